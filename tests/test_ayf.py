"""Align Your Flow: the EMD and LMD directions at the exact flow map of the gmm mixture (zero at
r = 1, a bias of order 1 - r below), the u- vs f-space gradients, dropout masks shared between the
JVP and the grad forward, the deterministic and gamma samplers, smoke runs, bad input (resume: tests/test_methods.py)."""
import dataclasses
import json
import os

import pytest
import torch

from common.data import default_gmm
from common.dit import MLP, save
from common.eval import energy_distance
from conftest import ROOT, load_method, read_all, run_inline, run_method
from test_methods import TINY, TINY_IMG

ayf = load_method("ayf")
SCRIPT = os.path.join(ROOT, "methods", "ayf.py")
GMM = default_gmm()
NULL = GMM.num_classes
teacher_v = lambda x_t, t, y: GMM.velocity(x_t, t, y)
exact = lambda x_t, t, s, y: GMM.avg_velocity(x_t, t, s, y, steps=100)
wrong = lambda x_t, t, s, y: exact(x_t, t, s, y) + 0.1 * torch.sin(x_t) * (t - s)[:, None]


def batch(n=256, seed=0):
    x, y = GMM.sample(n, torch.Generator().manual_seed(seed))  # float64 data: the oracle's precision
    return x, torch.where(torch.arange(n) % 3 == 0, NULL, y)  # conditional and unconditional rows


def g_norm(net, objective="emd", r=1.0, seed=1, **kw):
    x, y = batch()
    args = dataclasses.replace(ayf.Args(), objective=objective, ratio=0.75, **kw)
    torch.manual_seed(seed)
    return ayf.ayf_loss(net, teacher_v, x, y, r, args)[1]["g_norm"].item()


@pytest.mark.parametrize("objective", ["emd", "lmd"])
@pytest.mark.parametrize("time_dist", ["pair", "gap"])
def test_g_vanishes_at_the_exact_map(objective, time_dist):
    at, off = g_norm(exact, objective, time_dist=time_dist), g_norm(wrong, objective, time_dist=time_dist)
    assert at < 1e-6 and off > 1e-2, (at, off)


def test_emd_tangent_warmup_bias_is_of_order_one_minus_r():
    # g(r) = (u - v_T) + r (t - s) du_dt and at u* the r = 1 value vanishes, so g(r) = (1 - r)(u* - v_T)
    b99, b90, b0 = (g_norm(exact, r=r) for r in (0.99, 0.9, 0.0))
    assert b99 > 1e-4, b99  # the fixed point at r < 1 is NOT the exact map
    assert abs(b99 / b90 - 0.1) < 1e-3 and abs(b99 / b0 - 0.01) < 1e-4, (b99, b90, b0)


def test_f_space_adds_a_t_minus_s_weight():
    x, y = batch(64)
    grads = {}
    for space in ("u", "f"):
        theta = torch.zeros(64, 2, dtype=torch.float64, requires_grad=True)
        args = dataclasses.replace(ayf.Args(), space=space, ratio=1.0)
        torch.manual_seed(2)
        loss, _ = ayf.ayf_loss(lambda x_t, t, s, y_: wrong(x_t, t, s, y_) + theta, teacher_v, x, y, 1.0, args)
        grads[space] = torch.autograd.grad(loss, theta)[0]
    torch.manual_seed(2)
    torch.randn_like(x)  # the loss draws e first, then the times
    t, s = ayf.sample_ts(64, dataclasses.replace(ayf.Args(), ratio=1.0), x)
    assert torch.allclose(grads["f"], (t - s)[:, None] * grads["u"], rtol=1e-9, atol=1e-12)
    assert grads["u"].norm(dim=1).mean() > 1e-3 and (grads["u"].norm(dim=1) > 0).all()  # 2 w g / B with g != 0


def test_jvp_and_grad_forward_share_dropout_masks():
    draws = []

    def net(x_t, t, s, y):
        draws.append(torch.rand(()).item())  # stands for the dropout masks of a forward
        return exact(x_t, t, s, y)

    for objective in ("emd", "lmd"):
        draws.clear()
        g_norm(net, objective)
        assert len(draws) == 2 and draws[0] == draws[1], draws


def test_samplers_deterministic_and_gamma():
    n = 2000
    e = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.full((n,), NULL)
    end = GMM.flow_map(e, 1.0, 0.0, y, steps=200)
    for k in (1, 2, 4):  # exact flow-map steps compose to the ODE endpoint
        assert (ayf.sample(exact, e, y, k) - end).abs().max() < 1e-4  # RK4 error of the oracle
    real = GMM.sample(n, torch.Generator().manual_seed(4))[0]
    assert energy_distance(end.float(), real.float()) < 0.006
    for gamma in (0.5, 1.0):  # jump to (1 - gamma) t_{k+1} and re-noise: other points, the same law
        torch.manual_seed(0)
        x1 = ayf.sample(exact, e, y, 4, gamma=gamma)
        assert (x1 - end).norm(dim=1).mean() > 0.2 and energy_distance(x1.float(), real.float()) < 0.006, gamma
    shrunk = ayf.sample(lambda x_t, t, s, y_: exact(x_t, t, s, y_) + 0.3 * x_t, e, y, 4, gamma=1.0)  # a biased map
    assert energy_distance(shrunk.float(), real.float()) > 0.02  # the check can fail


def check_run(run, key):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] in (4, 6) and all(k in summary["final"] for k in [key, "loss", "g_norm", "w", "r", "grad_norm"])
    assert (run / "samples.png").stat().st_size > 1000 and (run / "model.safetensors").exists()
    assert {k.split("/")[1] for k in read_all(run / "ckpt.safetensors")} >= {"net", "ema", "opt"}


def test_smoke_mnist_lmd_and_gamma(tiny_teacher, tmp_path):
    run_method(SCRIPT, *TINY, *TINY_IMG, "--teacher", tiny_teacher, "--teacher-cfg", 2.0, "--dropout", 0.1, "--dataset", "mnist",
               "--out-dir", tmp_path)
    check_run(tmp_path / "ayf" / "mnist", "fid@1")
    run_method(SCRIPT, *TINY, "--teacher", "oracle", "--objective", "lmd", "--space", "f", "--time-dist", "gap",
               "--sample-gamma", 1.0, "--norm-dim", "--out-dir", tmp_path / "lmd")
    check_run(tmp_path / "lmd" / "ayf" / "gmm", "fm_err@1")


def test_bad_teacher_gets_one_line(tiny_teacher, tmp_path):
    other_shape = tmp_path / "gmm3d.safetensors"
    save(MLP(3, 16, 1, NULL), str(other_shape), dataset="gmm")
    for flags, needle in [(["--teacher", tiny_teacher], "not on --dataset gmm"), (["--teacher", other_shape], "expected (2,)"),
                          (["--teacher", tmp_path / "missing.safetensors"], "--teacher"), (["--objective", "cm"], "--objective cm")]:
        proc = run_inline(SCRIPT, *flags, "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (flags, proc.stderr[-2000:])
        assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]


@pytest.mark.parametrize("field,value,needle", [("r_max", 1.5, "--r-max 1.5"), ("r_max", -0.1, "--r-max -0.1"),
                                                ("objective", "both", "--objective both"), ("space", "x", "--space x"),
                                                ("time_dist", "uniform", "--time-dist uniform"), ("norm_eps", 0.0, "--norm-eps 0.0"),
                                                ("tangent_warmup", -1, "--tangent-warmup -1"), ("sample_gamma", 2.0, "--sample-gamma 2.0")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        ayf.check_args(dataclasses.replace(ayf.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)
