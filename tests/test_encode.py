"""`python -m common.data encode` on a tiny ImageFolder with a tiny random AutoencoderKL."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from common.data import center_crop_arr, encode, make_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(ImageFolder with 2 classes of 4 random PNGs of mixed sizes, a tiny AutoencoderKL folder)."""
    from diffusers import AutoencoderKL

    base = tmp_path_factory.mktemp("enc")
    rng = np.random.default_rng(0)
    for c, sizes in enumerate([[(40, 30), (16, 16), (70, 33), (20, 50)], [(33, 64), (48, 48), (17, 90), (32, 20)]]):
        (base / "img" / f"class{c}").mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(base / "img" / f"class{c}" / f"{i}.png")
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(base / "vae")
    return str(base / "img"), str(base / "vae")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stored(out, keys=("latents", "latents_flip")):
    """All latents stored in a shard folder (both versions) as [N, C, H, W]."""
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    return torch.cat([t[k] for t in map(load_file, (os.path.join(out, f) for f in files)) for k in keys if k in t]), files


def test_help_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "common.data", "encode", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0 and "--norm" in proc.stdout and "--src" in proc.stdout, proc.stderr


def test_adm_center_crop_box_halves_then_crops_the_center():
    a = np.random.default_rng(1).integers(0, 256, (32, 64, 3), dtype=np.uint8)  # H 32, W 64; res 16
    got = center_crop_arr(Image.fromarray(a), 16)
    half = a.reshape(16, 2, 32, 2, 3).astype(np.float64).mean((1, 3))  # one BOX halving (short side 32 >= 2 * 16)
    assert got.shape == (16, 16, 3) and np.abs(got - half[:, 8:24]).max() <= 1  # then the centre 16 of 32 columns
    odd = center_crop_arr(Image.fromarray(a[:, :50]), 16)  # 50x32 -> 25x16, crop columns 4..20
    assert odd.shape == (16, 16, 3)


def test_encode_whole_set_stats_and_flips(folders, tmp_path):
    src, vae = folders
    out = str(tmp_path / "lat")
    encode(src, out, vae=vae, resolution=16, batch_size=3, shard_size=3, workers=0, device="cpu")
    z, files = _stored(out)
    assert files == ["shard_r00_00000.safetensors", "shard_r00_00001.safetensors", "shard_r00_00002.safetensors"]
    assert not [f for f in os.listdir(out) if f.endswith(".part")]
    assert z.shape == (16, 4, 8, 8)  # 8 images, plain and mirrored
    loader = make_loader("imagenet-latent", 4, root=out)
    info = loader.info
    assert info["num_classes"] == 2 and info["vae"] == vae and info["norm"] == "stats" and loader.shards.has_flip
    mean, std = z.double().mean((0, 2, 3)), z.double().std((0, 2, 3), correction=0)
    assert np.allclose(info["mean"], mean, atol=1e-5) and np.allclose(info["std"], std, atol=1e-5)  # the whole set
    x, y = loader.shards.get(torch.arange(8), torch.zeros(8, dtype=torch.bool))
    xf, _ = loader.shards.get(torch.arange(8), torch.ones(8, dtype=torch.bool))
    both = torch.cat([x, xf]).double()
    assert both.mean((0, 2, 3)).abs().max() < 1e-5 and (both.std((0, 2, 3), correction=0) - 1).abs().max() < 1e-4
    assert sorted(y.tolist()) == [0] * 4 + [1] * 4
    assert next(loader)[0].shape == (4, 4, 8, 8)


def test_encode_cli_sd_scaling_without_flips(folders, tmp_path):
    src, vae = folders
    out = str(tmp_path / "lat")
    proc = subprocess.run([sys.executable, "-m", "common.data", "encode", "--src", src, "--out", out, "--vae", vae, "--resolution", "16",
                           "--norm", "sd", "--no-flip", "--workers", "0", "--device", "auto"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = make_loader("imagenet-latent", 2, root=out).info
    assert info["mean"] == [0.0] * 4 and np.allclose(info["std"], 1 / 0.18215) and info["norm"] == "sd"
    with safe_open(os.path.join(out, "shard_r00_00000.safetensors"), "pt") as f:
        assert set(f.keys()) == {"latents", "labels"}


def test_encode_under_torchrun_splits_files_and_sums_stats(folders, tmp_path):
    src, vae = folders
    out = str(tmp_path / "lat")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "common.data",
                           "encode", "--src", src, "--out", out, "--vae", vae, "--resolution", "16", "--workers", "0", "--shard-size", "3"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    z, files = _stored(out)
    assert {f[:9] for f in files} == {"shard_r00", "shard_r01"} and z.shape == (16, 4, 8, 8)  # each image once per version
    info = make_loader("imagenet-latent", 2, root=out).info  # every shard carries the same, all-reduced, statistics
    assert np.allclose(info["mean"], z.double().mean((0, 2, 3)), atol=1e-5)
    assert np.allclose(info["std"], z.double().std((0, 2, 3), correction=0), atol=1e-5)


@pytest.mark.parametrize("flag", ["src", "vae", "device"])
def test_encode_bad_inputs_one_line(flag, folders, tmp_path):
    src, vae = folders
    kw = dict(src=src, out=str(tmp_path / "o"), vae=vae, workers=0, device="cpu")
    kw[flag] = {"src": str(tmp_path / "nowhere"), "vae": str(tmp_path / "novae"), "device": "cuda:3"}[flag]
    if flag == "device" and torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    with pytest.raises(SystemExit, match=f"--{flag} ") as e:
        encode(**kw)
    assert "\n" not in str(e.value)
