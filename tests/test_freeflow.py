"""FreeFlow (reconstruction): Delta_G at the exact flow map of the gmm mixture (JVP and central
difference), the sign of the correction gradient against a shifted student with its exact
auxiliary field, dF/dd by JVP vs finite difference on a network, one student forward with grad,
smoke runs (the auxiliary net is checkpointed), bad input (resume: tests/test_methods.py).
Direction (exact teacher): a gradient step from a perturbed map moves toward the exact map and the autograd
gradient is the closed form (2 w Delta_G / B on prediction rows, lambda Delta_N / B on correction rows, rebuilt
here); the d and r laws by quantiles, the prediction-row fraction at 0.25, the guided teacher against
v_u + w (v_c - v_u), the K-step sampler exact on the oracle, the auxiliary loss's gradient (no gradient to x0)."""
import dataclasses
import json
import math
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
exact20 = lambda x_t, t, s, y: GMM.avg_velocity(x_t, t, s, y, steps=20)  # a cheaper exact map (RK4, 20 steps)


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


def replay(z, args, seed):
    """d of every row, r and the noise of the correction rows, as freeflow_loss draws them after torch.manual_seed(seed)."""
    n = len(z)
    n_p = min(max(round(args.pred_frac * n), 1), n - 1)
    torch.manual_seed(seed)
    d = torch.cat([ff.sample_d(n_p, args, z), torch.ones(n - n_p, dtype=z.dtype)])
    r = ff.sample_r(n - n_p, args, z)
    return n_p, d, r, torch.randn(n - n_p, z.shape[1], dtype=z.dtype)


def test_a_prediction_step_moves_toward_the_exact_map():
    # F = F* + sum_k theta_k phi_k with phi = 0 at s = 0: the correction rows stay exact and v_N = v_T there, so
    # Delta_N = 0 and only the prediction term moves theta; its gradient step must shrink the distance to F*
    z, y = noise(96)
    args = ff.Args()
    phis = lambda z_, s: [torch.sin(z_) * s[:, None], (torch.cos(2 * z_) + 0.5) * (s * (1 - s))[:, None], z_ * s[:, None] ** 2]
    theta0 = torch.tensor([0.2, -0.15, 0.1], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    net = lambda z_, t, s, y_: exact20(z_, t, s, y_) + sum(a * p for a, p in zip(theta, phis(z_, s)))
    loss, terms, _, _ = run_loss(net, n=96, seed=3)
    grad = torch.autograd.grad(loss, theta)[0]
    n_p, d, _, _ = replay(z, args, 3)
    dist = lambda th: sum(a * p for a, p in zip(th, phis(z, 1 - d))).pow(2).sum(1).mean()
    d0, d1 = dist(theta0), dist(theta0 - 1e-2 * grad / grad.norm())
    assert terms["dn_norm"] == 0 and d1 < d0 - 1e-4 * d0, (d0, d1, grad)
    at = run_loss(exact20, n=96, seed=3)[0]  # the loss vanishes at the exact map and not away from it
    assert at < 1e-6 and loss > 1e-2, (at, loss)  # at: the 20-step RK4 error of the map


@pytest.mark.parametrize("lambda_ref,k", [("pre", 1.0), ("post", 0.5)])
def test_gradient_is_the_closed_form(lambda_ref, k):
    # prediction rows: d/dF of w ||F - sg(F - Delta_G)||^2 = 2 w Delta_G / n_p, w = (||Delta_G||^2 / D + eps)^-k;
    # correction rows: lambda Delta_N / (B - n_p) (each term a mean over its own rows) with Delta_N = v_N(x_r, r) - v_T(x_r, r); all rebuilt here (dF/dd by a central difference)
    n, h = 40, 1e-5
    z, y = noise(n, seed=5)
    args = dataclasses.replace(ff.Args(), lambda_ref=lambda_ref, weight_k=k, weight_eps=0.05, alpha=0.7, pred_frac=0.6)
    base = lambda z_, t, s, y_: exact20(z_, t, s, y_) + 0.3 * torch.sin(2 * z_) * s[:, None] + 0.2
    moved = Mixture(GMM.means + torch.tensor([0.3, -0.2], dtype=torch.float64), GMM.sigmas, GMM.weights)
    aux = lambda x, t, s, y_: moved.velocity(x, t, y_)
    theta = torch.zeros(n, 2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(9)
    loss, terms, _, _ = ff.freeflow_loss(lambda *a: base(*a) + theta, aux, v_star, v_star, z, y, args)
    grad = torch.autograd.grad(loss, theta)[0]
    n_p, d, r, e = replay(z, args, 9)
    one = torch.ones(n, dtype=torch.float64)
    F = base(z, one, 1 - d, y)
    dF = (base(z, one, 1 - d - h, y) - base(z, one, 1 - d + h, y))[:n_p] / (2 * h)
    zp, dp, Fp = z[:n_p], d[:n_p, None], F[:n_p]
    dG = Fp + dp * dF - v_star(zp - dp * Fp, 1 - d[:n_p], y[:n_p])
    w = (dG.pow(2).mean(1, keepdim=True) + 0.05) ** -k
    x0 = z[n_p:] - F[n_p:]
    x_r = (1 - r[:, None]) * x0 + r[:, None] * e
    dN = moved.velocity(x_r, r, y[n_p:]) - v_star(x_r, r, y[n_p:])
    ref = dG.norm(dim=1) * (1 if lambda_ref == "pre" else w[:, 0])
    lam = 0.7 * ref.mean() / dN.norm(dim=1).mean()
    want = torch.cat([2 * w * dG / n_p, lam * dN / (n - n_p)])
    assert n_p == 24 and torch.allclose(terms["lambda"], lam, rtol=1e-6) and dN.abs().max() > 1e-2
    assert torch.allclose(grad, want, rtol=1e-6, atol=1e-9 * want.abs().max()), (grad - want).abs().max()


def test_row_fraction_and_time_laws():
    seen = []

    def net(z, t, s, y):
        if torch.is_grad_enabled():
            seen.append(s.clone())
        return exact20(z, t, s, y)

    run_loss(net, n=40, pred_frac=0.25)
    s = seen[0]  # prediction rows first (s = 1 - d > 0), then correction rows (d = 1: s = 0)
    assert (s[:10] > 0).all() and (s[10:] == 0).all()
    n, like = 20000, torch.zeros(1, dtype=torch.float64)
    qs = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64)
    ln_q = lambda mu, sig: torch.sigmoid(mu + sig * math.sqrt(2) * torch.erfinv(2 * qs - 1))  # logit-normal quantiles
    torch.manual_seed(0)
    for got, want in [(ff.sample_d(n, ff.Args(), like), qs),
                      (ff.sample_d(n, dataclasses.replace(ff.Args(), d_dist="logit-normal", d_mu=0.4, d_sigma=0.7), like), ln_q(0.4, 0.7)),
                      (ff.sample_r(n, dataclasses.replace(ff.Args(), corr_mu=0.8, corr_sigma=1.2, corr_r_min=0.1, corr_r_max=0.9), like),
                       0.1 + 0.8 * ln_q(0.8, 1.2))]:
        assert (torch.quantile(got, qs) - want).abs().max() < 0.01, (torch.quantile(got, qs), want)


def test_guided_teacher_is_v_u_plus_w_times_v_c_minus_v_u():
    z, y = noise(64)
    t = torch.linspace(0.01, 0.99, 64, dtype=torch.float64)
    v_c, v_u = GMM.velocity(z, t, y), GMM.velocity(z, t, torch.full_like(y, NULL))
    want = torch.where(((t >= 0.2) & (t <= 0.7))[:, None], v_u + 3.0 * (v_c - v_u), v_c)  # plain conditional outside
    assert torch.allclose(ff.guided(aux_star, z, t, y, NULL, 3.0, 0.2, 0.7), want, atol=1e-12) and (want - v_c).abs().max() > 0.1


def test_sampler_is_exact_on_the_oracle():
    e, y = noise(200, seed=6)
    end = GMM.flow_map(e, 1.0, 0.0, y, steps=200)
    for k in (1, 2):  # exact flow-map steps compose to the ODE endpoint
        assert (ff.sample(exact, e, y, k) - end).abs().max() < 1e-4, k  # RK4 error of the oracle


def test_aux_loss_regresses_on_n_minus_x0_without_grad_to_the_student():
    # d/dv of ||v_N(x_t, t) - (n - sg(x0))||^2 (batch mean of the sum) is 2 (v_N - (n - x0)) / B; no gradient reaches x0
    x0 = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = torch.full((32,), NULL)
    theta = torch.zeros(32, 2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(2)
    loss = ff.aux_loss(lambda x, t, s, y_: aux_star(x, t, s, y_) + theta, x0, y)
    g_theta, g_x0 = torch.autograd.grad(loss, [theta, x0], allow_unused=True)
    torch.manual_seed(2)
    t = torch.rand(32, dtype=torch.float64)
    n = torch.randn(32, 2, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0.detach() + t[:, None] * n
    assert torch.allclose(g_theta, 2 * (v_star(x_t, t, y) - (n - x0.detach())) / 32, atol=1e-12)
    assert g_x0 is None or not g_x0.any()


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
