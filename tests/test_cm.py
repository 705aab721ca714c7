"""Consistency models (CD / CT / iCT) on the gmm oracle. CD: with an exact teacher step the loss and its
gradient vanish at the exact consistency function and not at a perturbed one; the file's teacher step is
Heun in EDM sigma (equal to an independent sigma-Heun, ten times the residual of Heun in t at N = 18);
a gradient step moves toward the exact map. CT from data (posterior draws of (x, e) given x_t): with l2
the fixed point is E[f*(x', t_{n+1}) | x_t], off the exact map by O(dt); pseudo-Huber moves it to the
targets' M-estimate, a bias that does not shrink with dt. Around the loss: the Karras grid in t, the index
laws by quantiles, N(k) and mu(k) against hand values, the target network (the one passed, detached, EMA
vs online in the loop, replayed from its checkpoints), shared dropout masks, the sampler exact at 2 steps,
--init teacher, bad input."""
import dataclasses
import json
import math

import pytest
import torch

from common.data import default_gmm, make_loader
from common.dit import MLP, build, save
from common.eval import energy_distance
from common.run import micro_seed
from conftest import ROOT, load_method, run_here

cm = load_method("cm")
SCRIPT = f"{ROOT}/methods/cm.py"
GMM = default_gmm()
NULL = GMM.num_classes
teacher_v = lambda x, t, y: GMM.velocity(x, t, y)
u_star = lambda x, t, s, y, steps=50: GMM.avg_velocity(x, t, s, y, steps=steps)  # s = 0 here: (x - f*(x, t)) / t
wrong = lambda x, t, s, y: u_star(x, t, s, y) + 1e-2 * torch.sin(x) * (t - s)[:, None]  # the spec's perturbed map
exact_step = lambda tv, x_t, t, r, y, solver="heun": GMM.flow_map(x_t, t, r, y, steps=50)
ARGS = cm.Args()


def batch(n=128, seed=0):
    x, y = GMM.sample(n, torch.Generator().manual_seed(seed))  # float64: the oracle's precision
    return x, torch.where(torch.arange(n) % 3 == 0, NULL, y)


# ---------------------------------------------------------------- grid, index laws, schedules
def test_grid_is_the_karras_sigma_grid_mapped_to_t():
    sigma, t = cm.karras_ts(18, ARGS)
    want = torch.tensor([(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)], dtype=torch.float64)
    assert torch.allclose(sigma, want, rtol=1e-12) and (t[1:] < t[:-1]).all()
    assert abs(t[0] - 80 / 81) < 1e-12 and abs(t[-1] - 0.002 / 1.002) < 1e-15  # t_0 = 0.98765, t_{N-1} = 0.001996
    x, e = torch.randn(2, 5, 2, dtype=torch.float64)  # EDM x_sigma = x + sigma e is our x_t times (1 + sigma)
    assert torch.allclose((x + sigma[7] * e) / (1 + sigma[7]), (1 - t[7]) * x + t[7] * e, atol=1e-14)


def test_index_laws_by_quantiles():
    torch.manual_seed(0)
    n = cm.sample_n(40000, 18, ARGS, "cpu")  # cm: uniform on 0..N-2 (the last grid point is only a target)
    assert n.min() == 0 and n.max() == 16 and (torch.bincount(n, minlength=17) / 40000 - 1 / 17).abs().max() < 0.01
    ict = dataclasses.replace(ARGS, mode="ct", recipe="ict", ict_mean=-0.6, ict_std=1.5)
    sigma, t = cm.karras_ts(11, ict)
    p = torch.special.ndtr((torch.logit(t) + 0.6) / 1.5)  # LN(Pm, Ps) in t = lognormal sigma; P(t_{n+1} < T <= t_n)
    freq = torch.bincount(cm.sample_n(40000, 11, ict, "cpu"), minlength=10) / 40000
    assert (freq - (p[:-1] - p[1:]) / (p[0] - p[-1])).abs().max() < 0.01, freq
    ict = dataclasses.replace(ict, ict_mean=-1.1, ict_std=2.0)  # fine grid: ln sigma_n follows N(-1.1, 2^2)
    sigma = cm.karras_ts(1281, ict)[0]
    z = sigma[cm.sample_n(40000, 1281, ict, "cpu")].log()
    qs = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    assert (torch.quantile(z, qs) - (-1.1 + 2.0 * math.sqrt(2) * torch.erfinv(2 * qs - 1))).abs().max() < 0.06


def test_curricula_against_hand_computed_values():
    ct = dataclasses.replace(ARGS, mode="ct", curriculum=100)  # s0 2, s1 150, mu0 0.9
    # N(k) = ceil(sqrt(k/K (151^2 - 4) + 4) - 1) + 1: k 0 -> ceil(1) + 1; k 50 -> ceil(105.78) + 1; k 100 -> 151
    assert [cm.schedule(k, ct)[0] for k in (0, 50, 100)] == [2, 107, 151]
    assert [cm.schedule(k, ct)[1] for k in (0, 50, 100)] == pytest.approx([0.81, 0.9 ** (2 / 106), 0.9 ** (2 / 150)], rel=1e-12)
    assert cm.schedule(50, dataclasses.replace(ct, curriculum=0, steps=100)) == cm.schedule(50, ct)  # K = --steps
    ict = dataclasses.replace(ARGS, mode="ct", recipe="ict", curriculum=800)  # K' = floor(800 / (log2 128 + 1)) = 100
    assert [cm.schedule(k, ict) for k in (0, 99, 100, 250, 699, 700, 799)] == [(11, 0), (11, 0), (21, 0), (41, 0), (641, 0), (1281, 0), (1281, 0)]
    assert cm.schedule(123, dataclasses.replace(ARGS, num_scales=40, ema_target_decay=0.95)) == (40, 0.95)  # CD: fixed


# ---------------------------------------------------------------- CD: exactness, the teacher's discretization, direction
def cd_loss(net, target=None, seed=1, n=128, **kw):
    x, y = batch(n)
    torch.manual_seed(seed)
    return cm.cm_loss(net, target or net, teacher_v, x, y, 18, dataclasses.replace(ARGS, **kw))[0]


def test_cd_loss_and_gradient_vanish_at_the_exact_map(monkeypatch):
    monkeypatch.setattr(cm, "teacher_step", exact_step)  # the exact ODE step: no discretization error
    out = {}
    for name, base in (("exact", u_star), ("wrong", wrong)):
        theta = torch.zeros(128, 2, dtype=torch.float64, requires_grad=True)
        net = lambda x, t, s, y: base(x, t, s, y) + theta
        loss = cd_loss(net)
        out[name] = (loss.item(), torch.autograd.grad(loss, theta)[0].abs().max().item())
    assert out["exact"][0] < 1e-13 and out["exact"][1] < 1e-7, out  # RK4 error of the oracle only (measured 2.5e-15, 3.1e-9)
    assert out["wrong"][0] > 1e-8 and out["wrong"][1] > 1e-6, out  # measured 2.8e-7, 1.0e-5


def residual(step, N, pts=128):
    """Median over data points of |f*(x_t, t_n) - f*(step(x_t), t_{n+1})| / dt, n uniform."""
    sigma, ts = cm.karras_ts(N, ARGS)
    g = torch.Generator().manual_seed(5)
    x, _ = GMM.sample(pts, g)
    e, n = torch.randn(pts, 2, dtype=torch.float64, generator=g), torch.randint(0, N - 1, (pts,), generator=g)
    t, r = ts[n], ts[n + 1]
    x_t = (1 - t[:, None]) * x + t[:, None] * e
    y = torch.full((pts,), NULL)
    f_t, f_r = GMM.flow_map(x_t, t, 0.0, y, steps=50), GMM.flow_map(step(x_t, t, r, y), r, 0.0, y, steps=50)
    return ((f_t - f_r).norm(dim=1) / (t - r)).median().item(), (x_t, t, r, y)


def test_teacher_step_is_heun_in_sigma_not_in_t():
    def heun_sigma(x_t, t, r, y):  # EDM's Heun on d x_sigma / d sigma = (x_sigma - D) / sigma, D = x_t - t v
        t, r = t[:, None], r[:, None]
        sig, sig_r = t / (1 - t), r / (1 - r)
        xs = x_t / (1 - t)
        d1 = (xs - (x_t - t * teacher_v(x_t, t[:, 0], y))) / sig
        xe = xs + (sig_r - sig) * d1
        xe_t = xe / (1 + sig_r)
        d2 = (xe - (xe_t - r * teacher_v(xe_t, r[:, 0], y))) / sig_r
        return (xs + (sig_r - sig) * (d1 + d2) / 2) / (1 + sig_r)

    def heun_t(x_t, t, r, y):
        h = (r - t)[:, None]
        v1 = teacher_v(x_t, t, y)
        return x_t + h / 2 * (v1 + teacher_v(x_t + h * v1, r, y))

    file_r, (x_t, t, r, y) = residual(lambda *a: cm.teacher_step(teacher_v, *a), 18)
    assert torch.allclose(cm.teacher_step(teacher_v, x_t, t, r, y), heun_sigma(x_t, t, r, y), rtol=1e-10, atol=1e-12)
    euler_t = x_t + (r - t)[:, None] * teacher_v(x_t, t, y)  # Euler in sigma is Euler in t
    assert torch.allclose(cm.teacher_step(teacher_v, x_t, t, r, y, "euler"), euler_t, atol=1e-12)
    t_r = residual(heun_t, 18)[0]
    assert 5e-3 < file_r < 2e-2 and t_r < 2e-3 and file_r > 5 * t_r, (file_r, t_r)  # measured 9.5e-3 vs 1.0e-3


@pytest.mark.parametrize("target", ["online", "exact"])
def test_a_gradient_step_moves_toward_the_exact_map(target, monkeypatch):
    # u = u* + sum_k theta_k phi_k; distance to the exact map: mean ||f - f*||^2 = mean t^2 ||sum theta phi||^2 on the student rows
    monkeypatch.setattr(cm, "teacher_step", exact_step)
    x, y = batch(96)
    phis = lambda z, t: [torch.sin(z), torch.cos(2 * z) * t[:, None] + 0.3, z * t[:, None]]
    theta0 = torch.tensor([0.15, -0.1, 0.05], dtype=torch.float64)
    torch.manual_seed(3)  # replay the loss's draws: e, then n
    e, n = torch.randn_like(x), cm.sample_n(96, 18, ARGS, "cpu")
    t = cm.karras_ts(18, ARGS)[1][n]
    x_t = (1 - t[:, None]) * x + t[:, None] * e
    dist = lambda th: (t[:, None] * sum(a * p for a, p in zip(th, phis(x_t, t)))).pow(2).sum(1).mean()
    theta = theta0.clone().requires_grad_(True)
    net = lambda z, tt, s, y_: u_star(z, tt, s, y_) + sum(a * p for a, p in zip(theta, phis(z, tt)))
    torch.manual_seed(3)
    loss, _ = cm.cm_loss(net, net if target == "online" else u_star, teacher_v, x, y, 18, ARGS)
    grad = torch.autograd.grad(loss, theta)[0]
    d0, d1 = dist(theta0), dist(theta0 - 1e-2 * grad / grad.norm())
    assert d1 < d0 * (1 - 1e-3), (d0, d1, grad)


# ---------------------------------------------------------------- CT from data: the posterior test
def ct_fixed_points(N, monkeypatch, P=16, M=128, t_aim=0.5):
    """At P points x_t (one grid time near t_aim), M posterior draws (x, e) each, fed to cm_loss as its
    data and noise: the l2 fixed point's offset from f* (read from the loss's gradient, minus a
    zero-mean control variate), the pseudo-Huber M-estimate of the same targets, and the file's
    pseudo-Huber gradient there and at the mean. Returns per-point values / dt."""
    sigma, ts = cm.karras_ts(N, ARGS)
    n = int((ts - t_aim).abs().argmin())
    t, r = ts[n].item(), ts[n + 1].item()
    g = torch.Generator().manual_seed(N)
    x0, _ = GMM.sample(P, g)
    x_t = (1 - t) * x0 + t * torch.randn(P, 2, dtype=torch.float64, generator=g)
    rep = x_t.repeat_interleave(M, 0)
    X = GMM.posterior_sample(rep, t, g)
    E = (rep - (1 - t) * X) / t
    f_star = GMM.flow_map(x_t, t, 0.0, steps=30)
    memo = {}

    def target(z, tt, s, y):  # u*(x', t_{n+1}, 0), computed once for the file's x'
        if "z" not in memo or not torch.equal(memo["z"], z):
            memo["z"], memo["u"] = z.clone(), u_star(z, tt, s, None, steps=30)
        return memo["u"]

    def grad_at(offset, distance):  # student f = f*(x_t) + offset (per point)
        theta = offset.clone().requires_grad_(True)
        net = lambda z, tt, s, y: (rep - f_star.repeat_interleave(M, 0) - theta.repeat_interleave(M, 0)) / tt[:, None]
        args = dataclasses.replace(ARGS, mode="ct", distance=distance)
        with monkeypatch.context() as mp:
            draws, fresh = [E.clone()], torch.randn_like  # the loss's e; any further draw is fresh noise
            mp.setattr(torch, "randn_like", lambda like: draws.pop() if draws else fresh(like))
            mp.setattr(cm, "sample_n", lambda B, N_, a, dev: torch.full((B,), n))
            loss = cm.cm_loss(net, target, None, X, torch.full((P * M,), NULL), N, args)[0]
        return torch.autograd.grad(loss, theta)[0]

    mean = -grad_at(torch.zeros(P, 2, dtype=torch.float64), "l2") * 2 * P / 2  # l2: grad = 2 / (D P M) sum (f - T)
    T = memo["z"] - r * memo["u"]  # the targets f*(x', t_{n+1}) the file built
    h, eye = 1e-5, torch.eye(2, dtype=torch.float64)
    J = torch.stack([(GMM.flow_map(x_t + h * eye[i], r, 0.0, steps=30) - GMM.flow_map(x_t - h * eye[i], r, 0.0, steps=30)) / (2 * h)
                     for i in range(2)], -1)  # d f*(., t_{n+1}) / dx at x_t
    step = (memo["z"] - rep).view(P, M, 2) + (t - r) * GMM.velocity(x_t, t)[:, None]  # x' - E[x' | x_t]: mean zero
    mean_cv = mean - torch.einsum("poi,pmi->po", J, step) / M
    c = ARGS.huber_c * math.sqrt(2)
    T = T.view(P, M, 2)
    m = T.mean(1)
    for _ in range(400):  # IRLS for the pseudo-Huber M-estimate of the targets
        w = 1 / ((T - m[:, None]).pow(2).sum(-1) + c**2).sqrt()
        m = (w[..., None] * T).sum(1) / w.sum(1, keepdim=True)
    g_m, g_mean = (grad_at(o, "huber").norm(dim=1) for o in (m - f_star, T.mean(1) - f_star))
    dt = t - r
    return dt, mean_cv.norm(dim=1) / dt, (m - f_star).norm(dim=1) / dt, g_m, g_mean


def test_ct_posterior_l2_fixed_point_is_first_order_and_pseudo_huber_is_biased(monkeypatch):
    dt1, l2_1, hub_1, g_m, g_mean = ct_fixed_points(100, monkeypatch)
    dt2, l2_2, hub_2, _, _ = ct_fixed_points(1000, monkeypatch)
    a, b = l2_1.median().item(), l2_2.median().item()  # measured 0.083 (dt 0.026), 0.0082 (dt 0.0026)
    assert 0.03 < a < 0.3 and b < 0.25 * a * (dt2 / dt1) / 0.1, (dt1, a, dt2, b)  # nonzero at finite dt, falls as dt
    assert (g_m < 1e-4 * g_mean).all() and g_mean.min() > 1e-5  # the file's pseudo-Huber fixed point is that M-estimate
    assert hub_1.median() > 0.1 and hub_2.median() > max(0.1, 5 * b), (hub_1, hub_2)  # it does not shrink with dt


def test_distances_and_the_ict_weight(monkeypatch):
    a, b = torch.tensor([[0.3, -0.1, 0.2], [0.0, 0.5, -0.4]], dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    c = 0.01 * math.sqrt(3)
    assert torch.allclose(cm.distance(a, b, "l2", 0.01), torch.tensor([0.14 / 3, 0.41 / 3], dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(cm.distance(a, b, "l1", 0.01), torch.tensor([0.2, 0.3], dtype=torch.float64), rtol=1e-12)
    want = torch.tensor([math.sqrt(0.14 + c**2) - c, math.sqrt(0.41 + c**2) - c], dtype=torch.float64)  # over the sample
    assert torch.allclose(cm.distance(a, b, "huber", 0.01), want, rtol=1e-12)
    x, y = batch(32)
    sigma = cm.karras_ts(18, ARGS)[0]
    for n in (0, 7, 16):  # iCT = the same pseudo-Huber loss times 1 / (sigma_n - sigma_{n+1}); cm: weight 1, l2 by default
        monkeypatch.setattr(cm, "sample_n", lambda B, N, args, dev: torch.full((B,), n))
        loss = {}
        for name, kw in (("ict", dict(recipe="ict")), ("huber", dict(distance="huber")), ("auto", {}), ("l2", dict(distance="l2"))):
            torch.manual_seed(0)
            loss[name] = cm.cm_loss(lambda z, t, s, y_: torch.sin(3 * z), lambda z, t, s, y_: torch.cos(z), None, x, y, 18,
                                    dataclasses.replace(ARGS, mode="ct", **kw))[0].item()
        assert loss["ict"] == pytest.approx(loss["huber"] / (sigma[n] - sigma[n + 1]).item(), rel=1e-10) and loss["auto"] == loss["l2"]


# ---------------------------------------------------------------- target network, dropout masks, sampler
def test_target_is_the_net_passed_and_gets_no_gradient():
    x, y = batch(64)
    student, other = MLP(2, 16, 1, NULL).double(), MLP(2, 16, 1, NULL).double()
    for p in other.parameters():
        torch.nn.init.normal_(p, std=0.3)
    losses = {}
    for name, tgt in (("self", student), ("other", other)):
        torch.manual_seed(0)
        loss, _ = cm.cm_loss(student, tgt, teacher_v, x, y, 18, dataclasses.replace(ARGS, mode="ct"))
        loss.backward()
        losses[name] = loss.item()
    assert abs(losses["self"] - losses["other"]) > 1e-3 * losses["other"]
    assert all(p.grad is None for p in other.parameters()) and student.out[1].weight.grad.abs().sum() > 0


def test_student_at_t_n_target_at_t_n_plus_1_on_the_teacher_step(monkeypatch):
    calls = []

    def net(z, t, s, y):
        calls.append((z.clone(), t.clone(), s.clone()))
        return u_star(z, t, s, y, steps=10)

    n = torch.tensor([0, 3, 9, 16])
    monkeypatch.setattr(cm, "sample_n", lambda B, N, args, dev: n)
    x, y = batch(4)
    torch.manual_seed(0)
    e = torch.randn_like(x)
    torch.manual_seed(0)
    cm.cm_loss(net, net, teacher_v, x, y, 18, ARGS)
    ts = cm.karras_ts(18, ARGS)[1]
    (z_tgt, t_tgt, s_tgt), (z, t, s) = calls  # the target forward first (no grad), then the student's
    assert torch.equal(t, ts[n]) and torch.equal(t_tgt, ts[n + 1]) and not s.any() and not s_tgt.any()
    assert torch.allclose(z, (1 - ts[n, None]) * x + ts[n, None] * e, atol=1e-15)
    assert torch.allclose(z_tgt, cm.teacher_step(teacher_v, z, ts[n], ts[n + 1], y), atol=1e-15)


def test_student_and_target_share_dropout_masks():
    draws = []

    def net(z, t, s, y):
        draws.append(torch.rand(()).item())  # stands for the dropout masks of a forward
        return u_star(z, t, s, y, steps=10)

    for mode in ("cd", "ct"):
        draws.clear()
        cd_loss(net, n=16, mode=mode)
        assert len(draws) == 2 and draws[0] == draws[1], draws


def test_multistep_sampler_is_exact_on_the_oracle():
    n = 1000
    e = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.full((n,), NULL)
    real = GMM.sample(n, torch.Generator().manual_seed(4))[0].float()
    exact = lambda z, t, s, y_: u_star(z, t, s, y_, steps=40)
    one = cm.sample(exact, e, y, 1)
    assert (one - GMM.flow_map(e, 1.0, 0.0, y, steps=40)).abs().max() < 1e-12  # f(e, 1) = f*(e, 1)
    torch.manual_seed(0)
    two = cm.sample(exact, e, y, 2)  # jump to 0, re-noise to t = 1/2, jump to 0: other points, the same law
    assert energy_distance(two.float(), real) < 0.012 and (two - one).norm(dim=1).mean() > 0.2  # measured 0.0038
    torch.manual_seed(0)
    shrunk = cm.sample(lambda z, t, s, y_: exact(z, t, s, y_) + 0.3 * z, e, y, 2)  # a biased map: the check can fail
    assert energy_distance(shrunk.float(), real) > 0.02  # measured 0.031


# ---------------------------------------------------------------- the loop: which target net, EMA vs online, init
def replay_losses(flags, tmp_path):
    """Runs the file (gmm, oracle teacher) and recomputes each step's logged loss from the checkpoint of
    the step before (net, ema, ema_target), the data stream and the micro-batch seed, with each
    candidate target net."""
    snaps = []
    g = run_here(SCRIPT, "--teacher", "oracle", "--batch-size", 32, "--hidden", 16, "--depth", 1, "--log-every", 1, "--ckpt-every", 1,
                 "--eval-every", 100, "--eval-samples", 50, "--eval-steps", 1, "--steps", 3, "--label-dropout", 0.3, "--dropout", 0.2, *flags,
                 "--out-dir", tmp_path, capture=snaps)
    args = g["args"]
    logged = [json.loads(r)["loss"] for r in (tmp_path / "cm" / "gmm" / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    loader = make_loader("gmm", 32, 0)
    nets = {k: build(g["net"].config).train() for k in ("net", "ema", "ema_target")}
    out = []
    for k in range(1, 3):  # steps 2 and 3 (at step 1 every copy is the initial net)
        loader.load_state_dict(snaps[k - 1]["loader"])
        x, y = next(loader)
        for name, m in nets.items():
            m.load_state_dict(snaps[k - 1][name])
        N, _ = cm.schedule(k, args)
        got = {}
        for name in nets:
            torch.manual_seed(micro_seed(0, k, 0))
            yy = torch.where(torch.rand(len(y)) < 0.3, NULL, y)
            got[name] = cm.cm_loss(nets["net"], nets[name], lambda z, t, y_: GMM.velocity(z, t, y_).float(), x, yy, N, args)[0].item()
        out.append((logged[k], got))
    return snaps, out


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_loop_uses_the_target_ema_of_rate_mu(mu, tmp_path):
    snaps, out = replay_losses(["--ema-target-decay", mu, "--ema-decay", 0.9], tmp_path)
    for logged, got in out:  # the logged loss is the one with ema_target; the others differ
        assert abs(got["ema_target"] - logged) < 1e-6 * abs(logged) + 1e-9 and abs(got["ema"] - logged) > 1e-4 * abs(logged), (logged, got)
        assert (abs(got["net"] - logged) < 1e-6 * abs(logged) + 1e-9) == (mu == 0.0), (mu, logged, got)  # mu = 0: the online net
    for s in snaps:  # mu = 0: the target is a copy of the trained net after every step
        assert all(torch.equal(s["ema_target"][k], s["net"][k]) for k in s["net"]) == (mu == 0.0)


def test_ct_loop_updates_the_target_with_mu_of_k(tmp_path):
    snaps = []
    run_here(SCRIPT, "--teacher", "oracle", "--mode", "ct", "--curriculum", 10, "--batch-size", 32, "--hidden", 16, "--depth", 1,
             "--ckpt-every", 1, "--eval-every", 100, "--eval-samples", 50, "--eval-steps", 1, "--steps", 4, "--out-dir", tmp_path, capture=snaps)
    for k in range(1, 4):  # after step k (0-based): target <- mu(k) target + (1 - mu(k)) net, mu(k) = 0.9^(2 / (N(k) - 1))
        m = math.ceil(math.sqrt(k / 10 * (151**2 - 4) + 4) - 1)
        mu = 0.9 ** (2 / m)
        for name, w in snaps[k]["net"].items():
            want = mu * snaps[k - 1]["ema_target"][name].double() + (1 - mu) * w.double()
            assert (snaps[k]["ema_target"][name].double() - want).abs().max() < 1e-6, (k, name)
    rows = [json.loads(r) for r in (tmp_path / "cm" / "gmm" / "metrics.jsonl").read_text().splitlines() if '"N"' in r]
    assert rows[-1]["N"] == math.ceil(math.sqrt(3 / 10 * (151**2 - 4) + 4) - 1) + 1


def test_init_teacher_copies_the_teacher(tmp_path):
    torch.manual_seed(9)
    teacher = MLP(2, 16, 1, NULL)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.2)
    save(teacher, str(tmp_path / "t.safetensors"), dataset="gmm", method="fm")
    flags = ["--hidden", 16, "--depth", 1, "--batch-size", 16, "--steps", 1, "--lr", 1e-12, "--eval-every", 100, "--eval-samples", 50,
             "--eval-steps", 1]
    nets = {}
    for init, mode, teacher_path in (("teacher", "cd", tmp_path / "t.safetensors"), ("scratch", "ct", tmp_path / "missing.safetensors")):
        g = run_here(SCRIPT, *flags, "--init", init, "--mode", mode, "--teacher", teacher_path, "--out-dir", tmp_path / init)
        nets[init] = g["net"].state_dict()  # CT from scratch loads no teacher (the path does not exist)
    want = teacher.state_dict()
    assert all((nets["teacher"][k] - want[k]).abs().max() < 1e-9 for k in want)
    assert max((nets["scratch"][k] - want[k]).abs().max() for k in want) > 0.1


@pytest.mark.parametrize("field,value,needle", [("mode", "cm", "--mode cm"), ("recipe", "ict", "--recipe ict"), ("init", "ema", "--init ema"),
                                                ("solver", "rk4", "--solver rk4"), ("distance", "lpips", "--distance lpips"),
                                                ("num_scales", 1, "--num-scales 1"), ("ema_target_decay", 1.0, "--ema-target-decay 1.0"),
                                                ("ct_scales", (3, 2), "--ct-scales (3, 2)"), ("curriculum", -1, "--curriculum -1"),
                                                ("sigma_min", 0.0, "--sigma-min 0.0")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        cm.check_args(dataclasses.replace(ARGS, **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)
