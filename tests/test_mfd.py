"""Mean Flow Distillation: the Euler rollout against the exact average velocity, the sign of the
student gradient on a two-Gaussian toy, the fixed point with an exact auxiliary velocity, the
auxiliary loss at its own exact solution, the time laws (quantiles), guidance, the loop run in this
process (aux-ratio updates of the auxiliary net before each student update, each net stepped only by
its own optimizer, no gradient left in the other net), smoke runs (oracle, checkpoint teachers, VSD
limit), bad input (exact resume: tests/test_methods.py)."""
import json
import math
import os

import pytest
import torch

from common.data import GMM, default_gmm
from common.dit import DiT, MLP, load_teacher, save
from common.eval import energy_distance
from conftest import ROOT, load_method, read_all, run_inline, run_method
from test_fm import assert_each_net_moves_in_its_own_step, run_loop

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
    # the K = 1 limit (VSD's direction, not its time law or weight): a step >= t - r is one Euler step, the instantaneous velocity at (x_t, t)
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


# ---------------------------------------------------------------- the auxiliary loss, times, guidance
Q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)


def aux_grad(a, seed, n=20000):
    """Per-row d L_A / d a_i (times n) for the auxiliary net v_gen + a_i PHI on row i, v_gen the exact velocity
    of the student's law (the mixture shifted) and x0 its samples; labels as the loop passes them."""
    gen = shifted(torch.tensor([0.3, -0.2], dtype=torch.float64))
    x0, y = gen.sample(n, torch.Generator().manual_seed(seed))
    a = torch.full((n, 1), float(a), dtype=torch.float64, requires_grad=True)
    phi = lambda x_t, t: torch.stack([torch.sin(x_t[:, 1]) + t, x_t[:, 0] * (1 - t)], 1)
    torch.manual_seed(seed)
    loss = mfd.aux_loss(lambda x_t, t, s, y: gen.velocity(x_t, t, y) + a * phi(x_t, t), x0, y, mfd.Args())
    return torch.autograd.grad(loss, a)[0][:, 0] * n


def test_aux_loss_vanishes_at_the_students_own_velocity_only():
    # the auxiliary net's exact solution is the (class-conditional) velocity of the student's law: E[grad] = 0
    # there within Monte Carlo error; at a perturbation the gradient points back (descent lowers |a|)
    g0 = aux_grad(0.0, 0)
    se = g0.std() / len(g0) ** 0.5
    assert abs(g0.mean()) < 4 * se, (g0.mean(), se)
    assert aux_grad(0.3, 1).mean() > 10 * se and aux_grad(-0.3, 2).mean() < -10 * se


@pytest.mark.parametrize("law", ["uniform", "logit-normal"])
def test_time_laws_by_quantiles(law):
    # student times: t = max, r = min of two draws (CDFs F^2 and 1 - (1 - F)^2); the auxiliary loss: one draw,
    # at s = t. mu, sigma away from 0, 1 so that a swap shows.
    args = mfd.Args(time_dist=law, time_mu=0.3, time_sigma=0.7)
    F_inv = (lambda q: q) if law == "uniform" else (lambda q: torch.sigmoid(0.3 + 0.7 * torch.distributions.Normal(0.0, 1.0).icdf(q)))
    torch.manual_seed(0)
    t, r = (v.double() for v in mfd.sample_tr(100000, args, "cpu"))
    assert (r <= t).all()
    assert torch.allclose(torch.quantile(t, Q), F_inv(Q.sqrt()), atol=5e-3)
    assert torch.allclose(torch.quantile(r, Q), F_inv(1 - (1 - Q).sqrt()), atol=5e-3)
    seen = {}

    def aux(x_t, t, s, y):
        seen.update(t=t, s=s)
        return torch.zeros_like(x_t)
    mfd.aux_loss(aux, torch.zeros(100000, 2), torch.zeros(100000, dtype=torch.long), args)
    assert torch.equal(seen["t"], seen["s"]) and torch.allclose(torch.quantile(seen["t"].double(), Q), F_inv(Q), atol=5e-3)


@pytest.mark.parametrize("w", [1.0, 0.0, 4.5])
def test_guided_velocity_is_v_u_plus_w_times_v_c_minus_v_u(w):
    x, t = torch.randn(50, 2, dtype=torch.float64), torch.rand(50, dtype=torch.float64)
    y = torch.randint(0, NULL, (50,))
    v_c, v_u = G.velocity(x, t, y), G.velocity(x, t, torch.full_like(y, NULL))
    net = lambda x_t, t, s, y: G.velocity(x_t, t, y)
    assert torch.allclose(mfd.velocity(net, x, t, y, NULL, w), v_u + w * (v_c - v_u), atol=1e-12)


def test_student_sampler_is_euler_on_its_velocity():
    # with the exact velocity as the student's net: one step is G(e, 1) = e - v(e, 1); K steps converge to the
    # exact ODE endpoint at order 1 (doubling K halves the error)
    e = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.full((200,), NULL)
    net = lambda x_t, t, s, y: G.velocity(x_t, t, y)
    assert torch.allclose(mfd.generate(net, e, y, 1), e - G.velocity(e, 1.0, y), atol=1e-12)
    exact = G.flow_map(e, 1.0, 0.0, y, steps=200)
    err = [(mfd.generate(net, e, y, k) - exact).norm(dim=1).mean().item() for k in (16, 32)]
    assert 1.7 < err[0] / err[1] < 2.3 and err[1] < 0.05, err


# ---------------------------------------------------------------- the loop, in this process
@pytest.fixture(scope="module")
def mfd_loop(tmp_path_factory):
    """3 student steps on gmm (oracle teacher), 3 auxiliary updates before each; learning rates 1e-2 (student)
    and 3e-2 (auxiliary) warmed up over 2 steps; EMA decay 0.6."""
    flags = ["--teacher", "oracle", "--batch-size", 32, "--hidden", 16, "--depth", 2, "--steps", 3, "--aux-ratio", 3, "--ode-step", 0.5,
             "--lr", 1e-2, "--aux-lr", 3e-2, "--warmup", 2, "--ema-decay", 0.6]
    return run_loop(SCRIPT, flags, ["net", "aux", "ema"], keys=("j",), tmp_path=tmp_path_factory.mktemp("mfd_loop"))


def test_aux_ratio_updates_then_one_student_update(mfd_loop):
    # Alg. 1: aux_ratio auxiliary updates precede every student update; each net's weights change only inside
    # its own optimizer's step
    # (each at its own learning rate, both warmed up: rising to lr and aux_lr over --warmup 2); the EMA moves
    # right after the student's step, toward it, at decay 0.6
    post = [ev for ev in mfd_loop if ev["kind"] == "post"]
    assert [(ev["opt"], ev["step"]) for ev in post] == [(o, k) for k in range(3) for o in ["opt_aux"] * 3 + ["opt"]]
    warm = [0.5, 1.0, 1.0]
    assert all(ev["lr"] == pytest.approx((3e-2 if ev["opt"] == "opt_aux" else 1e-2) * warm[ev["step"]]) for ev in post)
    assert_each_net_moves_in_its_own_step(mfd_loop, {"opt": {"net"}, "opt_aux": {"aux"}}, ema_rate=0.4)


def test_each_turn_leaves_gradient_only_in_its_own_net(mfd_loop):
    # the student's turn: no gradient in the auxiliary net (its rollout is gradient-free); the auxiliary turns:
    # none in the student (its samples are drawn without grad)
    back = [ev for ev in mfd_loop if ev["kind"] == "backward"]
    assert [ev["j"] for ev in back] == [0, 1, 2, 3] * 3
    for ev in back:
        student = ev["j"] == 3
        assert (ev["grad"]["net"] > 0) == student and (ev["grad"]["aux"] > 0) != student, (ev["j"], ev["grad"])
