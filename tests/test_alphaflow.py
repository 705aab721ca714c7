"""alpha-Flow: at a = 0 the target is MeanFlow's and equals the exact average velocity of the
mixture (closed-form velocity, exact flow map by RK4 in float64); for a > 0 the Euler-step target
is not exact and its error falls like a^2; the a-schedule; no JVP while a > 0; the weights; the
training guidance with the official label-dropout order. Everything through the file's own code."""
import dataclasses
from unittest import mock
import math

import numpy as np
import pytest
import torch

from common.data import default_gmm
from conftest import ks, load_method, taylor_exact

af = load_method("alphaflow")
G = default_gmm()
NULL = G.num_classes


def exact(x_t, t, s, y, steps=40):
    return G.avg_velocity(x_t, t.double(), s.double(), y, steps=steps)


def batch(n, seed, m):
    torch.manual_seed(seed)
    x, y = G.sample(n, torch.Generator().manual_seed(seed))
    t, s = (a.double() for a in af.sample_ts(n, n - m, af.Args(), "cpu"))
    x_t = (1 - t[:, None]) * x + t[:, None] * torch.randn_like(x)
    return x_t, y, t, s


def target(net, a, n=200, m=100, seed=0, **kw):
    x_t, y, t, s = batch(n, seed, m)
    args = dataclasses.replace(af.Args(), **kw)
    u, u_tgt = af.mean_velocity_and_target(net, x_t, t, s, y, G.velocity(x_t, t, y), m, a, args)
    return u, u_tgt, exact(x_t, t, s, y), m


def test_meanflow_target_at_a_zero_is_exact():
    u, u_tgt, u_star, m = target(exact, 0.0)
    assert (u_tgt - u_star).pow(2).sum(1).max() < 1e-6 and torch.allclose(u, u_star)  # ODE error only
    perturbed = lambda x, t, s, y: exact(x, t, s, y) + 0.05 * (t - s)[:, None] * torch.sin(x)  # same velocity
    _, u_tgt, u_star, m = target(perturbed, 0.0)
    assert (u_tgt - u_star)[m:].pow(2).sum(1).mean() > 1e-4


def test_euler_step_target_error_falls_like_a_squared():
    alphas, errs = [0.04, 0.08, 0.16], []
    for a in alphas:
        _, u_tgt, u_star, m = target(exact, a, clip_target=1e9)
        errs.append((u_tgt - u_star)[m:].pow(2).sum(1).mean().sqrt().item())
    slope = np.polyfit(np.log(alphas), np.log(errs), 1)[0]
    assert 1.8 < slope < 2.2, (slope, errs)
    _, u_tgt, u_star, m = target(exact, 1.0)  # a = 1: flow matching, the (clipped) velocity on every row
    x_t, y, t, s = batch(200, 0, 100)
    v = G.velocity(x_t, t, y)
    assert torch.equal(u_tgt[m:], v[m:].clamp(-4, 4)) and torch.equal(u_tgt[:m], v[:m])


def test_the_target_is_clipped_for_a_above_zero_only():
    big = lambda x, t, s, y: 10 * exact(x, t, s, y)
    _, u_tgt, _, m = target(big, 0.5)
    assert u_tgt[m:].abs().max() <= 4 and u_tgt[:m].abs().max() > 4  # s = t rows: v_g as is


def test_alpha_schedule_values_and_snaps():
    args = dataclasses.replace(af.Args(), alpha_k_init=100, alpha_k_end=1100)
    a = [af.alpha_schedule(k, args) for k in range(0, 1300)]
    assert a[0] == a[99] == a[100] == 1.0 and a[1101] == a[1299] == 0.0
    assert abs(a[600] - 0.5) < 1e-12 and all(x >= y for x, y in zip(a, a[1:]))  # midpoint, monotone
    raw = lambda k: 1 - 1 / (1 + math.exp(-25 * (k - 600) / 1000))
    for k in range(100, 1101):
        r = raw(k)
        assert a[k] == (0.0 if r < 0.005 else 1.0 if r > 0.995 else r)
    assert 0 < min(x for x in a if x > 0) and min(x for x in a if x > 0) >= 0.005  # nothing in (0, 0.005)
    k_snap = next(k for k in range(100, 1101) if a[k] == 0)
    assert raw(k_snap) < 0.005 <= raw(k_snap - 1)


def test_no_jvp_while_alpha_is_positive():
    under_jvp = []

    def net(x, t, s, y):
        under_jvp.append(torch._C._functorch.maybe_current_level() is not None)
        return exact(x, t, s, y, steps=4)

    args = dataclasses.replace(af.Args(), alpha_k_end=100)
    x, y = G.sample(64, torch.Generator().manual_seed(0))
    for step, want in [(0, False), (50, False), (70, False), (99, True), (101, True)]:  # a = 1, 0.5, 0.007, snapped 0, 0
        under_jvp.clear()
        torch.manual_seed(0)
        af.alphaflow_loss(net, x, y, args, NULL, step)
        assert any(under_jvp) == want, (step, af.alpha_schedule(step, args))


def test_loss_weights_are_alpha_on_the_euler_rows():
    zero = lambda x, t, s, y: 0 * x  # l = |u_tgt|^2 >> eps: each row's weighted loss is its weight
    x, y = G.sample(400, torch.Generator().manual_seed(0))
    args = dataclasses.replace(af.Args(), alpha_k_end=100, norm_eps=1e-12)
    for step in (40, 50, 101):
        a = af.alpha_schedule(step, args)
        torch.manual_seed(0)
        loss, terms = af.alphaflow_loss(zero, x, y, args, NULL, step)
        want = 0.5 + 0.5 * (a if a > 0 else 1.0)
        assert abs(loss.item() - want) < 1e-6 and terms["alpha"].item() == a


def test_training_guidance_and_label_dropout_order():
    # v_g = w v + k v_c + (1 - w - k) v_u strictly inside (t_min, t_max), dropped labels included; v outside
    args = dataclasses.replace(af.Args(), cfg_omega=1.5, cfg_kappa=0.25, cfg_t_min=0.2, cfg_t_max=0.8)
    n = 400
    x, y = G.sample(n, torch.Generator().manual_seed(5))
    y[:50] = NULL
    t = torch.rand(n, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x + t[:, None] * torch.randn_like(x)
    v = torch.randn_like(x)
    oracle = lambda x_t, t, s, y: G.velocity(x_t, t, y)
    v_g = af.guided_velocity(oracle, x_t, t, v, y, NULL, args)
    inside = ((t > 0.2) & (t < 0.8))[:, None]
    want = torch.where(inside, 1.5 * v + 0.25 * G.velocity(x_t, t, y) - 0.75 * G.velocity(x_t, t), v)
    assert torch.allclose(v_g, want) and (inside[:50]).any()  # a dropped row inside: w v + (1 - w) v_u
    # the loss drops labels only inside the interval: record the labels of the net's calls
    seen = []
    net = lambda x, t, s, y: seen.append((t, s, y)) or 0 * x
    args = dataclasses.replace(args, label_dropout=0.5, cfg_kappa=0.0, cfg_omega=1.0)
    torch.manual_seed(0)
    x, y = G.sample(2000, torch.Generator().manual_seed(1))
    af.alphaflow_loss(net, x, y, args, NULL, 10**6)
    t, s, y_fwd = seen[-1]
    dropped = y_fwd == NULL
    inside = (t > 0.2) & (t < 0.8)
    assert not dropped[~inside].any() and abs(dropped[inside].float().mean() - 0.5) < 0.05


def test_samplers():
    e, y = torch.randn(50, 2, dtype=torch.float64), torch.arange(50) % NULL
    one = af.sample(exact, e, y, 1, "flow")
    assert torch.allclose(one, af.sample(exact, e, y, 1, "consistency")) and torch.allclose(one, G.flow_map(e, 1.0, 0.0, y), atol=1e-5)
    assert torch.allclose(af.sample(exact, e, y, 3, "flow"), one, atol=1e-5)  # an exact map composes
    torch.manual_seed(0)
    two = af.sample(exact, e, y, 2, "consistency")  # re-noised: another sample, not the same endpoint
    assert (two - one).abs().max() > 1e-2


@pytest.mark.parametrize("flags,needle", [({"alpha_k_end": 0}, "--alpha-k-end 0"), ({"cfg_t_min": 0.9, "cfg_t_max": 0.1}, "--cfg-t-min"),
                                          ({"cfg_t_max": 1.5}, "--cfg-t-max 1.5"), ({"cfg_omega": 0.5}, "--cfg-omega 0.5"),
                                          ({"samplers": ("euler",)}, "--samplers euler")])
def test_bad_input(flags, needle):
    with pytest.raises(SystemExit, match=needle):
        af.check_args(dataclasses.replace(af.Args(), **flags))


# ---------------------------------------------------------------- the posterior: conditional tangents e - x (a = 0)




def loss_on_posterior(norm_eps, eps=0.0, P=32, M=2048, ratio=0.75, seed=0):
    """alphaflow_loss itself at a = 0 (MeanFlow's target), unconditional, on P points x_t with M posterior tangents
    each (its draws of e and (t, s) replaced by ours), at u = u* + eps dir_i (1 + t - t_i): the autograd gradient
    wrt every row's output, the residual u - u_tgt (recorded) and the row weight the loss must apply."""
    gen = torch.Generator().manual_seed(seed)
    x0, _ = G.sample(P, gen)
    a, b = torch.sigmoid(-0.4 + torch.randn(2, P, generator=gen, dtype=torch.float64))
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    s[: round((1 - ratio) * P)] = t[: round((1 - ratio) * P)]
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(P, 2, generator=gen, dtype=torch.float64)
    X_t, T, S = (z.repeat_interleave(M, 0) for z in (x_t, t, s))
    x = G.posterior_sample(X_t, T, gen)
    e = (X_t - (1 - T[:, None]) * x) / T[:, None]
    u0, J, du_dt = taylor_exact(x_t, t, s)
    direction = torch.nn.functional.normalize(torch.randn(P, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64), dim=1)
    N, out = P * M, torch.zeros(P * M, 2, dtype=torch.float64, requires_grad=True)

    def net(z, t_, s_, y):  # rows of a call are the tail of the batch (the JVP runs on rows m..)
        i = torch.arange(N - len(z), N) // M
        pert = eps * direction[i] * (1 + t_ - t[i])[:, None]
        return u0[i] + ((z - x_t[i])[:, None, :] * J[i]).sum(-1) + (t_ - t[i])[:, None] * du_dt[i] + pert + out[N - len(z):]

    seen, orig = [], af.mean_velocity_and_target
    args = dataclasses.replace(af.Args(), ratio=ratio, norm_eps=norm_eps, alpha_k_end=10)
    with mock.patch.object(af, "sample_ts", lambda n, n_mf, a_, d: (T, S)), mock.patch.object(torch, "randn_like", lambda z: e), \
            mock.patch.object(af, "mean_velocity_and_target", lambda *a: seen.append(orig(*a)) or seen[-1]):
        loss, terms = af.alphaflow_loss(net, x, torch.zeros(N, dtype=torch.long), args, 0, 100)
    assert terms["alpha"] == 0
    g = torch.autograd.grad(loss, out)[0]
    r = (seen[0][0] - seen[0][1]).detach()
    return g, r, eps * direction, 1 / (r.pow(2).mean(1, keepdim=True) + norm_eps), M


@pytest.mark.parametrize("norm_eps", [1e6, 1e-3])
def test_weighted_gradient_on_posterior_tangents(norm_eps):
    """With e - x drawn from p(x | x_t), at a = 0: the expected gradient at the exact map is zero for a constant
    weight (c = 1e6: plain L2) and not for the official adaptive weight 1 / (l + 1e-3) (l a mean over dims): per
    point the weighted-mean target E[w u_tgt] / E[w] - u* (one fixed-point step from u*) has RMS 0.21-0.39 over 32
    points against 0.04-0.05 for plain L2 (Monte Carlo noise, M = 2048; seeds 0-4; CPU, 1 thread). Also: the
    autograd gradient is 2 w (u - u_tgt) / (B D) with the weight w = 1 / (l + c) DETACHED."""
    g, r, _, w, M = loss_on_posterior(norm_eps)
    assert torch.allclose(g, w * r / len(r), rtol=1e-9, atol=0), (g - w * r / len(r)).abs().max()  # 2 / D = 1
    shift = -(w * r).view(-1, M, 2).sum(1) / w.view(-1, M, 1).sum(1)
    se = r.view(-1, M, 2).std(1) / M**0.5
    rms, chi2 = shift.pow(2).sum(1).mean().sqrt().item(), ((shift / se) ** 2).mean().item()
    noise = se.pow(2).sum(1).mean().sqrt().item()
    if norm_eps > 1:  # zero within Monte Carlo error
        assert chi2 < 2.0 and rms < 2 * noise, (rms, noise, chi2)
    else:  # measured (seed 0) rms 0.263, chi2 per dof 30
        assert 0.15 < rms < 0.5 and chi2 > 10, (rms, chi2)


@pytest.mark.parametrize("norm_eps", [1e6, 1e-3])
def test_a_step_along_the_expected_gradient_approaches_the_exact_map(norm_eps):
    # u = u* + d (1 + t - t_i) per point, |d| = 0.5; plain L2: E[grad] . d > 0 and a small step is closer on every
    # point; the adaptive weight's shift turns some points, so there on average
    g, r, d, w, M = loss_on_posterior(norm_eps, eps=0.5, M=256)
    eg = g.view(-1, M, 2).sum(1)
    cos = (eg * d).sum(1) / eg.norm(dim=1) / d.norm(dim=1)
    step = d - 0.2 * d.norm(dim=1).max() / eg.norm(dim=1).max() * eg
    if norm_eps > 1:
        assert (cos > 0).all() and (step.norm(dim=1) < d.norm(dim=1)).all()
    else:
        assert cos.mean() > 0.4 and step.norm() < d.norm(), cos.mean()


# ---------------------------------------------------------------- the parts around the loss


@pytest.mark.parametrize("step", [10**6, 50])
def test_time_law_and_row_fraction_through_the_loss(step):
    # ratio 0.25: the LAST quarter of the rows has s != t (a JVP at a = 0, an Euler-step target at a > 0), t = max
    # and s = min of two LN(-0.4, 1) draws there; on the s = t rows t is ONE draw (official), not a max
    n, calls = 4000, []

    def net(z, t_, s_, y):
        under = torch._C._functorch.maybe_current_level() is not None
        calls.append((len(z), under, torch.is_grad_enabled(), None if under else (t_, s_)))
        return 0 * z

    x, y = G.sample(n, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    args = dataclasses.replace(af.Args(), ratio=0.25, alpha_k_end=100)
    af.alphaflow_loss(net, x.float(), y, args, NULL, step)
    (n_tgt, under_tgt, g_tgt, _), (n_fwd, _, g_fwd, (t, s)) = calls
    assert under_tgt == (step > 100) and not g_tgt and n_tgt == 1000 and n_fwd == n and g_fwd
    m = n - n_tgt
    assert torch.equal(t[:m], s[:m]) and (s[m:] < t[m:]).all()
    phi = lambda q: torch.distributions.Normal(0.0, 1.0).cdf((torch.logit(q) + 0.4) / 1.0)  # noqa: E731
    for sample, cdf in [(t[:m], phi), (t[m:], lambda q: phi(q) ** 2), (s[m:], lambda q: 1 - (1 - phi(q)) ** 2)]:
        assert ks(sample, cdf) < 1.63 / len(sample) ** 0.5, ks(sample, cdf)  # the 1% KS bound


@pytest.mark.parametrize("a", [0.0, 0.5])
def test_the_target_carries_no_gradient(a):
    theta = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    net = lambda x, t, s, y: exact(x, t, s, y, steps=6) + theta * torch.sin(x) * (1 + t[:, None])  # noqa: E731
    x_t, y, t, s = batch(64, 2, 16)
    u, u_tgt = af.mean_velocity_and_target(net, x_t, t, s, y, G.velocity(x_t, t, y), 16, a, af.Args())
    assert u.requires_grad and not u_tgt.requires_grad


def test_training_guidance_has_the_effective_scale_w_over_one_minus_k():
    # a net that IS the CFG field at scale w / (1 - k): with the conditional velocity as v, v_g is its own output
    args = dataclasses.replace(af.Args(), cfg_omega=1.2, cfg_kappa=0.4)
    x, y = G.sample(300, torch.Generator().manual_seed(6))
    t = torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x_t = (1 - t[:, None]) * x + t[:, None] * torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    cfg = lambda w: lambda z, t_, s_, y_: G.velocity(z, t_) + torch.where((y_ == NULL)[:, None], 0.0, w) * (G.velocity(z, t_, y_) - G.velocity(z, t_))  # noqa: E731
    v_g = af.guided_velocity(cfg(2.0), x_t, t, G.velocity(x_t, t, y), y, NULL, args)
    assert torch.allclose(v_g, cfg(2.0)(x_t, t, t, y), atol=1e-10)
    assert not torch.allclose(af.guided_velocity(cfg(1.2), x_t, t, G.velocity(x_t, t, y), y, NULL, args), cfg(1.2)(x_t, t, t, y), atol=1e-3)


def test_samplers_exact_at_two_steps():
    # flow map: the exact endpoint; consistency: x0 = f*(x, 1, 0), re-noised to 1/2 with the noise n, then f*(., 1/2, 0)
    e, y = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), torch.arange(50) % NULL
    f = lambda z, a, b: G.flow_map(z, a, b, y, steps=60)  # noqa: E731
    assert torch.allclose(af.sample(exact, e, y, 2, "flow"), f(e, 1.0, 0.0), atol=1e-6)
    n = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with mock.patch.object(torch, "randn_like", lambda z: n):
        got = af.sample(exact, e, y, 2, "consistency")
    assert torch.allclose(got, f(0.5 * f(e, 1.0, 0.0) + 0.5 * n, 0.5, 0.0), atol=1e-6)
