"""SiD: the score-identity gradient on a two-Gaussian toy with exact velocities (float64): zero on every sample
at q = p; the Fisher identity grad L = 1/2 grad F + (1/2 - alpha) grad L1 with the fake frozen at the
generator's exact velocity (unnormalized mode), so alpha = 1/2 is half the Fisher gradient and the official
1.2 is not; the normalization detached; the official loss trains the toy and a flipped one does not. The
SiD time law and the fake loss's time law, weight, target and exact solution; the one-step sampler exact at
the exact map, the generator's input time; the loop run in this process (fake turn first, its optimizer step
before the generator's loss, fresh noise for the generator's turn, no gradient crossing between the nets,
each net stepped only by its own optimizer, the EMA, the evaluation sampler at --gen-t); bad flags."""
import dataclasses
import math
import os

import pytest
import torch

from common.data import GMM
from conftest import ROOT, load_method
from test_fm import assert_each_net_moves_in_its_own_step, run_loop

sid = load_method("sid")
SCRIPT = os.path.join(ROOT, "methods", "sid.py")
TOY = GMM([[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], [1, 1])
NULL = TOY.num_classes
SHIFT = torch.tensor([0.8, 0.6], dtype=torch.float64)


def oracle(gmm):
    return lambda x_t, t, s, y: gmm.velocity(x_t, t, y)


def shifted(delta):
    return GMM(TOY.means + delta.detach().double(), TOY.sigmas, TOY.weights)


def nulls(n):
    return torch.full((n,), NULL)


def per_sample_grad(x0, fake_gmm, seed, **kw):
    """d L / d x0 (times the batch size: each sample's own gradient) of sid_loss, teacher TOY, fake fake_gmm."""
    x0 = x0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss, _ = sid.sid_loss(x0, nulls(len(x0)), oracle(TOY), oracle(fake_gmm), NULL, dataclasses.replace(sid.Args(), **kw))
    return torch.autograd.grad(loss, x0)[0] * len(x0)


def test_gradient_vanishes_on_every_sample_at_q_equal_p():
    # teacher and fake the same function: D_real - D_fake is 0 and so is its derivative through x_t, on every
    # sample (not only in expectation); a generator law off the teacher's gets a gradient on every sample
    x0 = TOY.sample(2000, torch.Generator().manual_seed(0))[0]
    for kw in ({}, {"sid_norm": "none", "alpha": 0.5}):
        g = per_sample_grad(x0, TOY, 1, **kw)
        assert g.abs().max() < 1e-12, (kw, g.abs().max())
    g = per_sample_grad(x0 + SHIFT, shifted(SHIFT), 1)
    assert (g.norm(dim=1) > 1e-12).all() and g.norm(dim=1).median() > 1e-2, g.norm(dim=1).min()


def test_both_nets_see_the_same_x_t_at_s_equal_t():
    # teacher and fake at the same noised point x_t = (1 - t) x0 + t n, the fake at s = t (a net that depends on s)
    seen = {}

    def net(name):
        def f(x_t, t, s, y):
            seen[name] = (x_t, t, s)
            return 0.7 * x_t + torch.stack([t, s], 1) * (name == "fake")
        return f
    x0 = torch.randn(1000, 2, dtype=torch.float64)
    torch.manual_seed(7)
    sid.sid_loss(x0, nulls(1000), net("teacher"), net("fake"), NULL, sid.Args())
    torch.manual_seed(7)
    t = sid.sample_dm_t(1000, sid.Args(), "cpu")
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn_like(x0)
    for name in ("teacher", "fake"):
        assert torch.equal(seen[name][1], t) and torch.equal(seen[name][2], t) and torch.allclose(seen[name][0], x_t), name


def fisher_setup(t0, n=50000, seed=0):
    """Generator x0 = z + theta (z ~ TOY, theta = SHIFT), fake frozen at the generator's exact velocity, fixed t0,
    common random numbers: returns (SiD gradient on theta at alpha, central-difference dF/dtheta, grad L1)."""
    z = TOY.sample(n, torch.Generator().manual_seed(seed))[0]
    fake = oracle(shifted(SHIFT))  # psi*(theta) at theta = SHIFT, frozen
    torch.manual_seed(seed + 1)
    e = torch.randn_like(z)
    t = torch.full((n, 1), t0, dtype=torch.float64)

    def sid_grad(alpha):
        theta = SHIFT.clone().requires_grad_(True)
        args = dataclasses.replace(sid.Args(), sid_norm="none", alpha=alpha)
        torch.manual_seed(seed + 1)  # sid_loss draws the same noise e
        saved = sid.sample_dm_t
        sid.sample_dm_t = lambda k, a, d: torch.full((k,), t0, dtype=torch.float64)
        try:
            loss, _ = sid.sid_loss(z + theta, nulls(n), oracle(TOY), fake, NULL, args)
        finally:
            sid.sample_dm_t = saved
        return torch.autograd.grad(loss, theta)[0]

    def fisher(theta):  # F(theta) = E mean_dims ||D_real - D_q(theta)||^2, D_real - D_q = t (v_q - v_real)
        x_t = (1 - t) * (z + theta) + t * e
        return ((t * (shifted(theta).velocity(x_t, t[:, 0]) - TOY.velocity(x_t, t[:, 0]))) ** 2).mean()

    h = 1e-4
    dF = torch.stack([(fisher(SHIFT + h * u) - fisher(SHIFT - h * u)) / (2 * h) for u in torch.eye(2, dtype=torch.float64)])
    theta = SHIFT.clone().requires_grad_(True)  # L1 at the frozen fake: grad through x_t only
    x_t = (1 - t) * (z + theta) + t * e
    l1 = ((t * (fake(x_t, t[:, 0], t[:, 0], None) - TOY.velocity(x_t, t[:, 0]))) ** 2).mean()
    return sid_grad, dF, torch.autograd.grad(l1, theta)[0]


@pytest.mark.parametrize("t0", [0.3, 0.7])
def test_fisher_identity_alpha_half_is_half_the_fisher_gradient(t0):
    # spec (verified in float64): with w = 1 and the fake at the exact psi*(theta), grad [L2 - alpha L1] =
    # 1/2 dF/dtheta + (1/2 - alpha) grad L1. Monte Carlo with common random numbers: rel gap ~ 1/sqrt(N)
    # (measured at N = 5e4: 0.010-0.011 at t = 0.3, 6e-4 at t = 0.7)
    sid_grad, dF, gl1 = fisher_setup(t0)
    for alpha in (0.5, 1.0, 1.2):
        want = 0.5 * dF + (0.5 - alpha) * gl1
        got = sid_grad(alpha)
        assert (got - want).norm() / want.norm() < 0.03, (alpha, got, want)
    half = sid_grad(0.5)
    assert (half - 0.5 * dF).norm() / (0.5 * dF).norm() < 0.03
    if t0 < 0.5:  # the official alpha is not half the Fisher gradient (measured: 0.14 off here, MC noise 0.01;
        # at t = 0.7 grad L1 is small on this toy: 0.009 off)
        assert (sid_grad(1.2) - 0.5 * dF).norm() / (0.5 * dF).norm() > 0.08


def test_normalizer_is_detached_and_per_sample():
    # official: each sample's loss over sg(mean_dims |D_real - x0|): its gradient is the unnormalized one / w_i
    x0 = (TOY.sample(500, torch.Generator().manual_seed(3))[0] + SHIFT)
    fake = shifted(0.5 * SHIFT)
    g_norm = per_sample_grad(x0, fake, 4)
    g_none = per_sample_grad(x0, fake, 4, sid_norm="none")
    torch.manual_seed(4)
    t = sid.sample_dm_t(len(x0), sid.Args(), "cpu")[:, None]
    e = torch.randn_like(x0)
    x_t = (1 - t) * x0 + t * e
    w = (x_t - t * TOY.velocity(x_t, t[:, 0]) - x0).abs().mean(1, keepdim=True).clamp(min=1e-5)
    assert torch.allclose(g_norm, g_none / w, rtol=1e-5, atol=1e-9), (g_norm - g_none / w).abs().max()
    assert not torch.allclose(g_norm, g_none, rtol=1e-2)


def train_toy(sign, steps=120, n=1000, lr=0.05):
    """Adam on theta, generator z + theta, the fake always at the generator's exact velocity; official loss
    (alpha 1.2, normalization, SiD time law). Returns |theta| before and after."""
    theta = SHIFT.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(6)
    for _ in range(steps):
        z = TOY.sample(n, gen)[0]
        loss, _ = sid.sid_loss(z + theta, nulls(n), oracle(TOY), oracle(shifted(theta)), NULL, sid.Args())
        opt.zero_grad()
        (sign * loss).backward()
        opt.step()
    return SHIFT.norm().item(), theta.detach().norm().item()


def test_official_loss_trains_the_toy_and_a_flipped_sign_diverges():
    before, after = train_toy(+1)
    assert after < 0.1 * before, (before, after)
    _, flipped = train_toy(-1)
    assert flipped > 2 * before, flipped


def test_sid_time_is_the_official_karras_fraction():
    # official: sigma = (a + u (b - a))^7 with u ~ U(0, tmax / 1000 = 0.8), t = sigma / (1 + sigma); quantiles
    # computed here from that continuous law (the file draws an index of the 1000-level grid: 0.1% apart)
    a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    sig = (a + 0.8 * qs * (b - a)) ** 7
    expect = sig / (1 + sig)
    assert torch.allclose(expect, torch.tensor([0.011, 0.078, 0.491, 0.854, 0.935], dtype=torch.float64), atol=2e-3)
    torch.manual_seed(0)
    t = sid.sample_dm_t(200000, sid.Args(), "cpu").double()
    assert torch.allclose(torch.quantile(t, qs), expect, atol=5e-3), (torch.quantile(t, qs), expect)
    assert abs((t > 0.9).double().mean().item() - 0.18) < 0.01 and t.max() < 0.962


def test_fake_loss_time_weight_target_and_stop_gradient():
    # EDM's loss in velocity units: t = sigmoid(N(-1.2, 1.2)) (EDM training law: t quantiles .061/.118/.232/.404/.583),
    # weight (1 - t)^2 + 4 t^2, target n - sg(x0), at s = t
    seen = {}

    def fake(x_t, t, s, y):
        seen.update(t=t, s=s, x_t=x_t)
        return torch.zeros_like(x_t)
    x0 = torch.randn(200000, 2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    loss, _ = sid.fake_loss(fake, x0, nulls(len(x0)), sid.Args())
    t = seen["t"]
    assert torch.equal(t, seen["s"])
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    assert torch.allclose(torch.quantile(t.double(), q), torch.tensor([0.061, 0.118, 0.232, 0.404, 0.583], dtype=torch.float64), atol=5e-3)
    torch.manual_seed(0)
    n = torch.randn_like(x0)
    assert torch.allclose(seen["x_t"], (1 - t[:, None]) * x0.detach() + t[:, None] * n)
    want = (((1 - t) ** 2 + 4 * t**2) * ((n - x0.detach()) ** 2).mean(1)).mean()
    assert torch.allclose(loss, want, rtol=1e-10), (loss, want)
    assert not loss.requires_grad  # no path back to the generator's samples


def fake_grad(a, seed, n=20000):
    """Per-row d L_fake / d a_i (times n) for the fake net v_gen + a_i PHI, v_gen the exact velocity of the
    generator's law (TOY shifted), x0 its samples."""
    gen = shifted(SHIFT)
    x0 = gen.sample(n, torch.Generator().manual_seed(seed))[0]
    a = torch.full((n, 1), float(a), dtype=torch.float64, requires_grad=True)
    phi = lambda x_t, t: torch.stack([torch.sin(x_t[:, 1]) + t, x_t[:, 0] * (1 - t)], 1)
    torch.manual_seed(seed)
    loss, _ = sid.fake_loss(lambda x_t, t, s, y: gen.velocity(x_t, t) + a * phi(x_t, t), x0, nulls(n), sid.Args())
    return torch.autograd.grad(loss, a)[0][:, 0] * n


def test_fake_loss_vanishes_at_the_generators_own_velocity_only():
    g0 = fake_grad(0.0, 0)
    se = g0.std() / len(g0) ** 0.5
    assert abs(g0.mean()) < 4 * se, (g0.mean(), se)
    assert fake_grad(0.3, 1).mean() > 10 * se and fake_grad(-0.3, 2).mean() < -10 * se


class Exact(torch.nn.Module):
    """The exact average velocity u*(x_t, t, 0) of TOY, as a module (the sampler switches it to eval mode)."""

    def forward(self, x_t, t, s, y):
        return TOY.avg_velocity(x_t, t, torch.zeros_like(t), steps=200)


def test_one_step_sampler_is_exact_at_the_exact_map():
    e = torch.randn(64, 2, dtype=torch.float64)
    x0 = sid.sample(Exact(), e, nulls(64), 1)
    assert torch.allclose(x0, TOY.flow_map(e, 1.0, 0.0, steps=200), atol=1e-10)


def test_generator_input_time_and_the_chain():
    seen = []
    net = lambda x_t, t, s, y: seen.append((x_t, t, s)) or 0.5 * x_t  # G(x_t, t) = (1 - t / 2) x_t
    e = torch.randn(8, 2)
    x0 = sid.generate(net, e, nulls(8), 0, 1, 0.7)  # official init_sigma: G(t_g e, t_g)
    assert torch.allclose(x0, (1 - 0.35) * 0.7 * e) and torch.allclose(seen[0][0], 0.7 * e)
    assert torch.allclose(seen[0][1], torch.full((8,), 0.7)) and torch.equal(seen[0][1], seen[0][2])
    torch.manual_seed(0)
    x0 = sid.generate(net, e, nulls(8), 1, 2, 0.7)  # 2-step chain: G at 0.7, re-noised to 0.35, G there
    torch.manual_seed(0)
    x = 0.65 * ((1 - 0.35) * 0.7 * e) + 0.35 * torch.randn(8, 2)
    assert torch.allclose(x0, (1 - 0.175) * x)


@pytest.mark.parametrize("field,value,needle", [("ttur", 0, "--ttur 0"), ("t_max", 1.5, "--t-max 1.5"), ("gen_t", 0.0, "--gen-t 0.0"),
                                                ("sid_norm", "l2", "--sid-norm l2"), ("fake_t_sigma", 0.0, "--fake-t-sigma 0.0")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        sid.check_args(dataclasses.replace(sid.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- the loop, in this process
@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """7 steps on gmm (oracle teacher), --ttur 3: generator turns at steps 2 and 5; EMA decay 0.6; lr 1e-2
    warmed up over 4 steps; generator input time 0.7."""
    flags = ["--teacher", "oracle", "--batch-size", 32, "--hidden", 16, "--depth", 2, "--steps", 7, "--ttur", 3,
             "--lr", 1e-2, "--grad-clip", 0, "--ema-decay", 0.6, "--warmup", 4, "--gen-t", 0.7]
    return run_loop(SCRIPT, flags, ["net", "fake", "ema"], keys=("gen_turn", "x0", "ema", "sample_fn"),
                    tmp_path=tmp_path_factory.mktemp("sid_loop"))


def test_fake_turn_first_then_the_generator_against_the_updated_fake(loop):
    evs = [ev for ev in loop if ev["kind"] != "batch"]
    order = [(ev["kind"], ev["opt"], ev["step"]) for ev in evs]
    want = []
    for step in range(7):
        want += [("backward", None, step), ("pre", "opt_fake", step), ("post", "opt_fake", step)]
        if step in (2, 5):
            want += [("backward", None, step), ("pre", "opt", step), ("post", "opt", step)]
    assert order == want, order
    for i, ev in enumerate(evs):
        if ev["kind"] != "backward":
            continue
        if evs[i - 1]["kind"] == "post" and evs[i - 1]["step"] == ev["step"]:  # the generator's backward
            assert ev["grad"]["net"] > 0 and ev["grad"]["fake"] == 0, ev["grad"]  # fake frozen: its input only
        else:  # the fake net's backward: on sg(x0), nothing reaches the generator
            assert ev["grad"]["fake"] > 0 and ev["grad"]["net"] == 0, ev["grad"]
    assert all(ev["lr"] == pytest.approx(1e-2 * min(1, (ev["step"] + 1) / 4)) for ev in evs if ev["kind"] == "post")


def test_each_net_by_its_own_optimizer_and_the_ema(loop):
    assert_each_net_moves_in_its_own_step(loop, {"opt": {"net"}, "opt_fake": {"fake"}}, ema_rate=0.4)


def test_generator_turn_draws_fresh_noise_and_the_sampler_uses_gen_t(loop):
    # the generator's turn draws its own noise (official: a fresh z), not the fake turn's again: with the
    # generator unchanged between the two turns, the same noise would give the same x0
    back = [ev for ev in loop if ev["kind"] == "backward"]
    for step in (2, 5):
        fake_x0, gen_x0 = [ev["x0"].detach() for ev in back if ev["step"] == step]
        assert fake_x0.shape == gen_x0.shape and not torch.allclose(fake_x0, gen_x0, atol=1e-3)
    ema, sample_fn = loop[-1]["ema"], loop[-1]["sample_fn"]  # evaluation samples G(t_g e, t_g) of the EMA, t_g = 0.7
    e, y = torch.randn(16, 2), torch.full((16,), 6)
    t = torch.full((16,), 0.7)
    with torch.no_grad():
        assert torch.allclose(sample_fn(e, y, 1), 0.7 * e - 0.7 * ema(0.7 * e, t, t, y), atol=1e-6)
