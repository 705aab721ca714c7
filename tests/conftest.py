import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `pytest -n 2` on 2 cores: one torch thread per worker (two threads each would oversubscribe the
# cores and burn CPU time spin-waiting); the method files started by the tests get one thread too
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def load_method(name):
    """Imports methods/<name>.py as a module (its __main__ block does not run)."""
    spec = importlib.util.spec_from_file_location(f"method_{name}", os.path.join(ROOT, "methods", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_method(script, *args, cwd=None, check=True):
    """Runs a method file as a user would; returns the CompletedProcess (stdout+stderr text)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "CLEANFLOW_CACHE": os.environ.get("CLEANFLOW_CACHE", os.path.join(ROOT, ".cache"))}
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_inline(script, *args):
    """A method file started with bad input, run in this process (no interpreter and torch start-up
    per case): returns what `run_method(..., check=False)` would, the exit code and the text the
    file printed. The file must stop at start-up; an exception other than SystemExit comes back as a
    traceback in `stderr`, as it would from a subprocess."""
    import contextlib
    import io
    import runpy
    import traceback

    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = sys.argv
    sys.argv = [str(script), *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = 1 if isinstance(e.code, str) else (e.code or 0)
            except BaseException:  # noqa: BLE001 - reported as a subprocess would
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A small untrained mnist DiT saved as an fm checkpoint: a teacher for smoke runs."""
    import torch

    from common.dit import DiT, save

    path = tmp_path_factory.mktemp("teacher") / "mnist.safetensors"
    torch.manual_seed(0)
    save(DiT(28, 7, 1, 32, 2, 2, 4.0, 10), str(path), dataset="mnist")
    return path


@pytest.fixture
def method_path():
    return lambda name: os.path.join(ROOT, "methods", f"{name}.py")


def read_all(path):
    """Every tensor of a safetensors file, by name."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_resumes_exactly(script, method, flags, tmp_path, keys=("loss",)):
    """Runs 6 steps straight (into tmp_path/a) and 3 + 3 with --resume (into tmp_path/b); the final
    checkpoints must be bit-identical and the logged `keys` equal at every step. Returns run a."""
    import json

    import torch

    a, b = tmp_path / "a", tmp_path / "b"
    run_method(script, *flags, "--steps", 6, "--out-dir", a)
    run_method(script, *flags, "--steps", 3, "--out-dir", b)
    run_method(script, *flags, "--steps", 6, "--out-dir", b, "--resume", b / method / "gmm")
    ta, tb = read_all(a / method / "gmm" / "ckpt.safetensors"), read_all(b / method / "gmm" / "ckpt.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    rows = lambda d: {r["step"]: r for r in map(json.loads, (d / method / "gmm" / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    ra, rb = rows(a), rows(b)  # b also logged its stop at step 3
    assert ra and all(rb[s][k] == r[k] for s, r in ra.items() for k in keys)
    return a / method / "gmm"


@pytest.fixture(scope="session")
def tiny_latents(tmp_path_factory):
    """(data root, vae folder, inception file), stand-ins for the real networks (nothing can be
    downloaded here): 96 latents [4, 8, 8] of 3 classes (a class pattern plus noise), normalized by
    mean 0.5 / std 2 per channel; a tiny randomly initialized diffusers AutoencoderKL (latents 8 px ->
    images 16 px); a small TorchScript conv net with Inception's call ([N, 3, 299, 299] -> [N, 16])."""
    import torch
    import torch.nn as nn
    from diffusers.models import AutoencoderKL

    from common.data import write_shard

    class Standin(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=4),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return 100 * self.net(x / 128 - 1)

    d = tmp_path_factory.mktemp("scale")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=16, layers_per_block=1).save_pretrained(d / "vae")
    torch.jit.script(Standin().eval()).save(str(d / "incep.pt"))
    g = torch.Generator().manual_seed(1)
    y = torch.arange(96) % 3
    z = 3 * torch.randn(3, 4, 8, 8, generator=g)[y] + 0.5 * torch.randn(96, 4, 8, 8, generator=g)
    os.makedirs(d / "data")
    write_shard(str(d / "data" / "s0.safetensors"), z, y, [0.5] * 4, [2.0] * 4)
    return str(d / "data"), str(d / "vae"), str(d / "incep.pt")


@pytest.fixture(scope="session")
def tiny_latent_teacher(tmp_path_factory):
    """A small untrained DiT for the tiny latent set (4x8x8, 3 classes), saved as an fm checkpoint."""
    import torch

    from common.dit import DiT, save

    path = tmp_path_factory.mktemp("latent_teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save(DiT(8, 2, 4, 32, 2, 2, 4.0, 3), str(path), dataset="imagenet-latent", method="fm")
    return path
