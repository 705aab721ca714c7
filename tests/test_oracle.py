"""The Gaussian-mixture oracle that every method's exactness test relies on."""
import torch

from common.data import GMM, default_gmm


def test_velocity_matches_monte_carlo_posterior():
    g = default_gmm()
    gen = torch.Generator().manual_seed(0)
    x0, _ = g.sample(400_000, gen)
    for t in (0.3, 0.6, 0.9):
        x_t = torch.tensor([[0.5, -0.3], [1.2, 0.8]], dtype=torch.float64)
        v = g.velocity(x_t, t)
        for i in range(2):  # importance weights N(x_t; (1-t) x, t^2): posterior over x
            logw = -((x_t[i] - (1 - t) * x0) ** 2).sum(1) / (2 * t**2)
            w = torch.softmax(logw, 0)
            x_hat = (w[:, None] * x0).sum(0)
            v_mc = (x_t[i] - (1 - t) * x_hat) / t - x_hat  # E[e | x_t] - E[x | x_t], e = (x_t - (1-t) x) / t
            assert (v[i] - v_mc).norm() < 0.05, (t, v[i], v_mc)


def test_conditional_velocity_is_single_component():
    g = default_gmm()
    x, t = torch.randn(50, 2, dtype=torch.float64), torch.rand(50, dtype=torch.float64)
    y = torch.randint(0, g.num_classes, (50,))
    for k in range(g.num_classes):
        single = GMM(g.means[k:k + 1], g.sigmas[k:k + 1], [1.0])
        assert torch.allclose(g.velocity(x, t, torch.full((50,), k)), single.velocity(x, t), atol=1e-10)
    assert torch.allclose(g.velocity(x, t, torch.full((50,), g.num_classes)), g.velocity(x, t))  # null = marginal
    assert not torch.allclose(g.velocity(x, t, y), g.velocity(x, t))


def test_flow_maps_compose_and_invert():
    g = default_gmm()
    e = torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direct = g.flow_map(e, 1.0, 0.0)
    via = g.flow_map(g.flow_map(e, 1.0, 0.35), 0.35, 0.0)
    assert (direct - via).abs().max() < 1e-4
    back = g.flow_map(direct, 0.0, 1.0)  # the map runs backward too
    assert (back - e).abs().max() < 1e-3
    assert (direct - e).abs().max() > 0.5  # and is far from the identity


def test_one_step_samples_match_mixture_moments():
    g = default_gmm()
    e = torch.randn(20000, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = g.flow_map(e, 1.0, 0.0, steps=60)
    mean, cov = g.moments()
    assert (x.mean(0) - mean).abs().max() < 0.05
    assert (torch.cov(x.T) - cov).abs().max() < 0.1
    y = torch.full((20000,), 2)  # conditional map: the component's own Gaussian
    x2 = g.flow_map(e, 1.0, 0.0, y, steps=60)
    assert (x2.mean(0) - g.means[2]).abs().max() < 0.01 and abs(x2.std(0).mean() - g.sigmas[2]) < 0.01


def test_average_velocity_identities():
    g = default_gmm()
    x, t, s = torch.randn(40, 2, dtype=torch.float64), torch.rand(40, dtype=torch.float64) * 0.5 + 0.5, torch.rand(40, dtype=torch.float64) * 0.4
    u = g.avg_velocity(x, t, s)
    assert torch.allclose(x - (t - s)[:, None] * u, g.flow_map(x, t, s), atol=1e-10)
    assert torch.allclose(g.avg_velocity(x, t, t), g.velocity(x, t))
    # a tiny interval gives the instantaneous velocity
    assert torch.allclose(g.avg_velocity(x, t, t - 1e-4), g.velocity(x, t), atol=1e-3)


def test_single_gaussian_matches_closed_form():
    # one component N(mu, sig^2 I): x_t ~ N((1-t) mu, var_t I), var_t = (1-t)^2 sig^2 + t^2, the
    # velocity is affine, v = -mu + var_t' / (2 var_t) (x - (1-t) mu), and so is the exact map
    mu, sig = torch.tensor([[1.5, -0.5]], dtype=torch.float64), 0.3
    g = GMM(mu, [sig], [1.0])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.9 + 0.05
    var = (1 - t) ** 2 * sig**2 + t**2
    dvar = -2 * (1 - t) * sig**2 + 2 * t
    v = -mu + (dvar / (2 * var))[:, None] * (x - (1 - t)[:, None] * mu)
    assert torch.allclose(g.velocity(x, t), v, atol=1e-12)
    s = t * 0.3
    var_s = (1 - s) ** 2 * sig**2 + s**2
    f = (1 - s)[:, None] * mu + (var_s / var).sqrt()[:, None] * (x - (1 - t)[:, None] * mu)
    assert torch.allclose(g.flow_map(x, t, s), f, atol=1e-8)
    err = [(g.flow_map(x, t, s, steps=n) - f).abs().max().item() for n in (20, 40)]
    assert err[0] < 5e-7 and err[0] / err[1] > 12  # RK4 is fourth order: halving h divides the error by ~16


def test_posterior_sample_averages_to_the_exact_velocity():
    """GMM.posterior_sample draws x ~ p(x | x_t): the mean of the conditional tangents (x_t - x) / t is v*(x_t, t)
    within Monte Carlo error, marginal and per component (the posterior tests of the method files rest on it)."""
    from common.data import default_gmm

    G, gen = default_gmm(), torch.Generator().manual_seed(0)
    P, M = 8, 4000
    x0, y0 = G.sample(P, gen)
    t = torch.rand(P, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(P, 2, generator=gen, dtype=torch.float64)
    X, T, Y = x_t.repeat_interleave(M, 0), t.repeat_interleave(M, 0), y0.repeat_interleave(M, 0)
    for y in (None, Y):
        v = ((X - G.posterior_sample(X, T, gen, y)) / T[:, None]).view(P, M, 2)
        z = (v.mean(1) - G.velocity(x_t, t, None if y is None else y0)) / (v.std(1) / M**0.5)
        assert z.abs().max() < 4.5, z
    # and it is not the prior: the tangents of fresh data samples miss v* at some point by many errors
    v = ((X - G.sample(P * M, gen)[0]) / T[:, None]).view(P, M, 2)
    assert ((v.mean(1) - G.velocity(x_t, t)) / (v.std(1) / M**0.5)).abs().max() > 10
