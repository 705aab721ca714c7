import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `pytest -n 2` on 2 cores: one torch thread per worker (two threads each would oversubscribe the
# cores and burn CPU time spin-waiting); the method files started by the tests get one thread too
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the digit cache (mnist, its classifier) of the runs made in this process, as of the subprocesses below
os.environ.setdefault("CLEANFLOW_CACHE", os.path.join(ROOT, ".cache"))


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


def run_here(script, *args, capture=None):
    """Runs a method file in this process, as `python script args` would (no interpreter and torch
    start-up: use it wherever the process boundary is not what a test is about), and returns the
    file's globals at the end (`saved`, the nets, the optimizers, `args`). A failing run raises with
    the text the file printed. `capture`: a list that receives a deep copy of the state dict of
    every training checkpoint the run writes (common.dit.save_state), one per `--ckpt-every`. The
    caller's torch random state is left as it was."""
    import contextlib
    import copy
    import io
    import runpy

    import torch

    import common.dit

    out, argv, save_state = io.StringIO(), sys.argv, common.dit.save_state

    def capturing(state, path):
        capture.append(copy.deepcopy(state))
        return save_state(state, path)

    sys.argv = [str(script), *map(str, args)]
    if capture is not None:
        common.dit.save_state = capturing  # the file imports it by name when it runs
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if not e.code:
            return {}
        raise AssertionError(f"{script} {args} stopped ({e.code}):\n{out.getvalue()[-3000:]}") from None
    except BaseException as e:
        raise AssertionError(f"{script} {args} failed ({type(e).__name__}: {e}):\n{out.getvalue()[-3000:]}") from e
    finally:
        sys.argv, common.dit.save_state = argv, save_state


def _from(module_or_path, root):
    """Whether a path, or a module (its file or package folders), lies in root and not in the
    environment's own folders (a virtual environment made inside the clone, as CI's .ci-venv, holds
    torch: that is the environment, not the repository)."""
    env = tuple(os.path.abspath(p) + os.sep for p in {sys.prefix, sys.exec_prefix} if os.path.abspath(p).startswith(root + os.sep))
    inside = lambda p: (p == root or p.startswith(root + os.sep)) and not (env and (p + os.sep).startswith(env))  # noqa: E731
    if isinstance(module_or_path, str):
        return inside(os.path.abspath(module_or_path or "."))
    try:  # (some modules hold odd objects under these names)
        paths = [str(getattr(module_or_path, "__file__", None) or ""), *map(str, getattr(module_or_path, "__path__", None) or [])]
    except Exception:  # noqa: BLE001
        return False
    return any(p.startswith(root + os.sep) and inside(p) for p in paths)


def run_forked(script, *args, world=1, alone=None, timeout=300):
    """Runs a method file in `world` processes, each a fork of this one (no interpreter, torch and
    plotting start-up: about 6 s of CPU per process here). With world > 1 the processes get what
    `torchrun --nproc_per_node world` gives each rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) and meet over gloo. `alone`: a folder holding a copy of the file with common/ and
    kernels/: the forks forget this repository (its sys.path entries and the common and kernels
    modules already imported), start in that folder and import from there only, as `python` started
    there would; checked after the run. A failing process stops the others and raises with its output."""
    import multiprocessing
    import socket
    import tempfile
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    errors = tempfile.mkdtemp()

    def main(rank):
        try:
            if world > 1:
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            if alone is not None:  # forget every module and path of this repository
                for name in [n for n, m in list(sys.modules.items()) if n.split(".")[0] in ("common", "kernels") or _from(m, ROOT)]:
                    del sys.modules[name]
                sys.path[:] = [str(alone)] + [p for p in sys.path if not _from(p, ROOT)]
                os.chdir(alone)
            run_here(script, *args)
            if alone is not None:
                where = {n: sys.modules[n].__file__ for n in ("common", "kernels") if n in sys.modules}
                assert all(f.startswith(str(alone)) for f in where.values()), f"the copy imported {where}"
                leaked = sorted(n for n, m in list(sys.modules.items()) if _from(m, ROOT))
                assert not leaked, f"the copy imported {leaked} from the repository"
        except BaseException as e:  # noqa: BLE001 - reported by the parent
            with open(os.path.join(errors, str(rank)), "w") as f:
                f.write(f"process {rank}: {type(e).__name__}: {e}")
            os._exit(1)
        os._exit(0)

    procs = [ctx.Process(target=main, args=(r,), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    while any(p.exitcode is None for p in procs) and not any(p.exitcode for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join()
    if any(c != 0 for c in codes):
        raise AssertionError(f"{script} {args} in {world} process(es): exit codes {codes}\n"
                             + ("\n".join(open(os.path.join(errors, f)).read() for f in sorted(os.listdir(errors))) or "(timed out)"))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A small untrained mnist DiT saved as an fm checkpoint: a teacher for smoke runs (not the zero
    velocity: see random_dit)."""
    path = tmp_path_factory.mktemp("teacher") / "mnist.safetensors"
    random_dit(path, 28, 7, 1, 10, dataset="mnist")
    return path


def random_dit(path, size, patch, channels, classes, **meta):
    """A DiT (hidden 32, depth 2, 2 heads) with its zero-initialized layers (adaLN-zero, the output)
    drawn at random too: a fresh DiT is the zero velocity, and a student copied from a zero teacher
    gets no gradient from several distillation losses (the flow map of u = 0 is the identity, which
    is self-consistent): it would never train."""
    import torch

    from common.dit import DiT, save

    torch.manual_seed(0)
    net = DiT(size, patch, channels, 32, 2, 2, 4.0, classes)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    save(net, str(path), **meta)


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
    """A small untrained DiT for the tiny latent set (4x8x8, 3 classes), saved as an fm checkpoint
    (not the zero velocity: see random_dit)."""
    path = tmp_path_factory.mktemp("latent_teacher") / "teacher.safetensors"
    random_dit(path, 8, 2, 4, 3, dataset="imagenet-latent", method="fm")
    return path


@pytest.fixture(scope="session")
def mnist_fid_ref(tmp_path_factory):
    """An .npz for `--fid-ref` on mnist (mu 0, sigma I in the digit classifier's feature space): a
    run then skips the reference pass over all 5000 digits that every run and rank makes otherwise."""
    import numpy as np
    import torch

    from common.eval import mnist_classifier

    dim = mnist_classifier()[0].conv(torch.zeros(1, 1, 28, 28)).shape[1]
    path = tmp_path_factory.mktemp("fid_ref") / "mnist_ref.npz"
    np.savez(path, mu=np.zeros(dim), sigma=np.eye(dim))
    return path


def taylor_exact(x0, t0, s0):
    """The exact average velocity u* of the default mixture, its x-Jacobian J and du*/dt at each (x0, t0, s0)
    (u* = v* where s0 = t0): a first-order model of the exact map around each point has u*'s value and first
    derivatives there, all a loss and its JVP target read, at no cost per row (the posterior tests)."""
    import torch

    from common.data import default_gmm

    G = default_gmm()
    P, eye = len(x0), torch.eye(2, dtype=x0.dtype)
    tangents = (torch.cat([0 * x0, eye[0].expand_as(x0), eye[1].expand_as(x0)]), torch.cat([torch.ones_like(t0), 0 * t0, 0 * t0]))
    u0, d = torch.func.jvp(lambda z, t_: G.avg_velocity(z, t_, s0.repeat(3), None, steps=12), (x0.repeat(3, 1), t0.repeat(3)), tangents)
    return u0[:P], torch.stack([d[P:2 * P], d[2 * P:]], -1), d[:P]


def ks(sample, cdf):
    """Kolmogorov-Smirnov distance between a sample and a CDF."""
    import torch

    x = sample.double().sort().values
    F, n = cdf(x), len(x)
    return torch.maximum(torch.arange(1, n + 1) / n - F, F - torch.arange(n) / n).max().item()
