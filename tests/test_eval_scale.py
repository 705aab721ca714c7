"""Evaluation at scale, with stand-ins for the real networks (no weights can be downloaded here): a
tiny randomly initialized diffusers AutoencoderKL and a small TorchScript conv net with
Inception's call (uint8-range images [N, 3, 299, 299] -> [N, 16]). They check the plumbing
(decode, resize, features, statistics, reduction across processes, the scorer), not FID values."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import common.eval as E
from common.data import make_loader
from common.dit import DiT, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tiny_latents):
    return tiny_latents


def data_sampler(loader):
    """Returns data rows chosen by each row's noise (row-local: batch and process free)."""
    x_all, y_all = loader.sample(4096, torch.Generator().manual_seed(7))
    bank = [x_all[y_all == c] for c in range(3)]
    return lambda e, y, k: torch.stack([bank[c][i % len(bank[c])] for c, i in
                                        zip(y.tolist(), (e.flatten(1)[:, 0].abs() * 1e4).long().tolist())])


def test_resize_matches_clean_fid():
    from cleanfid.resize import build_resizer

    resize, g = build_resizer("clean"), torch.Generator().manual_seed(0)
    for size in (16, 64, 400):
        im = torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8)
        ref = torch.stack([torch.from_numpy(resize(a.permute(1, 2, 0).numpy()).transpose(2, 0, 1).copy()) for a in im])
        assert (E.resize_clean(im.float()) - ref).abs().max() < 1e-3


def test_latent_fid_data_vs_noise_npz_and_grid(setup, tmp_path):
    root, vae, incep = setup
    loader = make_loader("imagenet-latent", 8, root=root)
    ev = E.Evaluator(loader, n=300, seed=0, vae=vae, inception=incep, batch=64)
    assert ev.note is None and ev.ref[0].shape == (16,)
    data, noise = data_sampler(loader), (lambda e, y, k: e)
    m_data, m_noise = ev(data, (1,)), ev(noise, (2,))
    assert m_data["fid@1"] < 0.05 * m_noise["fid@2"]
    # decode: raw latent z = x * std + mean with the shards' statistics, then the VAE
    from diffusers.models import AutoencoderKL

    x = loader.sample(4)[0]
    with torch.no_grad():
        expect = AutoencoderKL.from_pretrained(vae).decode(x * 2.0 + 0.5).sample.clamp(-1, 1)
    assert torch.allclose(ev.decode(x), expect, atol=1e-5)
    # a user-given .npz replaces the computed reference
    np.savez(tmp_path / "ref.npz", mu=ev.ref[0], sigma=ev.ref[1])
    shift = np.full(16, 3.0)
    np.savez(tmp_path / "far.npz", mu=ev.ref[0] + shift, sigma=ev.ref[1])
    m_npz = E.Evaluator(loader, 300, 0, vae=vae, inception=incep, fid_ref=str(tmp_path / "ref.npz"), batch=64)(data, (1,))
    m_far = E.Evaluator(loader, 300, 0, vae=vae, inception=incep, fid_ref=str(tmp_path / "far.npz"), batch=64)(data, (1,))
    assert m_npz["fid@1"] == pytest.approx(m_data["fid@1"], rel=1e-9)
    assert m_far["fid@1"] > m_data["fid@1"] + 0.5 * (shift ** 2).sum()
    E.save_grid(data, loader, (1, 2), str(tmp_path / "g.png"), decode=ev.decode)
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_skips_name_the_missing_flag(setup, monkeypatch):
    root, vae, incep = setup
    monkeypatch.setattr(E, "CLEANFID_INCEPTION", "/nonexistent/inception-2015-12-05.pt")
    loader = make_loader("imagenet-latent", 8, root=root)
    ev = E.Evaluator(loader, n=20, seed=0, inception=incep)
    assert "--vae" in ev.note and ev(lambda e, y, k: e, (1,)) == {} and ev.decode is None
    ev = E.Evaluator(loader, n=20, seed=0, vae=vae)
    assert "--inception" in ev.note and ev.decode is not None


@pytest.mark.parametrize("case", ["missing_keys", "wrong_dim", "no_ref", "no_inception", "not_torchscript", "no_vae"])
def test_bad_files_give_one_line_errors(setup, tmp_path, case):
    root, vae, incep = setup
    kw = dict(vae=vae, inception=incep)
    if case == "missing_keys":
        np.savez(tmp_path / "r.npz", arr_0=np.zeros((4, 16)))
        kw["fid_ref"], flag = str(tmp_path / "r.npz"), "--fid-ref"
    elif case == "wrong_dim":
        np.savez(tmp_path / "r.npz", mu=np.zeros(2048), sigma=np.eye(2048))
        kw["fid_ref"], flag = str(tmp_path / "r.npz"), "--fid-ref"
    elif case == "no_ref":
        kw["fid_ref"], flag = str(tmp_path / "none.npz"), "--fid-ref"
    elif case == "no_inception":
        kw["inception"], flag = str(tmp_path / "none.pt"), "--inception"
    elif case == "not_torchscript":
        (tmp_path / "bad.pt").write_bytes(b"not a model")
        kw["inception"], flag = str(tmp_path / "bad.pt"), "--inception"
    else:
        kw["vae"], flag = str(tmp_path / "novae"), "--vae"
    with pytest.raises(SystemExit) as err:
        E.Evaluator(make_loader("imagenet-latent", 8, root=root), n=20, seed=0, **kw)
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_metrics(rank, port, root, vae, incep, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    result = _both_metrics(root, vae, incep)
    torch.save(result, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _both_metrics(root, vae, incep):
    gmm = make_loader("gmm", 8)
    exact = lambda e, y, k: gmm.gmm.flow_map(e.double(), 1.0, 0.0, y, steps=5 * k).float()
    m_gmm = E.Evaluator(gmm, n=2101, seed=1)(exact, (1, 2))  # n spans two noise chunks, odd share sizes
    lat = make_loader("imagenet-latent", 8, root=root)
    ev = E.Evaluator(lat, n=151, seed=0, vae=vae, inception=incep, batch=40)
    return m_gmm, ev(data_sampler(lat), (1,)), ev(lambda e, y, k: e * 0.8, (3,))


def test_two_processes_give_the_metrics_of_one(setup, tmp_path):
    """Same rows, noise and reference on 2 processes; gmm exactly, latents up to the conv kernels'
    batch-size-dependent rounding (features move by ~4e-5 relative when the batches change)."""
    one = _both_metrics(*setup)
    torch.multiprocessing.spawn(_rank_metrics, args=(_free_port(), *setup, str(tmp_path / "m")), nprocs=2)
    for rank in range(2):
        two = torch.load(tmp_path / f"m.{rank}")
        for a, b, rel in zip(one, two, (1e-9, 1e-3, 1e-3)):
            assert a.keys() == b.keys() and len(a) > 0
            assert all(b[k] == pytest.approx(a[k], rel=rel, abs=1e-12) for k in a), (a, b)


def _scorer(*args, nproc=1):
    launch = [sys.executable, "-m", "common.eval"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), "-m", "common.eval"]
    return subprocess.run([*launch, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_scorer_end_to_end_and_under_torchrun(setup, tmp_path):
    root, vae, incep = setup
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden=16, depth=1, heads=2, num_classes=3)
    for p in net.parameters():  # untrained but not zero (adaLN-zero would make every sample e)
        p.data.normal_(0, 0.1)
    ckpt = tmp_path / "model.safetensors"
    save(net, str(ckpt), dataset="imagenet-latent", sampler="denoiser")
    flags = ["--ckpt", ckpt, "--data-root", root, "--vae", vae, "--inception", incep, "--samples", 90, "--batch", 16,
             "--steps", 1, 2]
    for name, nproc in [("one", 1), ("two", 2)]:
        proc = _scorer(*flags, "--out", tmp_path / f"{name}.json", nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert one["sampler"] == "denoiser" and two["world_size"] == 2  # the checkpoint's sampler by default
    assert set(one["metrics"]) == {"fid@1", "fid@2"} and all(np.isfinite(v) and v > 0 for v in one["metrics"].values())
    assert all(two["metrics"][k] == pytest.approx(v, rel=1e-3) for k, v in one["metrics"].items()), (one, two)
    flow = E.score(E.Score(str(ckpt), data_root=root, vae=vae, inception=incep, samples=90, batch=16, steps=(1, 2),
                           sampler="flowmap", cfg_scale=2.0, out=str(tmp_path / "flow.json")))
    assert flow["sampler"] == "flowmap" and flow["cfg_scale"] == 2.0
    assert flow["metrics"]["fid@2"] != pytest.approx(one["metrics"]["fid@2"], rel=1e-3)


@pytest.mark.parametrize("kw,flag", [(dict(ckpt="/nonexistent.safetensors"), "--ckpt"), (dict(samples=0), "--samples"),
                                     (dict(dataset="mnist"), "--ckpt"), (dict(device="tpu"), "--device")])
def test_scorer_bad_flags(setup, tmp_path, kw, flag):
    root, vae, incep = setup
    ckpt = tmp_path / "model.safetensors"
    save(DiT(input_size=8, patch_size=2, in_channels=4, hidden=16, depth=1, heads=2, num_classes=3), str(ckpt), dataset="imagenet-latent")
    args = dict(ckpt=str(ckpt), data_root=root, vae=vae, inception=incep, samples=10, out=str(tmp_path / "m.json"))
    with pytest.raises(SystemExit) as err:
        E.score(E.Score(**{**args, **kw}))
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def test_scorer_cli_rejects_unknown_sampler(setup):
    proc = _scorer("--ckpt", "x.safetensors", "--sampler", "heun")
    assert proc.returncode != 0 and "--sampler" in proc.stderr
