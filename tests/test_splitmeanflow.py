"""SplitMeanFlow: the interval-splitting target is exact at the exact average velocity of the
mixture and not for a perturbed field; the whole loss vanishes at the exact map with the exact
teacher; u = 0 solves the split rows alone (why the boundary fraction matters); one forward with
grad; the guided teacher on the boundary rows; bad input; smoke runs from a teacher checkpoint."""
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
