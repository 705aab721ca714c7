"""Flow matching (the teacher of every distillation file) on the Gaussian-mixture oracle: the loss
gradient vanishes at the exact velocity (within Monte Carlo error) and not at a perturbation, and a
descent step moves toward it; the time law the loss feeds the net (quantiles); guidance against
v_u + w (v_c - v_u); Euler and Heun against the exact ODE endpoint at their orders; and, from the
loop run in this process, label dropout's rate and rows and the EMA update. `run_loop` (the loop
recorder) is shared with the distillation tests."""
import dataclasses
import math
import os
import runpy
import sys

import pytest
import torch
import common.eval
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from common.data import Loader, default_gmm
from conftest import ROOT, load_method

fm = load_method("fm")
SCRIPT = os.path.join(ROOT, "methods", "fm.py")
G = default_gmm()
NULL = G.num_classes
PHI = lambda x_t, t: torch.stack([torch.sin(x_t[:, 1]) + t, x_t[:, 0] * (1 - t)], 1)  # a perturbation direction


# ---------------------------------------------------------------- the loop, run in this process
def flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()]).clone()


def grad_norm(net):
    return sum(float(p.grad.abs().sum()) for p in net.parameters() if p.is_leaf and p.grad is not None)  # an EMA lerp leaves non-leaves


def assert_each_net_moves_in_its_own_step(events, own, ema_rate):
    """On a run_loop record: between an optimizer's pre and post hooks exactly the nets in own[optimizer] change;
    right after the generator's optimizer ("opt") only the EMA moves, by ema + ema_rate (net - ema); nothing
    moves anywhere else."""
    evs = [ev for ev in events if ev["kind"] != "batch"]
    for a, b in zip(evs, evs[1:]):
        moved = {n for n in a["w"] if not torch.equal(a["w"][n], b["w"][n])}
        if a["kind"] == "pre":
            assert b["kind"] == "post" and b["opt"] == a["opt"] and moved == own[a["opt"]], (a["opt"], a["step"], moved)
        elif a["kind"] == "post" and a["opt"] == "opt":
            ema, net = a["w"]["ema"], a["w"]["net"]
            assert moved == {"ema"} and torch.allclose(b["w"]["ema"], ema + ema_rate * (net - ema), atol=1e-6), a["step"]
        else:
            assert not moved, (a["kind"], b["kind"], a["step"], moved)


def run_loop(script, flags, nets, keys=(), tmp_path=None):
    """Runs a method file as `python <script> <flags>` in this process (runpy; a tiny gmm run, its evaluation
    stubbed out) and records
    what its loop does, read from the file's own globals: every data batch ("batch": x, y), after every backward() ("backward"), and
    before / after every optimizer step ("pre" / "post", with the optimizer's global name and lr), the step,
    the globals named in `keys`, the summed |grad| of each net named in `nets` and a copy of its weights."""
    events = []
    path = os.path.abspath(script)

    def method_globals():
        f = sys._getframe(1)
        while f is not None and not (f.f_code.co_filename == path and f.f_code.co_name == "<module>"):
            f = f.f_back
        return f.f_globals if f is not None else None

    def record(kind, opt=None):
        g = method_globals()
        if g is None:  # a backward outside the loop (none expected)
            return
        name = next((k for k, v in g.items() if v is opt), None) if opt is not None else None
        lr = opt.param_groups[0]["lr"] if opt is not None else None
        events.append({"kind": kind, "opt": name, "lr": lr, "step": g["step"], **{k: g.get(k) for k in keys},
                       "grad": {n: grad_norm(g[n]) for n in nets}, "w": {n: flat(g[n]) for n in nets}})

    backward, next_batch = torch.Tensor.backward, Loader.__next__

    def recording_backward(self, *a, **k):
        backward(self, *a, **k)
        record("backward")

    def recording_next(self):
        x, y = next_batch(self)
        events.append({"kind": "batch", "x": x, "y": y})
        return x, y

    handles = [register_optimizer_step_pre_hook(lambda opt, a, k: record("pre", opt)),
               register_optimizer_step_post_hook(lambda opt, a, k: record("post", opt))]
    argv = sys.argv
    sys.argv = [path, *map(str, flags), "--out-dir", str(tmp_path), "--eval-every", 10**6, "--eval-samples", 100,
                "--eval-steps", 1, "--ckpt-every", 10**6, "--log-every", 10**6]
    sys.argv = list(map(str, sys.argv))
    # the evaluation and its grid are not what is recorded: an empty grid file and no metrics (seconds saved)
    stubbed = common.eval.Evaluator.__init__, common.eval.Evaluator.__call__, common.eval.save_grid
    common.eval.Evaluator.__init__ = lambda self, *a, **k: self.__dict__.update(note="", decode=None)
    common.eval.Evaluator.__call__ = lambda self, fn, steps: {}
    common.eval.save_grid = lambda fn, loader, steps, path, *a, **k: open(path, "wb").close()
    torch.Tensor.backward, Loader.__next__ = recording_backward, recording_next
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        torch.Tensor.backward, Loader.__next__ = backward, next_batch
        common.eval.Evaluator.__init__, common.eval.Evaluator.__call__, common.eval.save_grid = stubbed
        sys.argv = argv
        for h in handles:
            h.remove()
    return events


TINY = ["--batch-size", 64, "--hidden", 16, "--depth", 2]


@pytest.fixture(scope="module")
def fm_loop(tmp_path_factory):
    """fm on gmm, 4 steps: label dropout 0.3, EMA decay 0.6 (distinguishable from 0.4), lr 1e-2 warmed up over 2 steps."""
    return run_loop(SCRIPT, [*TINY, "--steps", 4, "--label-dropout", 0.3, "--ema-decay", 0.6, "--lr", 1e-2, "--warmup", 2], ["net", "ema"],
                    keys=("x", "y", "null"), tmp_path=tmp_path_factory.mktemp("fm_loop"))


# ---------------------------------------------------------------- the loss
def loss_grad(a, seed, n=20000, args=None, y=None):
    """Per-row d L / d a_i (times n) of fm_loss for the net v* + a_i PHI on row i (x from the mixture)."""
    x, lab = G.sample(n, torch.Generator().manual_seed(seed))
    y = lab if y is None else y
    a = torch.full((n, 1), float(a), dtype=torch.float64, requires_grad=True)
    net = lambda x_t, t, s, y: G.velocity(x_t, t, y) + a * PHI(x_t, t)
    torch.manual_seed(seed)
    loss, _ = fm.fm_loss(net, x, y, args or fm.Args())
    return torch.autograd.grad(loss, a)[0][:, 0] * n


@pytest.mark.parametrize("cond", [True, False])
def test_loss_gradient_vanishes_at_the_exact_velocity_only(cond):
    # the exact (conditional or marginal) velocity is the minimizer: E[d L / d a] = 0 at a = 0 within Monte
    # Carlo error; at a = 0.3 the gradient is positive (descent moves a back toward 0), many errors away
    y = None if cond else torch.full((20000,), NULL)
    g0 = loss_grad(0.0, 0, y=y)
    se = g0.std() / len(g0) ** 0.5
    assert abs(g0.mean()) < 4 * se, (g0.mean(), se)
    g1 = loss_grad(0.3, 0, y=y)
    assert g1.mean() > 10 * se, (g1.mean(), se)


def test_a_gradient_step_lowers_the_distance_to_the_exact_velocity():
    # a perturbed field v* + a PHI (a = 0.5): one plain gradient step on a moves it toward v*, by about the
    # step 2 lr E|PHI|^2 a expected of the L2 loss (its curvature in a)
    a, lr = 0.5, 0.05
    g = loss_grad(a, 1).mean()
    x, _ = G.sample(4000, torch.Generator().manual_seed(1))  # E |PHI|^2 over the path (t ~ LN(0, 1)), on fresh draws
    t = torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    x_t = (1 - t[:, None]) * x + t[:, None] * torch.randn(4000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    curv = 2 * (PHI(x_t, t) ** 2).sum(1).mean()
    assert abs(a - lr * g) < abs(a)
    assert abs(g / (curv * a) - 1) < 0.15, (g, curv * a)


def test_loss_feeds_the_net_its_time_law_at_s_equal_t():
    # the t (and s) the loss passes to the net, by quantiles, against the law each --time-dist claims
    def times(args):
        seen = {}

        def net(x_t, t, s, y):
            seen.update(t=t, s=s)
            return torch.zeros_like(x_t)
        torch.manual_seed(0)
        fm.fm_loss(net, torch.zeros(100000, 2), torch.zeros(100000, dtype=torch.long), args)
        assert torch.equal(seen["t"], seen["s"])
        return seen["t"].double()

    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0).icdf(q)
    args = dataclasses.replace(fm.Args(), time_mu=0.4, time_sigma=0.7)  # mu != 0 and sigma != 1: a swap shows
    assert torch.allclose(torch.quantile(times(args), q), torch.sigmoid(0.4 + 0.7 * normal), atol=4e-3)
    assert torch.allclose(torch.quantile(times(dataclasses.replace(args, time_dist="uniform")), q), q, atol=4e-3)


def test_loss_is_the_per_row_sum_over_dimensions_averaged_over_rows():
    # the logged value and its scale: net = v + c (a constant offset c per dimension) gives exactly |c|^2
    x = torch.randn(64, 2, dtype=torch.float64)
    torch.manual_seed(0)
    e = torch.randn_like(x)
    torch.manual_seed(0)
    c = torch.tensor([0.3, -0.4], dtype=torch.float64)
    loss, terms = fm.fm_loss(lambda x_t, t, s, y: e - x + c, x, torch.zeros(64, dtype=torch.long), fm.Args())
    assert abs(loss.item() - 0.25) < 1e-12 and terms["loss"] == loss


# ---------------------------------------------------------------- guidance and samplers
def oracle(x_t, t, s, y):
    return G.velocity(x_t, t, y)


@pytest.mark.parametrize("w", [1.0, 0.0, 2.5])
def test_guided_velocity_is_v_u_plus_w_times_v_c_minus_v_u(w):
    x = torch.randn(50, 2, dtype=torch.float64)
    t = torch.rand(50, dtype=torch.float64)
    y = torch.randint(0, NULL, (50,))
    v_c, v_u = G.velocity(x, t, y), G.velocity(x, t, torch.full_like(y, NULL))
    assert torch.allclose(fm.velocity(oracle, x, t, y, NULL, w), v_u + w * (v_c - v_u), atol=1e-12)


def test_sampler_passes_the_guidance_scale():
    # two Euler steps of the guided field v_u + w (v_c - v_u) at w = 2.5, by hand
    e = torch.randn(50, 2, dtype=torch.float64)
    y = torch.randint(0, NULL, (50,))
    guided = lambda x, t: G.velocity(x, t, torch.full_like(y, NULL)) + 2.5 * (G.velocity(x, t, y) - G.velocity(x, t, torch.full_like(y, NULL)))
    x_half = e - 0.5 * guided(e, 1.0)
    want = x_half - 0.5 * guided(x_half, 0.5)
    assert torch.allclose(fm.sample(oracle, e, y, 2, NULL, 2.5, "euler"), want, atol=1e-12)


def test_euler_and_heun_converge_to_the_exact_endpoint_at_their_orders():
    # error of K steps against the exact ODE endpoint f*(e, 1, 0) (RK4, 200 steps); doubling K divides
    # Euler's error by ~2 (order 1) and Heun's by ~4 (order 2: the last step is Euler, still O(h^2) locally)
    e = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.full((200,), NULL)
    exact = G.flow_map(e, 1.0, 0.0, y, steps=200)
    err = lambda k, sampler: (fm.sample(oracle, e, y, k, NULL, 1.0, sampler) - exact).norm(dim=1).mean().item()
    eu = [err(k, "euler") for k in (16, 32, 64)]  # measured: 0.087, 0.045, 0.023
    he = [err(k, "heun") for k in (16, 32, 64)]  # measured: 7.7e-3, 1.8e-3, 4.2e-4
    assert all(1.7 < a / b < 2.3 for a, b in zip(eu, eu[1:])), eu
    assert all(3.5 < a / b < 4.7 for a, b in zip(he, he[1:])), he
    assert he[-1] < 1e-3 and he[-1] < eu[-1] / 10, (eu, he)


# ---------------------------------------------------------------- the loop
def test_label_dropout_rate_and_rows(fm_loop):
    # rows the loss sees: each label is kept or replaced by the null class, never another label, at the rate
    # --label-dropout (0.3 over 4 x 64 rows: 4 standard errors ~ 0.11); the labels come from the loader's batch
    seen = [ev for ev in fm_loop if ev["kind"] == "backward"]
    batches = [ev for ev in fm_loop if ev["kind"] == "batch"]
    assert len(seen) == len(batches) == 4 and seen[0]["null"] == NULL
    y, labels = torch.cat([ev["y"] for ev in seen]), torch.cat([ev["y"] for ev in batches])
    assert torch.equal(torch.cat([ev["x"] for ev in seen]), torch.cat([ev["x"] for ev in batches]))  # the same rows, in order
    dropped = y == NULL
    assert torch.equal(y[~dropped], labels[~dropped]) and (labels < NULL).all()
    assert abs(dropped.double().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(y)), dropped.double().mean()


def test_ema_update_moves_toward_the_net_at_its_decay(fm_loop):
    # the learning rate warms up; the EMA seen at step k + 1 is ema_k + (1 - decay)(net after step k's update - ema_k) with decay 0.6
    back = [ev for ev in fm_loop if ev["kind"] == "backward"]
    post = [ev for ev in fm_loop if ev["kind"] == "post"]
    assert len(post) == 4 and all(ev["opt"] == "opt" for ev in post)
    assert [ev["lr"] for ev in post] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])  # the warm-up rises to --lr
    assert torch.equal(back[0]["w"]["ema"], back[0]["w"]["net"])  # the EMA starts as the net
    for k in range(3):
        ema, net = back[k]["w"]["ema"], post[k]["w"]["net"]
        assert not torch.allclose(net, ema)
        assert torch.allclose(back[k + 1]["w"]["ema"], ema + 0.4 * (net - ema), atol=1e-6), k
