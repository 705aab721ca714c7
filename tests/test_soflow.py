"""SoFlow: MeanFlow with du/dt by an annealed finite difference of the current net. On the float64 mixture oracle:
the loss vanishes at the exact map up to the O(r) finite-difference bias and not at a 1e-2 perturbation; the
official difference quotient is exactly meanflow's residual with the finite difference; with the conditional velocity
e - x the bias is heavy-tailed; the gap schedule, the time law, the guidance decay, the weight from data, and both
samplers (consistency and flow map)."""
import dataclasses
import math
from unittest import mock

import pytest
import torch

from common.data import default_gmm
from common.eval import energy_distance
from conftest import ks, load_method, run_here, run_inline, taylor_exact

sf = load_method("soflow")
G = default_gmm()
NULL = G.num_classes
f64 = torch.float64


def exact(x_t, t, s, y, steps=40):
    return G.avg_velocity(x_t, t, s, y, steps=steps)


def bump(x_t, t, s):
    """The spec's test direction (t - s)(1 + t) sin(2x): zero at s = t, so the s = t rows stay exact."""
    return (t - s)[:, None] * (1 + t[:, None]) * torch.sin(2 * x_t)


def at_r(r, **kw):
    """Args with a constant gap ratio r (r0 = r1 = r)."""
    return dataclasses.replace(sf.Args(), fd_r0=r, fd_r1=r, **kw)


def points(n, seed, r, ratio=1.0, **kw):
    """x, x_t and (t, s, l) by the method's law at gap ratio r, in float64."""
    gen = torch.Generator().manual_seed(seed)
    x, _ = G.sample(n, gen)
    torch.manual_seed(seed)
    t, s, l = sf.sample_ts(n, round(ratio * n), r, at_r(r, **kw), x)
    return x, (1 - t[:, None]) * x + t[:, None] * torch.randn(n, 2, generator=gen, dtype=f64), t, s, l


v_star_target = lambda net, x_t, t, v, y, null, args: G.velocity(x_t, t)  # noqa: E731 - the marginal v* in place of e - x


def test_loss_and_gradient_vanish_at_the_exact_map_within_the_fd_bias():
    # soflow_loss itself with v* in place of e - x (no sampling noise), r = 1e-3, u = u* + theta (t - s)(1 + t) sin(2x):
    # at theta = 0 the consistency residual is the O(r) bias (measured rms 1e-3) and the s = t rows are exact; at the
    # spec's perturbation theta = 1e-2 both the residual and the gradient are many times larger
    theta = torch.zeros((), dtype=f64, requires_grad=True)
    net = lambda x_t, t, s, y: exact(x_t, t, s, y) + theta * bump(x_t, t, s)  # noqa: E731
    x, _ = G.sample(1000, torch.Generator().manual_seed(0))
    out = {}
    with mock.patch.object(sf, "guided_velocity", v_star_target):
        for th in (0.0, 1e-2):
            theta.data.fill_(th)
            torch.manual_seed(0)
            loss, terms = sf.soflow_loss(net, x, torch.full((1000,), NULL), at_r(1e-3, ratio=0.5), NULL, 0)
            out[th] = terms["mse_fm"].item(), terms["mse_con"].sqrt().item(), torch.autograd.grad(loss, theta)[0].item()
    (fm0, rms0, g0), (fm1, rms1, g1) = out[0.0], out[1e-2]
    assert fm0 < 1e-14 and fm1 < 1e-14  # the bump is zero at s = t: flow-matching rows exact (ODE error only)
    assert rms0 < 3e-3 and rms1 > 5 * rms0, (rms0, rms1)
    assert g1 > 5 * abs(g0), (g0, g1)


def test_the_difference_quotient_is_meanflows_residual_with_a_finite_difference():
    # official D = (f(x_t, t, s) - sg f(x_l, l, s)) / (t - l), f = x - (t - s) u, x_l = x_t - (t - l) v, equals
    # u_tgt - u with u_tgt = v - (l - s) (u - u_l) / (t - l), for ANY net (here a perturbed exact map), to rounding
    net = lambda x_t, t, s, y: exact(x_t, t, s, y, steps=10) + 0.3 * bump(x_t, t, s) + 0.1 * torch.tanh(x_t)  # noqa: E731
    x, x_t, t, s, l = points(200, 1, 1e-2)
    y, v = torch.full((200,), NULL), torch.randn(200, 2, dtype=f64, generator=torch.Generator().manual_seed(2))
    u, u_tgt = sf.mean_velocity_and_target(net, x_t, t, s, l, y, v, 0, 0.0)
    f = lambda z, a, b: z - (a - b)[:, None] * net(z, a, b, y)  # noqa: E731
    D = (f(x_t, t, s) - f(x_t - (t - l)[:, None] * v, l, s)) / (t - l)[:, None]
    assert torch.allclose(u_tgt - u, D, rtol=0, atol=1e-9), (u_tgt - u - D).abs().max()
    free = (t - s) * 1e-2 > 1e-4  # the other rows have l = t - min_gap (official clamp; where s = t - min_gap, l = s)
    assert ((t - l) / (t - s) - 1e-2)[free].abs().max() < 1e-12 and torch.allclose(l[~free], t[~free] - 1e-4) and 0 < (~free).sum() < 100

    # as r -> 0 the target tends to meanflow's u_tgt = v* - (t - s) du/dt (the JVP with tangent (v*, 1)) at rate O(r)
    # (the same RK4 map in both; rows with t - s > 1e-3, as the map's JVP at a tiny t - s is rounding)
    errs, coarse = [], lambda x_t, t, s, y: exact(x_t, t, s, y, steps=12)  # noqa: E731
    for r in (1e-2, 1e-3, 1e-4):
        x, x_t, t, s, l = points(100, 3, r, min_gap=1e-12)
        keep = t - s > 1e-3
        x_t, t, s, l, y_ = x_t[keep], t[keep], s[keep], l[keep], y[:100][keep]
        v = G.velocity(x_t, t)
        _, tgt = sf.mean_velocity_and_target(coarse, x_t, t, s, l, y_, v, 0, 0.0)
        _, du_dt = torch.func.jvp(lambda z, t_: coarse(z, t_, s, y_), (x_t, t), (v, torch.ones_like(t)))
        errs.append((tgt - (v - (t - s)[:, None] * du_dt)).pow(2).sum(1).mean().sqrt().item())
    assert 7 < errs[0] / errs[1] < 13 and 7 < errs[1] / errs[2] < 13 and errs[1] < 3e-3, errs


def posterior_bias(r, tangent, P=64, M=32, seed=0, steps=16):
    """E[D | x_t] at the exact map per point (norm), D with v = e - x from p(x | x_t) ('conditional', control variate
    h J (v_n - v*), h = t - l) or v = v* ('marginal'); times by the method's law (ImageNet defaults, all rows s != t)."""
    x, x_t, t, s, l = points(P, seed, r)
    u = lambda z, a, b: G.avg_velocity(z, a, b, None, steps=steps)  # noqa: E731
    vs, h, k = G.velocity(x_t, t), (t - l)[:, None], ((l - s) / (t - l))[:, None]
    u_t = u(x_t, t, s)
    if tangent == "marginal":
        u_l = u(x_t - h * vs, l, s)
    else:
        rep = lambda z: z.repeat_interleave(M, 0)  # noqa: E731
        vn = (rep(x_t) - G.posterior_sample(rep(x_t), rep(t), torch.Generator().manual_seed(seed + 1))) / rep(t)[:, None]
        eye = torch.eye(2, dtype=f64)
        J = torch.stack([torch.func.jvp(lambda z: u(z, l, s), (x_t - h * vs,), (eye[i].expand_as(x_t),))[1] for i in range(2)], -1)
        u_l = (u(rep(x_t) - rep(h) * vn, rep(l), rep(s)) + rep(h) * torch.einsum("bij,bj->bi", rep(J), vn - rep(vs))).view(P, M, 2).mean(1)
    return (vs - u_t - k * (u_t - u_l)).norm(dim=1)


def test_the_fd_bias_is_heavy_tailed_with_the_conditional_velocity():
    """At the exact map, r = 1e-3: with v* the bias is O(r) on every row (light-tailed); with e - x averaged over the
    posterior it is carried by a few rows (long jumps across modes). Measured (P = 128, M = 64, RK4 100 steps, ImageNet
    laws, seeds 0-3; CPU, 1 thread): rms 0.022-0.67 against a median of 8e-4-1.1e-3 (rms / median 26-630); with t
    uniform in [0.1, 0.9], s uniform in [0, t]: rms 0.0095-0.11, median 2.2e-4-5.6e-4. Here P = 64, M = 32 (seed 0)."""
    marg, cond = posterior_bias(1e-3, "marginal"), posterior_bias(1e-3, "conditional")
    rms = lambda z: z.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(marg) < 3e-3 and rms(marg) < 5 * marg.median(), (rms(marg), marg.median())
    assert rms(cond) > 30 * cond.median() and cond.max() > 200 * cond.median(), (rms(cond), cond.median(), cond.max())
    assert cond.median() < 3 * marg.median()  # the typical row is fine


def test_the_gap_shrinks_from_r0_to_r1_over_training():
    # t - l = r (t - s), r = r0 (r1 / r0)^(step / steps): r0 at the start, the geometric mean halfway, r1 at the end
    # (CIFAR-10's r0 = 1, r1 = 3.125e-4); read through the loss from the net's no-grad call at (x_l, l, s)
    args = dataclasses.replace(sf.Args(), fd_r0=1.0, fd_r1=3.125e-4, steps=1000, ratio=1.0, min_gap=1e-12)
    assert sf.fd_ratio(0, args) == 1.0 and math.isclose(sf.fd_ratio(1000, args), 3.125e-4)
    assert math.isclose(sf.fd_ratio(500, args), (3.125e-4) ** 0.5) and sf.fd_ratio(999, args) < sf.fd_ratio(998, args)
    x, _ = G.sample(256, torch.Generator().manual_seed(4))
    for step, want in ((0, 1.0), (500, 3.125e-4**0.5), (999, 3.125e-4 ** (999 / 1000))):
        calls = []
        torch.manual_seed(step)
        sf.soflow_loss(lambda z, t_, s_, y: calls.append((z, t_, s_)) or 0 * z, x, torch.full((256,), NULL), args, NULL, step)
        (x_l, l, s), (x_t, t, _) = calls
        free = t - s > 1e-6  # (8% of the rows have s = t - min_gap by CIFAR-10's laws)
        assert torch.allclose(((t - l) / (t - s))[free], torch.full_like(t[free], want), rtol=1e-9, atol=0) and free.float().mean() > 0.8, step
        e = (x_t - (1 - t[:, None]) * x) / t[:, None]  # x_l is the interpolant at l on the same (x, e) line
        assert torch.allclose(x_l, (1 - l[:, None]) * x + l[:, None] * e, atol=1e-9)
    # the default (ImageNet) schedule: 0.1 -> 0.002
    d = sf.Args()
    assert (d.fd_r0, d.fd_r1) == (0.1, 0.002) and sf.fd_ratio(0, d) > sf.fd_ratio(d.steps - 1, d)


def test_the_fd_step_follows_the_guided_velocity_and_the_target_has_no_gradient():
    # x_l = x_t - (t - l) v_g with v_g the guided target (official v_t_masked), not e - x; u_tgt carries no gradient
    x, _ = G.sample(64, torch.Generator().manual_seed(8))
    theta = torch.tensor(0.2, dtype=f64, requires_grad=True)
    calls, seen, v_gs = [], [], []
    net = lambda z, t_, s_, y: calls.append((z, t_)) or exact(z, t_, s_, y, steps=4) + theta * bump(z, t_, s_)  # noqa: E731
    fake_guidance = lambda net_, x_t, t, v, y, null, a: v_gs.append(v + torch.sin(3 * x_t)) or v_gs[-1]  # noqa: E731
    orig = sf.mean_velocity_and_target
    with mock.patch.object(sf, "guided_velocity", fake_guidance), \
            mock.patch.object(sf, "mean_velocity_and_target", lambda *a: seen.append(orig(*a)) or seen[-1]):
        torch.manual_seed(0)
        sf.soflow_loss(net, x, torch.full((64,), NULL), at_r(0.1, ratio=0.5), NULL, 0)
    (x_l, l), (x_t, t) = calls
    assert torch.allclose(x_l, x_t[32:] - (t[32:] - l)[:, None] * v_gs[0][32:], atol=1e-12)
    assert seen[0][0].requires_grad and not seen[0][1].requires_grad


def test_independent_time_draws_by_quantiles():
    # s = t ~ LN(mu0, sig0) on the first rows; t ~ LN(mu2, sig2) and s = min(LN(mu1, sig1), t - min_gap) on the others
    # (independent draws, not meanflow's max / min of two); ~14% of the rows at s = t - min_gap with the ImageNet laws
    args, n = sf.Args(ratio=0.5), 8000
    torch.manual_seed(0)
    t, s, l = sf.sample_ts(n, n // 2, 0.1, args, torch.zeros(1, dtype=f64))
    (m0, m1, m2), (s0, s1, s2), gap = args.time_mu, args.time_sigma, args.min_gap
    phi = lambda q, m, sd: torch.distributions.Normal(0.0, 1.0).cdf((torch.logit(q.clamp(1e-12, 1 - 1e-12)) - m) / sd)  # noqa: E731
    fm, fd = slice(0, n // 2), slice(n // 2, n)
    assert torch.equal(t[fm], s[fm]) and torch.equal(t[fm], l[fm]) and (s[fd] < t[fd]).all() and (s[fd] <= l[fd]).all()
    for sample, cdf in [(t[fm], lambda q: phi(q, m0, s0)), (t[fd], lambda q: phi(q, m2, s2)),
                        (s[fd], lambda q: 1 - (1 - phi(q, m1, s1)) * (1 - phi(q + gap, m2, s2)))]:
        assert ks(sample, cdf) < 1.63 / len(sample) ** 0.5, ks(sample, cdf)  # the 1% KS bound
    q = torch.linspace(1e-6, 1 - 1e-6, 20001, dtype=f64)  # P(LN1 > t - gap) = int p_t(q) (1 - Phi1(q - gap)) dq
    dens = torch.diff(phi(q, m2, s2)) * (1 - phi(q[1:] - gap, m1, s1))
    clamped = ((t[fd] - s[fd]) <= gap * (1 + 1e-9)).double().mean().item()
    assert abs(clamped - dens.sum().item()) < 3 * (0.14 * 0.86 / (n // 2)) ** 0.5 and 0.1 < clamped < 0.18, (clamped, dens.sum())


def test_guidance_decay_and_its_fixed_point():
    # official ImageNet: W = 3, mix 0.25, decay from t = 0.8: v_g = mix (v + g (W - 1)(v - v_u)) + (1 - mix) v_c,
    # g = 1 - exp(-0.025 d / (1 - d)), d = (1 - t) / 0.2; our (w, k) = (mix W, 1 - mix)
    args = dataclasses.replace(sf.Args(), cfg_omega=0.75, cfg_kappa=0.75, cfg_decay_time=0.8)
    t = torch.tensor([0.0, 0.5, 0.8, 0.8 + 1e-9, 0.81, 0.9, 0.99, 1.0], dtype=f64)
    g = sf.guidance_decay(t, args)
    assert torch.equal(g[:3], torch.ones(3, dtype=f64)) and g[3] > 0.999 and g[-1] == 0 and (torch.diff(g[3:]) < 0).all()
    assert math.isclose(g[5].item(), 1 - math.exp(-0.025), rel_tol=1e-12)  # d = 1/2
    n = 400
    x, y = G.sample(n, torch.Generator().manual_seed(5))
    y[:50] = NULL
    tt = torch.rand(n, dtype=f64, generator=torch.Generator().manual_seed(6))
    x_t = (1 - tt[:, None]) * x + tt[:, None] * torch.randn(n, 2, dtype=f64, generator=torch.Generator().manual_seed(7))
    v = torch.randn_like(x)
    oracle = lambda z, t_, s_, y_: G.velocity(z, t_, y_)  # noqa: E731
    v_g = sf.guided_velocity(oracle, x_t, tt, v, y, NULL, args)
    gt = sf.guidance_decay(tt, args)[:, None]
    official = 0.25 * (v + gt * 2 * (v - G.velocity(x_t, tt))) + 0.75 * G.velocity(x_t, tt, y)
    assert torch.allclose(v_g, torch.where((y != NULL)[:, None], official, v)) and (tt > 0.8).any()
    # fixed point: a net that IS the CFG field at scale 1 + g(t)(W - 1) gets its own conditional velocity back
    cfg = lambda z, t_, s_, y_: G.velocity(z, t_) + torch.where((y_ == NULL)[:, None], 0.0, 1 + sf.guidance_decay(t_, args)[:, None] * 2) * (  # noqa: E731
        G.velocity(z, t_, y_) - G.velocity(z, t_))
    lab = y != NULL
    assert torch.allclose(sf.guided_velocity(cfg, x_t, tt, G.velocity(x_t, tt, y), y, NULL, args)[lab], cfg(x_t, tt, tt, y)[lab], atol=1e-10)


# ---------------------------------------------------------------- the posterior: conditional tangents e - x


def loss_on_posterior(p, eps=0.0, P=32, M=2048, ratio=0.75, seed=0, r=1e-3):
    """soflow_loss itself on P points x_t with M posterior tangents each (its draws of e and (t, s, l) replaced by ours,
    l = t - r (t - s)), the net a first-order model of u* around each point (taylor_exact: its finite difference is
    the exact derivative, no curvature bias) plus eps * dir_i (1 + t - t_i). Returns the autograd gradient wrt every
    row's output, the residual u - u_tgt the loss regressed, the perturbation, the row weight c w, M and the terms."""
    gen = torch.Generator().manual_seed(seed)
    x0, _ = G.sample(P, gen)
    a, b = torch.sigmoid(-0.4 + torch.randn(2, P, generator=gen, dtype=f64))
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    m = round((1 - ratio) * P)
    s[:m] = t[:m]
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(P, 2, generator=gen, dtype=f64)
    rep = lambda z: z.repeat_interleave(M, 0)  # noqa: E731
    X_t, T, S = rep(x_t), rep(t), rep(s)
    x = G.posterior_sample(X_t, T, gen)
    e = (X_t - (1 - T[:, None]) * x) / T[:, None]
    u0, J, du_dt = taylor_exact(x_t, t, s)
    direction = torch.nn.functional.normalize(torch.randn(P, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=f64), dim=1)
    N, out = P * M, torch.zeros(P * M, 2, dtype=f64, requires_grad=True)

    def net(z, t_, s_, y):
        i = torch.arange(N - len(z), N) // M
        pert = eps * direction[i] * (1 + t_ - t[i])[:, None]
        return u0[i] + ((z - x_t[i])[:, None, :] * J[i]).sum(-1) + (t_ - t[i])[:, None] * du_dt[i] + pert + out[N - len(z):]

    seen, orig = [], sf.mean_velocity_and_target
    args = dataclasses.replace(at_r(r), ratio=ratio, norm_p=p)
    with mock.patch.object(sf, "sample_ts", lambda n, n_fd, r_, a_, like: (T, S, T - r * (T - S))), \
            mock.patch.object(torch, "randn_like", lambda z: e), \
            mock.patch.object(sf, "mean_velocity_and_target", lambda *a: seen.append(orig(*a)) or seen[-1]):
        loss, terms = sf.soflow_loss(net, x, torch.full((N,), NULL), args, NULL, 0)
    g = torch.autograd.grad(loss, out)[0]
    res = (seen[0][0] - seen[0][1]).detach()
    c = torch.where(torch.arange(N) < m * M, 1.0, 0.5).to(f64)[:, None]
    return g, res, eps * direction, c / (res.pow(2).mean(1, keepdim=True) + args.norm_eps) ** p, M, terms


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_weighted_gradient_on_posterior_tangents(p):
    """With e - x drawn from p(x | x_t), the expected gradient at the exact map is zero for plain L2 (p = 0; up to the
    O(r) bias, 1e-3 here) and not for the adaptive weight, as in meanflow.py: the weighted-mean target minus u* per
    point has RMS 0.24-0.40 over 32 points at p = 1 (seeds 0-4; CPU, 1 thread) against MC noise 0.04-0.09. Also: the
    gradient is 2 c w (u - u_tgt) / (B D), w = 1 / (mse + eps)^p DETACHED on the MEAN over dims, c = 1/2 on the s != t
    rows (the official surrogate), 1 on the s = t rows."""
    g, res, _, w, M, terms = loss_on_posterior(p)
    assert torch.allclose(g, 2 * w * res / (len(res) * 2), rtol=1e-9, atol=0), (g - w * res / len(res)).abs().max()
    assert torch.allclose(terms["mse"], res.pow(2).mean())
    shift = -(w * res).view(-1, M, 2).sum(1) / w.view(-1, M, 1).sum(1)  # weighted-mean target minus u*
    se = res.view(-1, M, 2).std(1) / M**0.5
    rms, chi2 = shift.pow(2).sum(1).mean().sqrt().item(), ((shift / se) ** 2).mean().item()
    noise = se.pow(2).sum(1).mean().sqrt().item()
    if p == 0:
        assert chi2 < 2.0 and rms < 2 * noise, (rms, noise, chi2)
    else:
        assert 0.1 < rms < 0.5 and chi2 > 10, (rms, chi2)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_a_step_along_the_expected_gradient_approaches_the_exact_map(p):
    # u = u* + d (1 + t - t_i) per point, |d| = 0.5: with p = 0, E[grad] . d > 0 on every point and a small step along
    # -E[grad] is closer to u* on every point; with p = 1 on average (the weight's shift turns some points)
    g, _, d, _, M, _ = loss_on_posterior(p, eps=0.5, M=256)
    eg = g.view(-1, M, 2).sum(1)
    cos = (eg * d).sum(1) / eg.norm(dim=1) / d.norm(dim=1)
    step = d - 0.2 * d.norm(dim=1).max() / eg.norm(dim=1).max() * eg
    if p == 0:
        assert (cos > 0).all() and (step.norm(dim=1) < d.norm(dim=1)).all()
    else:
        assert cos.mean() > 0.4 and step.norm() < d.norm(), cos.mean()


# ---------------------------------------------------------------- the parts around the loss


def test_the_fd_forward_shares_the_dropout_masks():
    # with --dropout > 0 the no-grad forward at (x_l, l, s) draws the grad forward's masks (official: the RNG state
    # restored): with v = 0 (x_l = x_t) and a time-blind dropout net, u_l = u exactly, du/dt = 0 and u_tgt = v on every row
    x_t, t = torch.randn(64, 2, dtype=f64), torch.full((64,), 0.7, dtype=f64)
    s, l = 0.2 * t, 0.6 * t
    net = lambda z, t_, s_, y: torch.nn.functional.dropout(z + 1, 0.5, training=True)  # noqa: E731
    torch.manual_seed(0)
    u, u_tgt = sf.mean_velocity_and_target(net, x_t, t, s, l, torch.zeros(64, dtype=torch.long), torch.zeros_like(x_t), 16, 0.5)
    assert torch.equal(u_tgt, torch.zeros_like(x_t)) and (u == 0).any() and (u != 0).any()


def test_both_samplers_are_exact_on_the_oracle():
    # flow map: K exact jumps land on the exact ODE endpoint; consistency: x0 = f*(e, 1, 0), re-noised to
    # x = (1 - t) x0 + t n at t = 1/2, then f*(x, 1/2, 0) (official inference.py); one step: both f*(e, 1, 0)
    e = torch.randn(200, 2, generator=torch.Generator().manual_seed(9), dtype=f64)
    y = G.sample(200, torch.Generator().manual_seed(10))[1]
    end = G.flow_map(e, 1.0, 0.0, y, steps=40)
    for k in (1, 2):  # (each jump by 40 / k RK4 steps: the same discretization as `end`)
        assert (sf.sample(lambda *a: exact(*a, steps=40 // k), e, y, k, "flow") - end).abs().max() < 1e-9
    oracle = lambda *a: exact(*a, steps=40)  # noqa: E731
    assert (sf.sample(oracle, e, y, 1, "consistency") - end).abs().max() < 1e-9
    n = torch.randn(200, 2, generator=torch.Generator().manual_seed(11), dtype=f64)
    with mock.patch.object(torch, "randn_like", lambda z: n):
        two = sf.sample(oracle, e, y, 2, "consistency")
    assert (two - G.flow_map(0.5 * end + 0.5 * n, 0.5, 0.0, y, steps=40)).abs().max() < 1e-9
    # in law: the 2-step consistency samples are data samples (energy distance at the data-vs-data level)
    u = torch.full((1000,), NULL)
    e = torch.randn(1000, 2, generator=torch.Generator().manual_seed(12), dtype=f64)
    torch.manual_seed(0)
    ed = energy_distance(sf.sample(lambda *a: exact(*a, steps=20), e, u, 2, "consistency").float(), G.sample(1000, torch.Generator().manual_seed(13))[0].float())
    ref = energy_distance(G.sample(1000, torch.Generator().manual_seed(14))[0].float(), G.sample(1000, torch.Generator().manual_seed(13))[0].float())
    assert ed < 3 * ref + 2e-3, (ed, ref)


def test_the_loop_evaluates_both_samplers_and_anneals_by_step(tmp_path):
    # the run logs every sampler (the first unsuffixed, the others as metric@k_<name>) and the loss sees the loop's
    # step: the logged gap ratio is r(step) at every step
    import json

    run_here(sf.__file__, "--steps", 4, "--batch-size", 16, "--hidden", 16, "--depth", 2, "--log-every", 1, "--eval-every", 4,
             "--ckpt-every", 4, "--eval-samples", 64, "--eval-steps", 1, 2, "--fd-r0", 0.5, "--fd-r1", 0.01, "--out-dir", tmp_path)
    rows = [json.loads(r) for r in (tmp_path / "soflow" / "gmm" / "metrics.jsonl").read_text().splitlines()]
    args = sf.Args(steps=4, fd_r0=0.5, fd_r1=0.01)
    r = {row["step"]: row["fd_r"] for row in rows if "fd_r" in row}
    assert r.keys() == {1, 2, 3, 4} and all(math.isclose(v, sf.fd_ratio(k - 1, args), rel_tol=1e-6) for k, v in r.items()), r
    ev = {k: v for row in rows for k, v in row.items() if "@" in k}
    assert {"ed@1", "ed@2", "ed@1_flow", "ed@2_flow"} <= ev.keys()
    assert ev["ed@1"] == ev["ed@1_flow"] and ev["ed@2"] != ev["ed@2_flow"]  # one step: the same map; two: re-noised or not


@pytest.mark.parametrize("flags,needle", [(["--fd-r0", 0], "--fd-r0 0"), (["--fd-r1", 2], "--fd-r1 2"),
                                          (["--samplers", "euler"], "--samplers euler"), (["--cfg-decay-time", 1.5], "--cfg-decay-time 1.5")])
def test_bad_flags_get_one_line(flags, needle):
    proc = run_inline(sf.__file__, *flags)
    assert proc.returncode != 0 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_under_bf16_autocast_the_difference_runs_in_fp32():
    # the difference of two bf16 forwards is rounding (|FD - JVP| / |JVP| 3 to 135, measured): under autocast both of
    # its forwards run in fp32, so the target matches the fp32 one while u itself is the bf16 forward
    from common.dit import MLP
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=64, depth=2, num_classes=NULL)
    torch.nn.init.normal_(net.out[1].weight, std=0.3)  # not the zero init: a net with an output
    x_t, t = torch.randn(64, 2), torch.rand(64) * 0.8 + 0.1
    s, l, y, v = 0.3 * t, t - 1e-3 * 0.7 * t, torch.zeros(64, dtype=torch.long), torch.randn(64, 2)
    _, ref = sf.mean_velocity_and_target(net, x_t, t, s, l, y, v, 16, 0.0)
    with torch.autocast("cpu", torch.bfloat16):
        u, tgt = sf.mean_velocity_and_target(net, x_t, t, s, l, y, v, 16, 0.0)
    dref, d = (ref - v)[16:], (tgt - v)[16:]  # the finite-difference part of the target
    assert (u - net(x_t, t, s, y)).abs().max() > 1e-4  # u is the bf16 forward (rounded)
    assert (d - dref).norm() < 1e-3 * dref.norm(), ((d - dref).norm() / dref.norm()).item()
