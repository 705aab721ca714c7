"""DMD2: the sign of the distribution-matching gradient on a two-Gaussian toy with exact
velocities, its closed form, its fixed point, the fake loss at its own exact solution, guidance, the
loop run in this process (the generator's turn leaves no gradient in the fake net or the
discriminator, the two time-scale rule, each net stepped only by its own optimizer), smoke runs (gmm
oracle teacher, tiny mnist teacher, GAN and backward simulation on), exact resume, and bad input."""
import dataclasses
import json
import os

import pytest
import torch

from common.data import GMM, make_loader
from common.dit import DiT, MLP, load_teacher, save
from common.eval import energy_distance
from conftest import ROOT, assert_resumes_exactly, load_method, read_all, run_inline, run_method
from test_fm import assert_each_net_moves_in_its_own_step, run_loop
from test_methods import TINY, TINY_IMG

dmd2 = load_method("dmd2")
SCRIPT = os.path.join(ROOT, "methods", "dmd2.py")
TOY = GMM([[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], [1, 1])
NULL = TOY.num_classes
SHIFT = torch.tensor([0.8, 0.6])


def oracle(gmm):
    return lambda x_t, t, s, y: gmm.velocity(x_t, t, y)


def shifted(delta):
    return GMM(TOY.means + delta.double(), TOY.sigmas, TOY.weights)


def dm_step(x0, fake_gmm, seed, lr=0.5, cfg=1.0):
    """One generator update with x0 itself as the (fully flexible) generator output; returns the
    gradient on x0 (rescaled to `grad` per sample) and the updated samples."""
    torch.manual_seed(seed)
    x0 = x0.clone().requires_grad_(True)
    args = dataclasses.replace(dmd2.Args(), teacher_cfg=cfg)
    loss, _ = dmd2.dm_loss(x0, torch.full((len(x0),), NULL), oracle(TOY), oracle(fake_gmm), NULL, args)
    (g,) = torch.autograd.grad(loss, x0)
    g = g * x0.numel()  # the loss is a mean: undo it to get `grad` per sample
    return g, (x0 - lr * g).detach()


def test_sign_one_update_moves_samples_toward_the_teacher():
    gen = shifted(SHIFT)
    x0, _ = gen.sample(4000, torch.Generator().manual_seed(0))
    x0 = x0.float()
    g, x1 = dm_step(x0, gen, seed=1)
    real = TOY.sample(4000, torch.Generator().manual_seed(2))[0].float()
    assert energy_distance(x1, real) < 0.8 * energy_distance(x0, real)
    assert (x1.mean(0) - x0.mean(0)) @ SHIFT < 0  # back along -shift


def test_fixed_point_gradient_vanishes_only_at_the_teacher_distribution():
    def mean_grad(delta, reps=4):
        out = []
        for r in range(reps):
            x0 = shifted(delta).sample(10000, torch.Generator().manual_seed(10 + r))[0].float()
            out.append(dm_step(x0, shifted(delta), seed=r)[0].mean(0))
        return torch.stack(out)

    at = mean_grad(torch.zeros(2))  # generator = teacher law, fake velocity = its exact velocity
    off = mean_grad(SHIFT)
    assert at.abs().max() < 1e-5, at
    se = off.std(0) / len(off) ** 0.5
    assert (off.mean(0) @ SHIFT) > 0 and (off.mean(0).abs() > 10 * se).all(), (off, se)


def test_teacher_guidance_is_v_u_plus_w_times_v_c_minus_v_u():
    # with CFG w != 1 the teacher sees v_u + w (v_c - v_u); for unconditional rows (y = null) it is v_u
    x0 = TOY.sample(500, torch.Generator().manual_seed(3))[0].float()
    g1, _ = dm_step(x0, TOY, seed=4, cfg=1.0)
    g3, _ = dm_step(x0, TOY, seed=4, cfg=3.0)
    assert torch.equal(g1, g3)
    x, t = x0.double(), torch.rand(500, dtype=torch.float64)
    y = torch.randint(0, 2, (500,))
    v_c, v_u = TOY.velocity(x, t, y), TOY.velocity(x, t, torch.full_like(y, NULL))
    for w in (1.0, 0.0, 3.0):
        assert torch.allclose(dmd2.guided(oracle(TOY), x, t, y, NULL, w), v_u + w * (v_c - v_u), atol=1e-12), w


def test_dm_gradient_is_the_closed_form_sign_rule():
    # d L / d x0 = t (v_real - v_fake) / (w numel) with w = mean_dims |x0 - (x_t - t v_real)| held constant:
    # descent moves each sample along v_fake - v_real. A teacher and a fake net that differ everywhere, the
    # same t and noise drawn again here.
    x0 = TOY.sample(256, torch.Generator().manual_seed(5))[0].requires_grad_(True)
    y, args = torch.full((256,), NULL), dmd2.Args(t_dist="uniform")
    fake = lambda x_t, t, s, y: 0.7 * x_t + torch.stack([t, s], 1)  # depends on s: the fake velocity must be at s = t
    torch.manual_seed(6)
    loss, _ = dmd2.dm_loss(x0, y, oracle(TOY), fake, NULL, args)
    (g,) = torch.autograd.grad(loss, x0)
    torch.manual_seed(6)
    t = dmd2.sample_dm_t(256, args, "cpu")[:, None].double()
    x_t = (1 - t) * x0.detach() + t * torch.randn_like(x0)
    v_real, v_fake = TOY.velocity(x_t, t[:, 0]), 0.7 * x_t + torch.cat([t, t], 1)
    w = (x0.detach() - (x_t - t * v_real)).abs().mean(1, keepdim=True)
    want = t * (v_real - v_fake) / w / x0.numel()
    assert ((g - want).abs().max() / want.abs().max()) < 1e-5, ((g - want).abs().max() / want.abs().max())


def fake_grad(a, seed, n=20000):
    """Per-row d L_fake / d a_i (times n) for the fake net v_gen + a_i PHI on row i, where v_gen is the exact
    velocity of the generator's law (TOY shifted) and x0 its samples."""
    gen = shifted(SHIFT)
    x0 = gen.sample(n, torch.Generator().manual_seed(seed))[0]
    a = torch.full((n, 1), float(a), dtype=torch.float64, requires_grad=True)
    phi = lambda x_t, t: torch.stack([torch.sin(x_t[:, 1]) + t, x_t[:, 0] * (1 - t)], 1)
    torch.manual_seed(seed)
    loss, _ = dmd2.fake_loss(lambda x_t, t, s, y: gen.velocity(x_t, t) + a * phi(x_t, t), x0, torch.full((n,), NULL))
    return torch.autograd.grad(loss, a)[0][:, 0] * n


def test_fake_loss_vanishes_at_the_generators_own_velocity_only():
    # the fake net's exact solution is the velocity of the generator's law (not the teacher's): E[grad] = 0
    # there within Monte Carlo error; at a perturbation the gradient points back (descent lowers a)
    g0 = fake_grad(0.0, 0)
    se = g0.std() / len(g0) ** 0.5
    assert abs(g0.mean()) < 4 * se, (g0.mean(), se)
    assert fake_grad(0.3, 1).mean() > 10 * se and fake_grad(-0.3, 2).mean() < -10 * se


def test_fake_loss_time_is_uniform_at_s_equal_t():
    seen = {}

    def fake(x_t, t, s, y):
        seen.update(t=t, s=s)
        return torch.zeros_like(x_t)
    torch.manual_seed(0)
    dmd2.fake_loss(fake, torch.zeros(100000, 2), torch.zeros(100000, dtype=torch.long))
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    assert torch.equal(seen["t"], seen["s"]) and torch.allclose(torch.quantile(seen["t"], q), q, atol=5e-3)


def test_backward_simulation_chain():
    net = lambda x_t, t, s, y: 0.5 * x_t  # G(x_t, t) = (1 - t / 2) x_t
    e = torch.randn(8, 2)
    torch.manual_seed(0)
    x0 = dmd2.generate(net, e, torch.zeros(8, dtype=torch.long), 0, 4)
    assert torch.allclose(x0, 0.5 * e)
    torch.manual_seed(0)
    x0 = dmd2.generate(net, e, torch.zeros(8, dtype=torch.long), 1, 4)
    torch.manual_seed(0)
    x = 0.25 * (0.5 * e) + 0.75 * torch.randn(8, 2)  # re-noised to t = 0.75, then G(x, 0.75)
    assert torch.allclose(x0, (1 - 0.375) * x)


def test_smoke_mnist(tiny_teacher, tmp_path):
    extra = [*TINY_IMG, "--teacher", tiny_teacher, "--gan-weight", 3e-3, "--backsim-steps", 2]
    run_method(SCRIPT, *TINY, *extra, "--ttur", 2, "--dataset", "mnist", "--out-dir", tmp_path)
    check_run(tmp_path / "dmd2" / "mnist", "fid@1")


def check_run(run, key):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] in (4, 6) and all(k in summary["final"] for k in [key, "loss", "fake_loss", "grad_norm", "sec_per_step"])
    assert (run / "samples.png").stat().st_size > 1000 and (run / "model.safetensors").exists()
    assert {k.split("/")[1] for k in read_all(run / "ckpt.safetensors")} >= {"net", "opt", "fake", "disc", "opt_fake"}


def test_resume_continues_exactly_with_gan_and_backsim(tmp_path):
    common = [*TINY, "--dataset", "gmm", "--teacher", "oracle", "--dropout", 0.1, "--eval-every", 100, "--ttur", 3,
              "--gan-weight", 3e-3, "--backsim-steps", 2, "--eval-ema"]
    run = assert_resumes_exactly(SCRIPT, "dmd2", common, tmp_path, keys=("loss", "fake_loss", "gan_g", "gan_d"))
    check_run(run, "fm_err@1")  # doubles as the gmm smoke run (oracle teacher)


def test_dm_time_is_the_official_karras_index():
    # the official samples an index uniformly in [20, 980) of the ascending 1000-level Karras grid
    # (sigma 0.002 .. 80, rho 7); on our path t = sigma / (1 + sigma). Quantiles computed independently:
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    sig = lambda q: (lo + (20 + q * 960) / 999 * (hi - lo)) ** 7
    expect = torch.tensor([sig(q) / (1 + sig(q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)])
    torch.manual_seed(0)
    t = dmd2.sample_dm_t(200000, dmd2.Args(), "cpu")
    got = torch.quantile(t.double(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
    assert torch.allclose(got, expect.double(), atol=5e-3), (got, expect)
    assert abs((t > 0.9).double().mean().item() - 0.34) < 0.01  # 34% of the draws above t = 0.9 (uniform: 8%)
    assert torch.allclose(expect, torch.tensor([0.022, 0.163, 0.716, 0.943, 0.976]), atol=2e-3)
    torch.manual_seed(0)
    u = dmd2.sample_dm_t(200000, dmd2.Args(t_dist="uniform"), "cpu")
    assert abs((u > 0.9).double().mean().item() - 0.08 / 0.96) < 0.01


def test_bad_input_gets_one_line(tmp_path):
    for flags, needle in [(["--ttur", 0], "--ttur 0"), (["--teacher", tmp_path / "missing.safetensors"], "no such file")]:
        proc = run_inline(SCRIPT, *flags, "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (flags, proc.stderr[-2000:])
        assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]


@pytest.mark.parametrize("field,value,needle", [("ttur", 0, "--ttur 0"), ("ttur", -2, "--ttur -2"), ("backsim_steps", 0, "--backsim-steps 0"),
                                                ("t_min", 0.99, "--t-min 0.99"), ("gan_weight", -1.0, "--gan-weight -1.0")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        dmd2.check_args(dataclasses.replace(dmd2.Args(), **{field: value}))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_bad_teachers(tmp_path):
    # the file hands --teacher to common.dit.load_teacher with the data set's info: every mismatch is one line
    other, shape = tmp_path / "other.safetensors", tmp_path / "shape.safetensors"
    save(DiT(28, 7, 1, 32, 2, 2, 4.0, 10), str(other), dataset="mnist")
    save(MLP(3, 16, 1, 6), str(shape), dataset="gmm")
    loader = make_loader("gmm", 8)
    for spec, needle in [(other, "trained on mnist"), (shape, "network for data (3,)"), (tmp_path / "{dataset}.st", "gmm.st: checkpoint")]:
        with pytest.raises(SystemExit) as err:
            load_teacher(str(spec), "gmm", loader.info, "cpu", loader.gmm)
        assert "--teacher" in str(err.value) and needle in str(err.value), str(err.value)
    with pytest.raises(SystemExit, match="--teacher oracle"):
        load_teacher("oracle", "moons", make_loader("moons", 8).info)
    student = tmp_path / "student.safetensors"  # a distilled generator is not a flow-matching teacher
    save(MLP(2, 16, 1, 6), str(student), dataset="gmm", method="dmd2")
    with pytest.raises(SystemExit, match="a dmd2 checkpoint; expected a flow-matching teacher"):
        load_teacher(str(student), "gmm", loader.info, "cpu", loader.gmm)


# ---------------------------------------------------------------- the loop, in this process
@pytest.fixture(scope="module")
def gan_loop(tmp_path_factory):
    """7 steps of the GAN run on gmm (oracle teacher), --ttur 3: generator turns at steps 2 and 5; an EMA of the
    generator at decay 0.6 (--eval-ema; 0.5 would hide an inverted decay); lr 1e-2 warmed up over 4 steps."""
    flags = ["--teacher", "oracle", "--batch-size", 32, "--hidden", 16, "--depth", 2, "--steps", 7, "--ttur", 3, "--gan-weight", 0.5,
             "--lr", 1e-2, "--grad-clip", 0, "--eval-ema", "--ema-decay", 0.6, "--warmup", 4]
    return run_loop(SCRIPT, flags, ["net", "fake", "disc", "ema"], keys=("gen_turn",), tmp_path=tmp_path_factory.mktemp("dmd2_loop"))


def test_generator_turn_leaves_no_gradient_in_the_fake_net_or_the_discriminator(gan_loop):
    # issue 21: the generator's GAN loss runs through the fake net and the head; both must be frozen for that
    # turn, or opt_fake adds the generator's gradient to the discriminator's own update
    back = [ev for ev in gan_loop if ev["kind"] == "backward"]
    gen = [ev for i, ev in enumerate(back) if ev["gen_turn"] and (i == 0 or back[i - 1]["step"] != ev["step"])]
    assert [ev["step"] for ev in gen] == [2, 5]
    for ev in gen:  # right after the generator's backward
        assert ev["grad"]["net"] > 0 and ev["grad"]["fake"] == 0 and ev["grad"]["disc"] == 0, ev["grad"]
    for ev in back:  # the fake / discriminator backward adds nothing to the generator
        if ev not in gen:
            same = [g for g in gen if g["step"] == ev["step"]]
            assert ev["grad"]["net"] == (same[0]["grad"]["net"] if same else 0), (ev["step"], ev["grad"])
            assert ev["grad"]["fake"] > 0 and ev["grad"]["disc"] > 0


def test_two_time_scale_rule_and_each_net_by_its_own_optimizer(gan_loop):
    # --ttur 3: the fake net and the discriminator step every step, the generator only on steps 2 and 5; the
    # weights of a net change only inside its own optimizer's step; the EMA right after the generator's, toward it
    steps = [(ev["opt"], ev["step"]) for ev in gan_loop if ev["kind"] == "post"]
    assert steps == [("opt_fake", 0), ("opt_fake", 1), ("opt_fake", 2), ("opt", 2), ("opt_fake", 3), ("opt_fake", 4),
                     ("opt_fake", 5), ("opt", 5), ("opt_fake", 6)], steps
    assert all(ev["lr"] == pytest.approx(1e-2 * min(1, (ev["step"] + 1) / 4)) for ev in gan_loop if ev["kind"] == "post")  # both warm up
    assert_each_net_moves_in_its_own_step(gan_loop, {"opt": {"net"}, "opt_fake": {"fake", "disc"}}, ema_rate=0.4)


def test_gan_loss_signs(tmp_path):
    """The GAN terms' signs, read from a real loop run: the generator minimizes softplus(-D(x0)) (it wants
    its samples called real), the discriminator softplus(D(sg x0)) + softplus(-D(x)) (fake low, real high).
    Every softplus argument is compared with the logit the head produced just before it."""
    import sys

    import torch.nn.functional as F

    from conftest import run_here

    path = os.path.join(ROOT, "methods", "dmd2.py")
    logits, args_seen, softplus = [], [], F.softplus

    def head_hook(module, inp, out):
        if isinstance(module, torch.nn.Sequential) and isinstance(module[-1], torch.nn.Linear) and module[-1].out_features == 1:
            logits.append(out[:, 0].detach().clone())

    def recording(x, *a, **k):
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename != path:
            f = f.f_back
        if f is not None:
            with open(path) as fh:
                line = fh.read().splitlines()[f.f_lineno - 1].strip()
            args_seen.append((line.split("=")[0].strip(), len(logits), x.detach().clone()))
        return softplus(x, *a, **k)

    handle = torch.nn.modules.module.register_module_forward_hook(head_hook)
    F.softplus = recording
    try:
        run_here(path, "--dataset", "gmm", "--teacher", "oracle", "--batch-size", 16, "--hidden", 16, "--depth", 2, "--steps", 2,
                 "--ttur", 1, "--gan-weight", 0.5, "--eval-samples", 50, "--eval-steps", 1, "--out-dir", tmp_path)
    finally:
        F.softplus = softplus
        handle.remove()
    gen = [(n, x) for role, n, x in args_seen if role == "gan_g"]
    disc = [(n, x) for role, n, x in args_seen if role != "gan_g"]
    assert len(gen) == 2 and len(disc) == 4, [r for r, _, _ in args_seen]  # ttur 1: both turns on both steps
    for n, x in gen:  # generator: softplus(-D(x0))
        assert torch.equal(x, -logits[n - 1])
    for i, (n, x) in enumerate(disc):  # discriminator: softplus(+D(fake)), then softplus(-D(real))
        assert torch.equal(x, logits[n - 1] if i % 2 == 0 else -logits[n - 1]), i
