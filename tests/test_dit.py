import pytest
import torch

from common.dit import DiT, MLP, build, load, save


def tiny_dit(**kw):
    return DiT(**{**dict(input_size=8, patch_size=2, in_channels=3, hidden=32, depth=2, heads=2, num_classes=10), **kw})


def randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # adaLN-zero makes a fresh net output 0: give every weight a value
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def test_shapes_and_zero_init():
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    y = torch.tensor([0, 5, 10])  # 10 = null class
    net = tiny_dit()
    out = net(x, t, t * 0.5, y)
    assert out.shape == x.shape and torch.all(out == 0)  # adaLN-zero output layer
    mlp = MLP(dim=5, hidden=16, depth=2, num_classes=3)
    assert mlp(torch.randn(4, 5), torch.rand(4), torch.rand(4), torch.zeros(4, dtype=torch.long)).shape == (4, 5)


@pytest.mark.parametrize("make", [lambda: tiny_dit(n_cond=2, qk_norm=True), lambda: MLP(dim=3, hidden=16, depth=2, num_classes=4, n_cond=2)])
def test_every_condition_matters(make):
    net = randomize(make()).eval()
    shape = (4, 3, 8, 8) if isinstance(net, DiT) else (4, 3)
    x, t, s = torch.randn(shape), torch.full((4,), 0.7), torch.full((4,), 0.2)
    y, c = torch.tensor([0, 1, 2, 3]), torch.rand(4, 2)
    base = net(x, t, s, y, c)
    for changed in [net(x, t + 0.1, s, y, c), net(x, t, s + 0.1, y, c), net(x, t, s, (y + 1) % 4, c), net(x, t, s, y, c + 0.5)]:
        assert (changed - base).abs().max() > 1e-4
    # each row depends only on its own inputs (no mixing across the batch)
    assert torch.allclose(net(x[:1], t[:1], s[:1], y[:1], c[:1]), base[:1], atol=1e-5)
    with pytest.raises(ValueError, match="expects c"):
        net(x, t, s, y)


def test_jvp_through_dit():
    net = randomize(tiny_dit())
    x, t, s, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.zeros(2), torch.tensor([1, 2])
    dx = torch.randn_like(x)
    u, du = torch.func.jvp(lambda z, t_: net(z, t_, s, y), (x, t), (dx, torch.ones(2)))
    eps = 1e-3  # central difference along the same direction
    fd = (net(x + eps * dx, t + eps, s, y) - net(x - eps * dx, t - eps, s, y)) / (2 * eps)
    assert torch.allclose(du, fd, atol=2e-2 * fd.abs().max().item())
    assert torch.allclose(u, net(x, t, s, y), atol=1e-5)


def test_save_load_roundtrip(tmp_path):
    for net, x in [(randomize(tiny_dit(n_cond=1)), torch.randn(2, 3, 8, 8)), (randomize(MLP(dim=2, hidden=8, depth=1)), torch.randn(2, 2))]:
        path = str(tmp_path / "m.safetensors")
        save(net, path, dataset="toy")
        net2 = load(path)
        args = (x, torch.rand(2), torch.rand(2) * 0.1, torch.zeros(2, dtype=torch.long))
        c = torch.rand(2, 1) if isinstance(net, DiT) else None
        assert torch.equal(net.eval()(*args, c), net2.eval()(*args, c))
        assert build(net.config).config == net.config


def test_load_errors(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save(tiny_dit(), path)
    with pytest.raises(ValueError, match="hidden=32, expected 64"):
        load(path, expect={"hidden": 64})
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(str(tmp_path / "missing.safetensors"))
    (tmp_path / "bad.safetensors").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load(str(tmp_path / "bad.safetensors"))
