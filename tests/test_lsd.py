"""LSD (methods/lsd.py) on the Gaussian-mixture oracle in float64: the Lagrangian residual vanishes at the
exact flow map and not at a perturbed one; the gradient through u and du/ds equals a finite difference with
the teacher held fixed (the stop-gradient); the loss and its gradient vanish at the exact map and a step
moves toward it. lsd.py and esd.py are one program with another off-diagonal residual (`diff` shows only
that), so the shared parts are tested here on BOTH files (parametrized): the row split and time laws, dropout
on the diagonal rows only, the learned log-variance weight (minimum at w = log l), the teacher being the
current weights of the loop (not the EMA), the diagonal rows' expected gradient on posterior tangents, the
sampler, bad input. ESD's own residual: tests/test_esd.py."""
import dataclasses
import json
import os
from unittest import mock

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from common.data import default_gmm, make_loader
from common.dit import MLP
from conftest import ROOT, ks, load_method, run_here, run_inline

SD = {m: load_method(m) for m in ("lsd", "esd")}
lsd = SD["lsd"]
G = default_gmm()
NULL = G.num_classes


def exact(x, t, s, y, steps=100):
    return G.avg_velocity(x, t, s, y, steps=steps)


def perturbed(eps, steps=100, phi=lambda x, t, s: (t - s)[:, None] * (1 + t[:, None]) * torch.sin(2 * x)):
    """u = u* + eps phi; the default phi (the spec's) vanishes at s = t, so the velocity (the teacher) stays exact."""
    return lambda x, t, s, y: exact(x, t, s, y, steps) + eps * phi(x, t, s)


def off_diagonal_batch(n, seed, method=lsd):
    """x_t with (t, s) by the method's off-diagonal law (every row), unconditional labels."""
    gen = torch.Generator().manual_seed(seed)
    x, _ = G.sample(n, gen)
    torch.manual_seed(seed)
    t, s = method.sample_times(n, 0, "cpu", torch.float64)
    return (1 - t[:, None]) * x + t[:, None] * torch.randn(x.shape, generator=gen, dtype=torch.float64), t, s, torch.full((n,), NULL)


def rms(r):
    return r.pow(2).sum(1).mean().sqrt().item()


def test_lagrangian_residual_vanishes_at_the_exact_map():
    # R = df_ds - v*(f, s), rms over rows of |R|. Measured (B 256, RK4 100 steps, seeds 0-3, CPU 1 thread): exact
    # 1.0e-7 - 2.5e-7 (ODE error: 200 steps give 16x less), 1e-2 perturbation 1.8e-2 - 2.0e-2 (spec: 3.7e-8 vs
    # 1.5e-2). Here, for time, B 64 and 25 steps: exact 1.1e-5 (ODE error), perturbed 1.7e-2
    x_t, t, s, y = off_diagonal_batch(64, 0)
    u_star, u_pert = (lambda *a: exact(*a, steps=25)), perturbed(1e-2, steps=25)
    r0, r1 = rms(lsd.residual(u_star, u_star, x_t, t, s, y)), rms(lsd.residual(u_pert, u_pert, x_t, t, s, y))
    assert r0 < 5e-5 and 5e-3 < r1 < 5e-2, (r0, r1)


class Recorded:
    """A teacher that is the live net (so a missing no_grad would pass its theta-dependence into the graph) while
    recording, and replays the recorded outputs (the stop-gradient: held fixed), their forward-mode tangents
    included (esd's spatial JVP), for the finite difference."""

    def __init__(self, net):
        self.net, self.outputs, self.replay = net, [], False

    def __call__(self, x, t, s, y):
        if self.replay:
            primal, tangent = self.outputs.pop(0)
            return primal if tangent is None else fwAD.make_dual(primal, tangent)
        out = self.net(x, t, s, y)
        primal, tangent = fwAD.unpack_dual(out)
        self.outputs.append((primal.detach(), None if tangent is None else tangent.detach()))
        return out


def loss_at(method, theta, teacher, n=48, seed=7, phi=lambda x, t, s: torch.sin(2 * x + s[:, None]) * (1 + t[:, None])):
    """The full loss for u = u* + theta phi (phi depends on t and s and not zero at s = t: the teacher and the
    tangent both carry theta), diagonal and off-diagonal rows, a non-constant weight w(t, s)."""
    net = lambda x, t, s, y: exact(x, t, s, y, steps=12) + theta * phi(x, t, s)  # noqa: E731
    x, y = G.sample(n, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    args = dataclasses.replace(method.Args(), diag_frac=0.5)
    return method.self_distillation_loss(net, teacher(net) if teacher else net, lambda t, s: 0.5 * t - 0.3 * s, x, y, args)


def gradient_equals_finite_difference(method):
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    holder = []
    loss, terms = loss_at(method, theta, lambda net: holder.append(Recorded(net)) or holder[0])
    g = torch.autograd.grad(loss, theta)[0].item()
    rec, fd, h = holder[0], 0.0, 1e-5
    outputs = list(rec.outputs)
    for sign in (1, -1):
        rec.outputs, rec.replay = list(outputs), True
        with torch.no_grad():
            fd += sign * loss_at(method, theta + sign * h, lambda net: rec)[0].item() / (2 * h)
    assert terms["mse_sd"] > 1e-3 and abs(g - fd) < 1e-7 * max(1.0, abs(fd)), (g, fd)


def test_gradient_through_u_and_du_ds_equals_finite_difference_with_the_teacher_fixed():
    gradient_equals_finite_difference(lsd)


def loss_and_gradient_vanish_at_the_exact_map(method):
    # phi vanishes at s = t: the diagonal rows (and the teacher) do not depend on theta, the gradient is the
    # off-diagonal term's alone; it is ~0 at theta = 0 and has the sign of theta away from it (a step moves
    # toward the exact map; measured g(+-0.3) = +-0.84 (lsd), +-0.68 (esd), g(0) 3.6e-5 / 1.3e-5, mse_sd(0) 1.4e-9 / 1.4e-10 (ODE error), n 48, seed 7)
    g, mse = {}, {}
    phi = lambda x, t, s: (t - s)[:, None] * (1 + t[:, None]) * torch.sin(2 * x)  # noqa: E731
    for theta0 in (0.0, 0.3, -0.3):
        theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
        loss, terms = loss_at(method, theta, None, phi=phi)
        g[theta0], mse[theta0] = torch.autograd.grad(loss, theta)[0].item(), terms["mse_sd"].item()
    assert mse[0.3] > 1e-2 and mse[0.0] < 1e-6 * mse[0.3] and abs(g[0.0]) < 1e-3 * g[0.3], (mse, g)  # RK4 12 steps: ODE error
    assert g[0.3] > 0.1 and g[-0.3] < -0.1, g
    return g


def test_loss_and_gradient_vanish_at_the_exact_map_and_a_step_moves_toward_it():
    loss_and_gradient_vanish_at_the_exact_map(lsd)


# ---------------------------------------------------------------- the shared program (lsd.py and esd.py)
class Rec(torch.nn.Module):
    """Records each call's rows, (t, s) primals, input and train/eval mode; returns a field with tangents in t and s."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, t, s, y):
        p = lambda a: fwAD.unpack_dual(a).primal.detach().clone()  # noqa: E731
        self.calls.append(dict(n=len(z), t=p(t), s=p(s), z=p(z), training=self.training))
        return 0.1 * z * (1 + t[:, None] - s[:, None])


@pytest.mark.parametrize("method", ["lsd", "esd"])
def test_rows_time_laws_and_dropout_modes_through_the_loss(method):
    # the FIRST max(1, floor(eta B)) rows: s = t ~ U(0, 1), FM on x_t of those rows, net in train mode (dropout on);
    # the rest: (t, s) = (max, min) of two U(0, 1) (t: CDF q^2, s: 1 - (1 - q)^2, t - s: 1 - (1 - g)^2), every
    # call there (JVP, teacher) in eval mode; the mode is restored after the loss
    m_ = SD[method]
    n = 4000
    net, x = Rec().train(), G.sample(n, torch.Generator().manual_seed(0))[0]
    e = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    with mock.patch.object(torch, "randn_like", lambda z: e):
        m_.self_distillation_loss(net, net, lambda t, s: 0 * t, x, torch.full((n,), NULL), m_.Args())
    fm, *rest = net.calls
    m = 3000
    assert fm["n"] == m and fm["training"] and torch.equal(fm["t"], fm["s"])
    assert torch.allclose(fm["z"], (1 - fm["t"][:, None]) * x[:m] + fm["t"][:, None] * e[:m])
    assert len(rest) == (2 if method == "lsd" else 3) and all(c["n"] == n - m and not c["training"] for c in rest) and net.training
    off = next(c for c in rest if not torch.equal(c["t"], c["s"]))
    t, s = off["t"], off["s"]
    assert (s < t).all() and torch.allclose(off["z"] if method == "esd" else rest[0]["z"], (1 - t[:, None]) * x[m:] + t[:, None] * e[m:])
    for sample, cdf in [(fm["t"], lambda q: q), (t, lambda q: q**2), (s, lambda q: 1 - (1 - q) ** 2), (t - s, lambda q: 1 - (1 - q) ** 2)]:
        assert ks(sample, cdf) < 1.63 / len(sample) ** 0.5, ks(sample, cdf)  # the 1% KS bound
    for size, eta, want in [(64, 0.75, 48), (3, 0.75, 2), (1, 0.75, 1), (10, 0.0, 1), (10, 1.0, 10)]:
        net.calls.clear()
        m_.self_distillation_loss(net, net, lambda t, s: 0 * t, x[:size], torch.full((size,), NULL), dataclasses.replace(m_.Args(), diag_frac=eta))
        assert net.calls[0]["n"] == want and all(c["n"] == size - want for c in net.calls[1:]), (size, eta)
        assert len(net.calls) == 1 if want == size else len(net.calls) > 1


@pytest.mark.parametrize("method", ["lsd", "esd"])
def test_log_variance_weight_has_its_minimum_at_log_l(method):
    # per-row w: d/dw (e^-w l + w) = 1 - e^-w l, zero at w = log l, the loss larger on both sides; the gradient
    # reaching the net's output is e^-w times the unweighted one (l is not detached from the net)
    m_ = SD[method]
    n = 40
    x, y = G.sample(n, torch.Generator().manual_seed(2))
    out = torch.zeros(n // 2, 2, dtype=torch.float64, requires_grad=True)  # added to the diagonal rows' output

    def run(W):
        W, calls = W.clone().requires_grad_(True), []

        def net(z, t, s, y_):  # the first call is the diagonal rows' (FM); u* + a perturbation off the diagonal
            calls.append(1)
            return exact(z, t, s, y_, steps=8) + 0.2 * (t - s)[:, None] * torch.cos(z) + (out if len(calls) == 1 else 0)

        torch.manual_seed(3)
        loss, _ = m_.self_distillation_loss(net, net, lambda t, s: W, x, y, dataclasses.replace(m_.Args(), diag_frac=0.5))
        gW, gout = torch.autograd.grad(loss, (W, out))
        return loss.item(), gW, gout

    _, g0, gout0 = run(torch.zeros(n, dtype=torch.float64))
    l = 1 - n * g0  # the rows' unweighted losses, read off the gradient at w = 0
    assert (l > 1e-8).all()
    W = l.log()
    L, gW, gout = run(W)
    assert gW.abs().max() < 1e-12, gW.abs().max()
    assert run(W + 0.2)[0] > L and run(W - 0.2)[0] > L
    assert torch.allclose(gout, gout0 * torch.exp(-W[:20, None]), rtol=1e-10, atol=1e-14)


def test_log_variance_head():
    # w(t, s): zero at the start, one value per row, a function of both times once trained (weights perturbed)
    head = lsd.LogVar(8).double()
    t, s = torch.tensor([0.9, 0.9, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.4, 0.1], dtype=torch.float64)
    assert torch.equal(head(t, s), torch.zeros(3, dtype=torch.float64))
    with torch.no_grad():
        head.linear.weight.normal_()
    w = head(t, s)
    assert w.shape == (3,) and abs(w[0] - w[1]) > 1e-3 and abs(w[0] - w[2]) > 1e-3


def flags(tmp_path):
    return ["--steps", 2, "--batch-size", 32, "--hidden", 16, "--depth", 2, "--lr", 3e-2, "--ema-decay", 0.9, "--log-every", 1,
            "--ckpt-every", 1, "--eval-every", 100, "--eval-samples", 100, "--eval-steps", 1, "--out-dir", tmp_path]


@pytest.mark.parametrize("method", ["lsd", "esd"])
def test_the_loop_uses_the_current_weights_as_teacher(method, tmp_path):
    # the logged loss of step 2 is reproduced from the step-1 checkpoint with teacher = the online net; with the EMA
    # (distinguishable: it differs from the net after step 1) as the teacher the loss differs
    from common.run import micro_seed

    m_ = SD[method]
    caps = []
    run_here(os.path.join(ROOT, "methods", f"{method}.py"), *flags(tmp_path), capture=caps)
    state = caps[0]
    assert state["step"] == 1
    nets = {}
    for k in ("net", "ema"):
        nets[k] = MLP(**{a: state["config"][a] for a in ("dim", "hidden", "depth", "num_classes", "n_cond", "dropout")})
        nets[k].load_state_dict(state[k])
    logvar = m_.LogVar(m_.Args().logvar_freqs)
    logvar.load_state_dict(state["logvar"])
    assert any(not torch.equal(a, b) for a, b in zip(nets["net"].state_dict().values(), nets["ema"].state_dict().values()))
    loader = make_loader("gmm", 32, 0)
    loader.load_state_dict(state["loader"])
    x, y = next(loader)
    rows = [json.loads(r) for r in (tmp_path / method / "gmm" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["loss"] for r in rows if r.get("step") == 2 and "loss" in r)
    got = {}
    for k in ("net", "ema"):
        torch.manual_seed(micro_seed(0, 1, 0))
        yk = torch.where(torch.rand(len(y)) < m_.Args().label_dropout, NULL, y)
        nets["net"].train()
        got[k] = m_.self_distillation_loss(nets["net"], nets[k], logvar, x, yk, m_.Args())[0].item()
    assert abs(got["net"] - logged) < 1e-6 * abs(logged) and abs(got["ema"] - logged) > 1e-4 * abs(logged), (got, logged)


@pytest.mark.parametrize("method", ["lsd", "esd"])
def test_diagonal_rows_on_posterior_tangents(method):
    """The diagonal rows regress u(x_t, t, t) on e - x with e - x drawn from p(x | x_t), weighted by e^-w(t, t): the
    weight depends on the times only, not on the row's residual (unlike meanflow.py's adaptive weight), so the
    expected gradient at u = v* is zero: the weighted-mean target minus v* per point (32 points x 1024 draws, seeds
    0-2, CPU 1 thread) has rms 0.041-0.064 against Monte Carlo noise 0.056-0.062, chi2 per dof 0.62-0.94 (no
    shift; meanflow.py's weight: rms 0.23-0.40). At u = v* + d (|d| = 0.3) it points along d on every point."""
    m_ = SD[method]
    P, M = 32, 1024
    gen = torch.Generator().manual_seed(0)
    x0, _ = G.sample(P, gen)
    t = torch.rand(P, generator=gen, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(P, 2, generator=gen, dtype=torch.float64)
    X, T = x_t.repeat_interleave(M, 0), t.repeat_interleave(M, 0)
    x = G.posterior_sample(X, T, gen)
    e = (X - (1 - T[:, None]) * x) / T[:, None]
    d = 0.3 * torch.nn.functional.normalize(torch.randn(P, 2, generator=gen, dtype=torch.float64), dim=1)
    out = torch.zeros(P * M, 2, dtype=torch.float64, requires_grad=True)
    w_fn = lambda t_, s_: 1.5 * t_ - 0.5  # noqa: E731 - a weight that varies with t

    def expected(shift):
        net = lambda z, t_, s_, y: G.velocity(z, t_) + shift.repeat_interleave(M, 0) + out  # noqa: E731
        with mock.patch.object(m_, "sample_times", lambda n, m, dev, dt: (T, T)), mock.patch.object(torch, "randn_like", lambda z: e):
            loss, _ = m_.self_distillation_loss(net, net, w_fn, x, torch.full((P * M,), NULL), dataclasses.replace(m_.Args(), diag_frac=1.0))
        g = torch.autograd.grad(loss, out)[0].view(P, M, 2)
        return g.mean(1), g.std(1) / M**0.5

    eg, se = expected(0 * d)
    chi2 = ((eg / se) ** 2).mean().item()
    assert chi2 < 2.0, chi2
    eg, _ = expected(d)
    assert ((eg * d).sum(1) > 0).all()


@pytest.mark.parametrize("method", ["lsd", "esd"])
def test_sampler_is_exact_at_two_steps_on_the_exact_map(method):
    e = torch.randn(100, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = G.sample(100, torch.Generator().manual_seed(10))[1]
    end = G.flow_map(e, 1.0, 0.0, y, steps=100)
    for k in (1, 2):
        assert (SD[method].sample(lambda *a: exact(*a, steps=100 // k), e, y, k) - end).abs().max() < 1e-6
    assert (SD[method].sample(lambda *a: G.velocity(a[0], a[1], a[3]), e, y, 2) - end).abs().max() > 1e-2  # velocity steps are not exact


@pytest.mark.parametrize("method,flags_,needle", [
    ("lsd", ["--diag-frac", 1.5], "--diag-frac 1.5"),
    ("esd", ["--diag-frac", -0.1], "--diag-frac -0.1"),
    ("lsd", ["--logvar-freqs", 0], "--logvar-freqs 0"),
    ("esd", ["--compile"], "--compile"),
])
def test_bad_input_gets_one_line(method, flags_, needle, tmp_path):
    proc = run_inline(os.path.join(ROOT, "methods", f"{method}.py"), *flags_, "--out-dir", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr
