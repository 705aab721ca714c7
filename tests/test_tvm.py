"""TVM: the terminal-velocity residual vanishes at the exact flow map of the mixture and not away
from it; the gradient through the JVP tangent equals a finite difference (analytic field) and,
on a small DiT in float64, the gradient through kernels.attention_jvp equals the one through
plain-math attention under torch.func.jvp (and, under TRITON_INTERPRET=1, through Triton)."""
import copy
import dataclasses
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from common.data import default_gmm
from conftest import ROOT, load_method, read_all, run_inline, run_method

tvm = load_method("tvm")
G = default_gmm()
NULL = G.num_classes


def exact(x, t, s, y, c=None, steps=60):
    return G.avg_velocity(x, t, s, y, steps=steps)


def oracle_v(x, t, s, y, c=None):  # the exact velocity as a "target network" (it ignores s: v*(x, t))
    return G.velocity(x, t, y)


def batch(n, seed, args):
    gen = torch.Generator().manual_seed(seed)
    x, y = G.sample(n, gen)
    torch.manual_seed(seed)
    t, s, _ = tvm.sample_times(n, args, "cpu", torch.float64)
    return (1 - t[:, None]) * x + t[:, None] * torch.randn(x.shape, generator=gen, dtype=torch.float64), t, s, y


def test_times():
    args = tvm.Args()
    torch.manual_seed(0)
    t, s, s2 = tvm.sample_times(200_000, args, "cpu", torch.float64)
    assert (s >= 0).all() and (s <= t).all() and (t <= 1).all() and ((s2 > 0) & (s2 < 1)).all()
    gap = torch.logit(t - s)  # t = s + gap exactly (s was truncated below 1 - gap), gap ~ LN(-0.8, 1)
    assert abs(gap.mean() + 0.8) < 0.01 and abs(gap.std() - 1) < 0.01
    z = torch.logit(s2)
    assert abs(z.mean() + 0.4) < 0.01 and abs(z.std() - 1) < 0.01
    # s itself is the truncated law: below the untruncated one
    assert torch.logit(s.clamp(1e-12, 1 - 1e-12)).mean() < z.mean() - 0.3


@pytest.mark.parametrize("scale_param", [False, True])
def test_terminal_residual_vanishes_at_the_exact_map(scale_param):
    # R = df_ds - v*(f, s): 0 for u = u* (up to the ODE error), not for u* + eps (t - s) sin x
    args = dataclasses.replace(tvm.Args(), scale_param=scale_param)
    x_t, t, s, y = batch(300, 0, args)
    w = torch.full_like(t, 1.5 if scale_param else 1.0)
    net = (lambda x, t, s, y, c: exact(x, t, s, y) / (1 / c)) if scale_param else exact  # F = u / w, so that w F = u*
    for field, lo, hi in [(net, 0, 1e-6), (lambda x, t_, s_, y, c: net(x, t_, s_, y, c) + 0.05 * (t_ - s_)[:, None] * torch.sin(x), 1e-3, None)]:
        u, f, df_ds = tvm.map_and_ds(field, x_t, t, s, y, w, args)
        r = (df_ds - G.velocity(f, s, y)).pow(2).sum(1).mean().sqrt()
        assert r > lo and (hi is None or r < hi), r


def test_loss_terminal_term_vanishes_at_the_exact_map():
    args = tvm.Args()
    x, y = G.sample(400, torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    _, terms = tvm.tvm_loss(exact, oracle_v, x, y, args, NULL)
    assert terms["term"] < 1e-10 and terms["fm"] > 0.1 and terms["nonfinite"] == 0


class Frozen:
    """The target network with its outputs frozen at theta_0: sg(u_tgt(f, s, s)) depends on theta through
    f, and the stop-gradient means exactly that this dependence is not differentiated; the finite
    difference must hold it fixed too."""

    def __init__(self):
        self.outputs, self.replay = [], False

    def __call__(self, x, t, s, y, c=None):
        if self.replay:
            return self.outputs.pop(0)
        self.outputs.append(oracle_v(x, t, s, y))
        return self.outputs[-1]


def loss_at(theta, args, target, n=256, seed=7, phi=lambda x, t, s: torch.sin(2 * x + s[:, None]) * (1 + t[:, None])):
    """The full TVM loss for u_theta = u* + theta phi (phi depends on s: the tangent carries theta)."""
    net = lambda x, t, s, y, c: exact(x, t, s, y, steps=20) + theta * phi(x, t, s)  # noqa: E731
    x, y = G.sample(n, torch.Generator().manual_seed(seed))
    y = torch.where(torch.arange(n) % 5 == 0, NULL, y)
    torch.manual_seed(seed)
    return tvm.tvm_loss(net, target, x, y, args, NULL)


@pytest.mark.parametrize("cfg_w,scale_param", [(1.0, False), (1.7, True)])
def test_gradient_through_the_tangent_equals_finite_difference(cfg_w, scale_param):
    args = dataclasses.replace(tvm.Args(), cfg_w=cfg_w, scale_param=scale_param)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    target = Frozen()
    loss, terms = loss_at(theta, args, target)
    g = torch.autograd.grad(loss, theta)[0].item()
    h = 1e-4
    outputs, fd = list(target.outputs), 0.0
    for sign in (1, -1):
        target.outputs, target.replay = list(outputs), True
        with torch.no_grad():
            fd += sign * loss_at(theta + sign * h, args, target)[0].item() / (2 * h)
    assert terms["term"] > 1e-3 and abs(g - fd) < 1e-7 * max(1.0, abs(fd)), (g, fd)


# ---------------------------------------------------------------- the DiT: sdpa vs plain-math attention
def naive_attention(q, k, v, causal=False, scale=None):
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1) @ v


def map_and_ds_func(net, x, t, s, y, w, args):
    """map_and_ds with torch.func.jvp in place of forward_ad dual numbers (the reference path)."""
    u, du_ds = torch.func.jvp(lambda s_: tvm.velocity(net, x, t, s_, y, w, args), (s,), (torch.ones_like(s),))
    col = lambda a: a.view(-1, *[1] * (x.dim() - 1))  # noqa: E731
    return u, x - col(t - s) * u, u - col(t - s) * du_ds


def dit_grads(dtype, attention=None, jvp="forward_ad", seed=0, detach=False):
    """Parameter gradient of the full TVM loss on a small randomized DiT (guidance on, scale param)."""
    import common.dit as dit
    from kernels.attention_jvp import sdpa

    torch.manual_seed(seed)
    net = dit.DiT(8, 2, 2, 32, 2, 2, 4.0, 10, n_cond=1, qk_norm=True, norm="rms", modnorm=True).to(dtype)
    with torch.no_grad():  # adaLN-zero makes a fresh net output 0: give every weight a value
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    target = copy.deepcopy(net).requires_grad_(False)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    args = dataclasses.replace(tvm.Args(), cfg_w=1.5, scale_param=True)
    x = torch.randn(6, 2, 8, 8, dtype=dtype)
    y = torch.tensor([0, 3, 10, 7, 10, 1])
    saved = dit.sdpa, tvm.map_and_ds
    dit.sdpa = attention or sdpa
    if jvp == "func":
        tvm.map_and_ds = map_and_ds_func
    if detach:
        orig = tvm.map_and_ds
        tvm.map_and_ds = lambda *a: (lambda u, f, d: (u, f, d.detach()))(*orig(*a))
    try:
        torch.manual_seed(seed + 1)
        loss, terms = tvm.tvm_loss(net, target, x, y, args, 10)
        loss.backward()
    finally:
        dit.sdpa, tvm.map_and_ds = saved
    return torch.cat([p.grad.flatten() for p in net.parameters()]), terms


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_dit_gradient_through_sdpa_equals_plain_math_attention():
    ours, terms = dit_grads(torch.float64)
    ref, _ = dit_grads(torch.float64, naive_attention, jvp="func")
    assert terms["term"] > 1e-3 and rel(ours, ref) < 1e-6, rel(ours, ref)
    # the same with torch.func.jvp through sdpa, and the test can fail: detaching df_ds changes the gradient
    assert rel(dit_grads(torch.float64, jvp="func")[0], ref) < 1e-6
    assert rel(dit_grads(torch.float64, detach=True)[0], ref) > 1e-2


TRITON_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
import kernels.attention_jvp as A
assert A.INTERPRET and A.HAS_TRITON
import test_tvm as T
A.BACKEND = "triton"
ours, _ = T.dit_grads(torch.float32)
ref, _ = T.dit_grads(torch.float32, T.naive_attention, jvp="func")
print("REL", T.rel(ours, ref))
"""


def test_dit_gradient_through_triton_interpreter():
    pytest.importorskip("triton")
    code = TRITON_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = float(proc.stdout.split("REL")[-1])
    assert err < 1e-5, err  # fp32 (seen: 1.6e-7)


# ---------------------------------------------------------------- no silent NaN, guidance, bad input, checkpoint
def test_a_nonfinite_row_is_counted_not_zeroed():
    args = tvm.Args()
    x, y = G.sample(64, torch.Generator().manual_seed(1))

    def net(x, t, s, y, c):
        u = exact(x, t, s, y, steps=10)
        return torch.where((torch.arange(len(x)) == 3)[:, None], torch.nan, u)

    torch.manual_seed(1)
    loss, terms = tvm.tvm_loss(net, oracle_v, x, y, args, NULL)
    assert not torch.isfinite(loss) and terms["nonfinite"] == 1


def test_guidance_scale_and_sampler_inputs():
    args = dataclasses.replace(tvm.Args(), cfg_w=2.0, scale_param=True)
    y = torch.tensor([0, NULL, 2, NULL])
    assert tvm.guidance_scale(y, NULL, args).tolist() == [2.0, 1.0, 2.0, 1.0]
    lo_hi = tvm.guidance_scale(torch.zeros(1000, dtype=torch.long), NULL, dataclasses.replace(args, cfg_w_range=(1.5, 3.0)))
    assert 1.5 <= lo_hi.min() and lo_hi.max() <= 3.0 and lo_hi.std() > 0.3
    seen = []

    def net(x, t, s, y, c):
        seen.append(c[:, 0].clone())
        return torch.ones_like(x)

    out = tvm.sample(net, torch.zeros(4, 2), y, 2, NULL, args)
    assert torch.equal(seen[0], torch.tensor([0.5, 1.0, 0.5, 1.0]))  # beta = 1/w, 1 on null rows
    assert torch.allclose(out, -torch.tensor([2.0, 1.0, 2.0, 1.0])[:, None].expand(4, 2))  # u = w F, two half steps


@pytest.mark.parametrize("flags,needle", [
    (["--cfg-w", 0.5], "--cfg-w 0.5"),
    (["--cfg-w-range", 0.5, 2.0], "--cfg-w-range"),
    (["--gap-mu", 5.0], "--gap-mu 5.0"),
    (["--ema-target-decay", 1.0], "--ema-target-decay 1.0"),
    (["--ema-decay", 1.0], "--ema-decay 1.0"),
    (["--ema-target-decay", -0.1], "--ema-target-decay -0.1"),
    (["--norm", "batch"], "--norm batch"),
])
def test_bad_input_gets_one_line(flags, needle, tmp_path):
    proc = run_inline(os.path.join(ROOT, "methods", "tvm.py"), *flags, "--out-dir", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_target_ema_is_checkpointed(tmp_path):
    run_method(os.path.join(ROOT, "methods", "tvm.py"), "--steps", 3, "--batch-size", 32, "--hidden", 32, "--depth", 2,
               "--log-every", 1, "--eval-every", 3, "--eval-samples", 100, "--ckpt-every", 3, "--out-dir", tmp_path)
    state = read_all(tmp_path / "tvm" / "gmm" / "ckpt.safetensors")
    tgt = {k.split("/", 2)[-1]: v for k, v in state.items() if k.startswith("/ema_target/")}
    ema = {k.split("/", 2)[-1]: v for k, v in state.items() if k.startswith("/ema/")}
    net = {k.split("/", 2)[-1]: v for k, v in state.items() if k.startswith("/net/")}
    assert tgt and tgt.keys() == ema.keys() == net.keys()
    # decay 0.99 moves further toward the net than the sampling EMA's 0.999
    d = lambda a: sum((a[k] - net[k]).pow(2).sum() for k in net)  # noqa: E731
    assert 0 < d(tgt) < d(ema)


# ---------------------------------------------------------------- target network, time law, posterior, direction, sampler
def test_terminal_and_unconditional_velocities_come_from_the_target_net():
    # distinguishable nets: the trained net is the exact map, the target EMA the exact velocity + 0.1 (terminal)
    # and + 0.2 on null labels (the unconditional velocity of the guided FM target): each offset shows up in its term
    args = dataclasses.replace(tvm.Args(), cfg_w=1.5)
    n, net = 200, lambda x_, t_, s_, y_, c=None: exact(x_, t_, s_, y_, steps=12)  # noqa: E731
    x, y = G.sample(n, torch.Generator().manual_seed(5))
    target = lambda x_, t_, s_, y_, c=None: oracle_v(x_, t_, s_, y_) + 0.1 + 0.1 * (y_ == NULL)[:, None]  # noqa: E731
    torch.manual_seed(5)
    _, terms = tvm.tvm_loss(net, target, x, y, args, NULL)
    torch.manual_seed(5)
    _, terms0 = tvm.tvm_loss(net, oracle_v, x, y, args, NULL)
    # terminal: (beta (df_ds - v* - 0.1))^2 = (0.1 / w)^2 per dim on the s < t rows
    assert abs(terms["term"] - 0.01 / 1.5**2) < 2e-4 and terms0["term"] < 1e-7, (terms["term"], terms0["term"])
    # FM: v_tgt moves by (1 - w) 0.2 = -0.1 on labeled rows, so the FM term changes
    assert abs(terms["fm"] - terms0["fm"]) > 1e-3


def test_s_is_the_truncated_logit_normal_given_the_gap():
    # probability integral transform: given the gap g, F(s | g) = Phi((logit s - mu) / sig) / Phi((logit(1 - g) - mu) / sig)
    # is uniform; t = min(s + g, 1) = s + g
    args = tvm.Args()
    torch.manual_seed(1)
    t, s, s2 = tvm.sample_times(20000, args, "cpu", torch.float64)
    gap = t - s
    Phi = torch.distributions.Normal(0.0, 1.0).cdf
    u = Phi((torch.logit(s) + 0.4) / 1.0) / Phi((torch.logit(1 - gap) + 0.4) / 1.0)
    x = u.sort().values
    n = len(x)
    d = torch.maximum(torch.arange(1, n + 1) / n - x, x - torch.arange(n) / n).max().item()
    assert d < 1.63 / n**0.5, d  # the 1% KS bound
    assert (t <= 1).all() and (s + gap <= 1 + 1e-12).all()






def cfg_field(x, t, y, w):
    """v*_u + w (v*_c - v*_u) per row, the unconditional field on null rows."""
    v_u = G.velocity(x, t)
    return v_u + w[:, None] * (G.velocity(x, t, y) - v_u)


def test_fm_term_on_posterior_targets_has_the_cfg_field_at_the_embedded_scale_as_its_minimizer():
    """With e - x drawn from p(x | x_s', y) (class-conditional), the FM target w (e - x) + (1 - w) v_u has mean
    v*_u + w (v*_c - v*_u): the expected gradient of the loss at the net that outputs the CFG field at the scale
    it is given (1 / beta) is zero within Monte Carlo error (plain L2: no per-sample weight), and at a field of
    another scale it is not. 32 points x 2048 draws, terminal term switched off (s = t)."""
    args = dataclasses.replace(tvm.Args(), cfg_w=2.0)
    P, M, gen = 32, 2048, torch.Generator().manual_seed(0)
    x0, y0 = G.sample(P, gen)
    y0[:4] = NULL  # dropped labels: w = 1, the unconditional posterior
    s2 = torch.sigmoid(-0.4 + torch.randn(P, generator=gen, dtype=torch.float64))
    x_s = (1 - s2[:, None]) * x0 + s2[:, None] * torch.randn(P, 2, generator=gen, dtype=torch.float64)
    X, S2, Y = x_s.repeat_interleave(M, 0), s2.repeat_interleave(M, 0), y0.repeat_interleave(M, 0)
    x = torch.cat([G.posterior_sample(X[:4 * M], S2[:4 * M], gen), G.posterior_sample(X[4 * M:], S2[4 * M:], gen, Y[4 * M:])])
    e = (X - (1 - S2[:, None]) * x) / S2[:, None]
    out = torch.zeros_like(X, requires_grad=True)

    def grads(scale):
        def net(z, t_, s_, y_, c):
            w = scale * (1 / c[:, 0] - 1) + 1  # the field at scale 1 + scale (w - 1): scale 1 is the embedded w
            return cfg_field(z, t_, y_, torch.where(y_ == NULL, 1.0, w)) + out

        with mock.patch.object(tvm, "sample_times", lambda n, a_, d, dt: (S2, S2, S2)), mock.patch.object(torch, "randn_like", lambda z: e):
            loss, terms = tvm.tvm_loss(net, oracle_v, x, Y, args, NULL)
        assert terms["term"] == 0
        g = torch.autograd.grad(loss, out)[0].view(P, M, 2)
        return g.sum(1), g.std(1) * M**0.5

    eg, se = grads(1.0)
    assert ((eg / se) ** 2).mean() < 2.0, ((eg / se) ** 2).mean()  # zero within Monte Carlo error
    eg, se = grads(1.5)
    assert ((eg[4:] / se[4:]) ** 2).mean() > 20  # the wrong scale is not the minimizer (labeled rows)


def test_a_gradient_step_moves_toward_the_exact_map():
    # u = u* + theta phi: dL/dtheta has the sign of theta (both terms pull back; measured +-1.7 to 2.4, seeds 7-9)
    args = tvm.Args()
    g = {}
    for theta0 in (0.3, -0.3):
        theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
        g[theta0] = torch.autograd.grad(loss_at(theta, args, oracle_v, n=64, seed=7)[0], theta)[0].item()
    assert g[0.3] > 0.5 and g[-0.3] < -0.5, g


def guided_avg_velocity(x, t, s, y, w, steps=40):
    """(x - f_w(x, t, s)) / (t - s) for the CFG field at per-row scale w, by RK4."""
    z, h, tau = x.double(), ((s - t) / steps)[:, None], t.clone().double()
    for _ in range(steps):
        k1 = cfg_field(z, tau, y, w)
        k2 = cfg_field(z + 0.5 * h * k1, tau + 0.5 * h[:, 0], y, w)
        k3 = cfg_field(z + 0.5 * h * k2, tau + 0.5 * h[:, 0], y, w)
        k4 = cfg_field(z + h * k3, tau + h[:, 0], y, w)
        z, tau = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), tau + h[:, 0]
    return (x - z) / (t - s)[:, None]


@pytest.mark.parametrize("cfg_w,scale_param", [(1.0, False), (2.0, True)])
def test_sampler_is_exact_at_two_steps(cfg_w, scale_param):
    # a net that is the exact map of the CFG field at the scale it embeds (w = 1 / beta); under --scale-param it
    # outputs F = u / w; the sampler must pass the training scale and land on the exact guided endpoint
    args = dataclasses.replace(tvm.Args(), cfg_w=cfg_w, scale_param=scale_param)
    e = torch.randn(40, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.arange(40) % (NULL + 1)
    net = lambda x, t, s, y_, c: guided_avg_velocity(x, t.double(), s.double(), y_, 1 / c[:, 0].double()) * (c if scale_param else 1)  # noqa: E731
    w = torch.where(y == NULL, 1.0, cfg_w).double()
    one = torch.ones(40, dtype=torch.float64)
    want = e - guided_avg_velocity(e, one, 0 * one, y, w, steps=80)
    assert torch.allclose(tvm.sample(net, e, y, 2, NULL, args).double(), want, atol=1e-6)


def test_grad_ckpt_covers_the_jvp_with_grad():
    """--grad-ckpt on TVM's forward-AD JVP with grad: the same u, du/ds and weight gradients (float64),
    every block recomputed through the checkpoint, and less peak tensor memory."""
    import torch.utils.checkpoint as cp

    from common.dit import DiT
    from kernels.bench import PeakTensorMemory

    fwAD = torch.autograd.forward_ad
    torch.manual_seed(0)
    net = DiT(8, 2, 4, 64, 3, 2, 4.0, 10, n_cond=1, qk_norm=True, norm="rms", modnorm=True).double()
    with torch.no_grad():  # adaLN-zero starts at zero output: random weights everywhere
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    s, y, c = 0.5 * t, torch.arange(4), torch.ones(4, 1, dtype=torch.float64)

    def step(ckpt):
        net.grad_ckpt = ckpt
        net.zero_grad()
        with fwAD.dual_level():
            u, du = fwAD.unpack_dual(net(x, t, fwAD.make_dual(s, torch.ones_like(s)), y, c))[:2]
        (u.pow(2).sum() + du.pow(2).sum()).backward()
        return u.detach(), du.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    calls, checkpoint = [], cp.checkpoint
    cp.checkpoint = lambda *a, **k: calls.append(1) or checkpoint(*a, **k)
    try:
        ref, got = step(False), step(True)
    finally:
        cp.checkpoint = checkpoint
    assert len(calls) == 3  # one per block, only with --grad-ckpt
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    peaks = []
    for ckpt in (False, True):
        with PeakTensorMemory() as tr:
            step(ckpt)
        peaks.append(tr.peak)
    assert peaks[1] < 0.8 * peaks[0], peaks
