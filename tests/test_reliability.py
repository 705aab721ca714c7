"""Reliability: a run killed at any moment is finished by --resume with the files an uninterrupted
run writes; the run folder's lock; --resume=RUN and args.json; bad input as one line (issue 22).
Kills are simulated in-process (an exception nobody catches, raised at the worst moments, with the
partial temporary file a kill leaves) and once for real (os._exit in a subprocess: no cleanup at all)."""
import json
import os

import pytest
import torch

import common.dit
import common.run
from conftest import ROOT, read_all, run_inline, run_method

TINY = ["--steps", 4, "--batch-size", 16, "--log-every", 1, "--eval-every", 2, "--eval-samples", 64, "--ckpt-every", 2,
        "--hidden", 16, "--depth", 1]
TIMING = {"sec_per_step", "fpe", "eval_s", "wall_time_s", "fwd_time_s", "command"}


def script(m="meanflow"):
    return os.path.join(ROOT, "methods", f"{m}.py")


class Kill(BaseException):
    """A simulated kill -9: nothing catches it (SystemExit handlers, `except Exception`)."""


def run_ok(*args):
    proc = run_inline(script(), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMING}
    return obj


def files(run):
    """Everything a run folder holds, comparable across folders (timings and paths dropped)."""
    out = {}
    for p in sorted(run.iterdir()):
        if p.name == "ckpt.safetensors":
            out[p.name] = {k: v for k, v in read_all(p).items()}
        elif p.name == "metrics.jsonl":
            out[p.name] = [strip(json.loads(r)) for r in p.read_text().splitlines()]
        elif p.name == "summary.json":
            out[p.name] = strip(json.loads(p.read_text()))
        elif p.name != "args.json":
            out[p.name] = p.read_bytes()
    return out


def assert_same(a, b):
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if k == "ckpt.safetensors":
            assert fa[k].keys() == fb[k].keys() and all(torch.equal(fa[k][n], fb[k][n]) for n in fa[k]), k
        else:
            assert fa[k] == fb[k], k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run_ok(*TINY, "--out-dir", out)
    return out / "meanflow" / "gmm"


def kill_at_save_state(step):
    orig = common.dit.save_state

    def save_state(state, path):
        if state["step"] == step:  # model.safetensors of this step is written, its checkpoint not
            open(f"{path}.tmp99999", "wb").write(b"partial")
            raise Kill
        return orig(state, path)
    return save_state


def kill_at_save(step):
    orig = common.dit.save

    def save(net, path, **meta):
        if meta.get("step") == step:
            raise Kill
        return orig(net, path, **meta)
    return save


def kill_in_write(name, partial=True):
    orig = common.run.write_atomic

    def write_atomic(path, write):
        if os.path.basename(path) == name:
            if partial:
                root, ext = os.path.splitext(path)
                open(f"{root}.tmp99999{ext}", "w").write("{\"method")
            raise Kill
        return orig(path, write)
    return write_atomic


def kill_in_evaluation(step):
    orig = common.run.Run.evaluate

    def evaluate(self, s, metrics=True):
        if s == step:
            self.metrics_fn()  # the evaluation runs, and is killed before it writes anything
            raise Kill
        return orig(self, s, metrics)
    return evaluate


KILLS = {  # moment -> (module, name, replacement)
    "while the final model is written": (common.dit, "save", lambda: kill_at_save(4)),
    "between the final model and checkpoint": (common.dit, "save_state", lambda: kill_at_save_state(4)),
    "inside the final evaluation": (common.run.Run, "evaluate", lambda: kill_in_evaluation(4)),
    "inside an evaluation mid-run": (common.run.Run, "evaluate", lambda: kill_in_evaluation(2)),
    "after the final grid, before samples.png": (common.run, "write_atomic", lambda: kill_in_write("samples.png", partial=False)),
    "while summary.json is written": (common.run, "write_atomic", lambda: kill_in_write("summary.json")),
}


@pytest.mark.parametrize("moment", KILLS)
def test_a_killed_run_resumes_to_the_files_of_an_uninterrupted_run(moment, straight, tmp_path, monkeypatch):
    owner, name, make = KILLS[moment]
    with monkeypatch.context() as m:
        m.setattr(owner, name, make())
        proc = run_inline(script(), *TINY, "--out-dir", tmp_path)
    assert proc.returncode != 0 and "Kill" in proc.stderr, proc.stderr[-2000:]
    run = tmp_path / "meanflow" / "gmm"
    from common.dit import load_state, read_meta
    assert read_meta(str(run / "model.safetensors"))["step"] >= load_state(str(run / "ckpt.safetensors"))["step"]
    run_ok("--resume", run)
    assert_same(straight, run)
    assert "nothing to do" in run_ok("--resume", run).stdout  # and now it is finished


def test_a_real_kill_while_summary_is_written(straight, tmp_path):
    """kill -9 as it is: no finally, no atexit (the lock of a dead process, a torn temporary file)."""
    probe = tmp_path / "kill.py"
    probe.write_text("import os, runpy, sys, common.run as r\n"
                     "orig = r.write_atomic\n"
                     "def w(path, write):\n"
                     "    if path.endswith('summary.json'):\n"
                     "        open(path[:-5] + '.tmp1.json', 'w').write('{\"meth'); os._exit(137)\n"
                     "    return orig(path, write)\n"
                     "r.write_atomic = w\n"
                     f"sys.argv = [{script()!r}] + sys.argv[1:]\n"
                     f"runpy.run_path({script()!r}, run_name='__main__')\n")
    proc = run_method(str(probe), *TINY, "--out-dir", tmp_path / "o", check=False)
    run = tmp_path / "o" / "meanflow" / "gmm"
    assert proc.returncode == 137 and (run / "run.lock").exists() and not (run / "summary.json").exists()
    run_ok("--resume", run)
    assert_same(straight, run)


def test_stale_model_is_rewritten_on_resume(straight, tmp_path):
    """A run written by the old order (checkpoint first): model.safetensors one checkpoint behind."""
    run_ok(*TINY, "--out-dir", tmp_path)
    run = tmp_path / "meanflow" / "gmm"
    from common.dit import read_meta
    net = common.dit.load(str(run / "model.safetensors"))
    common.dit.save(net, str(run / "model.safetensors"), dataset="gmm", method="meanflow", step=2)
    assert read_meta(str(run / "model.safetensors"))["step"] == 2
    run_ok("--resume", run)
    assert read_meta(str(run / "model.safetensors"))["step"] == 4
    assert_same(straight, run)


@pytest.mark.parametrize("name", ["model.safetensors", "samples.png", "samples_0000004.png", "summary.json", "the last eval row"])
def test_a_missing_end_file_is_redone(name, straight, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    if name == "the last eval row":
        rows = (run / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    else:
        (run / name).unlink()
    run_ok("--resume", run)
    assert_same(straight, run)


# ---------------------------------------------------------------- the lock
def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "meanflow" / "gmm"
    run.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "run.lock").write_text(f"{live.pid} {__import__('socket').gethostname()}")
        proc = run_inline(script(), *TINY, "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert f"another run (PID {live.pid}" in proc.stderr.strip().splitlines()[-1]
        assert not (run / "metrics.jsonl").exists()  # it wrote nothing
    finally:
        live.kill()
        live.wait()
    dead = live.pid  # a lock left by a process that is gone is taken over
    run_ok(*TINY, "--steps", 2, "--out-dir", tmp_path)
    assert (run / "summary.json").exists() and not (run / "run.lock").exists()
    assert dead


# ---------------------------------------------------------------- --resume and args.json
@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A finished 2-step run with --lr 5e-4 (not the default)."""
    out = tmp_path_factory.mktemp("half")
    run_ok(*TINY, "--steps", 2, "--lr", 5e-4, "--out-dir", out)
    return out / "meanflow" / "gmm"


def copy_of(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def rows(run):
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("form", ["--resume RUN", "--resume=RUN"])
def test_resume_forms_read_args_json(form, half, tmp_path):
    run = copy_of(half, tmp_path)
    run_ok(*(["--resume", run] if form == "--resume RUN" else [f"--resume={run}"]), "--steps", 3)
    assert [r["lr"] for r in rows(run) if r["step"] == 3 and "lr" in r] == [5e-4]
    assert {"step": 2, "resumed_with": {"steps": 3}} in rows(run)


def test_resume_without_args_json_is_one_line(half, tmp_path):
    run = copy_of(half, tmp_path)
    (run / "args.json").unlink()
    proc = run_inline(script(), f"--resume={run}", "--steps", 3)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "args.json" in proc.stderr.strip().splitlines()[-1] and not (run / "run.lock").exists()


def test_an_edited_args_json_is_recorded(half, tmp_path):
    run = copy_of(half, tmp_path)
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, "lr": 2e-4}, indent=1))
    run_ok("--resume", run, "--steps", 3)
    assert {"step": 2, "resumed_with": {"steps": 3, "args.json": {"lr": [5e-4, 2e-4]}}} in rows(run)
    assert [r["lr"] for r in rows(run) if r["step"] == 3 and "lr" in r] == [2e-4]


@pytest.mark.parametrize("field,value", [("lr", "fast"), ("steps", 2.5), ("eval_steps", [1, "two"]), ("qk_norm", "yes")])
def test_a_wrong_type_in_args_json_is_one_line(field, value, half, tmp_path):
    run = copy_of(half, tmp_path)
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, field: value}))
    proc = run_inline(script(), "--resume", run, "--steps", 3)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"has {field} = {value!r}" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
