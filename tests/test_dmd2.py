"""DMD2: the sign of the distribution-matching gradient on a two-Gaussian toy with exact
velocities, its fixed point, smoke runs (gmm oracle teacher, tiny mnist teacher, GAN and
backward simulation on), exact resume with the two time-scale rule, and bad input."""
import dataclasses
import json
import os

import pytest
import torch

from common.data import GMM, make_loader
from common.dit import DiT, MLP, load_teacher, save
from common.eval import energy_distance
from conftest import ROOT, assert_resumes_exactly, load_method, read_all, run_inline, run_method
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


def test_teacher_guidance_is_applied():
    # with CFG w != 1 the teacher sees v_u + w (v_c - v_u); for unconditional rows (y = null) it is v_u
    x0 = TOY.sample(500, torch.Generator().manual_seed(3))[0].float()
    g1, _ = dm_step(x0, TOY, seed=4, cfg=1.0)
    g3, _ = dm_step(x0, TOY, seed=4, cfg=3.0)
    assert torch.equal(g1, g3)
    y = torch.zeros(500, dtype=torch.long)  # conditional on component 0: the guided target differs
    v = dmd2.guided(oracle(TOY), x0, torch.full((500,), 0.5), y, NULL, 3.0)
    assert not torch.allclose(v, TOY.velocity(x0, 0.5, y))


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
