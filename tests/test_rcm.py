"""rCM: the consistency term against ayf.py's EMD at s = 0 and against the official loss written in TrigFlow
variables (value and gradient, warm-up included); g at the exact map and off it; the DMD term's closed form and
sign (q = p: zero; on the 2-Gaussian toy the correct sign converges, a flipped one diverges); the fake loss's
rho^2 weight; the rollout (times, grad on the last jump only) and its step count cycling 1..4 in the loop; the
time laws p_G, p_D by quantiles; the schedule (sCM alone in the warm-up, then fake every step, student every
ttur-th), teacher frozen, fake net trained and distinct; the sampler's times from t = 80/81 and its exactness on
the oracle; bad flags. Resume, DDP, bf16 and the generic loop checks: tests/test_methods.py, tests/test_loop.py."""
import dataclasses
import json
import math
import os
import sys

import pytest
import torch

from common.data import GMM as Mixture, default_gmm
from common.dit import MLP, save
from common.eval import energy_distance
from conftest import ROOT, load_method
from test_fm import assert_each_net_moves_in_its_own_step, run_loop

rcm = load_method("rcm")
ayf = load_method("ayf")  # the test compares the two files; the method file imports neither
SCRIPT = os.path.join(ROOT, "methods", "rcm.py")
GMM = default_gmm()
NULL = GMM.num_classes
teacher_v = lambda x_t, t, y: GMM.velocity(x_t, t, y)
BUMP = lambda x_t, t, s: (t - s)[:, None] * (1 + t[:, None]) * torch.sin(2 * x_t)  # the spec's perturbation direction
ln_cdf = lambda q, mu, sig: 0.5 * (1 + torch.erf((torch.logit(q) - mu) / (sig * math.sqrt(2))))  # logit-normal CDF


def batch(n=128, seed=0):
    x, y = GMM.sample(n, torch.Generator().manual_seed(seed))  # float64 data: the oracle's precision
    return x, torch.where(torch.arange(n) % 3 == 0, NULL, y)


def replay(x, args, seed):
    """The t and x_t that cm_loss draws after torch.manual_seed(seed) (e first, then t)."""
    torch.manual_seed(seed)
    e = torch.randn_like(x)
    t = torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(len(x), dtype=x.dtype))
    return t, (1 - t[:, None]) * x + t[:, None] * e


def official_loss(net, x_t, t, y, r, c=0.1):
    """The official sCM loss [t2v_model_distill_rcm.py 508-573] written here in TrigFlow variables: theta = atan(t / (1 - t)),
    x_theta = (cos + sin) x_t, the student's x0 = x_t - t net(x_t, t, 0, y), F = (cos x_theta - x0) / sin, the teacher's F_T
    likewise, dF = jvp of F along (cos sin F_T, cos sin), g = -cos sqrt(1 - r^2 sin^2)(sg F - F_T) - (r cos sin x_theta + dF),
    loss = mean_rows sum_dims (F - sg F - g / (||g|| + c))^2."""
    th = torch.atan(t / (1 - t))
    cos, sin = th.cos()[:, None], th.sin()[:, None]
    x_th = x_t * (cos + sin)

    def F(xth, thh):
        tt = thh.sin() / (thh.sin() + thh.cos())
        xt = xth / (thh.sin() + thh.cos())[:, None]
        return (thh.cos()[:, None] * xth - (xt - tt[:, None] * net(xt, tt, torch.zeros_like(tt), y))) / thh.sin()[:, None]

    with torch.no_grad():
        F_T = (cos * x_th - (x_t - t[:, None] * teacher_v(x_t, t, y))) / sin
        dF = torch.func.jvp(F, (x_th, th), (cos * sin * F_T, (cos * sin)[:, 0]))[1]
    F_ = F(x_th, th)
    g = -cos * (1 - r**2 * sin**2).sqrt() * (F_.detach() - F_T) - (r * cos * sin * x_th + dF)
    return ((F_ - F_.detach() - g / (g.norm(dim=1, keepdim=True) + c)) ** 2).sum(1).mean(), g


# ---------------------------------------------------------------- the consistency term
@pytest.mark.parametrize("r", [1.0, 0.6, 0.0])
def test_consistency_term_is_the_official_trigflow_loss_and_ayf_emd_at_s0(r):
    x, y = batch(64)
    # any smooth field will do (the identities hold for every net): no RK4 map, so it is fast
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    net = lambda x_t, t, s, y_: (teacher_v(x_t, t, y_) * (1 + 0.3 * (t - s))[:, None] + theta[0] * BUMP(x_t, t, s)
                                 + theta[1] * x_t * t[:, None])
    args = rcm.Args()
    torch.manual_seed(1)
    loss, terms = rcm.cm_loss(net, teacher_v, x, y, r, args)
    got = torch.autograd.grad(loss, theta)[0]
    t, x_t = replay(x, args, 1)
    want_loss, g_trig = official_loss(net, x_t, t, y, r)
    want = torch.autograd.grad(want_loss, theta)[0]
    assert want.norm() > 1e-2 and (got - want).norm() / want.norm() < 1e-10, (got, want)
    assert abs(loss.item() - want_loss.item()) < 1e-10 * want_loss.item()  # the logged value is the official one
    if r == 1.0:  # g = ayf's EMD g at s = 0 (ayf_g), and g_trig = -(1 - t) rho g (the spec's conversion)
        torch.manual_seed(5)
        g = rcm.cm_g(net, teacher_v, x_t, t, y, 1.0)[1]
        torch.manual_seed(5)
        g_ayf = ayf.ayf_g(net, teacher_v, x_t, t, torch.zeros_like(t), y, 1.0, "emd")[1]
        assert g_ayf.norm(dim=1).min() > 1e-3 and (g - g_ayf).norm() / g_ayf.norm() < 1e-12
        conv = -((1 - t) * rcm.rho(t))[:, None] * g_ayf
        assert (conv - g_trig).norm() / g_trig.norm() < 1e-12, ((conv - g_trig).norm() / g_trig.norm()).item()


def test_jvp_and_grad_forward_share_dropout_masks():
    draws = []

    def net(x_t, t, s, y):
        draws.append(torch.rand(()).item())  # stands for the dropout masks of a forward
        return teacher_v(x_t, t, y) * (1 + t)[:, None]

    rcm.cm_loss(net, teacher_v, *batch(16), 1.0, rcm.Args())
    assert len(draws) == 2 and draws[0] == draws[1], draws


def exact_at(x_t, t, steps=60):
    """u* at (x_t, t, 0) and a first-order model of it there: the value, the x-Jacobian and du*/dt of the exact map
    (RK4, `steps` steps) at each row, all that cm_g reads (its forward and its JVP), from one JVP of the RK4 map."""
    eye, s0, n = torch.eye(2, dtype=x_t.dtype), torch.zeros_like(t), len(t)
    tangents = (torch.cat([0 * x_t, eye[0].expand_as(x_t), eye[1].expand_as(x_t)]), torch.cat([torch.ones_like(t), 0 * t, 0 * t]))
    u3, d = torch.func.jvp(lambda z, t_: GMM.avg_velocity(z, t_, s0.repeat(3), None, steps=steps), (x_t.repeat(3, 1), t.repeat(3)), tangents)
    J, dt = torch.stack([d[n:2 * n], d[2 * n:]], -1), d[:n]
    return lambda z, t_, s_, y_: u3[:n] + (J @ (z - x_t)[:, :, None])[:, :, 0] + dt * (t_ - t)[:, None]


def test_g_vanishes_at_the_exact_map_and_not_off_it():
    x, y = batch(96, seed=2)
    y = torch.full_like(y, NULL)  # the first-order model is of the unconditional map
    args = rcm.Args()
    t, x_t = replay(x, args, 3)
    star = exact_at(x_t, t)
    out = []
    for eps in (0.0, 1e-2):  # u* (RK4 60 steps), then u* + eps (t - s)(1 + t) sin(2 x) at s = 0
        torch.manual_seed(3)
        _, terms = rcm.cm_loss(lambda z, t_, s_, y_: star(z, t_, s_, y_) + eps * BUMP(z, t_, s_), teacher_v, x, y, 1.0, args)
        out.append(terms["g_norm"].item())
    assert out[0] < 1e-6 and out[1] > 3e-3, out
    torch.manual_seed(3)  # the warm-up (r < 1) moves the fixed point off the exact map
    assert rcm.cm_loss(star, teacher_v, x, y, 0.5, args)[1]["g_norm"] > 1e-2


# ---------------------------------------------------------------- the DMD term and the fake net
TOY = Mixture([[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], [1, 1])
toy_v = lambda x_t, t, y: TOY.velocity(x_t, t)
shifted = lambda d: Mixture(TOY.means + d, TOY.sigmas, TOY.weights)


def test_dm_gradient_is_the_closed_form_and_zero_at_q_equal_p():
    # d L / d x0 = 2 t (v_real - v_fake) / (w B), w = max(mean_dims |x0 - (x_t - t v_real)|, 1e-5); at q = p (the fake
    # velocity is the teacher's) every row's gradient is zero
    n = 256
    x0 = TOY.sample(n, torch.Generator().manual_seed(5))[0].requires_grad_(True)
    y = torch.full((n,), NULL)
    fake = lambda x_t, t, s, y_: 0.7 * x_t + torch.stack([t, s], 1)  # depends on s: must be called at s = t
    args = rcm.Args(dm_shift=5.0)
    torch.manual_seed(6)
    (g,) = torch.autograd.grad(rcm.dm_loss(x0, y, toy_v, fake, args)[0], x0)
    torch.manual_seed(6)
    u = torch.rand(n, dtype=torch.float64)
    t = (5 * u / (1 + 4 * u))[:, None]
    x_t = (1 - t) * x0.detach() + t * torch.randn_like(x0)
    v_real, v_fake = TOY.velocity(x_t, t[:, 0]), 0.7 * x_t + torch.cat([t, t], 1)
    w = (x0.detach() - (x_t - t * v_real)).abs().mean(1, keepdim=True)
    want = 2 * t * (v_real - v_fake) / w / n
    assert (g - want).abs().max() < 1e-12 * want.abs().max(), (g - want).abs().max()
    torch.manual_seed(6)
    (g0,) = torch.autograd.grad(rcm.dm_loss(x0, y, toy_v, lambda x_t, t, s, y_: TOY.velocity(x_t, t), args)[0], x0)
    assert g0.abs().max() == 0


@pytest.mark.parametrize("sign", [1, -1])
def test_dm_sign_converges_on_the_toy_and_a_flipped_sign_diverges(sign):
    # the generator x0 = base + d (a translation); the fake velocity is the exact one of the generator's law. Descent
    # on the file's loss must pull d to 0 (the teacher's law); the same loss with real and fake swapped (a flipped sign)
    # must push it away
    base = TOY.sample(2000, torch.Generator().manual_seed(7))[0]
    d = torch.tensor([0.8, 0.6], dtype=torch.float64)
    args, y = rcm.Args(), torch.full((2000,), NULL)
    torch.manual_seed(8)
    for _ in range(25):
        d_ = d.clone().requires_grad_(True)
        gen_v = lambda x_t, t, y_, m=shifted(d): m.velocity(x_t, t)
        real, fake = (toy_v, gen_v) if sign == 1 else (gen_v, toy_v)
        loss = rcm.dm_loss(base + d_, y, real, lambda x_t, t, s, y_: fake(x_t, t, y_), args)[0]
        d = d - 0.05 * torch.autograd.grad(loss, d_)[0]
    if sign == 1:
        assert d.norm() < 0.1, d
    else:
        assert d.norm() > 2.0, d


def test_fake_loss_is_rho_squared_flow_matching_at_s_equal_t():
    n = 512
    x0, y = TOY.sample(n, torch.Generator().manual_seed(9))[0], torch.full((n,), NULL)
    theta = torch.zeros(n, 2, dtype=torch.float64, requires_grad=True)
    seen = {}

    def fake(x_t, t, s, y_):
        seen.update(t=t, s=s)
        return 0.5 * x_t + theta
    args = rcm.Args(dm_mu=0.4, dm_sigma=0.9)
    torch.manual_seed(10)
    (g,) = torch.autograd.grad(rcm.fake_loss(fake, x0, y, args)[0], theta)
    torch.manual_seed(10)
    noise = torch.randn_like(x0)
    t = torch.sigmoid(0.4 + 0.9 * torch.randn(n, dtype=torch.float64))[:, None]
    x_t = (1 - t) * x0 + t * noise
    want = 2 * ((1 - t) ** 2 + t**2) * (0.5 * x_t - (noise - x0)) / n
    assert torch.equal(seen["t"], seen["s"]) and (g - want).abs().max() < 1e-12, (g - want).abs().max()


def test_rollout_times_and_grad_on_the_last_jump_only():
    calls = []

    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def net(x_t, t, s, y):
        calls.append((x_t.detach().clone(), t.detach().clone(), s.detach().clone(), torch.is_grad_enabled()))
        return a * x_t

    e, y = torch.randn(6, 2, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    args = rcm.Args()
    for n in (1, 2, 3, 4):
        calls.clear()
        torch.manual_seed(n)
        x0 = rcm.generate(net, e, y, n, args)
        assert len(calls) == n and [c[3] for c in calls] == [False] * (n - 1) + [True]
        assert torch.equal(calls[0][0], e) and (calls[0][1] == 1).all() and all((c[2] == 0).all() for c in calls)
        torch.manual_seed(n)  # replayed: t_j = min(draw of p_D, t_{j-1}), x = (1 - t_j) G + t_j n with fresh noise
        x, t = e, torch.ones(6, dtype=torch.float64)
        for j in range(1, n):
            t_new = torch.minimum(torch.sigmoid(0.0 + 1.6 * torch.randn(6, dtype=torch.float64)), t)
            x = (1 - t_new[:, None]) * (x - t[:, None] * 0.5 * x) + t_new[:, None] * torch.randn(6, 2, dtype=torch.float64)
            t = t_new
            assert torch.equal(calls[j][1], t) and torch.allclose(calls[j][0], x, atol=1e-14)
        assert torch.allclose(x0, x - t[:, None] * 0.5 * x, atol=1e-14) and x0.requires_grad
    calls.clear()
    with torch.no_grad():
        rcm.generate(net, e, y, 3, args)
    assert [c[3] for c in calls] == [False] * 3


# ---------------------------------------------------------------- time laws
def test_time_laws_by_quantiles():
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    like = torch.zeros(1, dtype=torch.float64)
    torch.manual_seed(0)
    for mu, sig, shift, want in [(-0.8, 1.6, 0.0, None), (0.0, 1.6, 0.0, None),  # the official defaults p_G, p_D
                                 (0.7, 1.6, 0.0, [0.206, 0.405, 0.667, 0.856, 0.940]),  # Wan p_G (the spec's quantiles)
                                 (0.0, 1.6, 5.0, [0.358, 0.627, 0.834, 0.937, 0.978])]:  # Wan p_D, UniformShift(5)
        t = rcm.sample_t(40000, mu, sig, like, shift)
        cdf = (t[:, None] <= qs).double().mean(0)
        exp = ln_cdf(qs, mu, sig) if shift == 0 else qs / (shift - (shift - 1) * qs)  # u = t / (s - (s - 1) t)
        assert (cdf - exp).abs().max() < 0.01, (mu, shift, cdf, exp)
        if want:
            assert torch.allclose(torch.quantile(t, qs), torch.tensor(want, dtype=torch.float64), atol=6e-3)
    # the terms use them: cm_loss p_G, dm_loss and fake_loss p_D
    seen = []
    rec = lambda x_t, t, s, y: seen.append(t) or torch.zeros_like(x_t)
    args = rcm.Args(time_mu=1.0, time_sigma=0.5, dm_mu=-1.0, dm_sigma=0.7)
    x, y = torch.zeros(20000, 2, dtype=torch.float64), torch.zeros(20000, dtype=torch.long)
    rcm.cm_loss(rec, lambda x_t, t, y_: torch.zeros_like(x_t), x, y, 1.0, args)
    rcm.dm_loss(x, y, lambda x_t, t, y_: torch.zeros_like(x_t), rec, args)
    rcm.fake_loss(rec, x, y, args)
    assert len(seen) == 4  # cm: the JVP and the grad forward
    for t, (mu, sig) in zip(seen[1:], [(1.0, 0.5), (-1.0, 0.7), (-1.0, 0.7)]):
        assert ((t[:, None] <= qs).double().mean(0) - ln_cdf(qs, mu, sig)).abs().max() < 0.015, (mu, sig)


# ---------------------------------------------------------------- the loop, in this process
@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """11 steps on gmm with a small MLP teacher checkpoint, --tangent-warmup 3 --ttur 2: sCM alone on steps 0-2, then the
    fake net every step and the student on steps 4, 6, 8, 10; every net forward recorded (which net, t, s, grad)."""
    d = tmp_path_factory.mktemp("rcm_loop")
    torch.manual_seed(0)
    teacher = MLP(2, 16, 2, NULL)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save(teacher, str(d / "teacher.safetensors"), dataset="gmm")
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    forwards, path = [], os.path.abspath(SCRIPT)

    def hook(module, inp, out):
        f = sys._getframe(1)
        while f is not None and not (f.f_code.co_filename == path and f.f_code.co_name == "<module>"):
            f = f.f_back
        if f is None or not isinstance(module, MLP) or "step" not in f.f_globals:
            return
        g = f.f_globals
        who = next(k for k in ("net", "fake", "ema", "teacher_net") if g.get(k) is module)
        try:
            t, s = float(inp[1][0]), float(inp[2][0])
        except RuntimeError:  # inside torch.func.jvp
            t = s = None
        forwards.append({"step": g["step"], "who": who, "t": t, "s": s, "grad": torch.is_grad_enabled(), "n_gen": g.get("n_gen"),
                         "n_fake": g.get("n_fake")})

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        flags = ["--teacher", d / "teacher.safetensors", "--batch-size", 16, "--steps", 11, "--tangent-warmup", 3, "--ttur", 2,
                 "--ema-decay", 0.6, "--lr", 1e-2]
        events = run_loop(SCRIPT, flags, ["net", "fake", "ema", "teacher_net"], keys=("r", "gen_turn", "dmd"), tmp_path=d)
    finally:
        handle.remove()
    return events, forwards, start, d / "rcm" / "gmm"


def rollouts(forwards, step):
    """The student's rollouts at a step: runs of consecutive student calls that start at t = 1."""
    out = []
    for a in [f for f in forwards if f["step"] == step]:
        if a["who"] == "net" and a["t"] == 1.0:
            out.append([a])
        elif out and a["who"] == "net" and out[-1][-1]["who"] == "net" and a["s"] == 0 and a["t"] <= out[-1][-1]["t"]:
            out[-1].append(a)
        else:
            out.append([a])
    return [r for r in out if r[0]["who"] == "net" and r[0]["t"] == 1.0]


def test_schedule_warmup_then_fake_every_step_student_every_ttur(loop):
    events, forwards = loop[:2]
    posts = [(ev["opt"], ev["step"]) for ev in events if ev["kind"] == "post"]
    want = [("opt", 0), ("opt", 1), ("opt", 2)] + [x for k in range(3, 11) for x in [("opt_fake", k)] + ([("opt", k)] if (k - 2) % 2 == 0 else [])]
    assert posts == want, posts
    assert_each_net_moves_in_its_own_step(events, {"opt": {"net"}, "opt_fake": {"fake"}}, ema_rate=0.4)
    for ev in events:  # the warm-up: the sCM term alone, r rising as (step + 1) / 3, the fake net unused and without gradient
        if ev["kind"] == "backward" and ev["step"] < 3:
            assert ev["grad"]["fake"] == 0 and ev["grad"]["net"] > 0 and ev["r"] == pytest.approx((ev["step"] + 1) / 3)
    assert not [f for f in forwards if f["step"] < 3 and f["who"] == "fake"]
    assert not [r for k in range(3) for r in rollouts(forwards, k)]  # no DMD rollout in the warm-up


def test_rollout_step_count_cycles_and_only_the_last_student_jump_has_grad(loop):
    forwards = loop[1]
    gen, fake = [], []
    for k in range(3, 11):
        rs = rollouts(forwards, k)
        assert len(rs) == (2 if (k - 2) % 2 == 0 else 1), (k, len(rs))
        for r in rs:
            grads = [a["grad"] for a in r]
            if grads[-1]:  # the student's rollout: only its last jump with grad
                assert grads == [False] * (len(r) - 1) + [True]
                gen.append(len(r))
            else:
                assert not any(grads)
                fake.append(len(r))
    assert fake == [1, 2, 3, 4, 1, 2, 3, 4], fake  # the k-th fake update: k mod 4 + 1 jumps
    assert gen == [4, 1, 2, 3], gen  # the official effective iteration: (tangent_warmup + j) mod 4 + 1


def test_teacher_frozen_fake_trained_and_distinct(loop):
    events, forwards, start = loop[:3]
    events = [ev for ev in events if ev["kind"] != "batch"]
    last = events[-1]["w"]
    assert torch.equal(last["teacher_net"], events[0]["w"]["teacher_net"])  # the teacher's weights never move
    assert torch.equal(last["teacher_net"], torch.cat([v.flatten() for v in start.values()]).float())
    assert all(ev["grad"]["teacher_net"] == 0 for ev in events if ev["kind"] == "backward")
    assert not any(f["grad"] for f in forwards if f["who"] in ("teacher_net", "ema"))
    assert not torch.equal(last["fake"], events[0]["w"]["fake"]) and not torch.equal(last["fake"], last["net"])
    teach = [f for f in forwards if f["who"] == "teacher_net" and f["step"] == 4]
    fakes = [f for f in forwards if f["who"] == "fake" and f["step"] == 4]
    # student turn 4: the DMD term calls teacher and fake (no grad) at s = t; the fake update calls fake with grad
    assert teach and [f["grad"] for f in fakes] == [False, True] and all(f["t"] == f["s"] for f in fakes)


def test_student_loss_is_100_to_1(loop):
    # the last step (10) is a student turn: the logged loss is cm_weight 100 x the sCM term + 1 x the DMD term
    row = [json.loads(r) for r in (loop[3] / "metrics.jsonl").read_text().splitlines() if '"loss"' in r][-1]
    assert row["step"] == 11 and row["cm_loss"] > 0 and row["dm_loss"] > 0 and row["fake_loss"] > 0
    assert row["loss"] == pytest.approx(100 * row["cm_loss"] + row["dm_loss"], rel=1e-5)


# ---------------------------------------------------------------- sampler
def test_sampler_times_start_at_80_over_81():
    calls = []

    def net(x_t, t, s, y):
        calls.append((x_t.clone(), t.clone(), s.clone()))
        return torch.zeros_like(x_t)

    e, y = torch.randn(5, 2, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    tt = lambda th: math.tan(th) / (1 + math.tan(th))
    for k in (1, 2, 3, 4):
        calls.clear()
        rcm.sample(net, e, y, k, rcm.Args())
        want = [80 / 81, tt(1.5), tt(1.4), tt(1.0)][:k]
        assert [c[1][0].item() for c in calls] == pytest.approx(want, abs=1e-12) and all((c[2] == 0).all() for c in calls)
        assert torch.allclose(calls[0][0], math.sqrt((1 / 81) ** 2 + (80 / 81) ** 2) * e, atol=1e-15)  # x_theta = e
    assert [round(tt(th), 3) for th in (1.5, 1.4, 1.0)] == [0.934, 0.853, 0.609]  # the spec's numbers


def test_sampler_exact_on_the_oracle():
    n = 2000
    e = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.full((n,), NULL)
    real = GMM.sample(n, torch.Generator().manual_seed(4))[0]
    ex = lambda x_t, t, s, y_: GMM.avg_velocity(x_t, t, s, y_, steps=20)  # the exact consistency map (RK4)
    torch.manual_seed(0)
    x2 = rcm.sample(ex, e, y, 2, rcm.Args())
    assert energy_distance(x2.float(), real.float()) < 0.006  # two independent data samples: 0.0016
    end = GMM.flow_map(e, 1.0, 0.0, y, steps=100)  # the ODE endpoint of the same noise: re-noising moved the points
    assert (x2 - end).norm(dim=1).mean() > 0.2
    torch.manual_seed(0)
    biased = rcm.sample(lambda x_t, t, s, y_: ex(x_t, t, s, y_) + 0.3 * x_t, e, y, 2, rcm.Args())
    assert energy_distance(biased.float(), real.float()) > 0.02  # the check can fail


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("field,value,needle", [("ttur", 0, "--ttur 0"), ("backsim_steps", 0, "--backsim-steps 0"),
                                                ("cm_weight", -1.0, "--cm-weight -1.0"), ("cm_weight", 0.0, "--cm-weight 0.0"),
                                                ("tangent_warmup", -1, "--tangent-warmup -1"), ("dm_sigma", 0.0, "--dm-sigma 0.0"),
                                                ("sample_thetas", (1.4, 1.5), "--sample-thetas 1.4 1.5"),
                                                ("eval_steps", (1, 5), "--eval-steps 5")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        rcm.check_args(dataclasses.replace(rcm.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)
    rcm.check_args(dataclasses.replace(rcm.Args(), cm_weight=0.0, tangent_warmup=0))  # pure DMD is fine


def test_guidance_is_v_u_plus_w_times_v_c_minus_v_u_and_the_official_5_is_our_6():
    # the official teacher: F + w_off (F - F_uncond) = v_c + w_off (v_c - v_u) (NVlabs/rcm t2v_model_distill_rcm.py),
    # i.e. our w = w_off + 1: Wan's teacher_guidance 5.0 is --teacher-cfg 6; w = 1 is the conditional velocity alone
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    teacher = lambda z, t_, s_, y_: GMM.velocity(z, t_, y_)  # noqa: E731
    v_c, v_u = GMM.velocity(x, t, y), GMM.velocity(x, t, torch.full_like(y, NULL))
    assert not torch.allclose(v_c, v_u)
    assert torch.allclose(rcm.guided(teacher, x, t, y, NULL, 6.0), v_c + 5.0 * (v_c - v_u))
    assert torch.allclose(rcm.guided(teacher, x, t, y, NULL, 2.5), v_u + 2.5 * (v_c - v_u))
    assert torch.equal(rcm.guided(teacher, x, t, y, NULL, 1.0), v_c)
