"""Consistency Trajectory Models on the gmm oracle (float64): G(x_t, t, s) is CTM's (s/t) x_t + (1 - s/t) g
(and its EDM form); |est - tgt| vanishes at the exact map with the exact teacher trajectory and not off it; a
gradient step moves toward the exact map; the index laws (p(k) proportional to k, n and m uniform) by
frequencies; the estimate's outer jump is the frozen target net with the gradient through its input, the
target's inner jump the current weights under no_grad and its outer jump the target net (distinguishable
nets); dropout masks shared between the student's and the target's forwards; the teacher's Heun steps are
taken in t (not in sigma); DSM: the official EDM form, its time law by quantiles, its expected gradient
vanishing at the exact velocity, the adaptive weight against its definition; the gamma sampler (gamma 0:
flow-map steps, exact at 2 steps; the jump times; gamma > 0 re-noises to the right law); the target EMA
frozen and in train mode in a run; bad flags."""
import dataclasses
import math
import os

import pytest
import torch

from common.data import default_gmm
from common.dit import MLP
from common.eval import energy_distance
from conftest import ROOT, load_method, run_here, run_inline

ctm = load_method("ctm")
SCRIPT = os.path.join(ROOT, "methods", "ctm.py")
GMM = default_gmm()
NULL = GMM.num_classes
teacher_v = lambda x_t, t, y: GMM.velocity(x_t, t, y)
exact = lambda x_t, t, s, y: GMM.avg_velocity(x_t, t, s, y, steps=100)
exact20 = lambda x_t, t, s, y: GMM.avg_velocity(x_t, t, s, y, steps=20)
col = lambda t: t[:, None]


def batch(n=256, seed=0):
    x, y = GMM.sample(n, torch.Generator().manual_seed(seed))
    return x, torch.where(torch.arange(n) % 3 == 0, NULL, y)


def rows(n=256, seed=0, num_scales=18, k=3):
    """Rows (x_t, x', t, t', s) of the grid with the EXACT teacher trajectory x' = f*(x_t, t, t')."""
    x, y = batch(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    args = ctm.Args(num_scales=num_scales, k_max=num_scales - 1)
    ts = ctm.karras_ts(args, x)
    nn_ = torch.randint(0, num_scales - k, (n,), generator=g)
    m = nn_ + k + (torch.rand(n, generator=g, dtype=torch.float64) * (num_scales - nn_ - k)).long()
    t, t2, s = ts[nn_], ts[nn_ + k], ts[m]
    x_t = (1 - col(t)) * x + col(t) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x_t, GMM.flow_map(x_t, t, t2, y, steps=100), t, t2, s, y


def test_flow_map_is_ctm_parametrization():
    # our G = x_t - (t - s) u equals CTM's "euler" (s/t) x_t + (1 - s/t) g, g = x_t - t u (float64), and in EDM
    # variables (x_sigma = (1 + sigma) x_t) CTM's G_edm = (sigma_s/sigma_t) x_sigma + (1 - sigma_s/sigma_t) g = (1 + sigma_s) G
    x_t, _, t, _, s, y = rows(64)
    net = lambda z, a, b, y_: torch.sin(3 * z) + col(a) * z - col(b)  # any net
    G = ctm.jump(net, x_t, t, s, y)
    g = x_t - col(t) * net(x_t, t, s, y)
    assert (G - (col(s / t) * x_t + col(1 - s / t) * g)).abs().max() < 1e-14
    sig_t, sig_s = t / (1 - t), s / (1 - s)
    G_edm = col(sig_s / sig_t) * col(1 + sig_t) * x_t + col(1 - sig_s / sig_t) * g
    assert (G_edm - col(1 + sig_s) * G).abs().max() < 1e-13
    assert (G - x_t).abs().max() > 0.1  # the jump moves


def test_karras_grid_in_t():
    ts = ctm.karras_ts(ctm.Args(num_scales=40, k_max=39), torch.zeros(1, dtype=torch.float64))
    sigma = (80 ** (1 / 7) + torch.arange(40, dtype=torch.float64) / 39 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(ts, sigma / (1 + sigma), rtol=1e-12) and abs(ts[0] - 80 / 81) < 1e-12 and abs(ts[-1] - 0.002 / 1.002) < 1e-12


@pytest.mark.parametrize("k", [1, 4])
def test_loss_vanishes_at_the_exact_map_with_the_exact_trajectory(k):
    x_t, x2, t, t2, s, y = rows(128, k=k)
    pert = lambda z, a, b, y_: exact(z, a, b, y_) + 1e-2 * torch.sin(z)
    res = {}
    for name, f in [("exact", exact), ("pert", pert)]:
        est, tgt = ctm.ctm_pair(f, f, x_t, x2, t, t2, s, y, 0.0)
        res[name] = ((est - tgt).norm(dim=1) / (t - t2)).max().item()
    assert res["exact"] < 1e-5 and res["pert"] > 1e-2, res  # measured 4.7e-6 (RK4 100 steps) vs 0.13


def test_ctm_loss_end_to_end_small_at_exact_map():
    # the whole loss with the file's teacher (Heun in t on a fine grid), DSM off: small at u*, not off it
    x, y = batch(128)
    args = ctm.Args(num_scales=200, k_max=3, dsm_weight=0.0)
    pert = lambda z, a, b, y_: exact20(z, a, b, y_) + 1e-1 * torch.sin(z)
    out = []
    for f in (exact20, pert):
        torch.manual_seed(5)
        out.append(ctm.ctm_loss(f, f, teacher_v, x, y, args)[1]["ctm"].item())
    assert out[0] < 1e-2 * out[1] and out[1] > 1e-8, out  # measured 2.4e-10 (Heun error of steps < 0.01) vs 2.1e-7


def test_a_gradient_step_moves_toward_the_exact_map():
    # u = u* + sum_j theta_j phi_j on the student (the target net stays the exact map): distance on the estimate's rows
    x_t, x2, t, t2, s, y = rows(96, k=2)
    phis = lambda z, a, b: [torch.sin(z), torch.cos(2 * z) * col(a - b) + 0.3, z * col(a)]
    theta0 = torch.tensor([0.15, -0.1, 0.05], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    net = lambda z, a, b, y_: exact20(z, a, b, y_) + sum(c * p for c, p in zip(theta, phis(z, a, b)))
    est, tgt = ctm.ctm_pair(net, exact20, x_t, x2, t, t2, s, y, 0.0)
    loss = ((est - tgt) ** 2).flatten(1).mean(1).mean()
    grad = torch.autograd.grad(loss, theta)[0]
    dist = lambda th: sum(c * p for c, p in zip(th, phis(x_t, t, s))).pow(2).sum(1).mean()
    d0, d1 = dist(theta0), dist(theta0 - 1e-2 * grad / grad.norm())
    assert d1 < d0 - 1e-3 * d0, (d0, d1, grad)


def test_index_laws():
    N, K = 40, 39
    args = ctm.Args(num_scales=N, k_max=K)
    torch.manual_seed(0)
    ks = torch.tensor([ctm.sample_indices(1, args, "cpu")[0] for _ in range(10000)])
    p = torch.arange(1, K + 1, dtype=torch.float64) / (K * (K + 1) / 2)  # p(k) proportional to k
    freq = torch.bincount(ks, minlength=K + 1)[1:].double() / len(ks)
    z = (freq - p) / (p * (1 - p) / len(ks)).sqrt()
    assert ks.min() >= 1 and ks.max() <= K and z.abs().max() < 4.5, z
    mean_k = (p * torch.arange(1, K + 1)).sum()  # (2K + 1) / 3 = 26.33: the official 52.7 teacher calls at N = 40
    assert abs(mean_k - 79 / 3) < 1e-12 and abs(ks.double().mean() - mean_k) < 4 * ks.double().std() / len(ks) ** 0.5
    for k_max in (5, 1):  # k never above --k-max
        a = ctm.Args(num_scales=N, k_max=k_max)
        assert max(ctm.sample_indices(1, a, "cpu")[0] for _ in range(300)) == k_max
    B = 200000
    k, n, m = ctm.sample_indices(B, args, "cpu")
    assert n.min() == 0 and n.max() == N - 1 - k and (m >= n + k).all() and (m <= N - 1).all()
    cnt = torch.zeros(N, N, dtype=torch.float64)
    cnt.index_put_((n, m), torch.ones(B, dtype=torch.float64), accumulate=True)
    nn_, mm = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    p_nm = torch.where((nn_ <= N - 1 - k) & (mm >= nn_ + k), 1.0 / (N - k) / (N - nn_ - k).clamp(min=1), 0.0).double()
    z = (cnt - B * p_nm) / (B * p_nm).clamp(min=1).sqrt()  # n ~ U{0..N-1-k}, m | n ~ U{n+k..N-1}
    assert z.abs().max() < 5, (k, z.abs().max())


def test_loss_rows_lie_on_the_marginal_and_on_the_grid():
    # the student's inner forwards: (x', t', s) for the target (no grad), then (x_t, t, s) for the estimate (grad)
    n = 4000
    x, y = batch(n)
    seen = {}

    def net(z, a, b, y_):
        seen[torch.is_grad_enabled()] = (z.detach().clone(), a.clone(), b.clone())
        return 0.1 * z

    args = ctm.Args(dsm_weight=0.0)
    torch.manual_seed(2)
    terms = ctm.ctm_loss(net, lambda z, a, b, y_: 0.2 * z, teacher_v, x, y, args)[1]
    (x_t, t, s), (x2, t2, s2) = seen[True], seen[False]
    ts = ctm.karras_ts(args, x)
    i, i2, j = ((ts[None] - v[:, None]).abs().argmin(1) for v in (t, t2, s))
    assert torch.equal(ts[i], t) and torch.equal(ts[i2], t2) and torch.equal(ts[j], s) and torch.equal(s, s2)
    k = int(terms["k"])
    assert (i2 - i == k).all() and (j >= i2).all() and terms["teacher_calls"] == 2 * k
    e = (x_t - (1 - col(t)) * x) / col(t)  # x_t = (1 - t) x + t e with e ~ N(0, I) at the row's own t
    assert e.mean(0).abs().max() < 0.06 and (e.std(0) - 1).abs().max() < 0.05, (e.mean(0), e.std(0))
    assert torch.allclose(x2, ctm.heun(teacher_v, x_t, ts, i, k, y))  # the teacher's trajectory starts at x_t


class Lin(torch.nn.Module):
    """net(z, t, s, y) = w * z + c * (t - s): a parametrized net whose jumps the test can write by hand."""

    def __init__(self, w, c):
        super().__init__()
        self.w, self.c = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64)), torch.nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def forward(self, z, t, s, y):
        return self.w * z + self.c * col(t - s) + 0.1 * torch.sin(z) * self.w


def test_estimate_and_target_use_the_right_nets():
    x_t, x2, t, t2, s, y = rows(32, k=3)
    student, target = Lin(0.7, 0.2), Lin(-0.4, 0.5).requires_grad_(False)  # the target EMA: frozen
    est, tgt = ctm.ctm_pair(student, target, x_t, x2, t, t2, s, y, 0.0)
    G = lambda net, z, a, b: z - col(a - b) * net(z, a, b, y)
    zero = torch.zeros_like(s)
    want_est = G(target, G(student, x_t, t, s), s, zero)  # outer jump by the target net
    want_tgt = G(target, G(student, x2, t2, s), s, zero)  # inner: current weights; outer: the target net
    assert torch.allclose(est, want_est, atol=1e-13) and torch.allclose(tgt, want_tgt, atol=1e-13)
    assert (G(student, G(student, x_t, t, s), s, zero) - est).abs().max() > 1e-2  # the nets are distinguishable
    assert (G(target, G(target, x2, t2, s), s, zero) - tgt).abs().max() > 1e-2
    assert not tgt.requires_grad  # the target is under no_grad (the inner jump too)
    # the estimate's gradient reaches the student's weights THROUGH the target net's input
    gw = torch.autograd.grad(est.sum(), [student.w, student.c])
    inner = G(student, x_t, t, s).detach().requires_grad_(True)
    outer = G(target, inner, s, zero)
    dinner = torch.autograd.grad(outer.sum(), inner)[0]  # d outer / d input of the target net
    want = torch.autograd.grad((G(student, x_t, t, s) * dinner).sum(), [student.w, student.c])
    assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(gw, want)), (gw, want)
    assert (dinner - 1).abs().max() > 0.1  # the outer jump's Jacobian is not the identity
    assert target.w.grad is None and target.c.grad is None


def test_target_inner_jump_is_the_current_net_not_the_ema():
    # the target changes with the student's weights (current, no grad) and the estimate/target pair depends on both nets
    x_t, x2, t, t2, s, y = rows(32, k=3)
    target = Lin(-0.4, 0.5).requires_grad_(False)
    tgts = [ctm.ctm_pair(Lin(w, 0.2), target, x_t, x2, t, t2, s, y, 0.0)[1] for w in (0.7, 0.3)]
    assert (tgts[0] - tgts[1]).abs().max() > 1e-2
    student = Lin(0.7, 0.2)
    est, tgt = ctm.ctm_pair(student, target, x_t, x2, t, t2, s, y, 0.0)
    loss = ((est - tgt) ** 2).mean()
    g_full = torch.autograd.grad(loss, [student.w, student.c], retain_graph=True)
    g_est = torch.autograd.grad(((est - tgt.detach()) ** 2).mean(), [student.w, student.c])  # tgt is constant
    assert all(torch.allclose(a, b) for a, b in zip(g_full, g_est))


def test_dropout_masks_shared_between_student_and_target_forwards():
    calls = []

    def recorder(name):
        def net(z, a, b, y_):
            calls.append((name, torch.rand(()).item()))  # stands for the dropout masks of a forward
            return exact20(z, a, b, y_)
        return net

    x_t, x2, t, t2, s, y = rows(16, k=2)
    ctm.ctm_pair(recorder("net"), recorder("target"), x_t, x2, t, t2, s, y, 0.0)
    draws = {n: [d for m, d in calls if m == n] for n in ("net", "target")}
    assert len(draws["net"]) == 2 and draws["net"][0] == draws["net"][1], calls
    assert len(draws["target"]) == 2 and draws["target"][0] == draws["target"][1], calls
    # a real MLP with dropout in train mode: identical inputs give an identical estimate and target
    torch.manual_seed(0)
    net, tnet = MLP(2, 32, 2, NULL, 0, 0.5).double().train(), MLP(2, 32, 2, NULL, 0, 0.5).double().train()
    for m in (net, tnet):
        torch.nn.init.normal_(m.out[1].weight, std=0.3)
    est, tgt = ctm.ctm_pair(net, tnet, x_t, x_t, t, t, s, y, 0.0)
    assert (est - tgt).abs().max() < 1e-12 and (est - x_t).abs().max() > 1e-3


def test_teacher_heun_steps_are_in_t_not_sigma():
    # one grid step (N = 18) against the exact flow map: the Heun step in t (the file) is 9x closer (median)
    # than the official Heun step in sigma, dx_sigma/dsigma = (x_sigma - D) / sigma with D = x_t - t v
    x, y = batch(512)
    y = torch.full_like(y, NULL)
    args = ctm.Args()
    ts = ctm.karras_ts(args, x)
    n = torch.arange(512) % 17
    t, t2 = ts[n], ts[n + 1]
    torch.manual_seed(0)
    x_t = (1 - col(t)) * x + col(t) * torch.randn_like(x)
    ref = GMM.flow_map(x_t, t, t2, y, steps=100)

    def sigma_heun(z, a, b):
        sa, sb = a / (1 - a), b / (1 - b)
        d = lambda X, sg: (X - (X / col(1 + sg) - col(sg / (1 + sg)) * teacher_v(X / col(1 + sg), sg / (1 + sg), y))) / col(sg)
        X = z * col(1 + sa)
        d1 = d(X, sa)
        d2 = d(X + col(sb - sa) * d1, sb)
        return (X + col(sb - sa) * (d1 + d2) / 2) / col(1 + sb)

    err = (ctm.heun(teacher_v, x_t, ts, n, 1, y) - ref).norm(dim=1).median().item()
    err_sigma = (sigma_heun(x_t, t, t2) - ref).norm(dim=1).median().item()
    assert err < 1.5e-4 < 3e-4 < err_sigma, (err, err_sigma)  # measured 5.6e-5 vs 4.8e-4
    # k steps compose along the grid: 3 steps from t_n end at t_{n+3}, close to the exact trajectory
    n3 = torch.arange(512) % 10 + 2
    x_t3 = (1 - col(ts[n3])) * x + col(ts[n3]) * (x_t - (1 - col(t)) * x) / col(t)
    x3 = ctm.heun(teacher_v, x_t3, ts, n3, 3, y)
    x1 = x_t3
    for j in range(3):
        x1 = ctm.heun(teacher_v, x1, ts, n3 + j, 1, y)
    assert (x3 - x1).abs().max() < 1e-14
    assert (x3 - GMM.flow_map(x_t3, ts[n3], ts[n3 + 3], y, steps=100)).norm(dim=1).median() < 5e-3  # measured 1.9e-3


def test_dsm_time_law_by_quantiles():
    n = 40000
    args = ctm.Args()
    torch.manual_seed(0)
    t = ctm.dsm_ts(n, args, torch.zeros(1, dtype=torch.float64))
    ln = torch.logit(t[: n // 2])  # half: t ~ LN(-1.2, 1.2) (sigma ~ LogNormal(-1.2, 1.2))
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    normal_q = -1.2 + 1.2 * math.sqrt(2) * torch.erfinv(2 * qs - 1)
    assert (torch.quantile(ln, qs) - normal_q).abs().max() < 0.05
    sigma = t[n // 2:] / (1 - t[n // 2:])  # the rest: grid position u ~ U(0, 0.7) on the rho-grid (largest sigmas)
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    u = (sigma ** (1 / 7) - a) / (b - a)
    assert u.min() >= -1e-9 and u.max() <= 0.7 and (torch.quantile(u, qs) - 0.7 * qs).abs().max() < 0.01


def test_dsm_is_the_official_edm_form():
    # replay the draws (e, then the times) and compute (1/sigma^2 + 1/sigma_d^2) mean (g - x)^2 in EDM variables
    x, y = batch(64)
    args = ctm.Args(sigma_data=0.7)
    net = lambda z, a, b, y_: exact20(z, a, b, y_) + 0.2 * torch.sin(z)
    torch.manual_seed(3)
    got = ctm.dsm_loss(net, x, y, args)
    torch.manual_seed(3)
    e = torch.randn_like(x)
    t = ctm.dsm_ts(64, args, x)
    sigma = t / (1 - t)
    x_sigma = x + col(sigma) * e
    x_t = x_sigma / col(1 + sigma)
    g = x_t - col(t) * net(x_t, t, t, y)  # the denoiser g(x, sigma, sigma)
    want = ((1 / sigma**2 + 1 / 0.7**2) * ((g - x) ** 2).mean(1)).mean()
    assert abs(got - want) < 1e-10 * want, (got, want)


def test_dsm_expected_gradient_vanishes_at_the_exact_velocity():
    n = 20000
    x, y = GMM.sample(n, torch.Generator().manual_seed(7))
    y = torch.full_like(y, NULL)
    args = ctm.Args()
    grads = []
    for delta in (0.0, 0.5):
        theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(1)
        loss = ctm.dsm_loss(lambda z, a, b, y_: GMM.velocity(z, a, y_) + delta + theta, x, y, args)
        grads.append(torch.autograd.grad(loss, theta)[0])
    assert grads[0].abs().max() < 0.04 and (grads[1] > 0.3).all(), grads  # MC noise ~0.01; 2 E[w] delta / D ~ 0.5


def test_adaptive_weight_is_the_gradient_norm_ratio_on_the_last_layer():
    x, y = batch(64)
    torch.manual_seed(0)
    net, tnet = MLP(2, 32, 2, NULL).double(), MLP(2, 32, 2, NULL).double().requires_grad_(False)
    for m in (net, tnet):
        torch.nn.init.normal_(m.out[1].weight, std=0.3)
    W = net.out[1].weight
    base = ctm.Args(num_scales=10, k_max=3)
    run = lambda **kw: (torch.manual_seed(4), ctm.ctm_loss(net, tnet, teacher_v, x, y, dataclasses.replace(base, **kw), W))[1]
    g_ctm = torch.autograd.grad(run(dsm_weight=0.0)[0], W)[0]
    g_sum = torch.autograd.grad(run(adaptive_dsm=False)[0], W)[0]
    g_dsm = g_sum - g_ctm
    loss, terms = run(dsm_weight=0.5)
    lam = g_ctm.norm() / (g_dsm.norm() + 1e-4)
    assert abs(terms["dsm_lambda"] - lam) < 1e-9 * lam and abs(lam - 1) > 0.05, (terms["dsm_lambda"], lam)
    g = torch.autograd.grad(loss, W)[0]  # lambda is a constant in the gradient
    assert torch.allclose(g, g_ctm + 0.5 * lam * g_dsm, rtol=1e-8, atol=1e-12)
    assert terms["teacher_calls"] == 2 * terms["k"] and 1 <= terms["k"] <= 3


def test_gamma_sampler():
    e = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.full((2000,), NULL)
    e1, y1 = e[:256], y[:256]
    end = GMM.flow_map(e1, 1.0, 0.0, y1, steps=100)
    for k in (1, 2):  # gamma 0: exact flow-map steps compose to the ODE endpoint
        assert (ctm.sample(exact, e1, y1, k) - end).abs().max() < 1e-4
    biased = lambda z, a, b, y_: exact20(z, a, b, y_) + 0.3 * z
    x = e1
    for a, b in [(1.0, 0.5), (0.5, 0.0)]:  # gamma 0 = plain flow-map steps x <- x - (t_k - t_{k+1}) net
        x = x - (a - b) * biased(x, torch.full((256,), a, dtype=torch.float64), torch.full((256,), b, dtype=torch.float64), y1)
    assert (ctm.sample(biased, e1, y1, 2) - x).abs().max() < 1e-12
    calls = []

    def rec(z, a, b, y_):
        calls.append((a[0].item(), b[0].item()))
        return exact20(z, a, b, y_)

    torch.manual_seed(0)
    ctm.sample(rec, e[:8], y[:8], 4, gamma=0.6, t_min=0.01)  # jump to s = sqrt(1 - gamma^2)(t_{k+1} - t_min) + t_min
    grid = torch.linspace(1, 0.01, 5, dtype=torch.float64)
    want = [(grid[k].item(), 0.8 * (grid[k + 1].item() - 0.01) + 0.01) for k in range(4)]
    assert all(abs(a - c) < 1e-12 and abs(b - d) < 1e-12 for (a, b), (c, d) in zip(calls, want)), (calls, want)
    # re-noising: other points than the ODE's, the same law (the exact map on the oracle; RK4 with 10 steps)
    exact10 = lambda z, a, b, y_: GMM.avg_velocity(z, a, b, y_, steps=10)
    real = GMM.sample(2000, torch.Generator().manual_seed(4))[0]
    ode = ctm.sample(exact10, e, y, 2)
    mean, cov = GMM.moments()
    cov_half = 0.25 * cov + 0.25 * torch.eye(2, dtype=torch.float64)  # x_t at t = 0.5: (1 - t)^2 Cov[x] + t^2 I
    for gamma in (0.6, 1.0):
        inputs = []
        torch.manual_seed(0)
        x1 = ctm.sample(lambda z, a, b, y_: (inputs.append(z), exact10(z, a, b, y_))[1], e, y, 2, gamma=gamma)
        assert (x1 - ode).norm(dim=1).mean() > 0.2 and energy_distance(x1.float(), real.float()) < 0.006, gamma
        z = inputs[1]  # the second step's input: re-noised to the marginal at t = 0.5 (trace of the covariance, se ~0.04)
        assert (z.mean(0) - 0.5 * mean).abs().max() < 0.1 and abs(torch.cov(z.T).trace() - cov_half.trace()) < 0.12, (gamma, torch.cov(z.T))
    torch.manual_seed(0)
    biased10 = lambda z, a, b, y_: exact10(z, a, b, y_) + 0.3 * z
    assert energy_distance(ctm.sample(biased10, e, y, 2, gamma=1.0).float(), real.float()) > 0.02  # the check can fail


def test_target_ema_is_frozen_and_in_train_mode(tmp_path):
    g = run_here(SCRIPT, "--teacher", "oracle", "--steps", 2, "--batch-size", 16, "--hidden", 16, "--depth", 1, "--eval-every", 100,
                 "--eval-samples", 50, "--eval-steps", 1, "--log-every", 1, "--ema-target-decay", 0, "--out-dir", tmp_path)
    tgt, net = g["saved"]["ema_target"], g["saved"]["net"]
    assert tgt.training and not any(p.requires_grad or p.grad is not None for p in tgt.parameters())
    assert all(torch.equal(a, b) for a, b in zip(tgt.parameters(), net.parameters()))  # its own decay: 0 publishes the net
    assert g["last"] is list(net.parameters())[-2]  # the adaptive weight's layer: the output layer's weight (out[1].weight)
    assert tgt is not g["saved"]["ema"] and g["saved"]["ema"].training is False


@pytest.mark.parametrize("flags,needle", [(["--k-max", 18], "--k-max 18"), (["--num-scales", 1], "--num-scales 1"),
                                          (["--t-min", 0.01], "--t-min 0.01"), (["--sample-gamma", 1.5], "--sample-gamma 1.5"),
                                          (["--dsm-top", 0], "--dsm-top 0"), (["--ema-target-decay", 1], "--ema-target-decay 1")])
def test_bad_flags_get_one_line(flags, needle, tmp_path):
    proc = run_inline(SCRIPT, "--teacher", "oracle", *flags, "--out-dir", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]
