"""Flow-Anchored Consistency Models: the CM direction g and the whole loss at the exact map of the gmm mixture
(distillation: zero with the clip and the weight; a perturbed map: not), the FM anchor's two parts, the autograd
gradient against the closed form b 2 a clamp(g) / D / sg(e + c)^q / B (weight detached, du/dt detached, a(t) and
b(t) in our time direction), a gradient step toward the exact map; from data (v = e - x drawn from the posterior):
the drift of the expected gradient at u* (a property of the clip and the weight) and the cosine anchor's; the time
laws by quantiles, the guidance and its interval, the samplers exact on the oracle, dropout masks shared between
the JVP and the grad forward, smoke runs, bad flags."""
import dataclasses
import json
import math
import os
from unittest import mock

import pytest
import torch

from common.data import default_gmm
from common.eval import energy_distance
from conftest import ROOT, ks, load_method, run_here
from test_methods import TINY

facm = load_method("facm")
SCRIPT = os.path.join(ROOT, "methods", "facm.py")
G = default_gmm()
NULL = G.num_classes
oracle = lambda x_t, t, s, y: G.velocity(x_t, t, y)  # noqa: E731  the teacher as load_teacher gives it


def exact(x_t, t, s, y, steps=50):
    """u* by RK4 (v* where s = t: the FM forward costs nothing)."""
    return G.velocity(x_t, t, y) if torch.equal(s, t) else G.avg_velocity(x_t, t, s, y, steps=steps)




def batch(n=256, seed=0):
    x, y = G.sample(n, torch.Generator().manual_seed(seed))  # float64 data: the oracle's precision
    return x, torch.where(torch.arange(n) % 3 == 0, NULL, y)  # conditional and unconditional rows


def replay(x, args, seed):
    """The e, t, x_t that facm_loss draws after torch.manual_seed(seed) (e first, then t)."""
    torch.manual_seed(seed)
    e = torch.randn_like(x)
    t = facm.sample_t(len(x), args, x)
    return e, t, (1 - t[:, None]) * x + t[:, None] * e


def loss_of(net, teacher=oracle, seed=1, n=256, **kw):
    x, y = batch(n)
    torch.manual_seed(seed)
    return facm.facm_loss(net, teacher, x, y, NULL, dataclasses.replace(facm.Args(), **kw))


# ---------------------------------------------------------------- distillation: the exact map is a fixed point
def exact_derivatives(x_t, t, y=None, steps=100, h=1e-6):
    """u*(x_t, t, 0), its x-Jacobian J [B, 2, 2] and its partial derivative in t, by central differences of the RK4
    map in float64 (h 1e-6: u* is steep at some points, h 1e-4 errs by 0.16 there; forward-mode through the RK4
    steps costs 20 times more here)."""
    n, d = len(x_t), h * torch.eye(2, dtype=torch.float64)
    z = torch.cat([x_t, x_t + d[0], x_t - d[0], x_t + d[1], x_t - d[1], x_t, x_t])
    tt = torch.cat([t, t, t, t, t, t + h, t - h])
    u = G.avg_velocity(z, tt, 0 * tt, None if y is None else y.repeat(7), steps=steps).view(7, n, 2)
    return u[0], torch.stack([u[1] - u[2], u[3] - u[4]], -1) / (2 * h), (u[5] - u[6]) / (2 * h)


def taylor_net(x_t, t, y, extra=None):
    """The exact map at the rows (x_t, t, 0) as a first-order model (all the CM term reads: the value and the first
    derivatives at the row); v* where s = t. `extra(z, t)` is added to the CM output (a perturbed map)."""
    u0, J, dt = exact_derivatives(x_t, t, y)

    def net(z, t_, s_, y_):
        if torch.equal(s_, t_):
            return G.velocity(z, t_, y_)
        out = u0 + (J * (z - x_t)[:, None, :]).sum(-1) + (t_ - t)[:, None] * dt
        return out + (extra(z, t_) if extra is not None else 0)
    return net


def grad_and_terms(net, n=128, seed=1, **kw):
    """The autograd gradient of the loss wrt an offset on every output of `net`, and the logged terms."""
    theta = torch.zeros(n, 2, dtype=torch.float64, requires_grad=True)
    loss, terms = loss_of(lambda *a: net(*a) + theta, seed=seed, n=n, **kw)
    return torch.autograd.grad(loss, theta)[0], terms


def test_cm_direction_and_the_whole_gradient_vanish_at_the_exact_map():
    # g = u - (v - t du/dt) is MeanFlow's identity at s = 0; with the exact teacher it vanishes at u* up to the RK4
    # error (spec: 4.6e-7; measured here, 100 RK4 steps: 1.7e-7 mean, 0.13 perturbed), and the clip and the weight
    # keep the exact map a fixed point: the gradient of the whole loss (CM and FM) vanishes there, not at a perturbed map
    x, y = batch(128)
    _, t, x_t = replay(x, facm.Args(), 1)
    (g_at, at) = grad_and_terms(taylor_net(x_t, t, y))
    (g_off, off) = grad_and_terms(taylor_net(x_t, t, y, extra=lambda z, t_: 0.1 * torch.sin(z) * (1 + t_)[:, None]))
    assert at["g_abs"] < 1e-6 and off["g_abs"] > 1e-2, (at["g_abs"], off["g_abs"])
    assert at["cm_mse"] < 1e-11 and at["fm"] < 1e-12 and off["cm_mse"] > 1e-5, (at, off)
    assert g_at.abs().mean() < 1e-4 * g_off.abs().mean(), (g_at.abs().mean(), g_off.abs().mean())  # measured ratio 7e-6
    (_, fm_off) = grad_and_terms(lambda z, t_, s_, y_: exact(z, t_, s_, y_) + 0.1 * torch.sin(z) if torch.equal(s_, t_) else 0 * z)
    assert fm_off["fm"] > 1e-3, fm_off["fm"]


def rot(angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


@pytest.mark.parametrize("scale,angle", [(1.0, 0.0), (1.5, 0.0), (1.0, 0.4), (0.7, -1.0)])
def test_fm_anchor_is_mse_plus_one_minus_cosine(scale, angle):
    # FM output = scale R(angle) v*: the squared error sees the scale and the angle, 1 - cos only the angle;
    # both vanish at v* (scale 1, angle 0)
    n = 64
    net = lambda x_t, t, s, y: scale * G.velocity(x_t, t, y) @ rot(angle).T if torch.equal(s, t) else 0 * x_t  # noqa: E731
    x, y = batch(n)
    _, t, x_t = replay(x, facm.Args(), 1)
    v = G.velocity(x_t, t, y)
    want = (scale * v @ rot(angle).T - v).pow(2).mean(1) + (1 - math.cos(angle))
    got = loss_of(net, n=n)[1]["fm"]
    assert torch.allclose(got, want.mean(), rtol=1e-10, atol=1e-14), (got, want.mean())
    assert (got < 1e-14) == (scale == 1.0 and angle == 0.0)


def test_fm_cosine_is_over_the_channels_per_pixel():
    # images [B, C, H, W]: squared error averaged over all dims, 1 - cos over C then averaged over the pixels
    gen = torch.Generator().manual_seed(5)
    x, v_t, w = (torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    net = lambda z, t, s, y: w * (1 + t[:, None, None, None]) if torch.equal(s, t) else 0 * z  # noqa: E731
    teacher = lambda z, t, s, y: v_t  # noqa: E731
    torch.manual_seed(0)
    got = facm.facm_loss(net, teacher, x, torch.zeros(6, dtype=torch.long), 1, facm.Args())[1]["fm"]
    torch.manual_seed(0)
    torch.randn_like(x)
    p = w * (1 + facm.sample_t(6, facm.Args(), x)[:, None, None, None])
    cos = (p * v_t).sum(1) / p.norm(dim=1) / v_t.norm(dim=1)
    want = ((p - v_t).pow(2).mean((1, 2, 3)) + (1 - cos).mean((1, 2))).mean()
    assert torch.allclose(got, want, rtol=1e-10), (got, want)


# ---------------------------------------------------------------- the gradient: closed form and direction
@pytest.mark.parametrize("kw", [{}, {"relax_p": 0.3, "clip": 0.5, "norm_c": 0.02, "norm_q": 1.0, "time_dist": "log"}])
def test_gradient_is_the_closed_form(kw):
    # dL/du_i = b(t) 2 a(t) clamp(g) / D / sg(e + c)^q / B with g = u - (v - t du/dt) rebuilt here by central
    # differences along (v, 1), a = 1 - (1 - t)^p, b = sin(pi t / 2) (the official 1 - t_F^p, cos(pi t_F / 2)).
    # The offset theta (1 + t) enters du/dt: a JVP tangent that kept its graph would add to the gradient; so would
    # a weight with an undetached denominator.
    n, h = 64, 1e-5
    args = dataclasses.replace(facm.Args(), **kw)
    x, y = batch(n, seed=4)
    base = lambda z, t, s, y_: 0.8 * z * (1 + t)[:, None] + torch.sin(2 * z + t[:, None]) - 0.5 * (t - s)[:, None]  # noqa: E731
    theta = torch.zeros(n, 2, dtype=torch.float64, requires_grad=True)
    net = lambda z, t, s, y_: base(z, t, s, y_) + theta * ((1 + t) * (s == 0))[:, None]  # noqa: E731  CM output only
    torch.manual_seed(7)
    loss, terms = facm.facm_loss(net, oracle, x, y, NULL, args)
    grad = torch.autograd.grad(loss, theta)[0]
    _, t, x_t = replay(x, args, 7)
    v, zero = G.velocity(x_t, t, y), torch.zeros_like(t)
    u = base(x_t, t, zero, y)
    du = (base(x_t + h * v, t + h, zero, y) - base(x_t - h * v, t - h, zero, y)) / (2 * h)
    a, b = (1 - (1 - t) ** args.relax_p)[:, None], torch.sin(math.pi * t / 2)[:, None]
    step = a * (u - (v - t[:, None] * du)).clamp(-args.clip, args.clip)  # u - target
    e = step.pow(2).mean(1, keepdim=True)
    want = b * 2 * step / 2 / (e + args.norm_c) ** args.norm_q / n * (1 + t)[:, None]  # D = 2
    assert 0.1 < terms["clipped"] < 0.9, terms["clipped"]  # some of g is clipped, some not
    assert torch.allclose(grad, want, rtol=1e-6, atol=1e-9 * want.abs().max()), (grad - want).abs().max()


def test_a_gradient_step_moves_toward_the_exact_map():
    # CM output u = u* + sum_k theta_k phi_k: the distance to the exact map is mean ||sum theta_k phi_k||^2 on the rows
    n = 96
    x, y = batch(n)
    phis = lambda z, t: [torch.sin(z), torch.cos(2 * z) * (1 + t)[:, None] + 0.3, z * t[:, None]]  # noqa: E731
    theta0 = torch.tensor([0.15, -0.1, 0.05], dtype=torch.float64)
    _, t, x_t = replay(x, facm.Args(), 3)
    dist = lambda th: sum(a * p for a, p in zip(th, phis(x_t, t))).pow(2).sum(1).mean()  # noqa: E731
    theta = theta0.clone().requires_grad_(True)
    net = taylor_net(x_t, t, y, extra=lambda z, t_: sum(a * p for a, p in zip(theta, phis(z, t_))))
    grad = torch.autograd.grad(loss_of(net, seed=3, n=n)[0], theta)[0]
    d0, d1 = dist(theta0), dist(theta0 - 1e-2 * grad / grad.norm())
    assert d1 < d0 - 1e-3 * d0, (d0, d1, grad)


# ---------------------------------------------------------------- from data: v = e - x drawn from the posterior
def posterior_grads(P=24, M=4096, seed=0, **kw):
    """facm_loss itself from data (teacher None) on P points x_t, t in [0.2, 0.9], with M posterior draws of e - x
    each (its draws of e and t replaced by ours), at the exact map (u* for the CM output, v* for the FM output):
    the per-row autograd gradients of the rows' l_CM and l_FM wrt the CM and the FM outputs, [P, M, 2] each."""
    gen = torch.Generator().manual_seed(seed)
    x0, _ = G.sample(P, gen)
    t = 0.2 + 0.7 * torch.rand(P, generator=gen, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(P, 2, generator=gen, dtype=torch.float64)
    u0, J, du_dt = exact_derivatives(x_t, t)
    rep = lambda z: z.repeat_interleave(M, 0)  # noqa: E731
    X_t, T = rep(x_t), rep(t)
    x = G.posterior_sample(X_t, T, gen)
    e = (X_t - (1 - T[:, None]) * x) / T[:, None]
    N, i = P * M, torch.arange(P * M) // M
    out_cm, out_fm = (torch.zeros(N, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def net(z, t_, s_, y):
        if torch.equal(s_, t_):
            return G.velocity(z, t_) + out_fm
        return u0[i] + (J[i] * (z - X_t)[:, None, :]).sum(-1) + (t_ - T)[:, None] * du_dt[i] + out_cm

    args = dataclasses.replace(facm.Args(), teacher="none", **kw)
    with mock.patch.object(facm, "sample_t", lambda n, a, like: T), mock.patch.object(torch, "randn_like", lambda z: e):
        loss, _ = facm.facm_loss(net, None, x, torch.full((N,), NULL), NULL, args)
    g_cm, g_fm = (g.view(P, M, 2) * N for g in torch.autograd.grad(loss, [out_cm, out_fm]))
    return g_cm, g_fm, (G.velocity(X_t, T) - (e - x)).view(P, M, 2)  # the last: the gradient of the squared error alone


def drift(g):
    """|E g| / E |g| per point: the expected gradient at the exact map relative to the per-sample one."""
    return (g.mean(1).norm(dim=1) / g.norm(dim=2).mean(1))


def test_from_data_the_exact_map_is_not_a_fixed_point():
    # The clip and the weight e / sg(e + c)^q act per sample on a residual that holds the conditional e - x: at u*
    # the expected CM gradient keeps a drift |E g| / E|g| (spec 5.6: 0.103 mean, 0.42 max; measured here, 24 points,
    # t in [0.2, 0.9], M 4096, seeds 0/1/2: 0.127/0.174/0.135 mean, 0.37/0.45/0.47 max). Without the clip and the
    # weight (clip 1e9, q 0) it is Monte Carlo noise (measured 0.014). The FM anchor: its squared error has mean zero
    # at v* (what is left is noise, measured 0.023 in velocity units), its 1 - cos part does not: the expected
    # gradient of the cosine at v*, over the squared error's curvature, moves the FM fixed point by 0.044/0.105/0.152
    # (mean over the points; seeds 0/1/2) toward the mean direction of e - x.
    cm, fm, mse = posterior_grads()
    cm_plain = posterior_grads(clip=1e9, norm_q=0.0)[0]
    d, d0 = drift(cm), drift(cm_plain)
    assert d0.mean() < 2 / 4096**0.5 and 0.08 < d.mean() < 0.25 and d.max() > 0.25, (d0.mean(), d.mean(), d.max())
    shift = lambda g: g.mean(1).norm(dim=1).mean()  # noqa: E731  the expected gradient over the curvature 2 / D = 1
    assert shift(mse) < 0.03 and shift(fm - mse) > 0.03 and shift(fm) > 1.5 * shift(mse), (shift(mse), shift(fm - mse), shift(fm))


# ---------------------------------------------------------------- the parts around the loss
def test_time_laws_by_quantiles_through_the_loss():
    # arctan (official default): P(t <= q) = Phi((log tan(pi q / 2) - mu) / sigma), quantiles .037/.096/.269/.588/.822
    # at (-0.8, 1.6); log: the logit-normal LN(mu, sigma), .055/.132/.310/.569/.777. Read from the FM forward's t.
    n, seen = 8000, []
    phi = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    cdfs = {"arctan": lambda q, m, s: phi((torch.log(torch.tan(math.pi * q / 2)) - m) / s),
            "log": lambda q, m, s: phi((torch.logit(q) - m) / s)}
    net = lambda z, t, s, y: seen.append(t) or 0 * z  # noqa: E731
    x = torch.zeros(n, 2, dtype=torch.float64)
    for law, mu, sigma in [("arctan", -0.8, 1.6), ("log", -0.8, 1.6), ("arctan", 0.3, 0.7)]:
        seen.clear()
        torch.manual_seed(0)
        facm.facm_loss(net, oracle, x, torch.full((n,), NULL), NULL, dataclasses.replace(facm.Args(), time_dist=law, time_mu=mu, time_sigma=sigma))
        t = seen[-1]
        assert ks(t, lambda q: cdfs[law](q, mu, sigma)) < 1.63 / n**0.5, (law, mu, sigma)
    t = facm.sample_t(200000, facm.Args(), x)
    quantiles = torch.quantile(t[:100000], torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
    assert torch.allclose(quantiles, torch.tensor([0.037, 0.096, 0.269, 0.588, 0.822], dtype=torch.float64), atol=3e-3), quantiles


def test_guidance_and_its_interval():
    # official glow 0.125 on t_F = 1 - t: guidance for t <= 0.875 (default cfg_t_max), none above and none on null rows;
    # v = v_u + w (v_c - v_u) with the teacher's v_c and v_u, or from data v_c = e - x and v_u = the current net's FM
    # output with the null label
    n = 64
    x, y = batch(n)
    y[-2:] = 0  # labelled rows at the interval's end
    e = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.cat([torch.linspace(0.01, 0.99, n - 2, dtype=torch.float64), torch.tensor([0.875, 0.8751], dtype=torch.float64)])
    x_t = (1 - t[:, None]) * x + t[:, None] * e
    args = dataclasses.replace(facm.Args(), teacher_cfg=2.5)
    inside = ((t <= 0.875) & (y != NULL))[:, None]
    assert inside[-2] and not inside[-1] and inside.any() and not inside.all()
    v_c, v_u = G.velocity(x_t, t, y), G.velocity(x_t, t)
    got = facm.velocity(oracle, None, x, e, x_t, t, y, NULL, args)
    assert torch.allclose(got, torch.where(inside, v_u + 2.5 * (v_c - v_u), v_c), atol=1e-12) and (got - v_c).abs().max() > 0.1
    args2 = dataclasses.replace(args, cfg_t_min=0.3, cfg_t_max=0.6)
    inside2 = ((t >= 0.3) & (t <= 0.6) & (y != NULL))[:, None]
    assert torch.allclose(facm.velocity(oracle, None, x, e, x_t, t, y, NULL, args2), torch.where(inside2, v_u + 2.5 * (v_c - v_u), v_c), atol=1e-12)
    student = lambda z, t_, s_, y_: G.velocity(z, t_, y_) * torch.where(y_ == NULL, 0.5, 3.0)[:, None]  # noqa: E731  its null output: 0.5 v_u
    got = facm.velocity(None, student, x, e, x_t, t, y, NULL, args)
    assert torch.allclose(got, torch.where(inside, 0.5 * v_u + 2.5 * (e - x - 0.5 * v_u), e - x), atol=1e-12)
    assert torch.equal(facm.velocity(None, student, x, e, x_t, t, y, NULL, facm.Args()), e - x)
    assert torch.equal(facm.velocity(oracle, None, x, e, x_t, t, y, NULL, facm.Args()), v_c)


def test_the_jvp_tangent_is_the_guided_velocity_and_masks_are_shared():
    # the JVP runs along (v, 1), v the guided velocity of the loss; the grad forward of the CM output draws the
    # JVP's dropout masks (stood for by one torch.rand per forward), the FM forward its own
    draws, tangents, vs, jvp, velocity = [], [], [], torch.func.jvp, facm.velocity

    def net(z, t, s, y):
        draws.append(torch.rand(()).item())
        return G.velocity(z, t, y) * (1 + (s == 0)[:, None])

    with mock.patch.object(torch.func, "jvp", lambda f, p, tg: tangents.append(tg) or jvp(f, p, tg)), \
            mock.patch.object(facm, "velocity", lambda *a: vs.append(velocity(*a)) or vs[-1]):
        loss_of(net, n=32, teacher_cfg=2.0)
    assert len(draws) == 3 and draws[0] == draws[1] and draws[2] != draws[1], draws
    assert torch.equal(tangents[0][0], vs[0]) and torch.equal(tangents[0][1], torch.ones(32, dtype=torch.float64))


def test_samplers_on_the_exact_map():
    # consistency: x0 = f*(x, t_k, 0) exactly, then re-noised to t_{k+1} with the sampler's own noise: at 1 step the
    # ODE endpoint, at 2 steps f*((1 - 1/2) f*(e, 1, 0) + 1/2 n, 1/2, 0); Euler on the FM output v* converges to the endpoint
    n = 300
    e = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = G.sample(n, torch.Generator().manual_seed(4))[1]
    end = G.flow_map(e, 1.0, 0.0, y, steps=50)
    assert (facm.sample(exact, e, y, 1) - end).abs().max() < 1e-9
    torch.manual_seed(0)
    got = facm.sample(exact, e, y, 2)
    torch.manual_seed(0)
    x1 = 0.5 * end + 0.5 * torch.randn_like(end)
    assert (got - G.flow_map(x1, 0.5, 0.0, y, steps=50)).abs().max() < 1e-9 and (got - end).abs().mean() > 0.1
    assert (facm.sample(exact, e, y, 100, "euler") - end).abs().max() < 0.05
    assert (facm.sample(exact, e, y, 4, "euler") - end).abs().max() > 0.05  # a few Euler steps are not the map


def test_smoke_from_data_guided_and_euler(tmp_path):
    run_here(SCRIPT, *TINY, "--teacher", "none", "--teacher-cfg", 1.5, "--time-dist", "log", "--sampler", "euler",
               "--eval-steps", 2, "--dropout", 0.1, "--out-dir", tmp_path)
    summary = json.loads((tmp_path / "facm" / "gmm" / "summary.json").read_text())
    assert summary["steps"] == 4 and all(k in summary["final"] for k in ["loss", "cm", "fm", "cm_mse", "g_abs", "clipped", "fm_err@2"])


@pytest.mark.parametrize("field,value,needle", [("time_dist", "uniform", "--time-dist uniform"), ("sampler", "heun", "--sampler heun"),
                                                ("clip", 0.0, "--clip 0.0"), ("relax_p", -1.0, "--relax-p -1.0"),
                                                ("norm_q", -0.5, "--norm-q -0.5"), ("teacher_cfg", 0.5, "--teacher-cfg 0.5"),
                                                ("cfg_t_max", 1.5, "--cfg-t-max 1.5")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        facm.check_args(dataclasses.replace(facm.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)
