"""FreeFlow (reconstruction): Delta_G at the exact flow map of the gmm mixture (JVP and central
difference), the sign of the correction gradient against a shifted student with its exact
auxiliary field, dF/dd by JVP vs finite difference on a network, one student forward with grad,
smoke runs (the auxiliary net is checkpointed), bad input (resume: tests/test_methods.py)."""
import dataclasses
import json
import os

import pytest
import torch

from common.data import GMM as Mixture, default_gmm
from common.dit import MLP, save
from conftest import ROOT, load_method, read_all, run_inline, run_method
from test_methods import TINY, TINY_IMG

ff = load_method("freeflow")
SCRIPT = os.path.join(ROOT, "methods", "freeflow.py")
GMM = default_gmm()
NULL = GMM.num_classes
v_star = lambda x, t, y: GMM.velocity(x, t, y)
exact = lambda x_t, t, s, y: GMM.avg_velocity(x_t, t, s, y, steps=100)
wrong = lambda x_t, t, s, y: exact(x_t, t, s, y) + 0.1 * torch.sin(x_t) * (t - s)[:, None]
aux_star = lambda x, t, s, y: GMM.velocity(x, t, y)


def noise(n=256, seed=0):
    z = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))  # float64: the oracle's precision
    y = torch.randint(0, NULL + 1, (n,), generator=torch.Generator().manual_seed(seed + 1))  # classes and the null label
    return z, y


def run_loss(net, aux=aux_star, seed=1, n=256, **kw):
    z, y = noise(n)
    torch.manual_seed(seed)
    return ff.freeflow_loss(net, aux, v_star, v_star, z, y, dataclasses.replace(ff.Args(), **kw))


@pytest.mark.parametrize("deriv,h", [("jvp", 1e-3), ("fd", 1e-4)])
def test_prediction_residual_vanishes_at_the_exact_map(deriv, h):
    at = run_loss(exact, deriv=deriv, fd_step=h)[1]["dg_norm"].item()
    off = run_loss(wrong, deriv=deriv, fd_step=h)[1]["dg_norm"].item()
    assert at < 1e-6 and off > 1e-2, (at, off)


def test_correction_pulls_a_shifted_student_back():
    # the student's one-step samples are the exact ones shifted by a (x0 = z - F(z, 1) = f*(z) + a), so v_N is
    # the exact velocity of the mixture with shifted means; the prediction rows (s > 0) do not see a
    for a0 in ([0.3, -0.2], [-0.25, 0.0]):
        a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        moved = Mixture(GMM.means + a.detach(), GMM.sigmas, GMM.weights)
        # a 20-step ODE for the exact map and 1000 rows: the gradient agrees with 100 steps and 4000 rows to 2%
        student = lambda z, t, s, y: (GMM.avg_velocity(z, t, s, y, steps=20) + 0.1 * torch.sin(z) * (t - s)[:, None]
                                      - (s == 0).double()[:, None] * a)
        grads = []
        for seed in range(3):
            loss, terms, x0, _ = run_loss(student, lambda x, t, s, y: moved.velocity(x, t, y), seed=seed, n=1000)
            assert terms["lambda"] > 0.01 and terms["dn_norm"] > 0.01
            grads.append(torch.autograd.grad(loss, a)[0])
        g = torch.stack(grads)
        assert (g @ a.detach() > 0).all(), g  # a descent step a -= lr g shrinks the shift
        assert torch.nn.functional.cosine_similarity(g.mean(0), a.detach(), dim=0) > 0.8, g


def test_jvp_and_finite_difference_agree_on_a_network():
    torch.manual_seed(0)
    net = MLP(2, 32, 2, NULL)
    with torch.no_grad():  # the fresh net's zero-initialized output layer would make every derivative 0
        for p in net.parameters():
            p.normal_(0, 0.3)
    z, y = noise(64)
    z = z.float()
    d = torch.cat([torch.rand(60), torch.tensor([0.0, 1e-4, 1 - 1e-4, 1.0])])  # ends: one-sided differences
    with torch.no_grad():
        j = ff.deriv(net, z, d, y, dataclasses.replace(ff.Args(), deriv="jvp"))
        f = ff.deriv(net, z, d, y, dataclasses.replace(ff.Args(), deriv="fd", fd_step=1e-2))
    assert j.abs().mean() > 1e-2 and (j - f).abs().max() < 0.02 * j.abs().max(), (j - f).abs().max()


def test_one_student_forward_with_grad():
    calls = []

    def net(z, t, s, y):
        calls.append(torch.is_grad_enabled())
        return exact(z, t, s, y)

    for deriv in ("jvp", "fd"):
        calls.clear()
        run_loss(net, deriv=deriv)
        assert calls.count(True) == 1 and len(calls) == (2 if deriv == "jvp" else 3), calls


def check_run(run, key):
    summary = json.loads((run / "summary.json").read_text())
    keys = [key, "loss", "loss_pred", "loss_corr", "lambda", "dg_norm", "aux_loss", "grad_norm", "aux_grad_norm"]
    assert summary["steps"] in (4, 6) and all(k in summary["final"] for k in keys)
    assert (run / "samples.png").stat().st_size > 1000 and (run / "model.safetensors").exists()
    assert {k.split("/")[1] for k in read_all(run / "ckpt.safetensors")} >= {"net", "ema", "opt", "aux", "opt_aux"}


def test_smoke_mnist_fd(tiny_teacher, tmp_path):
    run_method(SCRIPT, *TINY, *TINY_IMG, "--teacher", tiny_teacher, "--teacher-cfg", 2.0, "--deriv", "fd", "--dataset", "mnist",
               "--out-dir", tmp_path)
    check_run(tmp_path / "freeflow" / "mnist", "fid@1")


def test_bad_teacher_gets_one_line(tiny_teacher, tmp_path):
    other_shape = tmp_path / "gmm3d.safetensors"
    save(MLP(3, 16, 1, NULL), str(other_shape), dataset="gmm")
    for flags, needle in [(["--teacher", tiny_teacher], "not on --dataset gmm"), (["--teacher", other_shape], "expected (2,)"),
                          (["--fd-step", 0], "--fd-step 0")]:
        proc = run_inline(SCRIPT, *flags, "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (flags, proc.stderr[-2000:])
        assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-500:]


@pytest.mark.parametrize("field,value,needle", [("fd_step", -1e-3, "--fd-step -0.001"), ("fd_step", 0.0, "--fd-step 0.0"),
                                                ("deriv", "forward", "--deriv forward"), ("pred_frac", 1.0, "--pred-frac 1.0"),
                                                ("corr_r_max", 1.5, "--corr-r-max 1.5"), ("alpha", 0.0, "--alpha 0.0"),
                                                ("lambda_ref", "mid", "--lambda-ref mid"), ("weight_k", -1.0, "--weight-k -1.0")])
def test_bad_flags(field, value, needle):
    with pytest.raises(SystemExit) as err:
        ff.check_args(dataclasses.replace(ff.Args(), **{field: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)
