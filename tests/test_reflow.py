"""Reflow (rectified flow on the teacher's ODE pairs) on float64 oracles. The exact field of a coupling
(e, T(e)) is v2(x_t, t) = e - T(e) with e solving (1 - t) T(e) + t e = x_t (damped Newton below, T the
exact ODE map by RK4): on one Gaussian one Euler step of it is exact where the original flow misses by
0.43; on the gmm mixture the reflow lines never cross (min det((1 - t) DT + t I) 0.034 over 2000 noises),
so the loss vanishes at v2 row by row, a gradient step moves toward it and 1- and 2-step samplers on it
land on T(e). The pairs: the teacher's ODE (solvers and guidance by hand, another teacher other pairs,
the label kept), online and cached pairs bit for bit the same at the same seed, the teacher frozen and
apart from the student; --t-fixed and the time laws by quantiles; bad --pairs files one line."""
import dataclasses
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.data import GMM, default_gmm
from common.dit import MLP, load, save
from conftest import ROOT, load_method, run_inline
from test_fm import run_loop

rf = load_method("reflow")
SCRIPT = os.path.join(ROOT, "methods", "reflow.py")
G = default_gmm()
NULL = G.num_classes
PHI = lambda x_t, t: torch.stack([torch.sin(x_t[:, 1]) + t, x_t[:, 0] * (1 - t)], 1)  # a perturbation direction
oracle = lambda M: (lambda x_t, t, s, y: M.velocity(x_t, t, y))


def invert(M, x_t, t, y, steps=20, h=1e-7):
    """e with (1 - t) T(e) + t e = x_t, T = M.flow_map(., 1, 0) (damped Newton, forward-difference Jacobian)."""
    tb, eye = t[:, None], torch.eye(2, dtype=x_t.dtype)
    T = lambda z, y_: M.flow_map(z, 1.0, 0.0, y_, steps)
    e = tb * x_t + (1 - tb) * M.flow_map(x_t, 0.0, 1.0, y, steps)  # exact at t = 1 and t = 0
    F = (1 - tb) * T(e, y) + tb * e - x_t
    n = len(e)
    for _ in range(40):
        if F.norm(dim=1).max() < 1e-12:
            break
        f3 = T(torch.cat([e, e + h * eye[0], e + h * eye[1]]), y.repeat(3))
        J = torch.stack([(f3[n:2 * n] - f3[:n]) / h, (f3[2 * n:] - f3[:n]) / h], -1)
        step = torch.linalg.solve((1 - tb)[:, :, None] * J + tb[:, :, None] * eye, F)
        lam = torch.ones_like(tb)
        while True:  # halve the step on the rows whose residual would grow
            cand = e - lam * step
            Fc = (1 - tb) * T(cand, y) + tb * cand - x_t
            r, rc = F.norm(dim=1, keepdim=True), Fc.norm(dim=1, keepdim=True)
            worse = (rc > r) & (r > 1e-12)
            if not worse.any() or lam.min() < 1e-3:
                break
            lam = torch.where(worse, lam / 2, lam)
        e, F = cand, Fc
    assert F.norm(dim=1).max() < 1e-10, F.norm(dim=1).max()
    return e


def reflow_field(M, steps=20):
    """The exact velocity of the coupling (e, T(e)) as a net: e(x_t) - T(e(x_t))."""
    def net(x_t, t, s, y):
        t = torch.as_tensor(t, dtype=x_t.dtype).expand(len(x_t))
        e = invert(M, x_t, t, y, steps)
        return e - M.flow_map(e, 1.0, 0.0, y, steps)
    return net


def labels(n, seed):
    return torch.where(torch.arange(n) % 3 == 0, NULL, torch.randint(0, NULL, (n,), generator=torch.Generator().manual_seed(seed)))


def noise(n, seed):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


ARGS = dataclasses.replace(rf.Args(), pair_steps=20)


# ---------------------------------------------------------------- the coupling: one Gaussian, the mixture
def test_one_gaussian_one_euler_step_of_the_reflowed_field_is_exact():
    mu, one = torch.tensor([1.0, -0.5], dtype=torch.float64), GMM([[1.0, -0.5]], [0.3], [1.0])
    e, y = noise(1000, 0), torch.full((1000,), 1)  # (the null label of a one-class mixture)
    x_hat = rf.teacher_pairs(oracle(one), e, y, 1, dataclasses.replace(ARGS, pair_steps=100))[1]
    assert (x_hat - (mu + 0.3 * e)).abs().max() < 2e-9  # the 1-RF coupling of N(mu, .3^2 I) is affine (RK4 error 6.8e-10)
    v2 = lambda x_t, t, s, y_: 0.7 * (x_t - (1 - t)[:, None] * mu) / ((1 - t) * 0.3 + t)[:, None] - mu  # closed form
    x_t, t = 0.4 * x_hat[:64] + 0.6 * e[:64], torch.full((64,), 0.6, dtype=torch.float64)
    assert (v2(x_t, t, t, y[:64]) - reflow_field(one, 100)(x_t, t, t, y[:64])).abs().max() < 1e-8  # = the Newton field
    one_step = lambda net: (rf.sample(net, e, y, 1, 1) - x_hat).norm(dim=1).pow(2).mean().sqrt().item()
    exact, flow = one_step(v2), one_step(oracle(one))
    assert exact < 1e-9 and 0.40 < flow < 0.45, (exact, flow)  # measured 2.9e-10 (the pairs' RK4 error) and 0.425 (0.3 sqrt 2)
    assert (rf.sample(v2, e, y, 1, 1) - (mu + 0.3 * e)).abs().max() < 1e-12  # on the exact coupling: rounding only
    torch.manual_seed(0)
    assert rf.reflow_loss(v2, e, x_hat, y, ARGS)[0] < 1e-14  # (the pairs' RK4 error, squared)


def test_mixture_reflow_lines_never_cross():
    # det((1 - t) DT + t I) over 2000 noises and 201 times (DT by central differences of the RK4 map); the lines
    # X_t = (1 - t) T(e) + t e of nearby noises would cross where it reaches 0
    e, y, h = noise(2000, 1), torch.full((2000,), NULL), 1e-5
    eye = torch.eye(2, dtype=torch.float64)
    f = G.flow_map(torch.cat([e + h * eye[0], e - h * eye[0], e + h * eye[1], e - h * eye[1]]), 1.0, 0.0, y.repeat(4), 30).chunk(4)
    J = torch.stack([(f[0] - f[1]) / (2 * h), (f[2] - f[3]) / (2 * h)], -1)
    ts = torch.linspace(0, 1, 201, dtype=torch.float64)[:, None]
    det, tr = torch.linalg.det(J), J.diagonal(dim1=1, dim2=2).sum(-1)
    d = (1 - ts) ** 2 * det + ts * (1 - ts) * tr + ts**2
    assert 0.025 < d.min() < 0.045, d.min()  # measured 0.0336 (the spec: 0.034), at t = 0: det DT itself
    ev = torch.linalg.eigvals(J)
    assert not ((ev.imag.abs() < 1e-9) & (ev.real <= 0)).any()  # no non-positive real eigenvalue of DT


@pytest.fixture(scope="module")
def coupling():
    """128 mixture pairs from the file's ODE (RK4, 20 steps, mixed labels), the t the loss draws after
    manual_seed(5), its x_t and the exact reflow velocity there (Newton on the independent float64 map)."""
    e, y = noise(128, 2), labels(128, 2)
    x_hat = rf.teacher_pairs(oracle(G), e, y, NULL, ARGS)[1]
    torch.manual_seed(5)
    t = rf.sample_t(128, ARGS, "cpu").double()
    x_t = (1 - t[:, None]) * x_hat + t[:, None] * e
    e_star = invert(G, x_t, t, y)
    assert (e_star - e).abs().max() < 1e-6  # the line through x_t is the pair's own (no crossing)
    return e, x_hat, y, x_t, e_star - G.flow_map(e_star, 1.0, 0.0, y, 20)


def exact_plus(coupling, pert):
    x_t0, v2 = coupling[3], coupling[4]

    def net(x_t, t, s, y):
        assert torch.allclose(x_t, x_t0, atol=1e-6)  # the rows the exact field was solved at (t is float32)
        return v2 + pert(x_t, t)
    return net


def loss_at(net, coupling):
    e, x_hat, y = coupling[:3]
    torch.manual_seed(5)
    return rf.reflow_loss(net, e, x_hat, y, ARGS)[0]


def test_loss_and_gradient_vanish_at_the_exact_velocity_of_the_coupling(coupling):
    grads, losses = {}, {}
    for a0 in (0.0, 0.3):
        a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        losses[a0] = loss_at(exact_plus(coupling, lambda x_t, t: a * PHI(x_t, t.double())), coupling)
        grads[a0] = torch.autograd.grad(losses[a0], a)[0].item()
    assert losses[0.0] < 1e-12 and abs(grads[0.0]) < 1e-5, (losses[0.0], grads[0.0])  # row by row, no Monte Carlo error
    assert losses[0.3] > 0.05 and grads[0.3] > 0.3, (losses[0.3], grads[0.3])
    flow = loss_at(lambda x_t, t, s, y: G.velocity(x_t, t, y), coupling)  # the 1-RF velocity is not the coupling's
    assert flow > 1e-2, flow


def test_a_gradient_step_moves_toward_the_exact_velocity(coupling):
    # v = v2 + sum_k theta_k phi_k: the loss is the distance mean |sum theta phi|^2, so its gradient is 2 mean phi_k . (sum theta phi)
    phis = lambda x_t, t: [torch.sin(x_t), torch.cos(2 * x_t) * t[:, None] + 0.3, x_t * t[:, None]]
    theta0 = torch.tensor([0.15, -0.1, 0.05], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    pert = lambda x_t, t: sum(a * p for a, p in zip(theta, phis(x_t, t.double())))
    grad = torch.autograd.grad(loss_at(exact_plus(coupling, pert), coupling), theta)[0]
    torch.manual_seed(5)
    t = rf.sample_t(128, ARGS, "cpu").double()
    ph = phis(coupling[3], t)
    dist = lambda th: sum(a * p for a, p in zip(th, ph)).pow(2).sum(1).mean()
    want = torch.stack([2 * (p * sum(a * q for a, q in zip(theta0, ph))).sum(1).mean() for p in ph])
    assert torch.allclose(grad, want, rtol=1e-5), (grad, want)
    assert dist(theta0 - 1e-2 * grad / grad.norm()) < dist(theta0) - 1e-4


def test_sampler_exact_at_1_and_2_steps_on_the_reflowed_oracle():
    e, y = noise(32, 3), labels(32, 3)
    end = G.flow_map(e, 1.0, 0.0, y, 12)  # (a coarser exact map, the same in the field: the test is the sampler)
    v2 = reflow_field(G, 12)
    for k, sampler in ((1, "euler"), (2, "euler"), (2, "heun"), (1, "rk4")):  # every evaluation lies on the straight line
        err = (rf.sample(v2, e, y, k, NULL, 1.0, sampler) - end).abs().max()
        assert err < 1e-8, (k, sampler, err)
    miss = (rf.sample(oracle(G), e, y, 2, NULL) - end).norm(dim=1).mean()
    assert miss > 0.1, miss  # the curved 1-RF field does not


# ---------------------------------------------------------------- the pairs
def test_pairs_are_the_teachers_ode_endpoints():
    e, y = noise(200, 4), labels(200, 4)
    pairs = lambda M, k, y_: rf.teacher_pairs(oracle(M), e, y_, NULL, dataclasses.replace(ARGS, pair_steps=k))[1]
    end = G.flow_map(e, 1.0, 0.0, y, 100)
    err = lambda M, k, want: (pairs(M, k, y) - want).norm(dim=1).mean().item()
    assert err(G, 8, end) < 3e-3 and err(G, 40, end) < 1e-5  # the defaults (RK4, 8 steps: 6.0e-4) and finer (1.5e-6)
    other = GMM(G.means * 0.8, G.sigmas, G.weights)  # another teacher: its own endpoints, not G's
    assert err(other, 40, other.flow_map(e, 1.0, 0.0, y, 100)) < 1e-5 and err(other, 40, end) > 0.1
    uncond = G.flow_map(e, 1.0, 0.0, torch.full_like(y, NULL), 40)  # the label steers the teacher's ODE
    assert (pairs(G, 40, y) - uncond)[y < NULL].norm(dim=1).mean() > 0.1


def test_pair_solvers_and_guidance_by_hand():
    e, y = noise(50, 5), labels(50, 5)
    w = 2.5
    v = lambda x, t: G.velocity(x, t, torch.full_like(y, NULL)) + w * (G.velocity(x, t, y) - G.velocity(x, t, torch.full_like(y, NULL)))
    pair = lambda solver, k: rf.teacher_pairs(oracle(G), e, y, NULL, dataclasses.replace(ARGS, pair_solver=solver, pair_steps=k, teacher_cfg=w))
    e_out, x_out, y_out = pair("euler", 2)
    x_half = e - 0.5 * v(e, 1.0)
    assert e_out is e and y_out is y and torch.allclose(x_out, x_half - 0.5 * v(x_half, 0.5), atol=1e-12)
    k1 = v(e, 1.0)  # Heun, 2 steps: a Heun step, then an Euler step (as fm.py)
    x_half = e - 0.5 * 0.5 * (k1 + v(e - 0.5 * k1, 0.5))
    assert torch.allclose(pair("heun", 2)[1], x_half - 0.5 * v(x_half, 0.5), atol=1e-12)
    k2 = v(e - 0.5 * k1, 0.5)  # RK4, 1 step
    k3 = v(e - 0.5 * k2, 0.5)
    k4 = v(e - k3, 0.0)
    assert torch.allclose(pair("rk4", 1)[1], e - (k1 + 2 * k2 + 2 * k3 + k4) / 6, atol=1e-12)


TINY = ["--batch-size", 64, "--hidden", 16, "--depth", 2, "--grad-accum", 2, "--label-dropout", 0.3, "--pair-steps", 8]


def backwards(events):
    return [ev for ev in events if ev["kind"] == "backward"]


def test_online_and_cached_pairs_agree_bit_for_bit(tmp_path):
    # online: each micro-batch's (e, x^, y) as the loop hands them to the loss; cached: the file made at the same
    # seed holds exactly those rows in order, and the cached run's loss sees rows of the file
    online = backwards(run_loop(SCRIPT, [*TINY, "--steps", 3, "--teacher", "oracle"], ["net"], keys=("e", "x", "y"),
                                tmp_path=tmp_path / "online"))
    assert len(online) == 6
    e, x, y = (torch.cat([ev[k] for ev in online]) for k in "exy")
    assert (x.double() - G.flow_map(e, 1.0, 0.0, y, 100)).norm(dim=1).mean() < 3e-3  # the teacher's ODE, the pair's label
    dropped = (y == NULL).double().mean()
    assert 0.2 < dropped < 0.4, dropped  # label dropout 0.3 (the gmm loader has no null rows)
    path = tmp_path / "pairs.safetensors"
    cached = backwards(run_loop(SCRIPT, [*TINY, "--steps", 2, "--teacher", "oracle", "--pairs", path, "--num-pairs", 192],
                                ["net"], keys=("e", "x", "y"), tmp_path=tmp_path / "cached"))
    with safe_open(str(path), framework="pt") as f:
        file = {k: f.get_tensor(k) for k in "exy"}
        assert "oracle" in f.metadata()["made_from"]
    for k, online_k in zip("exy", (e, x, y)):
        assert torch.equal(file[k], online_k), k
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    seen = torch.cat([ev["e"] for ev in cached])
    match = torch.cdist(seen.double(), file["e"].double()).min(1)
    rows = match.indices
    assert (match.values == 0).all() and torch.equal(torch.cat([ev["x"] for ev in cached]), file["x"][rows])
    assert torch.equal(torch.cat([ev["y"] for ev in cached]), file["y"][rows]) and len(set(rows.tolist())) > 64  # random rows


def test_teacher_frozen_and_distinguishable_from_the_student(tmp_path):
    torch.manual_seed(0)
    teacher = MLP(2, 16, 2, NULL)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))  # not the zero velocity
    save(teacher, str(tmp_path / "t.safetensors"), dataset="gmm", method="fm")
    evs = backwards(run_loop(SCRIPT, [*TINY, "--steps", 3, "--teacher", tmp_path / "t.safetensors", "--lr", 3e-2],
                             ["net", "teacher_net"], keys=("e", "x", "y"), tmp_path=tmp_path))
    first, last = evs[0], evs[-1]
    assert torch.equal(first["w"]["net"], first["w"]["teacher_net"])  # the student starts as the teacher (official)
    assert all(torch.equal(ev["w"]["teacher_net"], first["w"]["teacher_net"]) and ev["grad"]["teacher_net"] == 0 for ev in evs)
    assert (last["w"]["net"] - last["w"]["teacher_net"]).abs().max() > 1e-2  # the student moved
    frozen = load(str(tmp_path / "t.safetensors"))
    want = rf.teacher_pairs(frozen, last["e"], last["y"], NULL, dataclasses.replace(rf.Args(), pair_steps=8))[1]
    assert torch.allclose(last["x"], want, atol=1e-6)  # the pairs of the last step: still the teacher's ODE
    student = load(str(tmp_path / "t.safetensors"))
    torch.nn.utils.vector_to_parameters(last["w"]["net"], student.parameters())
    not_want = rf.teacher_pairs(student, last["e"], last["y"], NULL, dataclasses.replace(rf.Args(), pair_steps=8))[1]
    assert (last["x"] - not_want).abs().max() > 1e-3


# ---------------------------------------------------------------- times
def test_t_fixed_draws_only_t_1_and_the_time_laws():
    seen = {}

    def net(x_t, t, s, y):
        seen.update(t=t, s=s, x_t=x_t)
        return torch.zeros_like(x_t)

    e, x = torch.randn(100000, 2), torch.randn(100000, 2)
    y = torch.zeros(100000, dtype=torch.long)
    rf.reflow_loss(net, e, x, y, dataclasses.replace(rf.Args(), t_fixed=1.0))
    assert (seen["t"] == 1).all() and torch.equal(seen["s"], seen["t"]) and torch.equal(seen["x_t"], e)  # one Euler step from e
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.manual_seed(0)
    rf.reflow_loss(net, e, x, y, rf.Args())  # default: uniform (the official reflow schedule)
    assert torch.allclose(torch.quantile(seen["t"].double(), q), q, atol=4e-3)
    rf.reflow_loss(net, e, x, y, dataclasses.replace(rf.Args(), time_dist="logit-normal", time_mu=0.4, time_sigma=0.7))
    want = torch.sigmoid(0.4 + 0.7 * torch.distributions.Normal(0.0, 1.0).icdf(q))
    assert torch.allclose(torch.quantile(seen["t"].double(), q), want, atol=4e-3)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("field,value,needle", [("t_fixed", 1.5, "--t-fixed 1.5"), ("pair_solver", "rk45", "--pair-solver rk45"),
                                                ("pair_steps", 0, "--pair-steps 0"), ("num_pairs", 0, "--num-pairs 0"),
                                                ("sampler", "dpm", "--sampler dpm")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        rf.check_args(dataclasses.replace(rf.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_pairs_file_gets_one_line(tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a safetensors file")
    save_file({"e": torch.zeros(4, 3), "x": torch.zeros(4, 3), "y": torch.zeros(4, dtype=torch.long)}, str(tmp_path / "shape.safetensors"))
    save_file({"e": torch.zeros(4, 2), "x": torch.zeros(4, 2), "y": torch.full((4,), 9)}, str(tmp_path / "label.safetensors"))
    save_file({"e": torch.zeros(4, 2), "x": torch.zeros(4, 2), "y": torch.zeros(4, dtype=torch.long)}, str(tmp_path / "other.safetensors"),
              metadata={"made_from": "moons, teacher x (cfg 1), rk4 x 8"})
    for name, needle in [("garbage", "not a pairs file"), ("shape", "expected tensors e, x of shape [N, 2]"),
                         ("label", "labels y in [0, 6]"), ("other", "made from moons")]:
        proc = run_inline(SCRIPT, "--teacher", "oracle", "--pairs", tmp_path / f"{name}.safetensors", "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"--pairs {tmp_path / name}") and needle in last, last
