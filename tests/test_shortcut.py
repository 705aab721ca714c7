"""Shortcut models: the self-consistency target is exact at the exact average velocity of the
mixture for every step-size level (clips off) and not for a perturbed field; the official
h = 1/128 flow-matching rows are not consistent with the exact field, the default h = 0 is; the
official level allocation, t on the grid of d, one forward with grad per batch, guided targets
at the smallest level only, and bad input."""
import dataclasses
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
