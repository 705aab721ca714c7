"""Method files as a user runs them: smoke runs, exact resume, a copied file, bad input, NaN
guard, and the boilerplate blocks kept identical across files."""
import glob
import json
import os
import re
import shutil

import pytest
import torch

from conftest import ROOT, assert_resumes_exactly, read_all, run_method

METHODS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "methods", "*.py")))
TINY = ["--steps", 4, "--batch-size", 32, "--log-every", 2, "--eval-every", 4, "--eval-samples", 200, "--ckpt-every", 2,
        "--hidden", 32, "--depth", 2]
TINY_IMG = ["--heads", 2, "--patch-size", 7, "--batch-size", 8]


@pytest.mark.parametrize("method", ["fm", "meanflow"])
@pytest.mark.parametrize("dataset", ["gmm", "mnist"])
def test_smoke(method, dataset, tmp_path):
    extra = TINY_IMG if dataset == "mnist" else []
    run_method(os.path.join(ROOT, "methods", f"{method}.py"), *TINY, *extra, "--dataset", dataset, "--out-dir", tmp_path)
    run = tmp_path / method / dataset
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and summary["fpe"] > 0 and summary["seed"] == 0
    key = "fid@1" if dataset == "mnist" else "fm_err@1"
    assert all(k in summary["final"] for k in [key, "loss", "sec_per_step"]) and any(key in r for r in rows)
    assert (run / "samples.png").stat().st_size > 1000 and (run / "model.safetensors").exists()


def test_ddp_two_processes(tmp_path):
    # torchrun with the gloo backend on CPU: the same code path as multi-GPU, JVP included
    import sys
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env_run = [torchrun, "--nproc_per_node", "2", os.path.join(ROOT, "methods", "meanflow.py")]
    import subprocess
    proc = subprocess.run([*env_run, *map(str, TINY), "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "meanflow" / "gmm" / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("method", ["fm", "meanflow"])
def test_resume_continues_exactly(method, tmp_path):
    script = os.path.join(ROOT, "methods", f"{method}.py")
    assert_resumes_exactly(script, method, [*TINY, "--dataset", "gmm", "--dropout", 0.1, "--eval-every", 100], tmp_path)


def test_wall_time_and_grids_add_up_across_resume(tmp_path):
    # the checkpoint carries the wall time of earlier segments; summary.json reports the total
    import time

    from common.dit import load_state, save_state
    script = os.path.join(ROOT, "methods", "fm.py")
    run_method(script, *TINY, "--steps", 2, "--out-dir", tmp_path)
    run = tmp_path / "fm" / "gmm"
    state = load_state(run / "ckpt.safetensors")
    assert 0 < state["wall_time_s"] < 600
    state["wall_time_s"] = 1000.0  # pretend the first segment took 1000 s
    save_state(state, run / "ckpt.safetensors")
    tic = time.time()
    run_method(script, *TINY, "--steps", 3, "--out-dir", tmp_path, "--resume", run)
    wall = json.loads((run / "summary.json").read_text())["wall_time_s"]
    assert 1000.0 < wall < 1000.0 + (time.time() - tic)
    # the first segment's final sample grid survives the second segment's
    assert (run / "samples_0000002.png").exists() and (run / "samples_0000003.png").read_bytes() == (run / "samples.png").read_bytes()


def test_copied_method_runs_alone(tmp_path):
    for part in ("common", "kernels"):
        shutil.copytree(os.path.join(ROOT, part), tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "methods", "meanflow.py"), tmp_path / "meanflow.py")
    probe = tmp_path / "where.py"
    probe.write_text("import common, kernels; print(common.__file__); print(kernels.__file__)\n")
    out = run_method(str(probe), cwd=tmp_path).stdout
    assert out.count(str(tmp_path)) == 2, out  # the copies are used, not the repo's
    run_method(str(tmp_path / "meanflow.py"), *TINY, "--out-dir", tmp_path / "runs", cwd=tmp_path)
    assert (tmp_path / "runs" / "meanflow" / "gmm" / "summary.json").exists()


BAD = [
    (["--dataset", "imagenet"], "--dataset 'imagenet'"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "--data-root /nonexistent"),
    (["--steps", 0], "--steps 0"),
    (["--batch-size", -1], "--batch-size -1"),
    (["--ema-decay", 1.5], "--ema-decay 1.5"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run"),
]


@pytest.mark.parametrize("flags,needle", BAD + [(["--ratio", 1.2], "--ratio 1.2")])
def test_bad_input_gets_one_line(flags, needle, tmp_path):
    proc = run_method(os.path.join(ROOT, "methods", "meanflow.py"), *flags, "--out-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_resume_with_another_network_is_refused(tmp_path):
    script = os.path.join(ROOT, "methods", "fm.py")
    run_method(script, *TINY, "--steps", 2, "--out-dir", tmp_path)
    proc = run_method(script, *TINY, "--hidden", 64, "--out-dir", tmp_path, "--resume", tmp_path / "fm" / "gmm", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "does not match" in proc.stderr


def test_a_finished_run_is_never_overwritten(tmp_path):
    script = os.path.join(ROOT, "methods", "fm.py")
    run_method(script, *TINY, "--steps", 2, "--out-dir", tmp_path)
    before = (tmp_path / "fm" / "gmm" / "ckpt.safetensors").read_bytes()
    proc = run_method(script, *TINY, "--steps", 2, "--seed", 1, "--out-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "fm" / "gmm" / "ckpt.safetensors").read_bytes() == before


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    script = os.path.join(ROOT, "methods", "fm.py")
    proc = run_method(script, *TINY, "--steps", 50, "--lr", 1e30, "--grad-clip", 0, "--ckpt-every", 1, "--out-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    step = int(re.search(r"step (\d+): non-finite", proc.stderr).group(1))
    state = read_all(tmp_path / "fm" / "gmm" / "ckpt.safetensors")
    assert step >= 1 and all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())


def blocks(path):
    """The banner blocks ('# ---- name' up to the next banner or blank-line dedent) of a file."""
    text = open(path).read()
    main = text[text.index('if __name__ == "__main__":'):]
    parts = re.split(r"\n(\s*# ---- [^\n]*)\n", main)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


SHARED = ["# ---- seeding, device, distributed", "# ---- data", "# ---- resume", "# ---- logging", "# ---- evaluation",
          "# ---- checkpoint", "# ---- cost: one forward pass of the same network on a training batch",
          "# ---- log, evaluate, checkpoint (every method file ends its step with this block)", "# ---- summary"]


def generic_args(path):
    text = open(path).read()
    return text[text.index("class Args:"):text.index("    # method\n")]


def test_boilerplate_identical_across_method_files():
    ref = blocks(os.path.join(ROOT, "methods", "fm.py"))
    assert all(name in ref for name in SHARED)
    for m in METHODS:
        path = os.path.join(ROOT, "methods", f"{m}.py")
        other = blocks(path)
        for name in SHARED:
            assert other.get(name) == ref[name], f"methods/{m}.py: block '{name}' differs from methods/fm.py"
        assert generic_args(path) == generic_args(os.path.join(ROOT, "methods", "fm.py")), f"methods/{m}.py: generic Args differ"
        assert len(open(path).read().splitlines()) < 450, f"methods/{m}.py is over 450 lines"


def test_readme_results_table_is_regenerated_from_results():
    proc = run_method(os.path.join(ROOT, "results", "make_table.py"), "--check", check=False)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("```bash\n")[1].split("```")[0].strip().splitlines()
    assert len(block) == 2 and "pytest" in block[1] and "methods/" in block[0]
    assert "n==1' README.md | sed -n 2p" in open(os.path.join(ROOT, ".ci", "run")).read()
