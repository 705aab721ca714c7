"""PSD (progressive self-distillation, from data): the velocity-space split residual at the exact map of the
mixture against a 1e-2 perturbation (spec: 1.3e-8 vs 2.5e-3); the split rows' loss and gradient vanish at the
exact map and not away; a gradient step moves toward the exact map; the diagonal rows' expected gradient at v*
with e - x drawn from p(x | x_t) is zero, with and without the learned weight (it depends on the times only:
no shift); the learned weight's form e^-w l + w (its minimum at w = log l) and w(t, s) = g(t) + g(s); the time
laws by quantiles and floor(p B) diagonal rows; the split point's law (h ~ U(0, 1) or 1/2) and its weights;
the target detached, from the net passed, in eval mode; the loop's target = the online net (the EMA with
--ema-target), the weight head trained and checkpointed but not EMA'd; the sampler exact on the oracle at 2
steps; bad flags."""
import dataclasses
import os
from unittest import mock

import pytest
import torch

from common.data import default_gmm
from conftest import ROOT, ks, load_method, read_all, run_here, run_inline

psd = load_method("psd")
SCRIPT = os.path.join(ROOT, "methods", "psd.py")
G = default_gmm()
NULL = G.num_classes
ARGS = psd.Args()


def exact(x_t, t, s, y, steps=20):
    return G.avg_velocity(x_t, t.double(), s.double(), y, steps=steps)


def perturbed(x_t, t, s, y, eps=1e-2, steps=20):
    # the spec's perturbation: vanishes at s = t, so the diagonal stays exact
    return exact(x_t, t, s, y, steps) + eps * ((t - s) * (1 + t))[:, None] * torch.sin(2 * x_t)


def rows(n, seed, nb=0):
    """Data, labels, times (the file's law, nb diagonal rows first), h ~ U(0, 1), x_t; float64."""
    gen = torch.Generator().manual_seed(seed)
    x, y = G.sample(n, gen)
    torch.manual_seed(seed)
    t, s = (a.double() for a in psd.sample_ts(n, nb, "cpu"))
    h = torch.rand(n, dtype=torch.float64, generator=gen)
    e = torch.randn(n, 2, dtype=torch.float64, generator=gen)
    return x, y, t, s, h, (1 - t[:, None]) * x + t[:, None] * e


def random_logvar(seed=0):
    lv = psd.LogVar().double()
    with torch.no_grad():
        lv.linear.weight.copy_(0.1 * torch.randn(lv.linear.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return lv


def test_split_residual_at_the_exact_map_and_at_a_perturbation():
    """The spec's numbers (float64, RK4 100 steps, B = 256, h ~ U(0, 1), our sign): 1.3e-8 vs 2.5e-3 rms."""
    x, y, t, s, h, x_t = rows(256, 0)
    y = torch.full_like(y, NULL)
    fine = lambda *a: exact(*a, steps=100)  # noqa: E731
    res = (fine(x_t, t, s, y) - psd.split_target(fine, x_t, t, s, 1 - h, y)).pow(2).mean().sqrt()
    res_p = (perturbed(x_t, t, s, y) - psd.split_target(perturbed, x_t, t, s, 1 - h, y)).pow(2).mean().sqrt()
    assert (t > s).all() and res < 1e-7, res  # measured 6.4e-9 (RK4 error of the oracle only)
    assert 2.0e-3 < res_p < 3.2e-3, res_p  # measured 2.6e-3


def test_split_loss_and_gradient_vanish_at_the_exact_map_and_not_away():
    x, y = G.sample(256, torch.Generator().manual_seed(1))
    args = dataclasses.replace(ARGS, boundary_p=0.0)
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    net = lambda x_t, t, s, y_: exact(x_t, t, s, y_, steps=60) + theta * torch.sin(2 * x_t) * (t - s)[:, None]  # noqa: E731
    lv = random_logvar()
    for value, small in ((0.0, True), (0.05, False)):
        theta.data.fill_(value)
        torch.manual_seed(0)
        loss, terms = psd.psd_loss(net, lv, net, x, y, args)
        grad = torch.autograd.grad(loss, theta)[0].abs()
        if small:  # loss_split: the unweighted mean; the weighted loss is then mean(w) alone
            assert terms["loss_split"] < 1e-12 and grad < 1e-6 and torch.isclose(loss, terms["logvar"].double()), (terms, grad)
        else:
            assert terms["loss_split"] > 1e-5 and grad > 1e-4, (terms, grad)


def test_a_gradient_step_moves_toward_the_exact_map():
    # u = u* + sum_k theta_k phi_k, every target from the same (online) net without grad, diagonal rows on e - x
    x, y = G.sample(2000, torch.Generator().manual_seed(4))
    phis = lambda x_t, t, s: [torch.sin(x_t), (torch.cos(2 * x_t) + 0.5) * (t - s)[:, None], x_t * t[:, None]]  # noqa: E731
    theta0 = torch.tensor([0.15, -0.1, 0.08], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    net = lambda x_t, t, s, y_: exact(x_t, t, s, y_, steps=8) + sum(a * p for a, p in zip(theta, phis(x_t, t.double(), s.double())))  # noqa: E731
    torch.manual_seed(5)
    loss, _ = psd.psd_loss(net, random_logvar(), net, x, y, ARGS)
    grad = torch.autograd.grad(loss, theta)[0]
    torch.manual_seed(5)  # the loss draws e, then the times (sample_ts), then h
    e = torch.randn_like(x)
    t, s = (a.double() for a in psd.sample_ts(2000, 1500, "cpu"))
    x_t = (1 - t[:, None]) * x + t[:, None] * e
    dist = lambda th: sum(a * p for a, p in zip(th, phis(x_t, t, s))).pow(2).sum(1).mean()  # noqa: E731
    d0, d1 = dist(theta0), dist(theta0 - 1e-2 * grad / grad.norm())
    assert d1 < d0 - 1e-3 * d0, (d0, d1, grad)


def posterior_gradients(shift, logvar, P=32, M=512):
    """The gradient of psd_loss (all rows diagonal) with respect to the network's output at u = v*(x_t, t) + shift,
    with (x, e) drawn from p(x, e | x_t) at P points, M draws each: z^2 per point and component (about 1 if the
    expected gradient is zero), averaged."""
    gen = torch.Generator().manual_seed(0)
    x0, _ = G.sample(P, gen)
    t0 = 0.05 + 0.9 * torch.rand(P, dtype=torch.float64, generator=gen)
    x_t0 = (1 - t0[:, None]) * x0 + t0[:, None] * torch.randn(P, 2, dtype=torch.float64, generator=gen)
    X, T = x_t0.repeat_interleave(M, 0), t0.repeat_interleave(M, 0)
    x = G.posterior_sample(X, T, gen)
    e = (X - (1 - T[:, None]) * x) / T[:, None]  # so that the loss rebuilds x_t = X
    out = torch.zeros(P * M, 2, dtype=torch.float64, requires_grad=True)
    v0 = G.velocity(x_t0, t0).repeat_interleave(M, 0)
    net = lambda z, t_, s_, y_: (v0 + shift + out)[: len(z)]  # noqa: E731 (the split target's calls get no rows)
    with mock.patch.object(psd, "sample_ts", lambda n, nb, d: (T, T)), mock.patch.object(torch, "randn_like", lambda z: e):
        loss, _ = psd.psd_loss(net, logvar, net, x, torch.full((P * M,), NULL), dataclasses.replace(ARGS, boundary_p=1.0))
    g = torch.autograd.grad(loss, out)[0].view(P, M, 2)
    return ((g.sum(1) / (g.std(1) * M**0.5)) ** 2).mean().item()


def test_diagonal_rows_on_posterior_tangents_have_zero_expected_gradient_at_the_exact_velocity():
    """From data, with the tangents training sees: at v* the expected gradient vanishes (z^2 ~ 1, Monte Carlo only), at
    v* + 0.3 it does not. With the learned weight (random, nonzero) no shift: e^-w(t, t) is one factor per time,
    the same for every draw at a point, so z^2 is the same number with and without it (measured 0.654 at v*, 115 at
    v* + 0.5, both ways: no shift). A per-row nonlinearity of the error (e.g. sqrt, an L2 norm) fails here."""
    lv = random_logvar(1)
    for logvar in (None, lv):
        at, off = posterior_gradients(0.0, logvar), posterior_gradients(0.5, logvar)
        assert at < 1.6 and off > 20, (logvar, at, off)


def test_learned_weight_form_and_its_fixed_point():
    """Per row e^-w l + w (EDM2's uncertainty weight): dL/dw = (1 - e^-w l) / B vanishes at w = log l; w(t, s) =
    g(t) + g(s) (symmetric; the diagonal 2 g(t)); zero at initialization."""
    x, y = G.sample(64, torch.Generator().manual_seed(2))
    args = dataclasses.replace(ARGS, boundary_p=0.5)
    w = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    loss, terms = psd.psd_loss(perturbed, lambda t, s: w, lambda *a: exact(*a, steps=4), x, y, args)
    gw = torch.autograd.grad(loss, w)[0]
    err = 1 - 64 * gw  # at w = 0: dL/dw_i = (1 - l_i) / B
    assert torch.isclose(err[:32].mean(), terms["loss_boundary"].double(), rtol=1e-9) and (err > 0).all()
    w2 = err.log().detach().requires_grad_(True)
    torch.manual_seed(0)
    loss2, _ = psd.psd_loss(perturbed, lambda t, s: w2, lambda *a: exact(*a, steps=4), x, y, args)
    assert torch.autograd.grad(loss2, w2)[0].abs().max() < 1e-10 and torch.isclose(loss2, (w2 + 1).mean())
    lv, a, b = random_logvar(3), torch.rand(50, dtype=torch.float64), torch.rand(50, dtype=torch.float64)
    g = lambda z: lv(z, z) / 2  # noqa: E731
    assert torch.allclose(lv(a, b), lv(b, a)) and torch.allclose(lv(a, b), g(a) + g(b), atol=1e-6)
    assert lv(a, b).std() > 1e-2 and psd.LogVar()(a, b).abs().max() == 0


def test_time_laws_by_quantiles_and_the_diagonal_fraction():
    torch.manual_seed(0)
    n, nb = 20000, 15000
    t, s = psd.sample_ts(n, nb, "cpu")
    assert torch.equal(t[:nb], s[:nb]) and (s[nb:] < t[nb:]).all()
    assert ks(t[:nb], lambda q: q) < 0.015  # diagonal: t ~ U(0, 1) (not the max of two draws)
    assert ks(t[nb:], lambda q: q**2) < 0.02 and ks(s[nb:], lambda q: 1 - (1 - q) ** 2) < 0.02  # the triangle
    seen = []
    net = lambda x_t, t_, s_, y_: seen.append(t_ == s_) or exact(x_t, t_, s_, y_, steps=4)  # noqa: E731
    x, y = G.sample(10, torch.Generator().manual_seed(8))
    psd.psd_loss(net, None, lambda *a: exact(*a, steps=4), x, y, ARGS)
    assert seen[0][:7].all() and not seen[0][7:].any()  # floor(0.75 x 10) = 7 diagonal rows, first


@pytest.mark.parametrize("split", ["uniform", "midpoint"])
def test_split_point_law_and_weights(split):
    """m = h t + (1 - h) s with h ~ U(0, 1) (PSD-U) or 1/2 (PSD-M); the target is l u(x_t, t, m) + (1 - l) u(x_m, m, s),
    l = 1 - h = (t - m) / (t - s), x_m = x_t - (t - m) u(x_t, t, m)."""
    calls = []

    def tnet(x_t, t, s, y):
        calls.append((x_t.clone(), t.clone(), s.clone()))
        return torch.stack([t, s], 1) + x_t  # distinguishable values for the two jumps

    n = 4000
    x, y = G.sample(n, torch.Generator().manual_seed(3))
    zero = lambda x_t, t, s, y_: torch.zeros_like(x_t)  # noqa: E731
    torch.manual_seed(0)
    _, terms = psd.psd_loss(zero, None, tnet, x, y, dataclasses.replace(ARGS, boundary_p=0.0, split=split))
    (x_t, t, m), (x_m, m2, s) = calls
    h = (m - s) / (t - s)
    assert torch.equal(m, m2) and (s < m).all() and (m < t).all()
    if split == "uniform":
        assert ks(h, lambda q: q) < 0.03
    else:
        assert torch.allclose(m, (t + s) / 2, atol=1e-7)
    u2 = torch.stack([t, m], 1) + x_t
    assert torch.allclose(x_m, x_t - (t - m)[:, None] * u2, atol=1e-5)
    u1 = torch.stack([m, s], 1) + x_m
    want = ((1 - h)[:, None] * u2 + h[:, None] * u1).pow(2).sum(1).mean()  # the loss of u = 0
    assert torch.isclose(terms["loss_split"], want, rtol=1e-4), (terms["loss_split"], want)


def test_target_is_detached_velocity_space_and_from_the_net_passed():
    """d loss / d theta = mean_i e^-w_i 2 (u_i - sg(target_i)) . phi_i: no (t - s)^2 (velocity space, not position
    space), no gradient through the target (which comes from the target net passed, here exact)."""
    x, y = G.sample(200, torch.Generator().manual_seed(6))
    args = dataclasses.replace(ARGS, boundary_p=0.25)
    theta = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    phi = lambda x_t, t, s: torch.sin(2 * x_t) * (1 + t.double())[:, None]  # noqa: E731
    net = lambda x_t, t, s, y_: exact(x_t, t, s, y_, steps=8) + theta * phi(x_t, t, s)  # noqa: E731
    lv = random_logvar(4)
    for target_net in (net, lambda *a: exact(*a, steps=8)):
        torch.manual_seed(0)
        loss, terms = psd.psd_loss(net, lv, target_net, x, y, args)
        grad = torch.autograd.grad(loss, theta)[0]
        torch.manual_seed(0)
        e = torch.randn_like(x)
        t, s = psd.sample_ts(200, 50, "cpu")  # float32, as the loss has them
        h = torch.rand(200)
        x_t = (1 - t[:, None]) * x + t[:, None] * e
        with torch.no_grad():
            tgt = torch.cat([(e - x)[:50], psd.split_target(target_net, x_t[50:], t[50:], s[50:], 1 - h[50:], y[50:])])
            u = net(x_t, t, s, y)
            want = (torch.exp(-lv(t, s))[:, None] * 2 * (u - tgt) * phi(x_t, t, s)).sum(1).mean()
        assert torch.isclose(grad, want, rtol=1e-9, atol=1e-12), (grad.item(), want.item(), (grad - want).item())
        split = (u - tgt).pow(2).sum(1)[50:].mean()
        assert torch.isclose(terms["loss_split"], split, rtol=1e-9), (terms["loss_split"], split)
    assert split > 1e-4  # with the exact target net the split rows still see the perturbation


def test_split_target_runs_the_current_net_in_eval_mode():
    class Net(torch.nn.Module):  # u = dropout(x): identity in eval mode
        def __init__(self):
            super().__init__()
            self.drop, self.seen = torch.nn.Dropout(0.5), []

        def forward(self, x_t, t, s, y):
            self.seen.append(self.training)
            return self.drop(x_t)

    net = Net().train()
    out = psd.split_target(net, torch.ones(8, 2), torch.ones(8), torch.zeros(8), torch.full((8,), 0.5), torch.zeros(8, dtype=torch.long))
    assert net.seen == [False, False] and net.training  # restored afterwards
    assert torch.equal(out, torch.full((8, 2), 0.75))  # u2 = 1, x_m = 0.5, u1 = 0.5: 0.5 u2 + 0.5 u1


def test_sampler_is_exact_on_the_oracle():
    e = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y = torch.full((100,), NULL)
    end = G.flow_map(e, 1.0, 0.0, y, steps=100)
    for k in (1, 2):
        assert (psd.sample(lambda *a: exact(*a, steps=50), e, y, k) - end).abs().max() < 1e-4, k  # RK4 error of the oracle (9e-6, 3e-15)
    # 2 steps go through t = 1/2 (a wrong grid would still land, but at another cost: check the calls)
    ts = []
    psd.sample(lambda x, t, s, y_: ts.append((t[0].item(), s[0].item())) or torch.zeros_like(x), e, y, 2)
    assert ts == [(1.0, 0.5), (0.5, 0.0)]


def test_low_diagonal_fraction_warns(capsys):
    psd.check_args(ARGS)
    assert capsys.readouterr().err == ""
    psd.check_args(dataclasses.replace(ARGS, boundary_p=0.3))
    err = capsys.readouterr().err.strip()
    assert "--boundary-p 0.3" in err and "collapse" in err and "\n" not in err


@pytest.mark.parametrize("flag,value", [("--boundary-p", 1.5), ("--split", "dyadic")])
def test_bad_flags(flag, value, tmp_path):
    proc = run_inline(SCRIPT, flag, value, "--out-dir", tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and f"{flag} {value}" in last, proc.stderr


@pytest.mark.parametrize("ema_target", [False, True])
def test_loop_targets_come_from_the_online_net_and_the_weight_head_trains(tmp_path, ema_target):
    """The split target's no-grad calls of the first training step (from its data batch to the first optimizer
    step) go to the online net (the code: teacher_params = the current params), to the EMA with --ema-target, never to
    the other one. The weight head: in the optimizer, moved by the step, in the checkpoint, not in the EMA/model."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from common.data import Loader
    from common.dit import MLP

    calls, started, stepped, forward, next_batch = [], [], [], MLP.forward, Loader.__next__

    def recording(self, *a, **k):
        if started and not stepped:
            calls.append((id(self), torch.is_grad_enabled()))
        return forward(self, *a, **k)

    def first_batch(self):
        started.append(1)
        return next_batch(self)

    handle = register_optimizer_step_post_hook(lambda *a: stepped.append(1))
    MLP.forward, Loader.__next__ = recording, first_batch
    try:
        g = run_here(SCRIPT, "--dataset", "gmm", "--steps", 1, "--batch-size", 32, "--hidden", 16, "--depth", 1,
                     "--eval-samples", 50, "--eval-steps", 1, "--out-dir", tmp_path, *(["--ema-target"] if ema_target else []))
    finally:
        MLP.forward, Loader.__next__ = forward, next_batch
        handle.remove()
    target, other = (g["ema"], g["net"]) if ema_target else (g["net"], g["ema"])
    no_grad = {i for i, grad in calls if not grad}
    assert id(target) in no_grad and id(other) not in no_grad, (ema_target, calls)
    lv = g["saved"]["logvar"]
    held = {id(p) for group in g["opt"].param_groups for p in group["params"]}
    assert id(lv.linear.weight) in held and lv.linear.weight.abs().max() > 0  # trained from its zero start
    run = tmp_path / "psd" / "gmm"
    ckpt, model = read_all(run / "ckpt.safetensors"), read_all(run / "model.safetensors")
    assert torch.equal(ckpt["/logvar/linear.weight"], lv.linear.weight.detach().cpu())
    assert not any("logvar" in k for k in model)
