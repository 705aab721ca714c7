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
TIMING = {"sec_per_step", "fpe", "eval_sec", "wall_time_s", "fwd_time_s", "command"}


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
    orig = common.run.Run.evaluate  # (main before issue 22 has no Run: the test fails there)

    def evaluate(self, s, metrics=True):
        if s == step:
            self.metrics_fn()  # the evaluation runs, and is killed before it writes anything
            raise Kill
        return orig(self, s, metrics)
    return evaluate


KILLS = {  # moment -> (what is replaced, by what), resolved in the test
    "while the final model is written": lambda: (common.dit, "save", kill_at_save(4)),
    "between the final model and checkpoint": lambda: (common.dit, "save_state", kill_at_save_state(4)),
    "inside the final evaluation": lambda: (common.run.Run, "evaluate", kill_in_evaluation(4)),
    "inside an evaluation mid-run": lambda: (common.run.Run, "evaluate", kill_in_evaluation(2)),
    "after the final grid, before samples.png": lambda: (common.run, "write_atomic", kill_in_write("samples.png", partial=False)),
    "while summary.json is written": lambda: (common.run, "write_atomic", kill_in_write("summary.json")),
}


@pytest.mark.parametrize("moment", KILLS)
def test_a_killed_run_resumes_to_the_files_of_an_uninterrupted_run(moment, straight, tmp_path, monkeypatch):
    owner, name, replacement = KILLS[moment]()
    with monkeypatch.context() as m:
        m.setattr(owner, name, replacement)
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
    assert (run / "run.lock").read_text().startswith(f"{live.pid} ")  # now the lock of a process that is gone: taken over
    run_ok(*TINY, "--steps", 2, "--out-dir", tmp_path)
    assert (run / "summary.json").exists() and not (run / "run.lock").exists()


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


# ---------------------------------------------------------------- bad input: one line naming the flag
BAD = [
    ("meanflow", ["--seed", 10**20], "--seed 100000000000000000000"),
    ("tvm", ["--s-mu", "nan"], "--s-mu nan"),
    ("meanflow", ["--lr", "1e39"], "--lr 1e+39"),
    ("meanflow", ["--norm-eps", "inf"], "--norm-eps inf"),
    ("meanflow", ["--cfg-t-min", 0.8, "--cfg-t-max", 0.2], "--cfg-t-min 0.8 > --cfg-t-max 0.2"),
    ("imf", ["--sample-cfg", 1, "nan"], "--sample-cfg 1.0 nan"),
    ("meanflow", ["--eval-samples", 1], "--eval-samples 1"),
    ("meanflow", ["--vae", "{tmp}"], "--vae {tmp}: --dataset gmm does not use it"),
    ("meanflow", ["--inception", "{tmp}/i.pt"], "--inception {tmp}/i.pt: --dataset gmm does not use it"),
    ("meanflow", ["--fid-ref", "{tmp}/r.npz"], "--fid-ref {tmp}/r.npz: --dataset gmm does not use it"),
]


@pytest.mark.parametrize("method,flags,needle", BAD, ids=[" ".join(map(str, f)) for _, f, _ in BAD])
def test_bad_flags_get_one_line(method, flags, needle, tmp_path):
    fill = lambda s: str(s).replace("{tmp}", str(tmp_path))
    proc = run_inline(script(method), *TINY, *map(fill, flags), "--out-dir", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert fill(needle) in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_nan_guard_names_the_terms_and_the_flags_that_feed_them(tmp_path):
    from conftest import load_method

    for name, flags in (("meanflow", ["--ratio 0.25", "--norm-p 1.0"]), ("dmd2", ["--teacher"])):
        common.run._ARGS.append(load_method(name).Args())
        try:
            with pytest.raises(SystemExit) as err:
                common.run.stop_if_nonfinite({"loss": torch.tensor(float("nan")), "mse_mf": torch.tensor(float("inf")),
                                              "grad_norm": torch.tensor(1.0)}, 7, str(tmp_path))
        finally:
            common.run._ARGS.pop()
        msg = str(err.value)
        assert msg.startswith("step 7: non-finite loss nan, mse_mf inf") and "grad_norm 1.0" not in msg.split("(")[0]
        assert all(f in msg for f in flags) and "--lr" in msg and "\n" not in msg


@pytest.mark.parametrize("error,needle", [
    (KeyboardInterrupt(), "interrupted at step 2; the checkpoint of step 2 is kept; continue with --resume {run}"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "lower --batch-size, raise --grad-accum or pass --grad-ckpt"),
])
def test_ctrl_c_and_out_of_memory_are_one_line(error, needle, tmp_path, monkeypatch, capsys):
    """Raised at step 3; uncaught, Python hands it to sys.excepthook, which the run installed: called
    here as Python would (in-process, where the test runner catches the exception first)."""
    import sys

    orig = common.run.Run.log_step

    def log_step(self, step, *a):
        if step == 3:
            raise error
        return orig(self, step, *a)

    monkeypatch.setattr(common.run.Run, "log_step", log_step)
    hook = sys.excepthook
    try:
        proc = run_inline(script(), *TINY, "--out-dir", tmp_path)
        assert proc.returncode != 0 and sys.excepthook is not hook
        capsys.readouterr()
        sys.excepthook(type(error), error, None)
        lines = capsys.readouterr().err.strip().splitlines()
    finally:
        sys.excepthook = hook
    assert len(lines) == 1 and needle.format(run=tmp_path / "meanflow" / "gmm") in lines[0], lines


def unshare_ok():
    import shutil
    import subprocess

    return shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not unshare_ok(), reason="this machine cannot mount a private tmpfs (unshare -rm)")
@pytest.mark.parametrize("free_kb,what", [(0, "run.lock"), (8, "model.safetensors")])
def test_a_real_full_disk_is_one_line(free_kb, what, tmp_path):
    """A 256 KiB tmpfs in a private mount namespace, filled up to `free_kb`: safetensors' own error
    type and every other writer end in one line."""
    import subprocess
    import sys

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    flags = " ".join(map(str, TINY))
    cmd = (f"mount -t tmpfs -o size=256k tmpfs {mnt} && (dd if=/dev/zero of={mnt}/fill bs=1k 2>/dev/null; "
           f"truncate -s -{free_kb}k {mnt}/fill; PYTHONPATH={ROOT} OMP_NUM_THREADS=1 {sys.executable} {script()} {flags} --out-dir {mnt})")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    last = proc.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot write" in last and what in last and "No space left on device" in last, last


# ---------------------------------------------------------------- side tools: common.eval and common.data encode
@pytest.mark.parametrize("case", ["cfg nan", "nan weights", "unwritable out", "one sample", "missing ckpt", "usage"])
def test_eval_bad_input_one_line(case, half, tmp_path):
    ckpt = half / "model.safetensors"
    flags = ["--ckpt", ckpt, "--samples", 64, "--steps", 1, "--out", tmp_path / "e.json"]
    if case == "nan weights":
        net = common.dit.load(str(ckpt))
        with torch.no_grad():
            next(net.parameters()).fill_(float("nan"))
        common.dit.save(net, str(tmp_path / "nan.safetensors"), dataset="gmm")
        flags[1] = tmp_path / "nan.safetensors"
    flags += {"cfg nan": ["--cfg-scale", "nan"], "unwritable out": ["--out", "/proc/cleanflow/e.json"], "one sample": ["--samples", 1],
              "missing ckpt": ["--ckpt", tmp_path / "none.safetensors"], "usage": ["--help"], "nan weights": []}[case]
    proc = run_inline(os.path.join(ROOT, "common", "eval.py"), *flags)
    if case == "usage":
        assert proc.returncode == 0 and "usage: python -m common.eval" in proc.stdout and ROOT not in proc.stdout.split("\n")[0]
        return
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    needle = {"cfg nan": "--cfg-scale nan", "nan weights": "weights hold NaN", "unwritable out": "--out /proc/cleanflow/e.json",
              "one sample": "--samples 1", "missing ckpt": f"--ckpt {tmp_path / 'none.safetensors'}"}[case]
    assert needle in last, last
    assert last.count(str(tmp_path / "none.safetensors")) <= 1 and not (tmp_path / "e.json").exists()


def test_eval_files_of_the_wrong_kind(tmp_path):
    import numpy as np

    from common.eval import load_inception, load_ref, load_vae

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))

    class TwoArgs(torch.nn.Module):
        def forward(self, x, y):
            return x + y

    torch.jit.script(TwoArgs()).save(str(tmp_path / "two.pt"))
    np.savez(tmp_path / "nan.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
    for call, needle in ((lambda: load_vae(str(tmp_path / "unet"), "cpu"), "a UNet2DConditionModel folder"),
                         (lambda: load_inception(str(tmp_path / "two.pt"), "cpu"), "does not map images"),
                         (lambda: load_ref(str(tmp_path / "nan.npz"), 4), "NaN or inf")):
        with pytest.raises(SystemExit) as err:
            call()
        assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    (tmp_path / "src" / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(tmp_path / "src" / "a" / f"{i}.png")
    return tmp_path / "src"


@pytest.mark.parametrize("case", ["resolution 0", "batch-size 0", "workers -1", "unwritable out", "other shards", "corrupt image",
                                  "corrupt image, workers 1", "unet as vae"])
def test_encode_bad_input_one_line(case, image_folder, tmp_path, tiny_latents):
    from common.data import encode

    kw = dict(src=str(image_folder), out=str(tmp_path / "o"), vae=tiny_latents[1], resolution=16, workers=0, device="cpu")
    needle = {"resolution 0": "--resolution 0", "batch-size 0": "--batch-size 0", "workers -1": "--workers -1",
              "unwritable out": "--out /proc/cleanflow", "other shards": "already holds 1 shards", "corrupt image": "2.png is not a readable image",
              "corrupt image, workers 1": "2.png is not a readable image", "unet as vae": "a UNet2DModel folder"}[case]
    if case in ("resolution 0", "batch-size 0", "workers -1"):
        kw[case.split()[0].replace("-", "_")] = int(case.split()[1])
    elif case == "unwritable out":
        kw["out"] = "/proc/cleanflow"
    elif case == "other shards":
        os.makedirs(kw["out"])
        open(os.path.join(kw["out"], "shard_r00_00000.safetensors"), "w").close()
    elif case.startswith("corrupt image"):
        (image_folder / "a" / "2.png").write_bytes(b"\x89PNG not really")
        kw["workers"] = 1 if "workers 1" in case else 0
    else:
        (tmp_path / "unet").mkdir()
        (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
        kw["vae"] = str(tmp_path / "unet")
    with pytest.raises(SystemExit) as err:
        encode(**kw)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
