"""Align Your Flow: the EMD and LMD directions at the exact flow map of the gmm mixture (zero at
r = 1, a bias of order 1 - r below), the u- vs f-space gradients, dropout masks shared between the
JVP and the grad forward, the deterministic and gamma samplers, smoke runs, bad input (resume: tests/test_methods.py).
Direction (exact teacher): a gradient step from a perturbed map moves toward the exact map, and the autograd
gradient is the closed form 2 w g / B with g rebuilt by finite differences; the time laws by quantiles, the
s != t row fraction at 0.25, the guided teacher against v_u + w (v_c - v_u), the tangent warm-up rising."""
import copy
import dataclasses
import json
import os

import math

import pytest
import torch

from common.data import GMM as Mixture, default_gmm
from common.dit import MLP, save
from common.eval import energy_distance
from conftest import ROOT, load_method, read_all, run_inline, run_method
from test_methods import TINY, TINY_IMG

ayf = load_method("ayf")
SCRIPT = os.path.join(ROOT, "methods", "ayf.py")
GMM = default_gmm()
NULL = GMM.num_classes
teacher_v = lambda x_t, t, y: GMM.velocity(x_t, t, y)
exact = lambda x_t, t, s, y: GMM.avg_velocity(x_t, t, s, y, steps=100)
wrong = lambda x_t, t, s, y: exact(x_t, t, s, y) + 0.1 * torch.sin(x_t) * (t - s)[:, None]


exact20 = lambda x_t, t, s, y: GMM.avg_velocity(x_t, t, s, y, steps=20)  # a cheaper exact map (RK4, 20 steps)


def batch(n=256, seed=0):
    x, y = GMM.sample(n, torch.Generator().manual_seed(seed))  # float64 data: the oracle's precision
    return x, torch.where(torch.arange(n) % 3 == 0, NULL, y)  # conditional and unconditional rows


def g_norm(net, objective="emd", r=1.0, seed=1, **kw):
    x, y = batch()
    args = dataclasses.replace(ayf.Args(), objective=objective, ratio=0.75, **kw)
    torch.manual_seed(seed)
    return ayf.ayf_loss(net, teacher_v, x, y, r, args)[1]["g_norm"].item()


@pytest.mark.parametrize("objective", ["emd", "lmd"])
@pytest.mark.parametrize("time_dist", ["pair", "gap"])
def test_g_vanishes_at_the_exact_map(objective, time_dist):
    at, off = g_norm(exact, objective, time_dist=time_dist), g_norm(wrong, objective, time_dist=time_dist)
    assert at < 1e-6 and off > 1e-2, (at, off)


def test_emd_tangent_warmup_bias_is_of_order_one_minus_r():
    # g(r) = (u - v_T) + r (t - s) du_dt and at u* the r = 1 value vanishes, so g(r) = (1 - r)(u* - v_T)
    b99, b90, b0 = (g_norm(exact, r=r) for r in (0.99, 0.9, 0.0))
    assert b99 > 1e-4, b99  # the fixed point at r < 1 is NOT the exact map
    assert abs(b99 / b90 - 0.1) < 1e-3 and abs(b99 / b0 - 0.01) < 1e-4, (b99, b90, b0)


def test_f_space_adds_a_t_minus_s_weight():
    x, y = batch(64)
    grads = {}
    for space in ("u", "f"):
        theta = torch.zeros(64, 2, dtype=torch.float64, requires_grad=True)
        args = dataclasses.replace(ayf.Args(), space=space, ratio=1.0)
        torch.manual_seed(2)
        loss, _ = ayf.ayf_loss(lambda x_t, t, s, y_: wrong(x_t, t, s, y_) + theta, teacher_v, x, y, 1.0, args)
        grads[space] = torch.autograd.grad(loss, theta)[0]
    torch.manual_seed(2)
    torch.randn_like(x)  # the loss draws e first, then the times
    t, s = ayf.sample_ts(64, dataclasses.replace(ayf.Args(), ratio=1.0), x)
    assert torch.allclose(grads["f"], (t - s)[:, None] * grads["u"], rtol=1e-9, atol=1e-12)
    assert grads["u"].norm(dim=1).mean() > 1e-3 and (grads["u"].norm(dim=1) > 0).all()  # 2 w g / B with g != 0


def test_jvp_and_grad_forward_share_dropout_masks():
    draws = []

    def net(x_t, t, s, y):
        draws.append(torch.rand(()).item())  # stands for the dropout masks of a forward
        return exact(x_t, t, s, y)

    for objective in ("emd", "lmd"):
        draws.clear()
        g_norm(net, objective)
        assert len(draws) == 2 and draws[0] == draws[1], draws


def test_samplers_deterministic_and_gamma():
    n = 2000
    e = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.full((n,), NULL)
    end = GMM.flow_map(e, 1.0, 0.0, y, steps=200)
    for k in (1, 2, 4):  # exact flow-map steps compose to the ODE endpoint
        assert (ayf.sample(exact, e, y, k) - end).abs().max() < 1e-4  # RK4 error of the oracle
    real = GMM.sample(n, torch.Generator().manual_seed(4))[0]
    assert energy_distance(end.float(), real.float()) < 0.006
    for gamma in (0.5, 1.0):  # jump to (1 - gamma) t_{k+1} and re-noise: other points, the same law
        torch.manual_seed(0)
        x1 = ayf.sample(exact, e, y, 4, gamma=gamma)
        assert (x1 - end).norm(dim=1).mean() > 0.2 and energy_distance(x1.float(), real.float()) < 0.006, gamma
    shrunk = ayf.sample(lambda x_t, t, s, y_: exact(x_t, t, s, y_) + 0.3 * x_t, e, y, 4, gamma=1.0)  # a biased map
    assert energy_distance(shrunk.float(), real.float()) > 0.02  # the check can fail


def replay(x, args, seed):
    """The e, t, s that ayf_loss draws after torch.manual_seed(seed) (e first, then the times)."""
    torch.manual_seed(seed)
    e = torch.randn_like(x)
    t, s = ayf.sample_ts(len(x), args, x)
    return t, s, (1 - ayf.bc(t, x)) * x + ayf.bc(t, x) * e


@pytest.mark.parametrize("objective,tangent_grad", [("emd", False), ("lmd", False), ("emd", True), ("lmd", True)])
def test_a_gradient_step_moves_toward_the_exact_map(objective, tangent_grad):
    # u = u* + sum_k theta_k phi_k: the distance to the exact map is mean ||sum theta_k phi_k||^2 on the same rows
    x, y = batch(96)
    args = dataclasses.replace(ayf.Args(), objective=objective, ratio=0.75, tangent_grad=tangent_grad)
    phis = lambda x_t, t, s: [torch.sin(x_t), torch.cos(2 * x_t) * (t - s)[:, None] + 0.3, x_t * t[:, None]]
    theta0 = torch.tensor([0.15, -0.1, 0.05], dtype=torch.float64)
    t, s, x_t = replay(x, args, 3)
    dist = lambda th: sum(a * p for a, p in zip(th, phis(x_t, t, s))).pow(2).sum(1).mean()
    theta = theta0.clone().requires_grad_(True)
    net = lambda x_t_, t_, s_, y_: exact20(x_t_, t_, s_, y_) + sum(a * p for a, p in zip(theta, phis(x_t_, t_, s_)))
    torch.manual_seed(3)
    loss, _ = ayf.ayf_loss(net, teacher_v, x, y, 1.0, args)
    grad = torch.autograd.grad(loss, theta)[0]
    d0, d1 = dist(theta0), dist(theta0 - 1e-2 * grad / grad.norm())
    assert d1 < d0 - 1e-4 * d0, (d0, d1, grad)
    torch.manual_seed(3)  # the loss vanishes at the exact map and not away from it
    at = ayf.ayf_loss(exact20, teacher_v, x, y, 1.0, args)[0]
    assert at < 1e-6 and loss > 1e-2, (at, loss)  # at: the 20-step RK4 error of the map


@pytest.mark.parametrize("objective,space,norm_dim", [("emd", "u", False), ("lmd", "u", True), ("emd", "f", True)])
def test_gradient_is_the_closed_form_2wg_over_B(objective, space, norm_dim):
    # g rebuilt here from its definition with central differences of the (deterministic RK4) map; the normalized step
    # w g, w = 1 / (||g|| + c), enters the gradient as 2 w g / B (times (t - s) in f-space): sign, weight, r, c, sqrt(D)
    n, r, c, h = 48, 0.6, 0.05, 1e-5
    x, y = batch(n, seed=4)
    args = dataclasses.replace(ayf.Args(), objective=objective, space=space, norm_dim=norm_dim, norm_eps=c, ratio=0.75)
    base = lambda x_t, t, s, y_: exact20(x_t, t, s, y_) + 0.2 * torch.sin(3 * x_t) * (t - s)[:, None] + 0.1 * x_t
    theta = torch.zeros(n, 2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    loss, terms = ayf.ayf_loss(lambda *a: base(*a) + theta, teacher_v, x, y, r, args)
    grad = torch.autograd.grad(loss, theta)[0]
    t, s, x_t = replay(x, args, 7)
    u, gap = base(x_t, t, s, y), (t - s)[:, None]
    if objective == "emd":  # d/dt along the teacher flow, s fixed
        v = teacher_v(x_t, t, y)
        du = (base(x_t + h * v, t + h, s, y) - base(x_t - h * v, t - h, s, y)) / (2 * h)
        g = (u - v) + r * gap * du
    else:  # d/ds
        du = (base(x_t, t, s + h, y) - base(x_t, t, s - h, y)) / (2 * h)
        g = (u - gap * du) - teacher_v(x_t - gap * u, s, y)
    g = g / math.sqrt(2) if norm_dim else g
    want = 2 * g / (g.norm(dim=1, keepdim=True) + c) / n * (gap if space == "f" else 1)
    assert (t > s).sum() == 36 and grad.abs().max() > 1e-3
    assert torch.allclose(grad, want, rtol=1e-6, atol=1e-9 * want.abs().max()), (grad - want).abs().max()


def test_time_laws_by_quantiles_and_the_row_fraction():
    n = 20000
    like = torch.zeros(1, dtype=torch.float64)
    ln_cdf = lambda q, mu, sig: 0.5 * (1 + torch.erf((torch.logit(q) - mu) / (sig * math.sqrt(2))))  # logit-normal CDF
    qs = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64)
    args = dataclasses.replace(ayf.Args(), time_mu=-0.5, time_sigma=1.2, t_eps=0.01, ratio=0.25)
    torch.manual_seed(0)
    t, s = ayf.sample_ts(n, args, like)
    m = n - round(0.25 * n)  # s = t on the first rows, s < t on a fraction `ratio` of them
    assert torch.equal(t[:m], s[:m]) and (s[m:] < t[m:]).all() and (s >= 0.01).all() and (t <= 0.99).all()
    F = ln_cdf(qs, -0.5, 1.2)  # pair: t = max, s = min of two draws: CDFs F^2 and 1 - (1 - F)^2
    for got, want in [((t[m:, None] <= qs).double().mean(0), F**2), ((s[m:, None] <= qs).double().mean(0), 1 - (1 - F) ** 2),
                      ((t[:m, None] <= qs).double().mean(0), F**2)]:
        assert (got - want).abs().max() < 0.02, (got, want)
    args = dataclasses.replace(args, time_dist="gap", gap_mu=0.3, gap_sigma=0.8, ratio=1.0)
    t, s = ayf.sample_ts(n, args, like)  # gap: d = t - s logit-normal, s uniform on [0, 1 - d]
    d = t - s
    assert ((d[:, None] <= qs).double().mean(0) - ln_cdf(qs, 0.3, 0.8)).abs().max() < 0.02
    assert (((s / (1 - d))[:, None] <= qs).double().mean(0) - qs).abs().max() < 0.02 and (t <= 1).all()


def test_guided_teacher_is_v_u_plus_w_times_v_c_minus_v_u():
    x, y = batch(64)
    t = torch.linspace(0.01, 0.99, 64, dtype=torch.float64)
    args = dataclasses.replace(ayf.Args(), teacher_cfg=2.5, cfg_t_min=0.3, cfg_t_max=0.7)
    oracle = lambda x_t, t_, s_, y_: GMM.velocity(x_t, t_, y_)
    v_c, v_u = GMM.velocity(x, t, y), GMM.velocity(x, t, torch.full_like(y, NULL))
    inside = ((t >= 0.3) & (t <= 0.7))[:, None]
    want = torch.where(inside, v_u + 2.5 * (v_c - v_u), v_c)  # plain conditional outside the interval
    assert torch.allclose(ayf.guided(oracle, x, t, y, NULL, args), want, atol=1e-12)
    weak_mix = Mixture(GMM.means * 0.8, GMM.sigmas, GMM.weights)  # autoguidance: v_weak + w (v_T - v_weak)
    weak = lambda x_t, t_, s_, y_: weak_mix.velocity(x_t, t_, y_)
    v_w = weak_mix.velocity(x, t, y)
    assert torch.allclose(ayf.guided(oracle, x, t, y, NULL, args, weak), torch.where(inside, v_w + 2.5 * (v_c - v_w), v_c), atol=1e-12)
    assert (want - v_c).abs().max() > 0.1  # guidance does something here


def check_run(run, key):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] in (4, 6) and all(k in summary["final"] for k in [key, "loss", "g_norm", "w", "r", "grad_norm"])
    assert (run / "samples.png").stat().st_size > 1000 and (run / "model.safetensors").exists()
    assert {k.split("/")[1] for k in read_all(run / "ckpt.safetensors")} >= {"net", "ema", "opt"}


def test_smoke_mnist_lmd_and_gamma(tiny_teacher, tmp_path):
    run_method(SCRIPT, *TINY, *TINY_IMG, "--teacher", tiny_teacher, "--teacher-cfg", 2.0, "--dropout", 0.1, "--dataset", "mnist",
               "--out-dir", tmp_path)
    check_run(tmp_path / "ayf" / "mnist", "fid@1")
    run_method(SCRIPT, *TINY, "--teacher", "oracle", "--objective", "lmd", "--tangent-grad", "--space", "f", "--time-dist", "gap",
               "--sample-gamma", 1.0, "--norm-dim", "--tangent-warmup", 8, "--r-max", 0.9, "--log-every", 1, "--out-dir", tmp_path / "lmd")
    check_run(tmp_path / "lmd" / "ayf" / "gmm", "fm_err@1")
    rows = [json.loads(r) for r in (tmp_path / "lmd" / "ayf" / "gmm" / "metrics.jsonl").read_text().splitlines()]
    r = [row["r"] for row in rows if "r" in row]  # the tangent weight rises linearly from 0 to r_max over --tangent-warmup
    assert r == pytest.approx([0.9 * k / 8 for k in (1, 2, 3, 4)], rel=1e-6), r


def test_bad_teacher_gets_one_line(tiny_teacher, tmp_path):
    other_shape = tmp_path / "gmm3d.safetensors"
    save(MLP(3, 16, 1, NULL), str(other_shape), dataset="gmm")
    for flags, needle in [(["--teacher", tiny_teacher], "not on --dataset gmm"), (["--teacher", other_shape], "expected (2,)"),
                          (["--teacher", tmp_path / "missing.safetensors"], "--teacher"), (["--objective", "cm"], "--objective cm")]:
        proc = run_inline(SCRIPT, *flags, "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (flags, proc.stderr[-2000:])
        assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]


@pytest.mark.parametrize("field,value,needle", [("r_max", 1.5, "--r-max 1.5"), ("r_max", -0.1, "--r-max -0.1"),
                                                ("objective", "both", "--objective both"), ("space", "x", "--space x"),
                                                ("time_dist", "uniform", "--time-dist uniform"), ("norm_eps", 0.0, "--norm-eps 0.0"),
                                                ("tangent_warmup", -1, "--tangent-warmup -1"), ("sample_gamma", 2.0, "--sample-gamma 2.0")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        ayf.check_args(dataclasses.replace(ayf.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- --tangent-grad: Boffi et al.'s EMD / LMD (no stop-gradient)
PHIS = lambda x_t, t, s: [torch.sin(2 * x_t + s[:, None]), torch.cos(x_t) * (1 + t[:, None]) * (t - s)[:, None], x_t * (s * t)[:, None]]


def residual(net, x_t, t, s, y, r, objective, teacher_v=teacher_v):
    """g rebuilt here with torch.func.jvp (not the file's dual numbers), no stop-gradient anywhere: EMD (28)
    -d/dt f along (v_T, 1) with the tangent weight r; LMD (26) d/ds f - v_T(f, s)."""
    gap = ayf.bc(t - s, x_t)
    if objective == "emd":
        v = teacher_v(x_t, t, y)
        u, du = torch.func.jvp(lambda z, t_: net(z, t_, s, y), (x_t, t), (v, torch.ones_like(t)))
        return (u - v) + r * gap * du
    u, du = torch.func.jvp(lambda s_: net(x_t, t, s_, y), (s,), (torch.ones_like(s),))
    return (u - gap * du) - teacher_v(x_t - gap * u, s, y)


@pytest.mark.parametrize("objective", ["emd", "lmd"])
def test_tangent_grad_loss_and_gradient_vanish_at_the_exact_map(objective):
    x, y = batch(64, seed=5)
    args = dataclasses.replace(ayf.Args(), objective=objective, ratio=0.75, tangent_grad=True)
    out = []
    for eps in (0.0, 1e-2):  # the exact map, then the spec's 1e-2 perturbation (t - s)(1 + t) sin(2 x)
        theta = torch.tensor([eps, 0.0], dtype=torch.float64, requires_grad=True)
        bump = lambda x_t, t, s: (t - s)[:, None] * (theta[0] * (1 + t[:, None]) * torch.sin(2 * x_t) + theta[1] * x_t)
        net = lambda x_t, t, s, y_: GMM.avg_velocity(x_t, t, s, y_, steps=40) + bump(x_t, t, s)
        torch.manual_seed(6)
        loss, terms = ayf.ayf_loss(net, teacher_v, x, y, 1.0, args)
        out.append((loss.item(), torch.autograd.grad(loss, theta)[0].norm().item(), terms["g_norm"].item()))
    (l0, d0, g0), (l1, d1, g1) = out
    assert l0 < 1e-8 and d0 < 2e-5 and g0 < 1e-6, out  # the 40-step RK4 error of the oracle's map
    assert l1 > 1e-3 and d1 > 1e-2 and g1 > 5e-3, out


@pytest.mark.parametrize("objective,space,norm_dim,r", [("emd", "u", False, 0.6), ("lmd", "u", True, 1.0), ("lmd", "f", False, 1.0)])
def test_tangent_grad_is_the_gradient_of_the_unstopped_loss(objective, space, norm_dim, r):
    # With the flag the gradient must be that of L(theta) = mean_rows sg(w) ||g(theta)||^2 (/ sqrt(D) with --norm-dim, times
    # (t - s) in f-space) with nothing else stopped: through u, its JVP and (LMD) v_T's input f. The reference: autograd
    # through residual(), and central differences of L (w frozen at theta0). Without the flag the gradient drops the JVP (and
    # teacher) terms: it must differ, by far more than the tolerance. Any smooth field will do: no RK4 map, so it is fast.
    n, c, d = 48, 0.05, 1e-4
    x, y = batch(n, seed=8)
    args = dataclasses.replace(ayf.Args(), objective=objective, space=space, norm_dim=norm_dim, norm_eps=c, ratio=0.75)
    base = lambda x_t, t, s, y_: teacher_v(x_t, t, y_) * (1 + 0.3 * (t - s))[:, None] + 0.2 * torch.sin(3 * x_t) * (t - s)[:, None]
    netf = lambda th: lambda x_t, t, s, y_: base(x_t, t, s, y_) + sum(a * p for a, p in zip(th, PHIS(x_t, t, s)))
    theta0 = torch.tensor([0.1, -0.2, 0.15], dtype=torch.float64)
    grads = {}
    for tg in (False, True):
        theta = theta0.clone().requires_grad_(True)
        torch.manual_seed(9)
        loss, _ = ayf.ayf_loss(netf(theta), teacher_v, x, y, r, dataclasses.replace(args, tangent_grad=tg))
        grads[tg] = torch.autograd.grad(loss, theta)[0]
    t, s, x_t = replay(x, args, 9)
    scale = (t - s) if space == "f" else 1.0  # f-space: the u-space gradient times (t - s), row by row
    with torch.no_grad():
        w = 1 / (residual(netf(theta0), x_t, t, s, y, r, objective).norm(dim=1) / (math.sqrt(2) if norm_dim else 1) + c)
    L = lambda th: (w * scale * residual(netf(th), x_t, t, s, y, r, objective).pow(2).sum(1)).mean() / (math.sqrt(2) if norm_dim else 1)
    theta = theta0.clone().requires_grad_(True)
    ref = torch.autograd.grad(L(theta), theta)[0]
    with torch.no_grad():
        fd = torch.stack([(L(theta0 + d * e) - L(theta0 - d * e)) / (2 * d) for e in torch.eye(3, dtype=torch.float64)])
    assert (t > s).sum() == 36 and ref.norm() > 1e-2 and torch.allclose(ref, fd, rtol=1e-6, atol=1e-9), (ref, fd)
    assert torch.allclose(grads[True], ref, rtol=1e-9, atol=1e-12), (grads[True], ref)
    assert (grads[False] - ref).norm() > 0.05 * ref.norm(), (grads[False], ref)  # the flag does something, and it is this


def test_tangent_grad_is_one_call_of_the_net():
    # primal and tangent from ONE call on dual numbers (one set of dropout masks by construction); the tangent on
    # (x_t, t) for EMD, on s for LMD
    calls = []

    def net(x_t, t, s, y):
        calls.append(tuple(torch.autograd.forward_ad.unpack_dual(a).tangent is not None for a in (x_t, t, s)))
        return teacher_v(x_t, t, y) * (1 + (t - s))[:, None]

    x, y = batch(32)
    for objective, want in (("emd", (True, True, False)), ("lmd", (False, False, True))):
        calls.clear()
        ayf.ayf_loss(net, teacher_v, x, y, 1.0, dataclasses.replace(ayf.Args(), objective=objective, tangent_grad=True))
        assert calls == [want], (objective, calls)


def test_tangent_grad_through_a_dit():
    # the file's dual numbers through the DiT (attention's forward-AD rule and its backward, the teacher's backward to its
    # input) give the parameter gradient of the torch.func.jvp reference, float64, EMD and LMD
    import common.dit as dit

    torch.manual_seed(0)
    net = dit.DiT(8, 2, 2, 32, 2, 2, 4.0, 10).double()
    with torch.no_grad():  # adaLN-zero makes a fresh net output 0: give every weight a value
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher = copy.deepcopy(net).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tv = lambda x_t, t, y_: teacher(x_t, t, t, y_)
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.tensor([0, 3, 10, 7, 10, 1])
    params = list(net.parameters())
    for objective in ("emd", "lmd"):
        args = dataclasses.replace(ayf.Args(), objective=objective, tangent_grad=True, norm_eps=0.05)
        torch.manual_seed(1)
        loss, _ = ayf.ayf_loss(net, tv, x, y, 1.0, args)
        got = torch.autograd.grad(loss, params)
        t, s, x_t = replay(x, args, 1)
        g = residual(net, x_t, t, s, y, 1.0, objective, tv)
        w = 1 / (g.detach().flatten(1).norm(dim=1) + 0.05)
        want = torch.autograd.grad((w * g.pow(2).flatten(1).sum(1)).mean(), params)
        err = max((a - b).abs().max() / b.abs().max() for a, b in zip(got, want) if b.abs().max() > 0)
        assert err < 1e-9 and loss > 1e-3, (objective, err)
