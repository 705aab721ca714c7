import pytest
import torch

from common.data import make_loader
from common.eval import Evaluator, energy_distance, save_grid, time_forward
from common.dit import MLP


def test_energy_distance_separates_laws():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    same, shifted = energy_distance(a, b), energy_distance(a, b + torch.tensor([0.5, 0.0]))
    assert abs(same) < 0.01 and shifted > 10 * abs(same) and shifted > 0.05


def test_gmm_metrics_are_zero_for_the_exact_map_only(tmp_path):
    loader = make_loader("gmm", 16)
    ev = Evaluator(loader, n=1000, seed=0)
    exact = lambda e, y, k: loader.gmm.flow_map(e.double(), 1.0, 0.0, y, steps=100).float()
    euler = lambda e, y, k: e - loader.gmm.velocity(e, torch.ones(len(e)), y)  # one Euler step: wrong
    m_exact, m_euler = ev(exact, (1,)), ev(euler, (1,))
    assert m_exact["fm_err@1"] < 1e-4 and m_euler["fm_err@1"] > 0.3
    assert m_exact["ed@1"] < 0.01 < m_euler["ed@1"]
    save_grid(exact, loader, (1, 2), str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_mnist_fid_and_label_accuracy():
    loader = make_loader("mnist", 16)
    ev = Evaluator(loader, n=500, seed=0)
    assert ev.classifier_acc > 0.9  # held-out digits
    real = lambda e, y, k: torch.stack([loader.x[loader.y == c][i % 400] for i, c in enumerate(y.tolist())])
    noise = lambda e, y, k: e.clamp(-1, 1)
    m_real, m_noise = ev(real, (1,)), ev(noise, (1,))
    assert m_real["acc@1"] > 0.9 and m_noise["acc@1"] < 0.3
    assert m_real["fid@1"] * 20 < m_noise["fid@1"]


def test_time_forward_leaves_rng_alone():
    net = MLP(dim=2, hidden=8, depth=1, dropout=0.5)
    x = torch.randn(4, 2)
    state = torch.get_rng_state()
    assert time_forward(net, x, torch.zeros(4, dtype=torch.long), reps=2) > 0
    assert torch.equal(torch.get_rng_state(), state) and net.training


def test_single_process_numbers_are_those_of_the_old_evaluator():
    """Reference values printed by the evaluator before the distributed rewrite (commit 0ef0cf8),
    for samplers that act row by row (so the new sampling batch cannot matter)."""
    loader = make_loader("gmm", 16)
    exact = lambda e, y, k: loader.gmm.flow_map(e.double(), 1.0, 0.0, y, steps=100).float()
    euler = lambda e, y, k: e - loader.gmm.velocity(e, torch.ones(len(e)), y) / k
    ev = Evaluator(loader, n=1000, seed=3)
    # to 1e-9 relative: the thread count changes the order of float64 reductions (seen: 2e-15)
    assert ev(exact, (1,)) == pytest.approx({"ed@1": 0.0007059577277397366, "fm_err@1": 4.60781285545955e-08}, rel=1e-9)
    assert ev(euler, (1, 2)) == pytest.approx({"ed@1": 0.03705105113858087, "fm_err@1": 0.39932357629367704,
                                               "ed@2": 0.20598911639720452, "fm_err@2": 0.9792594021619191}, rel=1e-9)
    assert Evaluator(make_loader("moons", 16), n=2500, seed=1)(lambda e, y, k: e * 0.5 + k, (1, 4)) == \
        pytest.approx({"ed@1": 1.3132238595754462, "ed@4": 8.917438844321712}, rel=1e-9)
    loader = make_loader("mnist", 16)
    ev = Evaluator(loader, n=600, seed=2)
    if ev.classifier_acc != 0.9760000109672546:
        pytest.skip("the cached digit classifier differs from the one the reference values were computed with")
    bank = [loader.x[loader.y == c] for c in range(10)]
    real = lambda e, y, k: torch.stack([bank[c][i] for c, i in zip(y.tolist(), ((e[:, 0, 0, 0].abs() * 1000).long() % 400).tolist())])
    blend = lambda e, y, k: (0.3 * e / k + real(e, y, k)).clamp(-1, 1)
    m = {**ev(real, (1,)), **{f"b{k}": v for k, v in ev(blend, (1, 2)).items()}}
    old = {"fid@1": 4.807095871887213, "acc@1": 0.971666693687439, "bfid@1": 17.84115996167543,
           "bacc@1": 0.9649999737739563, "bfid@2": 8.146873829632568, "bacc@2": 0.9666666388511658}
    assert {k: m[k] for k in old} == pytest.approx(old, rel=1e-9)  # FID: sums of outer products vs np.cov
