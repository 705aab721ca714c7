"""alpha-Flow: at a = 0 the target is MeanFlow's and equals the exact average velocity of the
mixture (closed-form velocity, exact flow map by RK4 in float64); for a > 0 the Euler-step target
is not exact and its error falls like a^2; the a-schedule; no JVP while a > 0; the weights; the
training guidance with the official label-dropout order. Everything through the file's own code."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from common.data import default_gmm
from conftest import load_method

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
