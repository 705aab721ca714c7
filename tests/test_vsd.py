"""Diff-Instruct / VSD (methods/vsd.py): the sign rule at q = p and on a two-Gaussian toy with the exact fake
velocity (converges to the teacher's law; a flipped sign diverges), the per-sample gradient t (v_real - v_fake)
with no normalization, the time law LN(-1.2, 1.2) = EDM's sigma law by quantiles (both losses), the fake loss
= EDM's weighted denoising loss and its minimizer, the direction shared with mfd.py --ode-step 1 (other weight),
the generator input G(t_g e, t_g) and the exact one-step sampler, and from a loop run in this process: the
teacher frozen, the fake net and the generator trained 1:1 by their own optimizers, no gradient crossing
between the two losses, the EMA evaluated, --gen-t reaching every generator call; bad flags."""
import dataclasses
import math
import os

import pytest
import torch

from common.data import GMM
from common.dit import MLP, save
from common.eval import energy_distance
from conftest import ROOT, load_method, run_here
from test_fm import assert_each_net_moves_in_its_own_step, run_loop

vsd = load_method("vsd")
SCRIPT = os.path.join(ROOT, "methods", "vsd.py")
TOY = GMM([[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], [1, 1])
NULL = TOY.num_classes
EDM_Q = [0.061, 0.118, 0.232, 0.404, 0.583]  # t quantiles 10/25/50/75/90% of LN(-1.2, 1.2) (spec)


def oracle(gmm):
    return lambda x_t, t, s, y: gmm.velocity(x_t, t, y)


def x0_grad(x0, teacher, fake, seed, args=None):
    """d L_G / d x0 times numel (the per-sample `grad` of the file) and the t the loss drew."""
    x0 = x0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss, _ = vsd.dm_loss(x0, torch.full((len(x0),), NULL), teacher, fake, NULL, args or vsd.Args())
    torch.manual_seed(seed)
    return torch.autograd.grad(loss, x0)[0] * x0.numel(), vsd.sample_t(len(x0), args or vsd.Args(), "cpu")


# ---------------------------------------------------------------- the sign rule
def test_q_equals_p_gives_zero_gradient_on_every_sample():
    # the generator's law is the teacher's: the exact fake velocity is the teacher's, every row's gradient is 0
    x0 = TOY.sample(2000, torch.Generator().manual_seed(0))[0]
    g, _ = x0_grad(x0, oracle(TOY), oracle(GMM(TOY.means.clone(), TOY.sigmas.clone(), TOY.weights.clone())), 1)
    assert g.abs().max() == 0
    off, _ = x0_grad(x0, oracle(TOY), oracle(GMM(TOY.means + 0.3, TOY.sigmas, TOY.weights)), 1)
    assert (off.abs().sum(1) > 0).all()


def toy_run(flip, steps, seed=0, n=256, lr=0.1):
    """A two-Gaussian generator x0 = m_k + sigma_k z (means shifted by (0.8, 0.6)) trained by Adam on L_G with
    the exact teacher and the exact fake velocity of its own current law; flip: teacher and fake swapped."""
    m = (TOY.means + torch.tensor([0.8, 0.6], dtype=torch.float64)).requires_grad_(True)
    log_s = torch.full((2,), math.log(0.5), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([m, log_s], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        k = torch.randint(0, 2, (n,), generator=gen)
        x0 = m[k] + log_s.exp()[k, None] * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        own = oracle(GMM(m.detach(), log_s.exp().detach(), [1, 1]))
        real, fake = (own, oracle(TOY)) if flip else (oracle(TOY), own)
        torch.manual_seed(seed)
        loss, _ = vsd.dm_loss(x0, torch.full((n,), NULL), real, fake, NULL, vsd.Args())
        opt.zero_grad()
        loss.backward()
        opt.step()
    k = torch.arange(1500) % 2
    z = torch.randn(1500, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return energy_distance((m[k] + log_s.exp()[k, None] * z).detach(), REAL), m.detach(), log_s.exp().detach()


REAL = TOY.sample(1500, torch.Generator().manual_seed(99))[0]


def test_toy_converges_to_the_teacher_and_a_flipped_sign_diverges():
    k, z = torch.arange(1500) % 2, torch.randn(1500, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ed0 = energy_distance(TOY.means[k] + torch.tensor([0.8, 0.6]).double() + 0.5 * z, REAL)
    ed, m, s = toy_run(False, 150)
    assert ed0 > 0.3 and ed < 0.01, (ed0, ed)  # measured: 0.41 -> 1.4e-3 (the sample-size floor)
    assert (m - TOY.means).abs().max() < 2e-3 and (s - 0.5).abs().max() < 2e-3, (m, s)
    ed_flip, _, _ = toy_run(True, 50)
    assert ed_flip > 10 * ed0, ed_flip


# ---------------------------------------------------------------- the gradient: t (v_real - v_fake), no normalization
def test_per_sample_gradient_is_t_times_v_real_minus_v_fake_unnormalized():
    # a teacher and a fake net that differ everywhere; x0 far from the data and scaled rows: DMD2's division by
    # w = mean_dims |x0 - x0_real| (per sample) would change every row
    x0 = TOY.sample(256, torch.Generator().manual_seed(5))[0] * torch.linspace(0.2, 5, 256, dtype=torch.float64)[:, None]
    fake = lambda x_t, t, s, y: 0.7 * x_t + torch.stack([t, s], 1)  # depends on s: the fake must be at s = t
    g, t = x0_grad(x0, oracle(TOY), fake, 6)  # t: float32, as the file draws it
    torch.manual_seed(6)
    vsd.sample_t(256, vsd.Args(), "cpu")
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn_like(x0)
    want = t[:, None] * (TOY.velocity(x_t, t) - (0.7 * x_t + torch.stack([t, t], 1)))
    assert (g - want).abs().max() < 1e-12 * want.abs().max(), (g - want).abs().max()
    w = (x0 - (x_t - t[:, None] * TOY.velocity(x_t, t))).abs().mean(1, keepdim=True)
    assert (w - 1).abs().min() > 1e-3  # so the normalized gradient differs on every row


def test_same_direction_as_mfd_ode_step_1_with_weight_t_over_1_minus_t(monkeypatch):
    # mfd --ode-step 1: K = 1, u = v at (x_t, t), gradient (1 - t)(v_T - v_A) / numel; here t (v_T - v_A) / numel:
    # with the same t, noise and nets, grad_vsd = grad_mfd * t / (1 - t) on every row and coordinate
    mfd = load_method("mfd")
    t = torch.rand(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.9 + 0.05
    monkeypatch.setattr(vsd, "sample_t", lambda n, args, device: t)
    monkeypatch.setattr(mfd, "sample_tr", lambda n, args, device: (t, t * 0.3))
    other = GMM(TOY.means + torch.tensor([0.5, -0.4]).double(), TOY.sigmas * 1.3, [0.3, 0.7])
    x0 = other.sample(300, torch.Generator().manual_seed(2))[0]
    g_vsd, _ = x0_grad(x0, oracle(TOY), oracle(other), 3)
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(3)
    loss, terms = mfd.student_loss(x, torch.full((300,), NULL), lambda z, tau, y: TOY.velocity(z, tau),
                                   lambda z, tau, y: other.velocity(z, tau), dataclasses.replace(mfd.Args(), ode_step=1.0))
    g_mfd = torch.autograd.grad(loss, x)[0] * x.numel()
    assert terms["ode_k"] == 1
    ratio = (t / (1 - t))[:, None]
    assert torch.allclose(g_vsd, g_mfd * ratio, rtol=1e-10, atol=1e-14), (g_vsd - g_mfd * ratio).abs().max()


# ---------------------------------------------------------------- the time law
def edm_quantiles_check(t):
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    got = torch.quantile(t.double(), q)
    # EDM: sigma = exp(-1.2 + 1.2 n), t = sigma / (1 + sigma); its quantiles from the normal's, independently
    normal = torch.distributions.Normal(0.0, 1.0).icdf(q.float()).double()
    sigma = (-1.2 + 1.2 * normal).exp()
    assert torch.allclose(sigma / (1 + sigma), torch.tensor(EDM_Q, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(got, sigma / (1 + sigma), atol=4e-3), (got, sigma / (1 + sigma))


def test_time_law_is_edm_lognormal_for_the_generator_and_the_fake_loss():
    torch.manual_seed(0)
    edm_quantiles_check(vsd.sample_t(200000, vsd.Args(), "cpu"))
    seen = {}

    def fake(x_t, t, s, y):
        seen.update(t=t, s=s)
        return torch.zeros_like(x_t)
    torch.manual_seed(1)
    vsd.fake_loss(fake, torch.zeros(200000, 2), torch.zeros(200000, dtype=torch.long), vsd.Args())
    assert torch.equal(seen["t"], seen["s"])
    edm_quantiles_check(seen["t"])
    torch.manual_seed(2)
    vsd.dm_loss(torch.zeros(200000, 2), torch.zeros(200000, dtype=torch.long), lambda *a: torch.zeros(200000, 2), fake, NULL, vsd.Args())
    assert torch.equal(seen["t"], seen["s"])
    edm_quantiles_check(seen["t"])


# ---------------------------------------------------------------- the fake loss
def test_fake_loss_is_edms_weighted_denoising_loss():
    # EDM: lambda(sigma) ||D - x0||^2, lambda = (sigma^2 + 0.25) / (0.5 sigma)^2, D = x_t - t v (sigma = t / (1 - t)).
    # Per element, d L / d v of the file's loss (through a zero offset a on the fake's output) against that of
    # EDM's loss on the same rows; the mean weight of LN(-1.2, 1.2) is near 1, so only per-row values tell
    x0 = TOY.sample(5000, torch.Generator().manual_seed(3))[0].requires_grad_(True)
    a = torch.zeros(5000, 2, dtype=torch.float64, requires_grad=True)
    seen = {}

    def fake(x_t, t, s, y):
        v = 0.3 * x_t + torch.stack([t, 1 - 2 * t], 1)
        seen.update(x_t=x_t, t=t, v=v)
        return v + a
    torch.manual_seed(4)
    loss, _ = vsd.fake_loss(fake, x0, torch.full((5000,), NULL), vsd.Args())
    g, g_x0 = torch.autograd.grad(loss, [a, x0], allow_unused=True)
    assert g_x0 is None  # the target n - sg(x0): no path back to the generator's samples
    x0, t, x_t, v = x0.detach(), seen["t"].double()[:, None], seen["x_t"], seen["v"].detach().requires_grad_(True)
    sigma = t / (1 - t)
    edm = ((sigma**2 + 0.25) / (0.5 * sigma) ** 2 * (x_t - t * v - x0) ** 2).sum(1).mean()
    want = torch.autograd.grad(edm, v)[0]
    assert (g - want).abs().max() < 1e-5 * want.abs().max(), (g - want).abs().max()  # (the file's weight is float32)
    assert abs(loss.item() - edm.item()) < 1e-6 * edm.item()
    w = (1 - t) ** 2 + 4 * t**2  # the velocity-form weight varies 0.8 .. 4 over the rows: unweighted FM (dmd2's) fails above
    assert w.max() / w.min() > 2


def test_fake_loss_minimized_by_the_generators_own_velocity():
    # per-row d L_fake / d a for fake = v_gen + a PHI: zero mean at a = 0 (Monte Carlo), pointing back at +-0.3
    gen = GMM(TOY.means + torch.tensor([0.8, 0.6]).double(), TOY.sigmas, TOY.weights)

    def grad(a, seed, n=20000):
        x0 = gen.sample(n, torch.Generator().manual_seed(seed))[0]
        a = torch.full((n, 1), float(a), dtype=torch.float64, requires_grad=True)
        phi = lambda x_t, t: torch.stack([torch.sin(x_t[:, 1]) + t, x_t[:, 0] * (1 - t)], 1)
        torch.manual_seed(seed)
        loss, _ = vsd.fake_loss(lambda x_t, t, s, y: gen.velocity(x_t, t) + a * phi(x_t, t), x0, torch.full((n,), NULL), vsd.Args())
        return torch.autograd.grad(loss, a)[0][:, 0] * n

    g0 = grad(0.0, 0)
    se = g0.std() / len(g0) ** 0.5
    assert abs(g0.mean()) < 4 * se, (g0.mean(), se)
    assert grad(0.3, 1).mean() > 10 * se and grad(-0.3, 2).mean() < -10 * se


# ---------------------------------------------------------------- generator input and sampler
class Net(torch.nn.Module):
    """A plain function as a module (the sampler switches eval mode)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *a):
        return self.fn(*a)


def test_generator_input_and_the_exact_one_step_sampler():
    e = torch.randn(400, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = torch.full((400,), NULL)
    exact = lambda x_t, t, s, y: TOY.avg_velocity(x_t, t, torch.zeros_like(t), steps=60)  # u(x_t, t -> 0), any s
    for t_g in (1.0, 0.5):
        x0 = vsd.sample(Net(exact), e, y, 1, t_g)
        want = TOY.flow_map(t_g * e, torch.full((400,), t_g, dtype=torch.float64), 0.0, steps=60)
        assert (x0 - want).abs().max() < 1e-12, (t_g, (x0 - want).abs().max())
    seen = []
    rec = lambda x_t, t, s, y: seen.append((x_t, t, s)) or torch.zeros_like(x_t)
    out = vsd.generate(rec, e, y, 0, 1, 0.3)  # G(0.3 e, 0.3) = 0.3 e - 0.3 net(0.3 e, 0.3, 0.3, y)
    assert len(seen) == 1 and torch.equal(seen[0][0], 0.3 * e) and (seen[0][1] == 0.3).all() and torch.equal(seen[0][1], seen[0][2])
    assert torch.equal(out, 0.3 * e)
    seen.clear()
    torch.manual_seed(0)
    vsd.sample(Net(rec), e, y, 2, 0.6)  # two steps on linspace(0.6, 0, 3): times 0.6, then 0.3
    assert [float(s[1][0]) for s in seen] == pytest.approx([0.6, 0.3])


# ---------------------------------------------------------------- the loop, in this process
def teacher_file(folder):
    """A tiny fm checkpoint for gmm with random weights everywhere (its output layer is not zero). With dropout
    on, the fake net (a copy of the teacher, in train mode) differs from the teacher (eval) from step 1: the
    generator's first gradient is not zero (without dropout it is: fake = teacher before the fake's first step)."""
    net = MLP(2, 16, 2, 6, 0, 0.1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save(net, str(folder / "teacher.safetensors"), dataset="gmm")
    return folder / "teacher.safetensors"


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """6 steps on gmm with a tiny fm checkpoint as teacher (a network, so that its weights can be watched), at the
    file's defaults (--ttur 1, the EMA evaluated) with EMA decay 0.6, --gen-t 0.5 and dmd2's GAN option on (kept,
    off by default: its discriminator must also take no gradient from the generator's turn)."""
    tmp = tmp_path_factory.mktemp("vsd_loop")
    teacher = teacher_file(tmp)
    flags = ["--teacher", teacher, "--dropout", 0.1, "--gan-weight", 0.5, "--batch-size", 32, "--steps", 6, "--lr", 1e-2, "--grad-clip", 0, "--ema-decay", 0.6,
             "--gen-t", 0.5]
    return run_loop(SCRIPT, flags, ["net", "fake", "disc", "ema", "teacher_net"], tmp_path=tmp)


def test_teacher_frozen_fake_and_generator_trained_one_to_one(loop):
    posts = [(ev["opt"], ev["step"]) for ev in loop if ev["kind"] == "post"]
    assert posts == [(o, k) for k in range(6) for o in ("opt_fake", "opt")], posts
    assert_each_net_moves_in_its_own_step(loop, {"opt": {"net"}, "opt_fake": {"fake", "disc"}}, ema_rate=0.4)
    first, last = next(ev for ev in loop if ev["kind"] != "batch")["w"], loop[-1]["w"]
    assert torch.equal(first["teacher_net"], last["teacher_net"]) and all(ev["grad"]["teacher_net"] == 0 for ev in loop if "grad" in ev)
    assert not torch.equal(first["fake"], last["fake"]) and not torch.equal(first["net"], last["net"])


def test_no_gradient_crosses_between_the_two_losses(loop):
    # generator backward first (v_fake under no_grad; the fake net and the discriminator frozen for the GAN term):
    # only `net` holds a gradient; the fake loss's backward (target n - sg(x0)) adds to the fake net and the
    # discriminator only
    back = [ev for ev in loop if ev["kind"] == "backward"]
    assert len(back) == 12
    for gen, fk in zip(back[::2], back[1::2]):
        assert gen["grad"]["net"] > 0 and gen["grad"]["fake"] == 0 and gen["grad"]["disc"] == 0, gen["grad"]
        assert fk["grad"]["net"] == gen["grad"]["net"] and fk["grad"]["fake"] > 0 and fk["grad"]["disc"] > 0, fk["grad"]


def test_three_distinct_networks_and_gen_t_reaches_every_generator_call(tmp_path):
    # the generator, its EMA, the fake net and the teacher are four modules with no shared storage; every call of
    # the generator (training) and of its EMA (evaluation) is at t = s = gen_t on inputs gen_t e
    teacher = teacher_file(tmp_path)
    calls = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, inp: calls.append((mod, inp[0].detach().clone(), inp[1].detach().clone(), inp[2].detach().clone()))
        if isinstance(mod, MLP) else None)
    try:
        g = run_here(SCRIPT, "--teacher", teacher, "--batch-size", 128, "--hidden", 16, "--depth", 2, "--steps", 2, "--gen-t", 0.25,
                     "--eval-steps", 1, "--eval-samples", 200, "--out-dir", tmp_path)
    finally:
        hook.remove()
    nets = [g["net"], g["ema"], g["fake"], g["teacher_net"]]
    ptrs = [{p.data_ptr() for p in n.parameters()} for n in nets]
    assert len({id(n) for n in nets}) == 4 and all(not (a & b) for i, a in enumerate(ptrs) for b in ptrs[i + 1:])
    t_cost = torch.rand(128, generator=torch.Generator().manual_seed(0))  # common.eval.time_forward's (not the method's)
    gen_calls = [c for c in calls if (c[0] is g["net"] or c[0] is g["ema"]) and not torch.equal(c[2], t_cost)]
    assert {c[0] is g["ema"] for c in gen_calls} == {True, False}  # trained and evaluated
    for _, x, t, s in gen_calls:
        assert (t == 0.25).all() and (s == 0.25).all()
        assert 0.15 < x.std().item() < 0.35, x.std()  # 0.25 e (e: 1)
    others = torch.cat([c[2] for c in calls if c[0] is g["fake"] or c[0] is g["teacher_net"]])
    assert others.std() > 0.1  # the distribution-matching and fake times vary


@pytest.mark.parametrize("field,value,needle", [("ttur", 0, "--ttur 0"), ("t_sigma", 0.0, "--t-sigma 0.0"), ("gen_t", 0.0, "--gen-t 0.0"),
                                                ("gen_t", 1.5, "--gen-t 1.5"), ("gen_labels", "x", "--gen-labels x")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        vsd.check_args(dataclasses.replace(vsd.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)
