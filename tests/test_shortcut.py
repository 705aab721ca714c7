"""Shortcut models: the self-consistency target is exact at the exact average velocity of the
mixture for every step-size level (clips off) and not for a perturbed field; the official
h = 1/128 flow-matching rows are not consistent with the exact field, the default h = 0 is; the
official level allocation, t on the grid of d, one forward with grad per batch, guided targets
at the smallest level only, and bad input."""
import dataclasses
from unittest import mock
import math

import pytest
import torch

from common.data import default_gmm
from conftest import load_method

sc = load_method("shortcut")
G = default_gmm()
NULL = G.num_classes
NOCLIP = dataclasses.replace(sc.Args(), clip=0.0)


def exact(x_t, t, s, y, steps=60):
    return G.avg_velocity(x_t, t.double(), s.double(), y, steps=steps)


def perturbed(x_t, t, s, y, eps=0.05):
    return exact(x_t, t, s, y) + eps * torch.tanh(x_t + t[:, None])


def noisy(x, t, seed):
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return (1 - t[:, None]) * x + t[:, None] * e


@pytest.mark.parametrize("k", range(7))
def test_bootstrap_target_is_exact_at_the_exact_solution(k):
    # d = 2^-k: u*(t -> t - d) is the mean of the two exact half-steps (the semigroup property)
    n, d = 200, 2.0 ** -k
    x, y = G.sample(n, torch.Generator().manual_seed(k))
    torch.manual_seed(k)
    t, s = sc.sample_bootstrap_ts(7 * n, 128, "cpu")
    t, s = t.double()[(t - s) == d][:n], s.double()[(t - s) == d][:n]  # the rows of level d
    x, y = x[:len(t)], y[:len(t)]
    x_t = noisy(x, t, k)
    res = (exact(x_t, t, s, y) - sc.bootstrap_target(exact, x_t, t, s, y, NULL, NOCLIP)).pow(2).sum(1)
    res_p = (perturbed(x_t, t, s, y) - sc.bootstrap_target(perturbed, x_t, t, s, y, NULL, NOCLIP)).pow(2).sum(1)
    assert len(t) > 20 and res.max() < 1e-12, res.max()
    assert res_p.mean() > 1e-8 * 4 ** (6 - k) and res_p.mean() > 1e6 * res.max(), (res_p.mean(), res.max())


def test_loss_bootstrap_part_vanishes_at_the_exact_solution():
    # through shortcut_loss, the exact field as both net and EMA; guided rows off (w = 1)
    x, y = G.sample(512, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    _, terms = sc.shortcut_loss(exact, exact, x, y, NULL, NOCLIP)
    torch.manual_seed(0)
    _, terms_p = sc.shortcut_loss(perturbed, perturbed, x, y, NULL, NOCLIP)
    assert terms["loss_boot"] < 1e-13 and terms_p["loss_boot"] > 1e-6, (terms["loss_boot"], terms_p["loss_boot"])
    assert terms["loss_fm"] > 0.1  # the flow-matching part regresses e - x: noise, not a residual


@pytest.mark.parametrize("h", [0.0, 1 / 128])
def test_flow_matching_rows_at_h_zero_are_consistent_and_the_official_h_is_not(h):
    # the FM rows regress e - x, whose minimizer is v*(x_t, t); the exact map must be that minimizer
    # at the rows' (t, s): true for s = t (the paper), false for s = t - 1/128 (the official code)
    args = dataclasses.replace(sc.Args(), fm_h=h)
    x, y = G.sample(2000, torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    t, s = sc.sample_fm_ts(2000, args, "cpu")
    assert torch.allclose(t - s, torch.full_like(t, h)) and (t * 128 == torch.round(t * 128)).all() and t.min() > 0
    t, s = t.double(), s.double()
    x_t = noisy(x, t, 1)
    res = (exact(x_t, t, s, y) - G.velocity(x_t, t, y)).pow(2).sum(1).mean()
    if h == 0:
        assert res == 0
    else:  # measured 1.2e-4, far above the d = 1/64 bootstrap residual of a 5% perturbation (~2e-7)
        assert res > 5e-5, res


def test_level_allocation_and_time_grid():
    d = sc.level_sizes(32, 128)  # official: 32 // 7 = 4 rows per level, smallest first, 4 left to d = 1
    assert d.tolist() == sum([[2.0 ** -k] * 4 for k in range(6, -1, -1)], []) + [1.0] * 4
    torch.manual_seed(0)
    t, s = sc.sample_bootstrap_ts(7000, 128, "cpu")
    dd = t - s
    assert (s >= 0).all() and (t <= 1).all()
    assert torch.equal(torch.round(t / dd) * dd, t)  # t on the grid of d
    for k in range(7):  # t = 1 - j d with j uniform on {0, ..., 1/d - 1}
        j = torch.round((1 - t[dd == 2.0 ** -k]) * 2 ** k)
        assert j.min() == 0 and j.max() == 2 ** k - 1 and abs(j.mean().item() - (2 ** k - 1) / 2) < 0.15 * 2 ** k


def test_one_forward_with_grad_and_labels():
    calls = []

    def net(x_t, t, s, y):
        calls.append((torch.is_grad_enabled(), len(x_t), y.clone(), (t - s).clone()))
        return exact(x_t, t, s, y).float() + 0 * theta

    theta = torch.zeros((), requires_grad=True)
    x, y = G.sample(256, torch.Generator().manual_seed(2))
    x = x.float()
    args = dataclasses.replace(sc.Args(), label_dropout=0.5, bootstrap_cfg=1.5)
    torch.manual_seed(0)
    loss, _ = sc.shortcut_loss(net, net, x, y, NULL, args)
    grad_calls = [c for c in calls if c[0]]
    assert len(grad_calls) == 1 and grad_calls[0][1] == 256 and len(calls) == 3  # one grad forward, two EMA half-steps
    y_used = grad_calls[0][2]
    assert torch.equal(y_used[:32], y[:32]) and (y_used[32:] == NULL).float().mean() > 0.3  # bootstrap labels never dropped
    for _, n, y_ema, h in calls[:2]:  # EMA half-steps: 32 bootstrap rows + the 4 rows of d = 1/64 again, unconditional
        assert n == 36 and (y_ema[32:] == NULL).all() and torch.equal(y_ema[:32], y[:32]) and (h[32:] == 1 / 128).all()


def test_guided_targets_only_at_the_smallest_level():
    args = dataclasses.replace(NOCLIP, bootstrap_cfg=1.5)
    x, y = G.sample(35, torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    t, s = sc.sample_bootstrap_ts(35, 128, "cpu")
    t, s = t.double(), s.double()
    x_t = noisy(x, t, 3)
    got = sc.bootstrap_target(exact, x_t, t, s, y, NULL, args, n_cfg=5)
    m = (t + s) / 2
    g = lambda z, a, b: exact(z, a, b, torch.full_like(y, NULL)) + 1.5 * (exact(z, a, b, y) - exact(z, a, b, torch.full_like(y, NULL)))
    u1 = g(x_t, t, m)
    want = (u1 + g(x_t - (t - m)[:, None] * u1, m, s)) / 2
    assert torch.allclose(got[:5], want[:5]) and (t - s)[:5].eq(1 / 64).all()
    assert torch.allclose(got[5:], sc.bootstrap_target(exact, x_t, t, s, y, NULL, NOCLIP)[5:])
    assert not torch.allclose(got[:5], sc.bootstrap_target(exact, x_t, t, s, y, NULL, NOCLIP)[:5])


def test_clips():
    big = lambda x_t, t, s, y: torch.full_like(x_t, 10.0)
    x = torch.zeros(7, 2)
    t, s = sc.sample_bootstrap_ts(7, 128, "cpu")
    assert (sc.bootstrap_target(big, x, t, s, torch.zeros(7, dtype=torch.long), NULL, sc.Args()) == 4).all()


def test_sampler_composes_to_the_exact_map():
    e = torch.randn(300, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = G.sample(300, torch.Generator().manual_seed(5))[1]
    end = G.flow_map(e, 1.0, 0.0, y, steps=200)
    for k in (1, 2, 8):
        assert (sc.sample(lambda *a: exact(*a, steps=200 // k), e, y, k) - end).abs().max() < 1e-6


@pytest.mark.parametrize("field,value,needle", [("batch_size", 48, "--batch-size 48"), ("grad_accum", 8, "a micro-batch of 32"), ("denoise_timesteps", 96, "--denoise-timesteps 96"),
                                                ("fm_h", 0.01, "--fm-h 0.01"), ("bootstrap_every", 1, "--bootstrap-every 1"),
                                                ("clip", -1.0, "--clip -1.0")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        sc.check_args(dataclasses.replace(sc.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_off_grid_step_counts_warn(capsys):
    sc.check_args(dataclasses.replace(sc.Args(), eval_steps=(1, 2, 4, 128)))
    assert capsys.readouterr().err == ""
    sc.check_args(dataclasses.replace(sc.Args(), eval_steps=(1, 3, 256)))
    err = capsys.readouterr().err.strip()
    assert "off the training grid" in err and "[3, 256]" in err and "\n" not in err
    assert math.log2(sc.Args().denoise_timesteps) == 7  # levels 1 ... 1/64 by default


# ---------------------------------------------------------------- target net, split points, row fraction, time law
def test_bootstrap_targets_come_from_the_ema_net():
    # distinguishable nets: the trained net is exact, the EMA is exact + 0.1: the bootstrap rows see the offset
    x, y = G.sample(256, torch.Generator().manual_seed(6))
    ema = lambda x_t, t, s, y: exact(x_t, t, s, y, steps=8) + 0.1  # noqa: E731
    net = lambda x_t, t, s, y: exact(x_t, t, s, y, steps=8)  # noqa: E731
    torch.manual_seed(6)
    _, terms = sc.shortcut_loss(net, ema, x, y, NULL, NOCLIP)
    assert 0.003 < terms["loss_boot"] < 0.05, terms["loss_boot"]  # ~0.1^2 per dim (and a small drift of x')
    torch.manual_seed(6)
    assert sc.shortcut_loss(ema, net, x, y, NULL, NOCLIP)[1]["loss_boot"] > 0.003


def test_split_points_are_convex_and_the_second_half_starts_where_the_first_ends():
    calls = []

    def ema(x_t, t, s, y):
        calls.append((x_t.clone(), t.clone(), s.clone()))
        return exact(x_t, t, s, y, steps=8)

    x, y = G.sample(70, torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    t, s = sc.sample_bootstrap_ts(70, 128, "cpu")
    t, s = t.double(), s.double()
    x_t = noisy(x, t, 7)
    sc.bootstrap_target(ema, x_t, t, s, y, NULL, NOCLIP)
    (x1, t1, m1), (x2, m2, s2) = calls
    assert torch.equal(x1, x_t) and torch.equal(t1, t) and torch.equal(s2, s) and torch.equal(m1, m2)
    assert (s <= m1).all() and (m1 <= t).all() and torch.allclose(m1, (t + s) / 2)  # s <= m <= t, the midpoint
    assert torch.allclose(x2, G.flow_map(x_t, t, m1, y, steps=60), atol=1e-5)  # x' = the EMA's map to m


@pytest.mark.parametrize("every", [4, 8])
def test_row_fraction_and_fm_time_law_through_the_loss(every):
    # one row in `every` is a bootstrap row (the FIRST n // every rows), the FM rows have t uniform on {1/T, ..., 1}
    n, calls = 4096, []

    def net(x_t, t, s, y):
        calls.append((torch.is_grad_enabled(), len(x_t), t, s))
        return torch.zeros_like(x_t)

    x, y = G.sample(n, torch.Generator().manual_seed(8))
    torch.manual_seed(8)
    sc.shortcut_loss(net, net, x.float(), y, NULL, dataclasses.replace(sc.Args(), bootstrap_every=every))
    _, _, t, s = [c for c in calls if c[0]][0]
    nb = n // every
    assert ((t - s)[:nb] > 0).all() and ((t - s)[nb:] == 0).all()
    counts = torch.bincount(torch.round(t[nb:] * 128).long(), minlength=129)[1:].double()
    chi2 = ((counts - (n - nb) / 128) ** 2 / ((n - nb) / 128)).sum().item()
    assert counts.sum() == n - nb and chi2 < 180, chi2  # 127 dof: the 0.2% bound is 180


def test_loss_gradient_is_plain_l2_and_direction():
    # autograd gradient = 2 (u - target) / (B D) on every row (no per-row weight), and at u = u* + theta phi the
    # gradient along phi has the sign of theta
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x, y = G.sample(256, torch.Generator().manual_seed(9))
    out = torch.zeros(256, 2, dtype=torch.float64, requires_grad=True)
    seen = []
    net = lambda x_t, t, s, y_: seen.append((x_t, t, s, y_)) or exact(x_t, t, s, y_, steps=8) + theta * torch.sin(2 * x_t) + out  # noqa: E731
    ema = lambda x_t, t, s, y_: exact(x_t, t, s, y_, steps=8)  # noqa: E731
    torch.manual_seed(9)
    loss, _ = sc.shortcut_loss(net, ema, x, y, NULL, NOCLIP)
    g_out, g_theta = torch.autograd.grad(loss, [out, theta])
    x_t, t, s, y_ = seen[0]
    torch.manual_seed(9)
    e = torch.randn_like(x)  # the loss's first draw
    nb = 256 // 8
    tgt = torch.cat([sc.bootstrap_target(ema, x_t[:nb], t[:nb], s[:nb], y_[:nb], NULL, NOCLIP), (e - x)[nb:]])
    u = exact(x_t, t, s, y_, steps=8) + 0.3 * torch.sin(2 * x_t)
    assert torch.allclose(g_out, 2 * (u - tgt) / (256 * 2), atol=1e-12)
    theta.data.fill_(-0.3)
    torch.manual_seed(9)
    g_neg = torch.autograd.grad(sc.shortcut_loss(net, ema, x, y, NULL, NOCLIP)[0], theta)[0]
    assert g_theta > 0.05 and g_neg < -0.05, (g_theta, g_neg)


def test_fm_rows_on_posterior_targets_have_zero_expected_gradient_at_the_exact_velocity():
    """With e - x drawn from p(x | x_t), the FM rows' expected gradient at v* is zero within Monte Carlo error
    (plain L2: no per-sample weight, no shift); at v* + 0.5 it is not. 32 points x 512 draws."""
    P, M, gen = 32, 512, torch.Generator().manual_seed(0)
    x0, _ = G.sample(P, gen)
    t0 = torch.randint(1, 129, (P,), generator=gen).double() / 128
    x_t0 = noisy(x0, t0, 10)
    X, T = x_t0.repeat_interleave(M, 0), t0.repeat_interleave(M, 0)
    x_fm = G.posterior_sample(X, T, gen)
    e_fm = (X - (1 - T[:, None]) * x_fm) / T[:, None]
    N = P * M
    nb = N // 7  # bootstrap rows (their own draws) ahead of the N FM rows
    xb, _ = G.sample(nb, gen)
    x = torch.cat([xb, x_fm])
    e = torch.cat([torch.randn(nb, 2, generator=gen, dtype=torch.float64), e_fm])
    args = dataclasses.replace(NOCLIP, bootstrap_every=(N + nb) // nb)
    v0 = G.velocity(x_t0, t0)
    for shift, want_zero in ((0.0, True), (0.5, False)):
        out = torch.zeros(N, 2, dtype=torch.float64, requires_grad=True)
        fm_rows = lambda z: len(z) == N + nb  # noqa: E731

        def net(z, t_, s_, y_):
            return torch.cat([exact(z[:nb], t_[:nb], s_[:nb], y_[:nb], steps=4), v0.repeat_interleave(M, 0) + shift + out]) if fm_rows(z) else None

        ema = lambda z, t_, s_, y_: exact(z, t_, s_, y_, steps=4)  # noqa: E731
        with mock.patch.object(sc, "sample_fm_ts", lambda n, a_, d: (T, T)), mock.patch.object(torch, "randn_like", lambda z: e):
            loss, _ = sc.shortcut_loss(net, ema, x, torch.full((N + nb,), NULL), NULL, args)
        g = torch.autograd.grad(loss, out)[0].view(P, M, 2)
        z2 = ((g.sum(1) / (g.std(1) * M**0.5)) ** 2).mean().item()
        assert (z2 < 2.0) if want_zero else (z2 > 20), (shift, z2)
