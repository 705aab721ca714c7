"""Mean Flow Distillation: the Euler rollout against the exact average velocity, the sign of the
student gradient on a two-Gaussian toy, the fixed point with an exact auxiliary velocity, smoke
runs (oracle, checkpoint teachers, VSD limit), bad input (exact resume: tests/test_methods.py)."""
import json
import math
import os

import pytest
import torch

from common.data import GMM, default_gmm
from common.dit import DiT, MLP, load_teacher, save
from common.eval import energy_distance
from conftest import ROOT, load_method, read_all, run_inline, run_method

mfd = load_method("mfd")
G = default_gmm()
NULL = G.num_classes
SCRIPT = os.path.join(ROOT, "methods", "mfd.py")
TINY = ["--steps", 4, "--batch-size", 32, "--log-every", 2, "--eval-every", 4, "--eval-samples", 200, "--ckpt-every", 2,
        "--hidden", 32, "--depth", 2, "--aux-ratio", 2]


def oracle(gmm):
    return lambda x, t, y: gmm.velocity(x, t, y)


def path_points(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = G.sample(n, gen)
    t, r = torch.rand(2, n, generator=gen, dtype=torch.float64).sort(0, descending=True).values
    return (1 - t[:, None]) * x + t[:, None] * torch.randn(n, 2, generator=gen, dtype=torch.float64), t, r, y


def test_rollout_matches_the_exact_average_velocity():
    x_t, t, r, y = path_points(300, 0)
    exact = G.avg_velocity(x_t, t, r, y, steps=100)
    u, K = mfd.avg_velocity(oracle(G), x_t, t, r, y, 0.002)
    err = (u - exact).norm(dim=1)
    assert err.max() < 0.02 and err.mean() < 0.003, (err.max(), err.mean())  # Euler error O(step)
    u_coarse, _ = mfd.avg_velocity(oracle(G), x_t, t, r, y, 0.25)
    assert (u_coarse - exact).norm(dim=1).mean() > 5 * err.mean()  # the step does matter
    # VSD limit: a step >= t - r is one Euler step, the instantaneous velocity at (x_t, t)
    u_vsd, K_vsd = mfd.avg_velocity(oracle(G), x_t, t, r, y, 1.0)
    assert (K_vsd == 1).all() and torch.allclose(u_vsd, G.velocity(x_t, t, y), atol=1e-12)


def test_rollout_takes_each_samples_own_steps():
    # reference: one sample at a time, K = ceil((t - r) / step) Euler steps on linspace(t, r, K + 1)
    x_t, t, r, y = path_points(40, 1)
    step = 0.07
    u, K = mfd.avg_velocity(oracle(G), x_t, t, r, y, step)
    for i in range(len(x_t)):
        k = max(1, math.ceil((t[i] - r[i]).item() / step))
        taus = torch.linspace(t[i].item(), r[i].item(), k + 1, dtype=torch.float64)
        z = x_t[i:i + 1]
        for a, b in zip(taus[:-1], taus[1:]):
            z = z - (a - b) * G.velocity(z, a, y[i:i + 1])
        assert K[i] == k
        assert torch.allclose(u[i], ((x_t[i:i + 1] - z) / (t[i] - r[i]))[0], atol=1e-9), i


@pytest.mark.parametrize("step", [0.02, 1.0])
def test_one_update_moves_samples_toward_the_teacher(step):
    # teacher: two Gaussians around the origin; generator N(b, 0.5^2 I) with b = (0, 1.5) and the
    # exact velocity of its own law as the auxiliary net. One normalized gradient step on b.
    teacher = GMM([[-1.5, 0.0], [1.5, 0.0]], [0.4, 0.4], [1, 1])
    b = torch.tensor([0.0, 1.5], dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(4000, 2, generator=gen, dtype=torch.float64)
    y = torch.full((4000,), 2)
    real, _ = teacher.sample(4000, gen)
    aux = GMM([b.detach().tolist()], [0.5], [1])
    torch.manual_seed(0)
    loss, terms = mfd.student_loss(b + 0.5 * e, y, oracle(teacher), oracle(aux), mfd.Args(ode_step=step))
    (g,) = torch.autograd.grad(loss, b)
    b_new = b.detach() - 0.1 * g / g.norm()
    before, after = energy_distance(b.detach() + 0.5 * e, real), energy_distance(b_new + 0.5 * e, real)
    assert b_new[1] < b[1] - 0.09 and after < before, (b_new, before, after)
    assert terms["gap"] > 0.1


@pytest.mark.parametrize("step", [0.005, 1.0])
def test_student_gradient_is_jacobian_free(step):
    # dL/dx0 = (1 - t)(u_T - u_A) / numel at x_t = (1 - t) x0 + t n: no gradient through the rollouts
    x0 = G.sample(64, torch.Generator().manual_seed(4))[0].requires_grad_(True)
    y = torch.full((64,), NULL)
    aux = GMM(G.means * 0.8, G.sigmas, G.weights)
    args = mfd.Args(ode_step=step, time_dist="logit-normal")
    torch.manual_seed(5)
    loss, _ = mfd.student_loss(x0, y, oracle(G), oracle(aux), args)
    (g,) = torch.autograd.grad(loss, x0)
    torch.manual_seed(5)
    t, r = mfd.sample_tr(64, args, "cpu")
    x_t = (1 - t[:, None]) * x0.detach() + t[:, None] * torch.randn(64, 2, dtype=torch.float64)
    u_T = G.avg_velocity(x_t, t, r, y, steps=200) if step < 1 else G.velocity(x_t, t, y)
    u_A = aux.avg_velocity(x_t, t, r, y, steps=200) if step < 1 else aux.velocity(x_t, t, y)
    want = (1 - t[:, None]) * (u_T - u_A) / x0.numel()
    assert torch.allclose(g, want, atol=0.05 * want.abs().max()), (g - want).abs().max() / want.abs().max()


def shifted(theta):
    """The default mixture shifted by theta: the exact law of the generator x0 = x + theta."""
    return GMM(G.means + theta.detach(), G.sigmas, G.weights)


@pytest.mark.parametrize("step", [0.02, 1.0])
def test_gradient_vanishes_at_the_teacher_distribution(step):
    gen = torch.Generator().manual_seed(3)
    x, y = G.sample(4000, gen)
    args = mfd.Args(ode_step=step)
    teacher = lambda x_t, t, s, y: G.velocity(x_t, t, y)  # a module-like teacher through the CFG helper
    teacher_v = lambda z, t, y: mfd.velocity(teacher, z, t, y, NULL, 1.0)

    def grad(theta, teacher_v=teacher_v):
        theta = theta.clone().requires_grad_(True)
        torch.manual_seed(0)
        loss, _ = mfd.student_loss(x + theta, y, teacher_v, oracle(shifted(theta)), args)
        return torch.autograd.grad(loss, theta)[0]

    g0 = grad(torch.zeros(2, dtype=torch.float64))
    g1 = grad(torch.tensor([0.3, 0.0], dtype=torch.float64))
    assert g0.norm() < 1e-4 * g1.norm() + 1e-12, (g0, g1)
    assert g1[0] > 0 and abs(g1[1]) < g1[0]  # descent pulls the shift back toward 0
    # a guided teacher (w = 2) is another target: the data law is then no fixed point
    g_cfg = grad(torch.zeros(2, dtype=torch.float64), lambda z, t, y: mfd.velocity(teacher, z, t, y, NULL, 2.0))
    assert g_cfg.norm() > 1e-3 * g1.norm()


def read_rows(run):
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


def test_smoke_gmm_oracle(tmp_path):
    run_method(SCRIPT, *TINY, "--teacher", "oracle", "--eval-every", 100, "--steps", 6, "--out-dir", tmp_path)
    run = tmp_path / "mfd" / "gmm"
    assert any(k.startswith("/opt_aux/") for k in read_all(run / "ckpt.safetensors"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and all(k in summary["final"] for k in ["fm_err@1", "ed@1", "gap", "aux_loss", "ode_k"])


def test_smoke_checkpoint_teachers_and_vsd_limit(tmp_path):
    torch.manual_seed(0)
    save(MLP(2, 32, 2, NULL), tmp_path / "gmm_teacher.safetensors", dataset="gmm")
    run_method(SCRIPT, *TINY, "--teacher", tmp_path / "gmm_teacher.safetensors", "--ode-step", 1.0, "--gen-steps", 2,
               "--teacher-cfg", 1.5, "--out-dir", tmp_path)
    rows = read_rows(tmp_path / "mfd" / "gmm")
    assert all(r["ode_k"] == 1.0 for r in rows if "ode_k" in r) and any("fm_err@4" in r for r in rows)
    save(DiT(28, 7, 1, 32, 2, 2, 4.0, 10), tmp_path / "mnist_teacher.safetensors", dataset="mnist")
    run_method(SCRIPT, *TINY, "--heads", 2, "--patch-size", 7, "--batch-size", 8, "--dataset", "mnist", "--teacher-cfg", 2.0,
               "--teacher", tmp_path / "mnist_teacher.safetensors", "--out-dir", tmp_path)
    run = tmp_path / "mfd" / "mnist"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and "fid@1" in summary["final"] and summary["final"]["ode_k"] > 1
    assert (run / "samples.png").stat().st_size > 1000 and (run / "model.safetensors").exists()


@pytest.mark.parametrize("field,value,needle", [
    ("ode_step", 0.0, "--ode-step 0.0"), ("ode_step", -0.1, "--ode-step -0.1"), ("aux_ratio", 0, "--aux-ratio 0"),
    ("gen_steps", 0, "--gen-steps 0"), ("time_dist", "normal", "--time-dist normal")])
def test_bad_method_flags(field, value, needle):
    with pytest.raises(SystemExit, match=needle):
        mfd.check_args(mfd.Args(**{field: value}))


def test_bad_input_gets_one_line(tmp_path):
    save(MLP(2, 16, 1, NULL), tmp_path / "gmm.safetensors", dataset="gmm")
    save(MLP(3, 16, 1, NULL), tmp_path / "wide.safetensors", dataset="gmm")
    cases = [(["--ode-step", 0], "--ode-step 0"),
             (["--teacher", tmp_path / "none.safetensors"], "no such file"),
             (["--teacher", tmp_path / "gmm.safetensors", "--dataset", "mnist"], "trained on gmm"),
             (["--teacher", tmp_path / "wide.safetensors"], "expected (2,)")]
    for flags, needle in cases:
        proc = run_inline(SCRIPT, *flags, "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr
    with pytest.raises(SystemExit, match="--teacher oracle: only the gmm"):
        load_teacher("oracle", "moons", {"shape": (2,), "num_classes": 0})
