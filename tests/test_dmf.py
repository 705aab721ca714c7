"""Decoupled MeanFlow: the MeanFlow residual through dmf_loss vanishes at the exact map of the mixture
(float64) and not at a perturbation; the official log weight has no finite optimum in lv (the EDM2 weight
has, at lv = log mse); from data (posterior tangents) the log weight shifts the fixed point, the EDM2 weight
does not; the expected gradient points to the exact map; the time laws; the start from the fm file; the
sampler."""
import dataclasses
import math
from unittest import mock

import pytest
import torch

from common.data import default_gmm
from common.dit import MLP, load, save
from conftest import ROOT, ks, load_method, run_here, run_inline, taylor_exact

dmf = load_method("dmf")
G = default_gmm()
NULL = G.num_classes
SCRIPT = f"{ROOT}/methods/dmf.py"


def exact(x_t, t, s, y, steps=60):
    return G.avg_velocity(x_t, t, s, y, steps=steps)


def perturbed(x_t, t, s, y, eps=1e-2, steps=60):
    # the spec's perturbation: it vanishes at s = t (the FM rows see the exact velocity)
    return exact(x_t, t, s, y, steps) + eps * ((t - s) * (1 + t))[:, None] * torch.sin(2 * x_t)


def const_lv(value):
    return lambda t, s: torch.full_like(t, value)


def official(mse, lv, eps=0.01):
    return torch.log(mse / torch.exp(lv) + eps) + lv  # loss.py log_lv_loss as written


# ---------------------------------------------------------------- exactness through the loss
def test_meanflow_residual_vanishes_at_the_exact_map_through_the_loss():
    # the loss's own draws (2n rows: FM then MF), its JVP and its target; the marginal velocity v* in place of
    # e - x (no sampling noise): the residual is the ODE error at u*, and not at the 1e-2 perturbation
    n = 100
    x, y = G.sample(n, torch.Generator().manual_seed(0))
    oracle_v = lambda net, x_t, t, v, y, null, args: G.velocity(x_t, t, y)  # noqa: E731
    out = {}
    for name, net in [("exact", lambda *a: exact(*a, steps=20)), ("perturbed", lambda *a: perturbed(*a, steps=20))]:
        torch.manual_seed(0)
        with mock.patch.object(dmf, "guided_velocity", oracle_v):
            _, terms = dmf.dmf_loss(net, const_lv(0.0), x, torch.full((n,), NULL), dmf.Args(), NULL)
        out[name] = terms
    # measured (CPU, 1 thread; RK4 with 20 steps): exact mse_mf 5.4e-10 (the ODE error), mse_fm 0; perturbed mse_mf
    # 1.6e-4, mse_fm 0 (the perturbation vanishes at s = t)
    assert out["exact"]["mse_fm"] < 1e-20 and out["exact"]["mse_mf"] < 5e-9, out["exact"]
    assert out["perturbed"]["mse_mf"] > 1e-5 and out["perturbed"]["mse_fm"] < 1e-20, out["perturbed"]


# ---------------------------------------------------------------- the weight and lv
def test_log_weight_has_no_finite_optimum_in_lv_and_edm2_has_one_at_log_mse():
    args = dmf.Args()
    mse = torch.logspace(-8, 3, 45, dtype=torch.float64)[:, None].expand(-1, 81).reshape(-1)
    lv = torch.linspace(-30, 10, 81, dtype=torch.float64).repeat(45).requires_grad_(True)
    l = dmf.weighted(mse, lv, args)
    g = torch.autograd.grad(l.sum(), lv)[0]
    # the official form, and its lv-derivative 0.01 / (mse e^-lv + 0.01) > 0 everywhere
    assert torch.allclose(l, official(mse, lv), rtol=1e-12, atol=1e-12)
    assert (g > 0).all() and torch.allclose(g, 0.01 / (mse * torch.exp(-lv) + 0.01), rtol=1e-10, atol=0)
    # the loss tends to log(mse) as lv drifts down (the spec's numbers at mse 0.37: -0.9943 ... -0.8122)
    m = torch.tensor([0.37], dtype=torch.float64)
    ends = [dmf.weighted(m, torch.tensor([v], dtype=torch.float64), args).item() for v in (-20.0, 2.0)]
    assert abs(ends[0] - math.log(0.37)) < 1e-9 and abs(ends[0] + 0.9943) < 1e-4 and abs(ends[1] + 0.8122) < 1e-4
    # EDM2: the lv-derivative 1 - mse e^-lv changes sign at lv = log mse, which minimizes the loss
    edm2 = dataclasses.replace(args, weight="edm2")
    g2 = torch.autograd.grad(dmf.weighted(mse, lv, edm2).sum(), lv)[0]
    assert ((g2 > 0) == (lv.detach() > torch.log(mse) + 1e-12)).all()
    grid = torch.linspace(-12, 4, 16001, dtype=torch.float64)
    for v in (1e-4, 0.37, 20.0):
        best = grid[dmf.weighted(torch.full_like(grid, v), grid, edm2).argmin()]
        assert abs(best - math.log(v)) < 2e-3, (v, best)


@pytest.mark.parametrize("weight", ["log", "edm2"])
def test_lv_trained_by_adam_drifts_down_or_settles(weight):
    # the LogVar head (zero-initialized) trained alone by Adam (lr 1e-2, the file's betas) on a fixed mse of 0.37
    # per row: log weight: lv falls on every step, fast while eps e^lv is comparable to the mse, then ever slower
    # as its gradient eps e^lv / mse vanishes (measured, CPU: mean lv -10.758 after 100 steps, -10.794 after 200,
    # -10.839 after 300); edm2: lv settles at log 0.37 = -0.99425 (measured -0.99425 after 300 steps)
    torch.manual_seed(0)
    head = dmf.LogVar().double()
    assert not head(torch.rand(8), torch.rand(8)).any()  # zero-initialized (official): lv = 0 at the start
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, betas=dmf.Args().adam_betas, weight_decay=0.0)
    t = torch.rand(64, dtype=torch.float64)
    s = t * torch.rand(64, dtype=torch.float64)
    mse, args, trace = torch.full((64,), 0.37, dtype=torch.float64), dataclasses.replace(dmf.Args(), weight=weight), []
    for _ in range(300):
        lv = head(t, s)
        dmf.weighted(mse, lv, args).mean().backward()
        opt.step()
        opt.zero_grad()
        trace.append(lv.detach().mean().item())
    if weight == "log":
        assert all(b < a for a, b in zip(trace, trace[1:])) and trace[-1] < -3, trace[-1]
    else:
        assert abs(trace[-1] - math.log(0.37)) < 0.05, trace[-1]


# ---------------------------------------------------------------- from data: posterior tangents
def posterior_batch(P, M, seed):
    """P points x_t with t > s by the MF law, M tangents e - x each from p(x | x_t)."""
    gen = torch.Generator().manual_seed(seed)
    x0, _ = G.sample(P, gen)
    a = torch.sigmoid(0.4 + torch.randn(P, generator=gen, dtype=torch.float64))
    b = torch.sigmoid(-1.2 + torch.randn(P, generator=gen, dtype=torch.float64))
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(P, 2, generator=gen, dtype=torch.float64)
    rep = lambda z: z.repeat_interleave(M, 0)  # noqa: E731
    X_t, T, S = rep(x_t), rep(t), rep(s)
    x = G.posterior_sample(X_t, T, gen)
    return x_t, t, s, X_t, T, S, x, (X_t - (1 - T[:, None]) * x) / T[:, None]


def loss_on_posterior(weight, lv, eps=0.0, P=24, M=1024, seed=0):
    """dmf_loss itself on P points, each an FM row (s = t) and an MF row at the same x_t and data x (the loss
    duplicates the batch), M posterior tangents each, at u = u* + eps dir_i (1 + t - t_i). Returns the
    gradient wrt every row's output, the residuals u - u_tgt, the perturbation, and the per-row weight
    d loss / d mse (up to 1 / rows)."""
    x_t, t, s, X_t, T, S, x, e = posterior_batch(P, M, seed)
    u0, J, du_dt = (torch.cat(z) for z in zip(taylor_exact(x_t, t, t), taylor_exact(x_t, t, s)))
    xt2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
    direction = torch.nn.functional.normalize(torch.randn(P, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64), dim=1)
    direction = torch.cat([direction, direction])
    N = 2 * P * M
    out = torch.zeros(N, 2, dtype=torch.float64, requires_grad=True)

    def net(z, t_, s_, y):
        i = torch.arange(N - len(z), N) // M
        pert = eps * direction[i] * (1 + t_ - t2[i])[:, None]
        return u0[i] + ((z - xt2[i])[:, None, :] * J[i]).sum(-1) + (t_ - t2[i])[:, None] * du_dt[i] + pert + out[N - len(z):]

    seen, orig = [], dmf.mean_velocity_and_target
    args = dataclasses.replace(dmf.Args(), weight=weight)
    with mock.patch.object(dmf, "sample_ts", lambda n, a_, d: (torch.cat([T, T]), torch.cat([T, S]))), \
            mock.patch.object(torch, "randn_like", lambda z: torch.cat([e, e])), \
            mock.patch.object(dmf, "mean_velocity_and_target", lambda *a: seen.append(orig(*a)) or seen[-1]):
        loss, _ = dmf.dmf_loss(net, const_lv(lv), x, torch.full((N // 2,), NULL), args, NULL)
    g = torch.autograd.grad(loss, out)[0]
    r = (seen[0][0] - seen[0][1]).detach()
    mse = r.pow(2).mean(1, keepdim=True)
    w = 1 / (mse + 0.01 * math.exp(lv)) if weight == "log" else torch.full_like(mse, math.exp(-lv))
    return g, r, eps * direction, w, M


def shift_stats(r, w, M):
    """Per point, the weighted-mean target minus u* (the fixed point of the expected gradient at u*): its RMS
    over points, the Monte Carlo noise and chi2 per dof."""
    shift = -(w * r).view(-1, M, 2).sum(1) / w.view(-1, M, 1).sum(1)
    se = r.view(-1, M, 2).std(1) / M**0.5
    return shift.pow(2).sum(1).mean().sqrt().item(), se.pow(2).sum(1).mean().sqrt().item(), ((shift / se) ** 2).mean().item()


@pytest.mark.parametrize("weight,lv", [("log", 0.0), ("log", -20.0), ("edm2", 0.0)])
def test_fixed_point_on_posterior_tangents(weight, lv):
    """With e - x drawn from p(x | x_t) (training from data), the expected gradient at the exact map: the EDM2
    weight (a constant per row, lv depends on (t, s) only) leaves it at zero; the log weight
    1 / (mse + 0.01 e^lv) per row does not, at lv = 0 (the start) and more so at lv = -20 (the asymptote,
    weight 1 / mse). Measured (P = 24 points x {FM, MF} rows, M = 1024 tangents, seeds 0-2; CPU, 1 thread): RMS of
    the weighted-mean target minus u* per point 0.23-0.32 at lv 0 and 0.18-0.30 at lv -20 (chi2 per dof 7.5-24)
    against Monte Carlo noise 0.065-0.10; edm2 0.055-0.067 (chi2 per dof 0.72-0.99, noise only). Also: the
    autograd gradient is (2 / D) w (u - u_tgt) / rows with w = d l / d mse."""
    g, r, _, w, M = loss_on_posterior(weight, lv)
    assert torch.allclose(g, w * r / len(r), rtol=1e-8, atol=0), (g - w * r / len(r)).abs().max()  # (2 / D) = 1
    rms, noise, chi2 = shift_stats(r, w, M)
    if weight == "edm2":
        assert chi2 < 2.0 and rms < 2 * noise, (rms, noise, chi2)
    else:  # seed 0: rms 0.305 (lv 0), 0.282 (lv -20), noise 0.065
        assert rms > 2 * noise and chi2 > 5, (rms, noise, chi2)


@pytest.mark.parametrize("weight", ["log", "edm2"])
def test_expected_gradient_points_to_the_exact_map(weight):
    # u = u* + d (1 + t - t_i) per point, |d| = 0.2: the expected gradient over M = 256 posterior tangents is
    # aligned with d and a small step along -E[grad] is closer to u*. Measured (seeds 0-2, CPU): edm2 mean cosine
    # 0.89-0.95, 0-2% of the 48 rows turned (Monte Carlo); log (lv 0) 0.47-0.55, 12-25% turned (its shift, above)
    g, r, d, w, M = loss_on_posterior(weight, 0.0, eps=0.2, M=256)
    eg = g.view(-1, M, 2).sum(1)
    cos = (eg * d).sum(1) / eg.norm(dim=1) / d.norm(dim=1)
    step = d - 0.2 * d.norm(dim=1).max() / eg.norm(dim=1).max() * eg
    if weight == "edm2":
        assert cos.mean() > 0.8 and (cos > 0).float().mean() > 0.95 and step.norm() < d.norm(), cos
    else:
        assert cos.mean() > 0.4 and step.norm() < d.norm(), cos.mean()


# ---------------------------------------------------------------- the parts around the loss
def test_time_laws_and_row_kinds_through_the_loss():
    # 2n rows: FM rows t = s ~ LN(0, 1); MF rows t = max, s = min of LN(0.4, 1) and LN(-1.2, 1); the JVP on the
    # MF rows only, one forward on all 2n
    n, calls = 3000, []

    def net(z, t_, s_, y):
        level = torch._C._functorch.maybe_current_level() is not None
        calls.append((len(z), level, None if level else (t_, s_)))
        return 0 * z

    x, y = G.sample(n, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    dmf.dmf_loss(net, const_lv(0.0), x.float(), torch.full((n,), NULL), dmf.Args(), NULL)
    (n_jvp, under_jvp, _), (n_fwd, _, (t, s)) = calls
    assert under_jvp and n_jvp == n and n_fwd == 2 * n
    assert torch.equal(t[:n], s[:n]) and (s[n:] < t[n:]).all()
    phi = lambda mu: lambda q: torch.distributions.Normal(0.0, 1.0).cdf(torch.logit(q) - mu)  # noqa: E731
    law = [(t[:n], phi(0.0)), (t[n:], lambda q: phi(0.4)(q) * phi(-1.2)(q)), (s[n:], lambda q: 1 - (1 - phi(0.4)(q)) * (1 - phi(-1.2)(q)))]
    for sample, cdf in law:
        assert ks(sample, cdf) < 1.63 / len(sample) ** 0.5, ks(sample, cdf)  # the 1% KS bound


def test_both_terms_see_the_same_data_and_label_with_their_own_noise():
    n, seen = 64, []
    x, y = G.sample(n, torch.Generator().manual_seed(1))
    orig = dmf.guided_velocity
    with mock.patch.object(dmf, "guided_velocity", lambda net, x_t, t, v, y_, null, args: seen.append((x_t, t, v, y_)) or orig(net, x_t, t, v, y_, null, args)):
        torch.manual_seed(0)
        dmf.dmf_loss(lambda z, t_, s_, y_: 0 * z, const_lv(0.0), x, y, dmf.Args(), NULL)
    x_t, t, v, y2 = seen[0]
    e = v + torch.cat([x, x])
    assert torch.equal(y2, torch.cat([y, y])) and torch.allclose(x_t, (1 - t[:, None]) * torch.cat([x, x]) + t[:, None] * e)
    assert (e[:n] - e[n:]).abs().min() > 0  # independent noises


def test_net_starts_from_the_fm_file(tmp_path):
    # a gmm fm checkpoint with every weight random: the trained net is built from ITS config with the split, its
    # weights are the file's, and at s = t it is the fm net exactly (--ema-decay 1: the EMA keeps the start)
    torch.manual_seed(3)
    fm = MLP(2, 24, 3, NULL)
    with torch.no_grad():
        for p in fm.parameters():
            p.normal_(0, 0.3)
    path = tmp_path / "fm.safetensors"
    save(fm, str(path), dataset="gmm", method="fm")
    g = run_here(SCRIPT, "--teacher", path, "--steps", 1, "--batch-size", 16, "--ema-decay", 1, "--eval-every", 100,
                 "--eval-samples", 100, "--eval-steps", 1, "--log-every", 1, "--out-dir", tmp_path / "run")
    ema = g["ema"]
    assert ema.config == {**fm.config, "decouple": 2} and ema.state_dict().keys() == fm.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), fm.state_dict().values()))
    z, t = torch.randn(50, 2), torch.rand(50)
    y = torch.randint(0, NULL + 1, (50,))
    assert torch.equal(ema(z, t, t, y), fm(z, t, t, y)) and not torch.allclose(ema(z, t, 0.5 * t, y), fm(z, t, 0.5 * t, y))
    assert load(str(tmp_path / "run" / "dmf" / "gmm" / "model.safetensors")).config["decouple"] == 2


def test_bad_flags_are_one_line_errors(tmp_path):
    for flags, msg in [(["--weight", "l2"], "--weight l2"), (["--decouple-depth", 9], "--decouple-depth 9"),
                       (["--log-eps", 0], "--log-eps 0"), (["--cfg-t-max", 2], "--cfg-t-max 2")]:
        p = run_inline(SCRIPT, "--teacher", "oracle", "--steps", 1, "--eval-samples", 100, "--out-dir", tmp_path / flags[0], *flags)
        assert p.returncode == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr[-500:]


@pytest.mark.parametrize("shift", [1.0, 1.5])
def test_sampler_is_exact_at_two_steps_on_the_exact_map(shift):
    e = torch.randn(200, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = G.sample(200, torch.Generator().manual_seed(10))[1]
    end = G.flow_map(e, 1.0, 0.0, y, steps=100)
    calls = []
    net = lambda x, t, s, y_: calls.append((t[0].item(), s[0].item())) or exact(x, t.double(), s.double(), y_, steps=50)  # noqa: E731
    for k in (1, 2):
        calls.clear()
        assert (dmf.sample(net, e, y, k, shift) - end).abs().max() < 1e-6
    assert abs(calls[0][1] - shift * 0.5 / (1 + (shift - 1) * 0.5)) < 1e-7 and calls[1][1] == 0.0


def test_training_guidance_is_on_both_terms_with_scale_one_over_one_minus_k():
    # the official "mg" (omega 0.6 = our k, w 1): a net that IS the CFG field at scale 1 / (1 - 0.6) = 2.5 is
    # the fixed point: with the conditional velocity as v, v_g is its own conditional output, on the FM and the
    # MF rows alike (2n rows); outside [t_min, t_max] v_g = v; a net at another scale is not a fixed point
    args = dataclasses.replace(dmf.Args(), cfg_kappa=0.6, cfg_t_max=0.7)
    n = 200
    x, y = G.sample(n, torch.Generator().manual_seed(6))
    cfg = lambda w: lambda z, t_, s_, y_: G.velocity(z, t_) + torch.where((y_ == NULL)[:, None], 0.0, w) * (G.velocity(z, t_, y_) - G.velocity(z, t_))  # noqa: E731
    seen, orig = [], dmf.guided_velocity
    for w in (2.5, 1.5):
        with mock.patch.object(dmf, "guided_velocity", lambda net, x_t, t, v, y_, null, a: seen.append((x_t, t, y_, orig(net, x_t, t, G.velocity(x_t, t, y_), y_, null, a))) or seen[-1][-1]), \
                mock.patch.object(dmf, "mean_velocity_and_target", lambda net, x_t, t, s, y_, v_g, m, d: (v_g, v_g)):
            torch.manual_seed(0)
            dmf.dmf_loss(cfg(w), const_lv(0.0), x, y, args, NULL)
    (x_t, t, y2, v_g), (_, _, _, v_g15) = seen
    inside = t <= 0.7
    assert len(t) == 2 * n and inside[:n].any() and inside[n:].any() and (~inside).any()
    assert torch.allclose(v_g[inside], cfg(2.5)(x_t, t, t, y2)[inside], atol=1e-10)
    assert torch.allclose(v_g[~inside], G.velocity(x_t, t, y2)[~inside], atol=1e-12)
    assert not torch.allclose(v_g15[inside], cfg(1.5)(x_t, t, t, y2)[inside], atol=1e-3)
