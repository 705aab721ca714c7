"""MeanFlow exactness: the loss residual vanishes at the exact average velocity of the mixture
(closed-form velocity, exact flow map by RK4 in float64) and not away from it."""
import dataclasses

import pytest
import torch

from common.data import default_gmm
from conftest import load_method

mf = load_method("meanflow")
G = default_gmm()
NULL = G.num_classes


def exact(x_t, t, s, y, steps=60):
    return G.avg_velocity(x_t, t, s, y, steps=steps)


def perturbed(x_t, t, s, y, eps=0.05):
    return exact(x_t, t, s, y) + eps * torch.tanh(x_t + t[:, None])


def batch(n, seed, ratio=0.5, conditional=False):
    torch.manual_seed(seed)
    x, y = G.sample(n, torch.Generator().manual_seed(seed))
    y = y if conditional else torch.full_like(y, NULL)
    e = torch.randn_like(x)
    args = mf.Args(ratio=ratio)
    t, s = mf.sample_ts(n, round(ratio * n), args, "cpu")
    t, s = t.double(), s.double()
    return x, y, e, t, s, (1 - t[:, None]) * x + t[:, None] * e


@pytest.mark.parametrize("conditional", [False, True])
def test_residual_vanishes_at_the_exact_solution(conditional):
    x, y, e, t, s, x_t = batch(600, 0, conditional=conditional)
    v_star = G.velocity(x_t, t, y)  # the marginal velocity in place of e - x: no sampling noise
    m = 300
    u, u_tgt = mf.mean_velocity_and_target(exact, x_t, t, s, y, v_star, m, 0.0)
    res = (u - u_tgt).pow(2).sum(1)
    assert res[m:].max() < 1e-6 and res[:m].max() < 1e-12  # ODE error only
    u, u_tgt = mf.mean_velocity_and_target(perturbed, x_t, t, s, y, v_star, m, 0.0)
    res_p = (u - u_tgt).pow(2).sum(1)
    assert res_p[m:].mean() > 1e-4 and res_p[:m].mean() > 1e-4


def test_jvp_target_is_the_total_time_derivative():
    # du/dt along the flow, by finite differences of the exact map: (u(x_{t+d}, t+d) - u(x_{t-d}, t-d)) / 2d
    x, y, e, t, s, x_t = batch(50, 1, ratio=1.0)
    v_star = G.velocity(x_t, t, y)
    u, u_tgt = mf.mean_velocity_and_target(exact, x_t, t, s, y, v_star, 0, 0.0)
    d = 1e-4
    t = t.clamp(max=1 - 2 * d)
    up = exact(G.flow_map(x_t, t, t + d, y), t + d, s, y)
    dn = exact(G.flow_map(x_t, t, t - d, y), t - d, s, y)
    du_dt = (up - dn) / (2 * d)
    assert torch.allclose(u_tgt, v_star - (t - s)[:, None] * du_dt, atol=1e-4)


def test_loss_gradient_vanishes_in_expectation_at_the_exact_solution():
    # conditional velocity e - x as in training; unweighted loss (norm_p = 0): the adaptive weight
    # depends on the sampled residual, which moves the stochastic fixed point (see meanflow.py)
    args = dataclasses.replace(mf.Args(), ratio=0.5, norm_p=0.0, cfg_kappa=0.0)
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    net = lambda x_t, t, s, y: exact(x_t, t.double(), s.double(), y, steps=20) + theta * torch.sin(2 * x_t) * (1 + t[:, None])

    def grads(value, reps=4, n=1000):  # seeded; margins at these sizes: see the asserts
        out = []
        for r in range(reps):
            theta.data.fill_(value)
            x, y = G.sample(n, torch.Generator().manual_seed(100 + r))
            torch.manual_seed(r)
            loss, _ = mf.meanflow_loss(net, x, torch.full_like(y, NULL), args, NULL)
            out.append(torch.autograd.grad(loss, theta)[0].item())
        out = torch.tensor(out)
        return out.mean().item(), out.std().item() / len(out) ** 0.5

    g0, se0 = grads(0.0)
    g1, se1 = grads(0.3)
    assert abs(g0) < 3 * se0 + 1e-3, (g0, se0)
    assert g1 > 10 * max(se1, abs(g0)), (g1, se1)


def test_training_guidance_target():
    # v_g = w v + k v_c + (1 - w - k) v_u inside [t_min, t_max]; v outside and for dropped labels
    args = dataclasses.replace(mf.Args(), cfg_omega=1.5, cfg_kappa=0.25, cfg_t_min=0.2, cfg_t_max=0.8)
    n = 400
    x, y = G.sample(n, torch.Generator().manual_seed(5))
    y[:50] = NULL
    t = torch.rand(n, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x + t[:, None] * torch.randn_like(x)
    v = torch.randn_like(x)
    oracle = lambda x_t, t, s, y: G.velocity(x_t, t, y)
    v_g = mf.guided_velocity(oracle, x_t, t, v, y, NULL, args)
    v_c, v_u = G.velocity(x_t, t, y), G.velocity(x_t, t)
    inside = ((t >= 0.2) & (t <= 0.8))[:, None] & (y != NULL)[:, None]
    want = torch.where(inside, 1.5 * v + 0.25 * v_c + (1 - 1.5 - 0.25) * v_u, v)
    assert torch.allclose(v_g, want) and inside.any() and (~inside).any()
    # k = 0 needs no conditional pass and w = 1, k = 0 is no guidance at all
    args0 = dataclasses.replace(args, cfg_kappa=0.0)
    v_g0 = mf.guided_velocity(oracle, x_t, t, v, y, NULL, args0)
    assert torch.allclose(v_g0, torch.where(inside, 1.5 * v - 0.5 * v_u, v))
    assert torch.equal(mf.guided_velocity(oracle, x_t, t, v, y, NULL, dataclasses.replace(args0, cfg_omega=1.0)), v)


def test_label_dropout_rows():
    # official (default): Bin(B, p) labels dropped, all on the first rows, which are the s = t rows;
    # random: any row
    y = torch.arange(1000) % 7
    torch.manual_seed(0)
    first = mf.drop_labels(y, 7, mf.Args())
    k = int((first == 7).sum())
    assert 60 < k < 140 and (first[:k] == 7).all() and (first[k:] == y[k:]).all()
    torch.manual_seed(0)
    rand = mf.drop_labels(y, 7, mf.Args(label_dropout_rows="random"))
    idx = (rand == 7).nonzero().flatten()
    assert 60 < len(idx) < 140 and idx.max() > 500  # spread over the batch
    # with the default ratio the dropped rows are s = t rows: they never get a unconditional JVP target
    n, n_jvp = 64, round(mf.Args().ratio * 64)
    assert all(int((mf.drop_labels(torch.zeros(n, dtype=torch.long), 1, mf.Args()) == 1).sum()) <= n - n_jvp for _ in range(200))
