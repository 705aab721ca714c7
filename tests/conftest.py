import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
