"""FSF-DMD: the generator-induced fake velocity on the exact flow map of a two-Gaussian toy (the
endpoint identity, flow-map-consistent simulation, the sign and the fixed-point behaviour of
L_FSF), its closed form, L_CD at the exact map and its direction, the time laws (quantiles), guidance
on its interval, the finding as training (L_FSF alone collapses the modes, L_CD + lambda L_FSF
converges), the loop run in this process (tangent warm-up, both EMAs at their own decays, one
optimizer), smoke runs (oracle, tiny mnist teacher, self-teacher), exact resume, bad input, and what
the diff against dmd2.py removes."""
import copy
import dataclasses
import json
import os

import pytest
import torch

from common.data import GMM
from common.dit import MLP
from common.eval import energy_distance
from conftest import ROOT, load_method, read_all, run_inline, run_method
from test_fm import run_loop
from test_methods import TINY, TINY_IMG

fsf = load_method("fsf_dmd")
SCRIPT = os.path.join(ROOT, "methods", "fsf_dmd.py")
TOY = GMM([[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], [1, 1])
NULL = TOY.num_classes
SHIFT = torch.tensor([0.8, 0.6], dtype=torch.float64)
teacher = lambda x_t, t, s, y: TOY.velocity(x_t, t, y)


def shifted(delta):
    return GMM(TOY.means + delta, TOY.sigmas, TOY.weights)


def exact_map(gmm, steps=30):
    return lambda x_t, t, s, y: gmm.avg_velocity(x_t, t, s, y, steps=steps)


def dm_grad(delta, n, seed):
    """grad of L_FSF per sample for a generator that is the exact flow map of the toy shifted by delta
    (samples x0 as the leaf) with its EMA equal to it."""
    gen = shifted(delta)
    x0 = gen.sample(n, torch.Generator().manual_seed(seed))[0].float().requires_grad_(True)
    torch.manual_seed(seed)
    loss, _ = fsf.dm_loss(x0, torch.full((n,), NULL), teacher, exact_map(gen), NULL, fsf.Args())
    return torch.autograd.grad(loss, x0)[0] * n, x0.detach()


def test_endpoint_pseudo_velocity_and_flow_map_simulation():
    y = torch.full((400,), NULL)
    x0, _ = TOY.sample(400, torch.Generator().manual_seed(0))
    t = torch.rand(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.9 + 0.05
    x_t = TOY.flow_map(x0, torch.zeros(400, dtype=torch.float64), t, y, steps=100)  # PF-ODE coupling x_t = f*(x0, 0, t)
    u = exact_map(TOY, 100)(x_t, t, torch.zeros_like(t), y)  # what dm_loss uses as v_fake
    assert torch.allclose(u, (x_t - TOY.flow_map(x_t, t, 0.0, y, steps=100)) / t[:, None], atol=1e-10)
    assert torch.allclose(x_t - t[:, None] * u, x0, atol=1e-5)  # the posterior collapses to the generating x0 (eq. 43-44)
    e = torch.randn(400, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact_end = TOY.flow_map(e, 1.0, 0.0, y, steps=100)
    for m in (1, 2, 4):  # semigroup: M flow-map jumps of the exact map land on the exact ODE endpoint
        assert (fsf.generate(exact_map(TOY, 100), e, y, m) - exact_end).abs().max() < 1e-5


def test_simulation_has_gradient_through_the_last_jump_only():
    # net = a x: x_{1/2} = (1 - a / 2) e without grad, x0 = x_{1/2} - a / 2 x_{1/2}, so d sum(x0) / d a = -sum(x_{1/2}) / 2
    a = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    e = torch.randn(8, 2, dtype=torch.float64)
    x0 = fsf.generate(lambda x, t, s, y: a * x, e, torch.zeros(8, dtype=torch.long), 2)
    (g,) = torch.autograd.grad(x0.sum(), a)
    assert torch.allclose(x0, (1 - 0.3) ** 2 * e) and torch.allclose(g, -0.5 * ((1 - 0.3) * e).sum())


def test_sign_one_update_moves_samples_toward_the_teacher():
    g, x0 = dm_grad(SHIFT, 4000, 0)
    x1 = x0 - 0.3 * g
    real = TOY.sample(4000, torch.Generator().manual_seed(5))[0].float()
    assert energy_distance(x1, real) < 0.8 * energy_distance(x0, real)
    assert (x1.mean(0) - x0.mean(0)) @ SHIFT.float() < 0


def test_dm_term_at_the_exact_solution():
    # exact generator and exact fake surrogate: the mean (translation) part of the gradient vanishes up to
    # Monte-Carlo error, but not the per-sample field: E[x | x_t] is blurrier than the ODE endpoint
    # f*(x_t, t, 0), so the samples are pulled toward the data mean (a documented finding); a shifted
    # generator gets a restoring mean gradient.
    at = [dm_grad(torch.zeros(2, dtype=torch.float64), 6000, s) for s in range(3)]
    mean = torch.stack([g.mean(0) for g, _ in at])
    se = torch.stack([g.std(0) / len(g) ** 0.5 for g, _ in at]).mean(0) / len(at) ** 0.5
    assert (mean.mean(0).abs() < 4 * se).all(), (mean, se)
    radial = torch.tensor([(g * (x - x.mean(0))).sum(1).mean() for g, x in at])
    assert (radial > 0.5).all(), radial  # x -= lr grad contracts toward the mean
    off = torch.stack([dm_grad(SHIFT, 6000, s)[0].mean(0) for s in range(3)]).mean(0)
    assert off @ SHIFT.float() > 0 and (off.abs() > 20 * se).all(), (off, se)


def cd_at(net, r, args, seed=0):
    x = TOY.sample(128, torch.Generator().manual_seed(3))[0]
    torch.manual_seed(seed)
    return fsf.cd_loss(net, teacher, x, torch.full((128,), NULL), NULL, r, args)[0].item()


def test_cd_loss_vanishes_at_the_exact_map_only_at_r_1():
    # paper defaults (no tangent normalization, r ends at 1): the exact map is L_CD's fixed point;
    # AYF's r = 0.99 leaves a bias g = (1 - r)(t - s) du/dt, so L_CD ~ (1 - r)^2
    args = dataclasses.replace(fsf.Args(), diag_ratio=0.25)
    assert not args.tangent_norm and args.tangent_r_max == 1.0 and args.cd_time == "pair"
    wrong = lambda x_t, t, s, y: exact_map(TOY, 20)(x_t, t, s, y) + 0.1 * torch.sin(x_t) * (t - s)[:, None]
    at, off = cd_at(exact_map(TOY, 20), 1.0, args), cd_at(wrong, 1.0, args)
    assert at < 1e-7 and off > 1e-3, (at, off)
    b1, b2 = cd_at(exact_map(TOY, 20), 0.99, args), cd_at(exact_map(TOY, 20), 0.98, args)
    assert b1 > 100 * at and 3.5 < b2 / b1 < 4.5, (at, b1, b2)  # the bias is of order 1 - r
    # with AYF's normalization the fixed point at r = 1 stays (g = 0), the r < 1 bias too
    norm = dataclasses.replace(args, tangent_norm=True)
    assert cd_at(exact_map(TOY, 20), 1.0, norm) < 1e-5 and cd_at(exact_map(TOY, 20), 0.99, norm) > 100 * at


def test_fsf_alone_is_not_zero_at_the_exact_solution():
    # the finding kept from the review: at q = p (exact generator, exact fake surrogate) the L_FSF
    # gradient per sample does not vanish (see test_dm_term_at_the_exact_solution: it contracts the
    # samples), while L_CD's does (test above): L_FSF alone has no fixed point at the teacher, which is
    # why the paper trains L_CD + lambda L_FSF (it reports instability without L_CD)
    g, x = dm_grad(torch.zeros(2, dtype=torch.float64), 6000, 0)
    assert (g.norm(dim=1).mean() > 0.3) and (g * (x - x.mean(0))).sum(1).mean() > 0.5


def test_dm_gradient_is_the_closed_form_sign_rule():
    # d L_FSF / d x0 = t (v_real - v_fake) / (w B) with v_fake = fake(x_t, t, 0) (the endpoint pseudo-velocity)
    # and w = mean_dims |x0 - (x_t - t v_real)| held constant: descent moves samples along v_fake - v_real
    x0 = TOY.sample(256, torch.Generator().manual_seed(5))[0].requires_grad_(True)
    y, args = torch.full((256,), NULL), fsf.Args()
    fake = lambda x_t, t, s, y: 0.7 * x_t + torch.stack([t, 1 + s], 1)  # depends on s: must be called at s = 0
    torch.manual_seed(6)
    loss, _ = fsf.dm_loss(x0, y, teacher, fake, NULL, args)
    (g,) = torch.autograd.grad(loss, x0)
    torch.manual_seed(6)
    t = fsf.sample_dm_t(256, args, "cpu")[:, None].double()
    x_t = (1 - t) * x0.detach() + t * torch.randn_like(x0)
    v_real, v_fake = TOY.velocity(x_t, t[:, 0]), 0.7 * x_t + torch.cat([t, torch.ones_like(t)], 1)
    w = (x0.detach() - (x_t - t * v_real)).abs().mean(1, keepdim=True)
    want = t * (v_real - v_fake) / w / len(x0)
    assert (g - want).abs().max() < 1e-5 * want.abs().max(), (g - want).abs().max() / want.abs().max()


GAUSS = GMM([[1.0, -0.5]], [0.6], [1])  # one Gaussian N(m, sig^2 I): its exact flow map in closed form


def gauss_map(x_t, t, s, y):
    """Exact average velocity u*(x_t, t, s) of GAUSS: f*(x_t, t, s) = (1 - s) m + (sig_s / sig_t)(x_t - (1 - t) m),
    sig_t^2 = (1 - t)^2 sig^2 + t^2; at s = t the velocity (t - (1 - t) sig^2) / sig_t^2 (x_t - (1 - t) m) - m."""
    m, v = GAUSS.means[0], GAUSS.sigmas[0] ** 2
    t, s = t.double()[:, None], s.double()[:, None]
    sig = lambda r: ((1 - r) ** 2 * v + r**2).sqrt()
    diff = x_t - (1 - t) * m
    u = (x_t - (1 - s) * m - sig(s) / sig(t) * diff) / (t - s).clamp(min=1e-12)
    return torch.where(t - s > 1e-12, u, (t - (1 - t) * v) / sig(t) ** 2 * diff - m)


def test_cd_loss_direction_at_a_perturbed_map():
    # net = exact map + a c (c a constant vector): the target sg(u_m - g) stays the exact map, so the loss is
    # |a c|^2 per row and d L / d a = 2 a |c|^2 > 0: a descent step moves the map back toward the exact one
    x, y = GAUSS.sample(128, torch.Generator().manual_seed(3))[0], torch.full((128,), 1)
    t, s = torch.rand(2, 128, dtype=torch.float64).sort(0, descending=True).values
    assert torch.allclose(gauss_map(x, t, s, y), GAUSS.avg_velocity(x, t, s, steps=100), atol=1e-6)  # the closed form
    assert torch.allclose(gauss_map(x, t, t, y), GAUSS.velocity(x, t), atol=1e-12)
    c = torch.tensor([1.0, -0.5], dtype=torch.float64)
    gauss_v = lambda x_t, t, s, y: GAUSS.velocity(x_t, t)
    for a0 in (0.3, -0.2):
        a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(0)
        loss, _ = fsf.cd_loss(lambda x_t, t, s, y: gauss_map(x_t, t, s, y) + a * c, gauss_v, x, y, 1, 1.0,
                              dataclasses.replace(fsf.Args(), diag_ratio=0.25))
        (g,) = torch.autograd.grad(loss, a)
        assert abs(g / (2 * a0 * (c**2).sum()) - 1) < 1e-6, (a0, g)


def test_guidance_is_v_u_plus_w_times_v_c_minus_v_u_inside_its_interval():
    x, t = torch.randn(400, 2, dtype=torch.float64), torch.rand(400, dtype=torch.float64)
    y = torch.randint(0, 2, (400,))
    v_c, v_u = TOY.velocity(x, t, y), TOY.velocity(x, t, torch.full_like(y, NULL))
    args = dataclasses.replace(fsf.Args(), teacher_cfg=3.0, cfg_t_min=0.2, cfg_t_max=0.7)
    w = torch.where((t >= 0.2) & (t < 0.7), 3.0, 1.0)[:, None]
    assert torch.allclose(fsf.guided(teacher, x, t, y, NULL, args), v_u + w * (v_c - v_u), atol=1e-12)
    assert torch.allclose(fsf.guided(teacher, x, t, y, NULL, dataclasses.replace(args, teacher_cfg=1.0)), v_c, atol=1e-12)


Q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)


def test_dm_time_is_the_shifted_uniform():
    # t = b u / (1 + (b - 1) u), u ~ U(t_min, t_max): monotone, so its quantiles are the shifted uniform's
    args = dataclasses.replace(fsf.Args(), shift=3.0, t_min=0.1, t_max=0.9)
    torch.manual_seed(0)
    t = fsf.sample_dm_t(100000, args, "cpu").double()
    u = 0.1 + 0.8 * Q
    assert torch.allclose(torch.quantile(t, Q), 3 * u / (1 + 2 * u), atol=5e-3)


@pytest.mark.parametrize("law", ["pair", "gap"])
def test_cd_times_by_quantiles(law):
    # pair: t = max, s = min of two LN(mu, sigma) draws (CDFs F^2 and 1 - (1 - F)^2); gap: d = t - s ~ LN(mu,
    # sigma) and s / (1 - d) ~ U(0, 1); s = t on exactly the first round(diag_ratio n) rows (0.25: uneven)
    args = dataclasses.replace(fsf.Args(), cd_time=law, cd_mu=0.3, cd_sigma=0.8, diag_ratio=0.25)
    torch.manual_seed(0)
    t, s = (v.double() for v in fsf.sample_cd_ts(80000, args, "cpu"))
    assert torch.equal(t[:20000], s[:20000]) and (s[20000:] < t[20000:]).all() and (s >= 0).all() and (t <= 1).all()
    t, s = t[20000:], s[20000:]
    ln = lambda q: torch.sigmoid(0.3 + 0.8 * torch.distributions.Normal(0.0, 1.0).icdf(q))
    if law == "pair":
        assert torch.allclose(torch.quantile(t, Q), ln(Q.sqrt()), atol=6e-3)
        assert torch.allclose(torch.quantile(s, Q), ln(1 - (1 - Q).sqrt()), atol=6e-3)
    else:
        assert torch.allclose(torch.quantile(t - s, Q), ln(Q), atol=6e-3)
        assert torch.allclose(torch.quantile(s / (1 - (t - s)), Q), Q, atol=6e-3)


def train_toy(net, fake, steps, lr, seed, cd=True, lr_decay=True):
    """The method's training step on TOY with the exact teacher, unconditional (labels NULL): Adam, batch
    256, clip 1, L_CD (file defaults: r = 1, no tangent normalization, pair times) + dm_weight L_FSF (M = 2
    flow-map steps, shift 10), or L_FSF alone (cd=False); the fake side is an EMA of net (decay 0.9, fast
    so that the toy moves; the file's is 0.99995)."""
    args, y = fsf.Args(), torch.full((256,), NULL)
    opt, gen = torch.optim.Adam(net.parameters(), lr=lr), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for step in range(steps):
        opt.param_groups[0]["lr"] = lr * (1 - step / steps) if lr_decay else lr
        x = TOY.sample(256, gen)[0].float()
        loss = fsf.cd_loss(net, teacher, x, y, NULL, 1.0, args)[0] if cd else 0.0
        x0 = fsf.generate(net, torch.randn_like(x), y, args.sim_steps)
        loss = loss + args.dm_weight * fsf.dm_loss(x0, y, teacher, fake, NULL, args)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(fake.parameters()), list(net.parameters()), 0.1)


def toy_stats(net, n=2000):
    """1-step samples against TOY: energy distance, per-component std (split at x = 0, over the data's split
    the same way), total std sqrt(tr Cov) over the data's, and the mass between the modes (|x| < 1; data: 2%)."""
    x = fsf.sample(net, torch.randn(n, 2, generator=torch.Generator().manual_seed(123)), torch.full((n,), NULL), 1)
    data = TOY.sample(n, torch.Generator().manual_seed(124))[0].float()
    per_comp = lambda z: torch.stack([z[z[:, 0] < 0].std(0), z[z[:, 0] >= 0].std(0)])
    total = lambda z: z.var(0).sum().sqrt()
    return {"ed": energy_distance(x, data), "comp": per_comp(x) / per_comp(data), "total": (total(x) / total(data)).item(),
            "between": (x[:, 0].abs() < 1).float().mean().item()}


def run_toy(seed=0, steps=400, steps_b=100):
    """(a) L_CD + lambda L_FSF from scratch (MLP 64 x 2, `steps` steps, lr 3e-3 decaying linearly to 0), then
    from that generator and its EMA, `steps_b` steps at lr 1e-4 of L_FSF alone and, as a control, of both."""
    torch.manual_seed(seed)
    net = MLP(2, 64, 2, num_classes=2)
    fake = copy.deepcopy(net).requires_grad_(False)
    train_toy(net, fake, steps, 3e-3, seed)
    out = {"a": toy_stats(net)}
    for name, cd in (("fsf_alone", False), ("both", True)):
        net_b, fake_b = copy.deepcopy(net), copy.deepcopy(fake)
        train_toy(net_b, fake_b, steps_b, 1e-4, seed + 1, cd=cd, lr_decay=False)
        out[name] = toy_stats(net_b)
    return out


def test_training_fsf_alone_collapses_where_the_combined_objective_converges():
    # issue 10's finding as training behaviour: L_CD + lambda L_FSF trained from scratch converges to the
    # two-Gaussian data (seeds 0-2: energy distance 0.010-0.013, per-component std 0.72-1.15 of the data's,
    # total std 0.93-0.94, mass between the modes 0.07-0.08); from that generator, 100 steps of L_FSF alone at
    # a small lr pull the two modes into one blob (energy distance 0.50-0.95, total std 0.34-0.53, mass between
    # the modes 0.58-0.87: its gradient at q = p is not zero, see test_dm_term_at_the_exact_solution), while
    # the same 100 steps of L_CD + lambda L_FSF stay where they were (energy distance 0.012-0.013)
    out = run_toy(seed=0)
    a, b, c = out["a"], out["fsf_alone"], out["both"]
    assert a["ed"] < 0.03 and ((a["comp"] > 0.6) & (a["comp"] < 1.4)).all() and 0.85 < a["total"] < 1.15 and a["between"] < 0.12, a
    assert b["ed"] > 10 * a["ed"] and b["ed"] > 0.3 and b["total"] < 0.7 and b["between"] > 0.4, (a, b)
    assert c["ed"] < 0.03 and c["between"] < 0.12, c


def test_the_fake_network_is_gone():
    dmd2, text = open(os.path.join(ROOT, "methods", "dmd2.py")).read(), open(SCRIPT).read()
    assert "opt_fake" in dmd2 and "fake_loss" in dmd2 and "ttur" in dmd2
    assert all(w not in text for w in ("opt_fake", "fake_loss(", "args.ttur", "disc"))
    assert "dm_loss(x0, y, teacher, ema_fake, null, args)" in text  # ... replaced by an EMA generator


def check_run(run, key):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] in (4, 6) and all(k in summary["final"] for k in [key, "loss", "loss_cd", "loss_dm", "grad_norm"])
    assert (run / "samples.png").stat().st_size > 1000 and (run / "model.safetensors").exists()
    assert {k.split("/")[1] for k in read_all(run / "ckpt.safetensors")} == {"net", "ema", "ema_fake", "opt", "loader"}  # no fake, no opt_fake


def test_smoke_mnist_and_self_teacher(tiny_teacher, tmp_path):
    run_method(SCRIPT, *TINY, *TINY_IMG, "--teacher", tiny_teacher, "--teacher-cfg", 2.0, "--dataset", "mnist", "--out-dir", tmp_path)
    check_run(tmp_path / "fsf_dmd" / "mnist", "fid@1")
    run_method(SCRIPT, *TINY, "--teacher", "self", "--sim-steps", 1, "--shift", 1, "--out-dir", tmp_path / "self")
    check_run(tmp_path / "self" / "fsf_dmd" / "gmm", "fm_err@1")


def test_bad_input_gets_one_line(tmp_path):
    for flags, needle in [(["--sim-steps", 0], "--sim-steps 0"), (["--teacher", tmp_path / "missing.safetensors"], "no such file")]:
        proc = run_inline(SCRIPT, *flags, "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (flags, proc.stderr[-2000:])
        assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]


@pytest.mark.parametrize("field,value,needle", [("sim_steps", -1, "--sim-steps -1"), ("tangent_warmup", 0, "--tangent-warmup 0"), ("tangent_r_max", 1.5, "--tangent-r-max 1.5"), ("fake_ema_decay", 2.0, "--fake-ema-decay 2.0"), ("cd_time", "x", "--cd-time"),
                                                ("diag_ratio", 1.5, "--diag-ratio 1.5"), ("shift", 0.0, "--shift 0.0"),
                                                ("cfg_t_max", 1.2, "--cfg-t-max 1.2"), ("dm_weight", -0.1, "--dm-weight -0.1")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        fsf.check_args(dataclasses.replace(fsf.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- the loop, in this process
@pytest.fixture(scope="module")
def fsf_loop(tmp_path_factory):
    """4 steps on gmm (oracle teacher): tangent warm-up over 3 steps to r = 0.8, evaluation EMA decay 0.6, fake
    EMA decay 0.3 (distinguishable), dm_weight 0.3, lr 1e-2 warmed up over 2 steps."""
    flags = ["--teacher", "oracle", "--batch-size", 32, "--hidden", 16, "--depth", 2, "--steps", 4, "--tangent-warmup", 3,
             "--tangent-r-max", 0.8, "--ema-decay", 0.6, "--fake-ema-decay", 0.3, "--lr", 1e-2, "--dm-weight", 0.3, "--warmup", 2]
    return run_loop(SCRIPT, flags, ["net", "ema", "ema_fake"], keys=("r", "loss", "loss_cd", "loss_dm"), tmp_path=tmp_path_factory.mktemp("fsf_loop"))


def test_the_backpropagated_loss_is_l_cd_plus_dm_weight_l_fsf(fsf_loop):
    back = [ev for ev in fsf_loop if ev["kind"] == "backward"]
    assert all(torch.allclose(ev["loss"], ev["loss_cd"] + 0.3 * ev["loss_dm"]) and ev["loss_dm"] > 0 for ev in back)


def test_tangent_weight_warms_up(fsf_loop):
    back = [ev for ev in fsf_loop if ev["kind"] == "backward"]
    assert [ev["step"] for ev in back] == [0, 1, 2, 3]
    assert [round(ev["r"], 6) for ev in back] == [round(0.8 * k / 3, 6) for k in (1, 2, 3)] + [0.8]  # rising, then held


def test_one_optimizer_and_both_emas_at_their_own_decays(fsf_loop):
    # only the generator has an optimizer (stepped every step); the EMAs hold no gradient and move toward the net
    # after each step at their own decays: 0.6 (evaluation) and 0.3 (the fake side)
    back = [ev for ev in fsf_loop if ev["kind"] == "backward"]
    post = [ev for ev in fsf_loop if ev["kind"] == "post"]
    assert [(ev["opt"], ev["step"]) for ev in post] == [("opt", k) for k in range(4)]
    assert [ev["lr"] for ev in post] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])  # the learning-rate warm-up rises
    assert all(ev["grad"]["net"] > 0 and ev["grad"]["ema"] == 0 and ev["grad"]["ema_fake"] == 0 for ev in back)
    for k in range(3):
        net = post[k]["w"]["net"]
        for name, decay in (("ema", 0.6), ("ema_fake", 0.3)):
            old = back[k]["w"][name]
            assert not torch.allclose(net, old) and torch.allclose(back[k + 1]["w"][name], old + (1 - decay) * (net - old), atol=1e-6), (name, k)
    pre = [ev for ev in fsf_loop if ev["kind"] == "pre"]
    assert all(torch.equal(a["w"]["ema"], b["w"]["ema"]) and torch.equal(a["w"]["ema_fake"], b["w"]["ema_fake"]) for a, b in zip(pre, post))
