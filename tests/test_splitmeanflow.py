"""SplitMeanFlow: the interval-splitting target is exact at the exact average velocity of the
mixture and not for a perturbed field; the whole loss vanishes at the exact map with the exact
teacher; u = 0 solves the split rows alone (why the boundary fraction matters); one forward with
grad; the guided teacher on the boundary rows; bad input; smoke runs from a teacher checkpoint.
Direction (exact teacher): a gradient step from a perturbed map moves toward the exact map; the split target
comes from the target net passed (distinguishable from the online one); split points s <= m <= t with
(t - m) = l (t - s); the time law by quantiles, the boundary fraction at 0.25, the 2-step sampler exact on the oracle."""
import dataclasses
import json
import os

import pytest
import torch

from common.data import default_gmm
from conftest import ROOT, load_method, read_all, run_inline, run_method

smf = load_method("splitmeanflow")
SCRIPT = os.path.join(ROOT, "methods", "splitmeanflow.py")
G = default_gmm()
NULL = G.num_classes
oracle = lambda x_t, t, s, y: G.velocity(x_t, t, y)


def exact(x_t, t, s, y, steps=60):
    return G.avg_velocity(x_t, t.double(), s.double(), y, steps=steps)


def perturbed(x_t, t, s, y, eps=0.05):
    return exact(x_t, t, s, y) + eps * torch.tanh(x_t + t[:, None])


def rows(n, seed, p=0.0):
    x, y = G.sample(n, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    t, s = smf.sample_ts(n, round(p * n), "cpu")
    t, s, l = t.double(), s.double(), torch.rand(n, dtype=torch.float64)
    e = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return x, y, t, s, l, (1 - t[:, None]) * x + t[:, None] * e


@pytest.mark.parametrize("conditional", [False, True])
def test_split_residual_vanishes_at_the_exact_solution(conditional):
    x, y, t, s, l, x_t = rows(500, 0)
    y = y if conditional else torch.full_like(y, NULL)
    fine = lambda *a: exact(*a, steps=200)
    res = (fine(x_t, t, s, y) - smf.split_target(fine, x_t, t, s, l, y)).pow(2).sum(1)
    res_p = (perturbed(x_t, t, s, y) - smf.split_target(perturbed, x_t, t, s, l, y)).pow(2).sum(1)
    assert (t > s).all() and res.max() < 1e-11, res.max()  # RK4 error of the oracle only
    assert res_p.mean() > 1e-5 and res_p.mean() > 1e5 * res.max(), (res_p.mean(), res.max())


def test_loss_vanishes_at_the_exact_map_with_the_exact_teacher():
    x, y = G.sample(400, torch.Generator().manual_seed(1))
    args = smf.Args()
    torch.manual_seed(0)
    loss, terms = smf.splitmeanflow_loss(exact, exact, oracle, x, y, NULL, args)
    torch.manual_seed(0)
    loss_p, terms_p = smf.splitmeanflow_loss(perturbed, perturbed, oracle, x, y, NULL, args)
    assert loss < 1e-10 and terms["loss_boundary"] < 1e-20, terms
    assert terms_p["loss_boundary"] > 1e-3 and terms_p["loss_split"] > 1e-5, terms_p


def test_the_zero_field_solves_the_split_rows_alone():
    # the trivial solution behind the p >= 0.5 rule: only the boundary rows rule u = 0 out
    x, y = G.sample(400, torch.Generator().manual_seed(2))
    zero = lambda x_t, t, s, y: torch.zeros_like(x_t)
    torch.manual_seed(0)
    _, terms = smf.splitmeanflow_loss(zero, zero, oracle, x, y, NULL, smf.Args())
    assert terms["loss_split"] == 0 and terms["loss_boundary"] > 0.5, terms


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_an_empty_part_logs_zero_not_nan(p):
    # --boundary-p 0 or 1 leaves one part empty: its logged term is 0 (a NaN there stopped the run at step 0)
    x, y = G.sample(8, torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    loss, terms = smf.splitmeanflow_loss(perturbed, perturbed, oracle, x, y, NULL, dataclasses.replace(smf.Args(), boundary_p=p))
    assert all(torch.isfinite(v) for v in terms.values()), terms
    assert terms["loss_split" if p == 1 else "loss_boundary"] == 0 and torch.isclose(terms["loss"], terms["loss_boundary" if p == 1 else "loss_split"])


def test_one_forward_with_grad_boundary_rows_and_guided_teacher():
    calls, teacher_calls = [], []
    theta = torch.zeros((), requires_grad=True)

    def net(x_t, t, s, y):
        calls.append((torch.is_grad_enabled(), len(x_t), torch.equal(t, s)))
        return exact(x_t, t, s, y).float() + theta * x_t

    def teacher(x_t, t, s, y):
        teacher_calls.append((len(x_t), y.clone()))
        return G.velocity(x_t, t, y)

    x, y = G.sample(200, torch.Generator().manual_seed(3))
    x = x.float()
    args = dataclasses.replace(smf.Args(), boundary_p=0.6, teacher_cfg=2.0)
    torch.manual_seed(0)
    loss, terms = smf.splitmeanflow_loss(net, net, teacher, x, y, NULL, args)
    assert [c for c in calls if c[0]] == [(True, 200, False)]  # one grad forward, on all rows
    assert [c[1] for c in calls if not c[0]] == [80, 80]  # the split target: two no-grad calls on the 80 split rows
    assert len(teacher_calls) == 1 and teacher_calls[0][0] == 240  # guided: 120 boundary rows, conditional + null
    assert (teacher_calls[0][1][120:] == NULL).all() and torch.equal(teacher_calls[0][1][:120], y[:120])
    torch.manual_seed(0)
    t, s = smf.sample_ts(200, 120, "cpu")
    assert torch.equal(t[:120], s[:120]) and (t[120:] > s[120:]).all()
    # the guided target itself: v_u + w (v_c - v_u)
    x_t = torch.randn(50, 2, dtype=torch.float64)
    tt, yy = torch.rand(50, dtype=torch.float64), y[:50]
    want = G.velocity(x_t, tt) + 2.0 * (G.velocity(x_t, tt, yy) - G.velocity(x_t, tt))
    assert torch.allclose(smf.guided(oracle, x_t, tt, yy, NULL, 2.0), want)


def test_split_target_runs_the_current_net_in_eval_mode():
    class Net(torch.nn.Module):  # u = dropout(x): identity in eval mode
        def __init__(self):
            super().__init__()
            self.drop, self.seen = torch.nn.Dropout(0.5), []

        def forward(self, x_t, t, s, y):
            self.seen.append(self.training)
            return self.drop(x_t)

    net = Net().train()
    out = smf.split_target(net, torch.ones(8, 2), torch.ones(8), torch.zeros(8), torch.full((8,), 0.5), torch.zeros(8, dtype=torch.long))
    assert net.seen == [False, False] and net.training  # restored afterwards
    assert torch.equal(out, torch.full((8, 2), 0.75))  # u2 = 1, x_m = 0.5, u1 = 0.5: 0.5 u2 + 0.5 u1


def test_a_gradient_step_moves_toward_the_exact_map():
    # u = u* + sum_k theta_k phi_k, targets from the same (online) net without grad: the step shrinks the distance to u*
    x, y = G.sample(200, torch.Generator().manual_seed(4))
    phis = lambda x_t, t, s: [torch.sin(x_t), (torch.cos(2 * x_t) + 0.5) * (t - s)[:, None], x_t * t[:, None]]
    theta0 = torch.tensor([0.15, -0.1, 0.08], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    net = lambda x_t, t, s, y_: exact(x_t, t, s, y_, steps=20) + sum(a * p for a, p in zip(theta, phis(x_t, t.double(), s.double())))
    args = dataclasses.replace(smf.Args(), boundary_p=0.5)
    torch.manual_seed(5)
    loss, _ = smf.splitmeanflow_loss(net, net, oracle, x, y, NULL, args)
    grad = torch.autograd.grad(loss, theta)[0]
    torch.manual_seed(5)  # the loss draws e, then the times (sample_ts), then l
    e = torch.randn_like(x)
    t, s = (a.double() for a in smf.sample_ts(200, 100, "cpu"))
    x_t = (1 - t[:, None]) * x + t[:, None] * e
    dist = lambda th: sum(a * p for a, p in zip(th, phis(x_t, t, s))).pow(2).sum(1).mean()
    d0, d1 = dist(theta0), dist(theta0 - 1e-2 * grad / grad.norm())
    assert d1 < d0 - 1e-4 * d0, (d0, d1, grad)


def test_split_target_comes_from_the_target_net():
    # online net perturbed, target net exact: the split rows regress onto the exact average velocity, so their
    # loss is the perturbation's size; targets from the online net would give another value
    x, y = G.sample(200, torch.Generator().manual_seed(6))
    args = dataclasses.replace(smf.Args(), boundary_p=0.25)
    torch.manual_seed(0)
    _, terms = smf.splitmeanflow_loss(perturbed, exact, oracle, x, y, NULL, args)
    torch.manual_seed(0)
    e = torch.randn_like(x)
    t, s = (a.double() for a in smf.sample_ts(200, 50, "cpu"))
    x_t = (1 - t[:, None]) * x + t[:, None] * e
    want = (perturbed(x_t, t, s, y) - exact(x_t, t, s, y)).pow(2).sum(1)[50:].mean()
    assert abs(terms["loss_split"] - want) < 1e-6 * want, (terms["loss_split"], want)


def test_split_points_lie_between_s_and_t():
    calls = []

    def tnet(x_t, t, s, y):
        calls.append((t.clone(), s.clone()))
        return exact(x_t, t, s, y, steps=10)

    x, y, t, s, l, x_t = rows(200, 7)
    smf.split_target(tnet, x_t, t, s, l, y)
    (t1, m1), (m2, s2) = calls  # u(x_t, t, m), then u(x_m, m, s)
    assert torch.equal(t1, t) and torch.equal(s2, s) and torch.equal(m1, m2)
    assert (s <= m1).all() and (m1 <= t).all() and (s < t).all()
    assert torch.allclose(t - m1, l * (t - s), atol=1e-12)  # the weight l of u(x_t, t, m) is the share of [m, t]


def test_time_law_by_quantiles_and_the_boundary_fraction():
    torch.manual_seed(0)
    t, s = smf.sample_ts(20000, 5000, "cpu")  # t = max, s = min of two U(0, 1): CDFs q^2 and 1 - (1 - q)^2
    qs = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    assert torch.equal(t[:5000], s[:5000]) and (s[5000:] < t[5000:]).all()
    for got, want in [(t, qs**2), (s[5000:], 1 - (1 - qs) ** 2)]:
        assert ((got[:, None] <= qs).float().mean(0) - want).abs().max() < 0.02
    seen, teacher_rows = [], []
    net = lambda x_t, t_, s_, y_: seen.append(t_ == s_) or exact(x_t, t_, s_, y_, steps=10)
    teacher = lambda x_t, t_, s_, y_: teacher_rows.append(len(x_t)) or G.velocity(x_t, t_, y_)
    x, y = G.sample(40, torch.Generator().manual_seed(8))
    smf.splitmeanflow_loss(net, lambda *a: exact(*a, steps=10), teacher, x, y, NULL, dataclasses.replace(smf.Args(), boundary_p=0.25))
    assert seen[0][:10].all() and not seen[0][10:].any() and teacher_rows == [10]  # round(0.25 B) boundary rows, first


def test_sampler_is_exact_on_the_oracle():
    e = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y = torch.full((100,), NULL)
    end = G.flow_map(e, 1.0, 0.0, y, steps=200)
    for k in (1, 2):
        assert (smf.sample(lambda *a: exact(*a, steps=100), e, y, k) - end).abs().max() < 1e-4, k  # RK4 error of the oracle


def test_low_boundary_fraction_warns(capsys):
    smf.check_args(smf.Args())
    assert capsys.readouterr().err == ""
    smf.check_args(dataclasses.replace(smf.Args(), boundary_p=0.3))
    err = capsys.readouterr().err.strip()
    assert "--boundary-p 0.3" in err and "collapse" in err and "\n" not in err


@pytest.mark.parametrize("field,value,needle", [("boundary_p", 1.5, "--boundary-p 1.5"), ("teacher_cfg", -1.0, "--teacher-cfg -1.0")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        smf.check_args(dataclasses.replace(smf.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)


TINY = ["--steps", 4, "--batch-size", 32, "--log-every", 2, "--eval-every", 4, "--eval-samples", 200, "--ckpt-every", 2,
        "--hidden", 32, "--depth", 2]


def test_student_starts_as_the_teacher(tiny_teacher, tmp_path):
    run_method(SCRIPT, *TINY, "--steps", 1, "--lr", 1e-12, "--heads", 2, "--patch-size", 7, "--batch-size", 8, "--dataset", "mnist",
               "--teacher", tiny_teacher, "--teacher-cfg", 1.5, "--ema-target", "--out-dir", tmp_path)
    run = tmp_path / "splitmeanflow" / "mnist"
    teacher, student = read_all(tiny_teacher), read_all(run / "model.safetensors")
    assert teacher.keys() == student.keys()
    assert all(torch.allclose(teacher[k], student[k], atol=1e-6) for k in teacher)  # lr ~ 0: still the teacher
    assert "fid@1" in json.loads((run / "summary.json").read_text())["final"]


def test_bad_teacher_gets_one_line(tmp_path):
    proc = run_inline(SCRIPT, "--teacher", tmp_path / "missing.safetensors", "--out-dir", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--teacher" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("ema_target", [False, True])
def test_loop_builds_the_split_target_from_the_net_that_the_flag_names(tmp_path, ema_target):
    """The loop passes the EMA (--ema-target) or the online net as the split target: the no-grad calls
    of the first training step (from its data batch to the first optimizer step; the cost probe and
    evaluation fall outside) go to that network and never to the other one."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from common.data import Loader
    from common.dit import MLP
    from conftest import run_here

    calls, started, stepped, forward, next_batch = [], [], [], MLP.forward, Loader.__next__

    def recording(self, *a, **k):
        if started and not stepped:
            calls.append((id(self), torch.is_grad_enabled()))
        return forward(self, *a, **k)

    def first_batch(self):
        started.append(1)
        return next_batch(self)

    handle = register_optimizer_step_post_hook(lambda *a: stepped.append(1))
    MLP.forward, Loader.__next__ = recording, first_batch
    try:
        g = run_here(os.path.join(ROOT, "methods", "splitmeanflow.py"), "--dataset", "gmm", "--teacher", "oracle", "--steps", 1,
                     "--batch-size", 32, "--hidden", 16, "--depth", 1, "--eval-samples", 50, "--eval-steps", 1,
                     "--out-dir", tmp_path, *(["--ema-target"] if ema_target else []))
    finally:
        MLP.forward, Loader.__next__ = forward, next_batch
        handle.remove()
    target, other = (g["ema"], g["net"]) if ema_target else (g["net"], g["ema"])
    no_grad = {i for i, grad in calls if not grad}
    assert id(target) in no_grad and id(other) not in no_grad, (ema_target, calls)
