import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import common.data as data
from common.data import make_loader, write_shard


@pytest.mark.parametrize("name", ["checkerboard", "moons", "spirals", "8gaussians", "gmm"])
def test_toys_seeded_and_resumable(name):
    a, b = make_loader(name, 64, seed=3), make_loader(name, 64, seed=3)
    xa, ya = next(a)
    assert xa.shape == (64, 2) and ya.shape == (64,) and xa.dtype == torch.float32
    assert torch.equal(xa, next(b)[0])
    assert not torch.equal(xa, next(make_loader(name, 64, seed=4))[0])
    assert 0.3 < xa.std() < 3  # roughly unit scale
    state = a.state_dict()
    x2 = next(a)[0]
    a.load_state_dict(state)
    assert torch.equal(next(a)[0], x2)
    # evaluation draws with their own generator and leave the training stream alone
    a.load_state_dict(state)
    a.sample(10, torch.Generator().manual_seed(0))
    assert torch.equal(next(a)[0], x2)


def test_gmm_labels_are_components():
    loader = make_loader("gmm", 4000, seed=0)
    x, y = next(loader)
    g = loader.gmm
    assert loader.info["num_classes"] == g.num_classes == int(y.max()) + 1
    for k in range(g.num_classes):
        assert (x[y == k].double().mean(0) - g.means[k]).norm() < 5 * g.sigmas[k] / (y == k).sum().sqrt() + 1e-3


def test_mnist():
    loader = make_loader("mnist", 16, seed=0)
    x, y = next(loader)
    assert x.shape == (16, 1, 28, 28) and loader.info["num_classes"] == 10
    assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9 and y.dtype == torch.long
    assert len(loader.x) == 5000


def test_unknown_dataset_and_bad_batch():
    with pytest.raises(SystemExit, match="--dataset 'imagenet': unknown"):
        make_loader("imagenet", 4)
    with pytest.raises(SystemExit, match="--batch-size 0"):
        make_loader("gmm", 0)


def test_cifar10_missing_folder(tmp_path):
    with pytest.raises(SystemExit, match="no CIFAR-10 there"):
        make_loader("cifar10", 4, root=str(tmp_path))


def test_cifar10_reads_local_folder(tmp_path, monkeypatch):
    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    # our files are not the real ones: skip torchvision's md5 check, read them for real
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    loader = make_loader("cifar10", 8, root=str(tmp_path))
    x, y = next(loader)
    assert x.shape == (8, 3, 32, 32) and len(loader.x) == 20 and x.min() >= -1 and x.max() <= 1


def test_latent_shards(tmp_path):
    g = torch.Generator().manual_seed(0)
    lat = [torch.randn(n, 4, 8, 8, generator=g) * 3 + 1 for n in (5, 7)]
    lab = [torch.randint(0, 6, (len(l),), generator=g) for l in lat]
    lab[1][0] = 9  # num_classes comes from the labels
    for i in range(2):
        write_shard(str(tmp_path / f"s{i}.safetensors"), lat[i], lab[i], mean=[1.0] * 4, std=[3.0] * 4)
    loader = make_loader("imagenet-latent", 6, seed=0, root=str(tmp_path))
    assert loader.info == dict(kind="image", shape=(4, 8, 8), num_classes=10) and len(loader.shards) == 12
    idx = torch.tensor([0, 4, 5, 11])
    x, y = loader.shards.get(idx)
    allx, ally = torch.cat(lat), torch.cat(lab)
    assert torch.allclose(x, (allx[idx] - 1) / 3) and torch.equal(y, ally[idx])
    assert next(loader)[0].shape == (6, 4, 8, 8)


def test_latent_shard_errors(tmp_path):
    with pytest.raises(SystemExit, match="no \\*.safetensors shards"):
        make_loader("imagenet-latent", 2, root=str(tmp_path))
    save_file({"labels": torch.zeros(3, dtype=torch.long)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(SystemExit, match="expected tensors 'latents' and 'labels'"):
        make_loader("imagenet-latent", 2, root=str(tmp_path))
    save_file({"latents": torch.zeros(3, 4, 2, 2), "labels": torch.zeros(2, dtype=torch.long)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(SystemExit, match="must be \\[N,C,H,W\\] and \\[N\\]"):
        make_loader("imagenet-latent", 2, root=str(tmp_path))
    write_shard(str(tmp_path / "a.safetensors"), torch.zeros(3, 4, 2, 2), torch.zeros(3))
    write_shard(str(tmp_path / "b.safetensors"), torch.zeros(3, 4, 4, 4), torch.zeros(3))
    with pytest.raises(SystemExit, match="disagree on the latent shape"):
        make_loader("imagenet-latent", 2, root=str(tmp_path))


def test_rank_sharding(monkeypatch):
    monkeypatch.setattr(data, "_rank_world", lambda: (1, 2))
    loader = make_loader("mnist", 4, seed=0)
    assert torch.equal(loader.index, torch.arange(1, 5000, 2))
    x, _ = next(loader)
    other = make_loader.__globals__["Loader"]("mnist", 4, seed=0)
    assert other.rank == 1  # rank-specific seed: seed + rank
    monkeypatch.setattr(data, "_rank_world", lambda: (0, 2))
    assert not torch.equal(next(make_loader("mnist", 4, seed=0))[0], x)
