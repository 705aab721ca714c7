"""PID (physics-informed distillation) on the gmm oracle in float64. The residual (f - s df_ds) - sg(f - s v_T(f, s))
of the map from t = 1: with the JVP it vanishes at the exact map and not at the spec's 1e-2 perturbation; the
official finite difference over 250 Karras levels leaves a floor at the exact map as large as that perturbation,
falling with the level gap, and the difference in t equals the official one in EDM sigma. Direction: the loss
and its gradient vanish at the exact map (JVP) and not away; a gradient step moves toward the exact map; the
autograd gradient is the closed form -2 t_max R / (D B) (sign, detached target, gradient through df_ds). Around
the loss: the Karras levels and the level law by quantiles, the teacher called without grad on a detached input
and distinguishable from the student (also in the loop), the guided teacher, the fd forwards' shared dropout masks, the sampler exact on the oracle
(from t = 1 and from t_max), the student starting as the teacher, the teacher frozen in a run; bad input."""
import dataclasses
import math
import os

import pytest
import torch

from common.data import GMM as Mixture, default_gmm
from common.dit import MLP, save
from conftest import ROOT, load_method, read_all, run_here

pid = load_method("pid")
SCRIPT = os.path.join(ROOT, "methods", "pid.py")
GMM = default_gmm()
NULL = GMM.num_classes
ARGS = pid.Args()
v_star = lambda x, t, y: GMM.velocity(x, t, y)


class ExactU(torch.autograd.Function):
    """u*(x, t, s) by RK4 with its exact forward-mode tangent in s, du*/ds = (u* - v*(f*, s)) / (t - s) (because
    df*/ds = v*(f*, s), the ODE itself): the file's JVP path then costs one RK4 solve, not one on dual numbers
    (10 s here for 256 rows and 100 steps); checked against dual numbers through the RK4 below."""

    @staticmethod
    def forward(x, t, s, y, steps, mix=GMM):
        return mix.avg_velocity(x, t, s, y, steps=steps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, s, y, _, *mix = inputs
        ctx.save_for_forward(x, t, s, y, output)
        ctx.mix = mix[0] if mix else GMM

    @staticmethod
    def jvp(ctx, gx, gt, gs, gy, gsteps, *gmix):
        x, t, s, y, u = ctx.saved_tensors
        assert (gx is None or not gx.any()) and (gt is None or not gt.any()), "only a tangent on s"
        gap = (t - s)[:, None]
        return gs[:, None] * (u - ctx.mix.velocity(x - gap * u, s, y)) / gap


exact = lambda x, t, s, y: ExactU.apply(x, t, s, y, 100)
# the spec's perturbed map: u = u* + eps (t - s)(1 + t) sin(2x), eps = 1e-2 (it vanishes at s = t)
wrong = lambda x, t, s, y: exact(x, t, s, y) + 1e-2 * ((t - s) * (1 + t))[:, None] * torch.sin(2 * x)
exact20 = lambda x, t, s, y: ExactU.apply(x, t, s, y, 20)
exact40 = lambda x, t, s, y: ExactU.apply(x, t, s, y, 40)  # a cheaper exact map (RK4, 20 steps)


def noise(n=256, seed=0):
    e = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))  # float64: the oracle's precision
    return e, torch.full((n,), NULL)  # unconditional rows (the spec's measurements)


def residual(net, e, y, s, s_next, derivative, t_max=1.0):
    """R = (f - s df_ds) - (f - s v*(f, s)) per row, through the file's derivative."""
    t = torch.full_like(s, t_max)
    f, df = pid.derivative(net, t_max * e, t, s, s_next, y, dataclasses.replace(ARGS, derivative=derivative))
    return (f - s[:, None] * df) - (f - s[:, None] * v_star(f, s, y))


rms = lambda r: r.pow(2).sum(1).mean().sqrt().item()  # rms over rows of the residual's norm (the spec's measure)


def test_jvp_residual_vanishes_at_the_exact_map_and_not_at_the_perturbed_one():
    e, y = noise()
    s = 0.002 + (80 / 81 - 0.002) * torch.rand(256, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    at, off = rms(residual(exact, e, y, s, None, "jvp")), rms(residual(wrong, e, y, s, None, "jvp"))
    # measured 4.5e-17 (the helper's tangent is the ODE: an assembly check; dual numbers through the RK4 leave 1.8e-8, the
    # spec 4.3e-8) and 9.2e-3 (the spec: 9.2e-3)
    assert at < 1e-6 and 6e-3 < off < 1.3e-2, (at, off)


def test_the_helpers_tangent_is_the_dual_number_one():
    e, y = noise(16)
    t, s = torch.ones(16, dtype=torch.float64), torch.linspace(0.02, 0.98, 16, dtype=torch.float64)
    a = pid.derivative(lambda *q: ExactU.apply(*q, 20), e, t, s, None, y, dataclasses.replace(ARGS, derivative="jvp"))[1]
    b = pid.derivative(lambda *q: GMM.avg_velocity(*q, steps=20), e, t, s, None, y, dataclasses.replace(ARGS, derivative="jvp"))[1]
    assert (a - b).abs().max() < 1e-4 and a.abs().max() > 0.1  # equal up to the RK4 error (20 steps)


def levels(n, args, seed=1):
    torch.manual_seed(seed)
    return pid.sample_levels(n, args, torch.zeros(1, dtype=torch.float64))


def test_official_finite_difference_leaves_a_floor_at_the_exact_map():
    e, y = noise()
    s, s_next = levels(256, ARGS)
    floor = rms(residual(exact40, e, y, s, s_next, "fd"))  # (RK4 error of the map: ~1e-6)
    off = rms(residual(wrong, e, y, s, None, "jvp"))
    # the official difference over 250 Karras levels: a residual at the EXACT map of the size of a 1e-2 model error
    assert 4e-3 < floor < 1.2e-2 and floor > 0.5 * off, (floor, off)  # measured 5.8e-3 vs 5.6e-3 (the spec: 7.1e-3)
    s4, s4_next = levels(256, dataclasses.replace(ARGS, levels=1000))
    fine = rms(residual(exact40, e, y, s4, s4_next, "fd"))
    assert 2.5 < floor / fine < 6, (floor, fine)  # first order in the gap: 4 x the levels, ~1/4 the floor (measured 3.6)


def test_difference_in_t_is_the_official_difference_in_sigma():
    # official: y = x_sigma = f / (1 - s), student = y_i - sigma_i (y_i - y_{i+1}) / (sigma_i - sigma_{i+1})
    e, y = noise(64)
    s, s_next = levels(64, ARGS)
    f, df = pid.derivative(wrong, e, torch.ones_like(s), s, s_next, y, ARGS)
    f2 = e - (1 - s_next)[:, None] * wrong(e, torch.ones_like(s), s_next, y)
    sig, sig2 = s / (1 - s), s_next / (1 - s_next)
    Y, Y2 = f / (1 - s)[:, None], f2 / (1 - s_next)[:, None]
    official = Y - sig[:, None] * (Y - Y2) / (sig - sig2)[:, None]
    assert (official - (f - s[:, None] * df)).abs().max() < 1e-11
    assert (df - (f - f2) / (s - s_next)[:, None]).abs().max() < 1e-12  # the backward difference to the partner level


def run_loss(net, derivative="jvp", n=128, seed=3, teacher=v_star, **kw):
    e, y = noise(n, seed=5)
    torch.manual_seed(seed)
    return pid.pid_loss(net, teacher, e, y, dataclasses.replace(ARGS, derivative=derivative, **kw))


def test_loss_and_gradient_vanish_at_the_exact_map_and_not_away():
    out = {}
    for name, base in (("at", exact), ("off", wrong)):
        theta = torch.zeros(128, 2, dtype=torch.float64, requires_grad=True)
        loss, _ = run_loss(lambda *a: base(*a) + theta)
        out[name] = (loss.item(), torch.autograd.grad(loss, theta)[0].abs().max().item())
    assert out["at"][0] < 1e-14 and out["at"][1] < 1e-9, out
    assert out["off"][0] > 1e-6 and out["off"][1] > 1e-5, out


@pytest.mark.parametrize("derivative", ["jvp", "fd"])
def test_gradient_is_the_closed_form(derivative):
    # a per-row constant c added to u moves f by -(t - s) c and df_ds by +c: the student side by -t c, the detached
    # target not at all, so dL/dc = -2 t R / (D B) with R rebuilt here (df_ds by central or backward differences of the map)
    n, t_max = 40, 0.99
    base = lambda x, t, s, y: exact20(x, t, s, y) + 0.3 * torch.sin(2 * x) * (t - s)[:, None] + 0.1 * x
    theta = torch.zeros(n, 2, dtype=torch.float64, requires_grad=True)
    loss, _ = run_loss(lambda *a: base(*a) + theta, derivative, n=n, seed=7, t_max=t_max)
    grad = torch.autograd.grad(loss, theta)[0]
    e, y = noise(n, seed=5)
    s, s_next = levels(n, ARGS, seed=7)
    t, x_T = torch.full_like(s, t_max), t_max * e
    f_at = lambda r: x_T - (t - r)[:, None] * base(x_T, t, r, y)
    f, gap = f_at(s), (t - s)[:, None]
    if derivative == "jvp":  # d/ds [x_T - (t - s) u*] = v*(f*, s) (the ODE); the rest by hand
        df = v_star(x_T - gap * exact20(x_T, t, s, y), s, y) + 0.6 * torch.sin(2 * x_T) * gap + 0.1 * x_T
    else:
        df = (f - f_at(s_next)) / (s - s_next)[:, None]
    R = (f - s[:, None] * df) - (f - s[:, None] * v_star(f, s, y))
    want = -2 * t_max * R / (2 * n)
    assert grad.abs().max() > 1e-4 and torch.allclose(grad, want, rtol=1e-6, atol=1e-8 * want.abs().max()), (grad - want).abs().max()


@pytest.mark.parametrize("derivative", ["jvp", "fd"])
def test_a_gradient_step_moves_toward_the_exact_map(derivative):
    # u = u* + sum_k theta_k phi_k (each phi vanishes at s = t): the distance to the exact map on the rows' (e, s)
    n = 96
    phis = lambda x, t, s: [torch.sin(x) * (t - s)[:, None], (torch.cos(2 * x) + 0.5) * ((t - s) * s)[:, None], x * (t - s)[:, None] ** 2]
    theta0 = torch.tensor([0.2, -0.15, 0.1], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    net = lambda x, t, s, y: exact20(x, t, s, y) + sum(a * p for a, p in zip(theta, phis(x, t, s)))
    loss, _ = run_loss(net, derivative, n=n)
    grad = torch.autograd.grad(loss, theta)[0]
    e, _ = noise(n, seed=5)
    s, _ = levels(n, ARGS, seed=3)
    dist = lambda th: sum(a * p for a, p in zip(th, phis(e, torch.ones_like(s), s))).pow(2).sum(1).mean()
    d0, d1 = dist(theta0), dist(theta0 - 1e-2 * grad / grad.norm())
    assert d1 < d0 - 1e-4 * d0, (d0, d1, grad)


def test_karras_levels_and_the_level_law_by_quantiles():
    sigma, t = pid.karras_ts(ARGS)
    want = torch.tensor([(80 ** (1 / 7) + i / 249 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(250)], dtype=torch.float64)
    assert torch.allclose(sigma, want, rtol=1e-12) and abs(t[0] - 80 / 81) < 1e-12 and abs(t[-1] - 0.002 / 1.002) < 1e-15
    args = dataclasses.replace(ARGS, levels=10, sigma_max=20.0, rho=5.0)
    ts = pid.karras_ts(args)[1]
    s, s_next = levels(40000, args, seed=0)
    i = (s[:, None] == ts[None]).double().argmax(1)
    j = (s_next[:, None] == ts[None]).double().argmax(1)
    assert (ts[i] == s).all() and (ts[j] == s_next).all()  # on the grid
    freq = torch.bincount(i, minlength=10) / 40000
    assert (freq - 0.1).abs().max() < 0.01, freq  # i ~ U{0..N-1}: every level, the top one (sigma_max) included
    assert ((i < 9) <= (j == i + 1)).all() and (j[i == 9] == 8).all()  # partner: the next level toward data; N - 2 for the last
    qs = torch.tensor([0.05, 0.25, 0.45, 0.65, 0.85], dtype=torch.float64)  # the same law by quantiles of s (mid-level)
    assert (torch.quantile(s, qs) - ts.flip(0)[(qs * 10).long()]).abs().max() < 1e-12


def test_teacher_without_grad_on_a_detached_input_and_distinguishable_from_the_student():
    seen = []

    def teacher(x, t, y):
        seen.append((torch.is_grad_enabled(), x.requires_grad))
        return v_star(x, t, y)

    for derivative in ("jvp", "fd"):
        seen.clear()
        theta = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
        run_loss(lambda *a: exact20(*a) + theta, derivative, teacher=teacher)
        assert seen == [(False, False)], seen
    # the target is the TEACHER's: the exact map of another mixture is no fixed point under this teacher, and is under its own
    moved = Mixture(GMM.means + torch.tensor([0.3, -0.2], dtype=torch.float64), GMM.sigmas, GMM.weights)
    student = lambda x, t, s, y: ExactU.apply(x, t, s, y, 20, moved)
    own = run_loss(student, teacher=lambda x, t, y: moved.velocity(x, t, y))[0]
    other = run_loss(student)[0]
    assert own < 1e-10 and other > 1e-3, (own, other)


def test_fd_forwards_share_dropout_masks_and_jvp_is_one_call():
    draws = []

    def net(x, t, s, y):
        draws.append((torch.rand(()).item(), torch.is_grad_enabled()))  # the rand stands for the dropout masks of a forward
        return exact20(x, t, s, y)

    run_loss(net, "fd")
    assert len(draws) == 2 and draws[0] == draws[1] and draws[0][1], draws  # both with grad (the official y_hat, y_hat_dt)
    draws.clear()
    run_loss(net, "jvp")
    assert len(draws) == 1 and draws[0][1], draws


@pytest.mark.parametrize("t_max", [1.0, 80 / 81])
def test_sampler_is_exact_on_the_oracle(t_max):
    e, y = noise(100, seed=6)
    end = GMM.flow_map(t_max * e, t_max, 0.0, y, steps=100)  # official start: x_T = t_max e (80/81 = sigma_max 80)
    for k in (1, 2):  # exact flow-map steps compose to the ODE endpoint
        assert (pid.sample(exact, e, y, k, t_max) - end).abs().max() < 1e-4, k  # RK4 error of the oracle


def gmm_run(tmp_path, teacher, *flags):
    return run_here(SCRIPT, "--teacher", teacher, "--hidden", 16, "--depth", 1, "--batch-size", 16, "--eval-every", 100, "--eval-samples", 50,
                    "--eval-steps", 1, "--log-every", 1, *flags, "--out-dir", tmp_path)


def random_teacher(tmp_path):
    torch.manual_seed(9)
    teacher = MLP(2, 16, 1, NULL)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.2)
    path = tmp_path / "t.safetensors"
    save(teacher, str(path), dataset="gmm", method="fm")
    return path, teacher.state_dict()


def test_student_starts_as_the_teacher(tmp_path):
    path, want = random_teacher(tmp_path)
    g = gmm_run(tmp_path / "init", path, "--steps", 1, "--lr", 1e-12, "--derivative", "jvp", "--t-max", 0.99)
    assert all((g["net"].state_dict()[k] - want[k]).abs().max() < 1e-9 for k in want)  # lr ~ 0: still the teacher


def test_teacher_stays_frozen_out_of_the_optimizer_and_is_the_target(tmp_path):
    path, want = random_teacher(tmp_path)
    g = gmm_run(tmp_path / "train", path, "--steps", 2, "--lr", 1e-2, "--hidden", 64, "--depth", 3)  # --hidden ignored: the teacher's net
    net, frozen = g["net"].state_dict(), g["teacher"]
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters()) and not frozen.training
    assert all(torch.equal(frozen.state_dict()[k], want[k]) for k in want)  # the teacher as loaded, after two steps
    assert max((net[k] - want[k]).abs().max() for k in want) > 1e-3  # the student moved away from it
    assert {id(p) for p in frozen.parameters()}.isdisjoint(id(p) for grp in g["opt"].param_groups for p in grp["params"])
    saved = read_all(tmp_path / "train" / "pid" / "gmm" / "model.safetensors")
    assert saved.keys() == want.keys()
    x, y = GMM.sample(64, torch.Generator().manual_seed(0))
    x, t = x.float(), torch.rand(64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the loop's target field is the teacher's, not the student's
        v = g["teacher_v"](x, t, y)
        assert torch.equal(v, frozen(x, t, t, y)) and (v - g["net"](x, t, t, y)).abs().max() > 1e-3


def test_guided_teacher_is_v_u_plus_w_times_v_c_minus_v_u():
    e, y = noise(64)
    y = torch.arange(64) % NULL
    t = torch.linspace(0.01, 0.99, 64, dtype=torch.float64)
    args = dataclasses.replace(ARGS, teacher_cfg=2.5, cfg_t_min=0.3, cfg_t_max=0.7)
    v_c, v_u = GMM.velocity(e, t, y), GMM.velocity(e, t, torch.full_like(y, NULL))
    want = torch.where(((t >= 0.3) & (t <= 0.7))[:, None], v_u + 2.5 * (v_c - v_u), v_c)  # plain conditional outside
    got = pid.guided(lambda x, t_, s_, y_: GMM.velocity(x, t_, y_), e, t, y, NULL, args)
    assert torch.allclose(got, want, atol=1e-12) and (want - v_c).abs().max() > 0.1


@pytest.mark.parametrize("field,value,needle", [("derivative", "central", "--derivative central"), ("levels", 1, "--levels 1"),
                                                ("sigma_min", 0.0, "--sigma-min 0.0"), ("rho", 0.0, "--rho 0.0"),
                                                ("t_max", 0.9, "--t-max 0.9"), ("t_max", 1.5, "--t-max 1.5"),
                                                ("cfg_t_min", 0.8, "--cfg-t-min 0.8")])
def test_bad_flags(field, value, needle):
    args = dataclasses.replace(ARGS, **{field: value}, **({"cfg_t_max": 0.5} if field == "cfg_t_min" else {}))
    with pytest.raises(SystemExit) as err:
        pid.check_args(args)
    assert needle in str(err.value) and "\n" not in str(err.value)
