"""Every method file as a user runs it, parametrized over methods/*.py so a new file is covered
the day it lands: a copied file run alone on gmm (also the smoke run), imagenet-latent in bf16 with 2
micro-batches and an FID through a VAE (stand-ins), on mnist one process with 2 micro-batches run
straight against the same resumed (bit-identical) and against torchrun with 2 processes (equal to
float rounding), and the boilerplate blocks kept identical. Bad input and run-folder safety are
tested on one file each (the code is shared)."""
import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_all, run_inline, run_method

METHODS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "methods", "*.py")))
TINY = ["--steps", 4, "--batch-size", 32, "--log-every", 2, "--eval-every", 4, "--eval-samples", 200, "--ckpt-every", 2,
        "--hidden", 32, "--depth", 2]
TINY_IMG = ["--hidden", 32, "--depth", 2, "--heads", 2, "--patch-size", 7, "--batch-size", 8, "--eval-samples", 100]
# what a method needs to run in seconds (a method file may add its entry here)
FAST = {"mfd": ["--ode-step", 0.5, "--aux-ratio", 1], "shortcut": ["--denoise-timesteps", 4, "--bootstrap-every", 2]}


def script(m):
    return os.path.join(ROOT, "methods", f"{m}.py")


def teacher_flags(m, dataset, tiny_teacher):
    """Distillation files take --teacher: the oracle on gmm, a tiny untrained DiT on mnist."""
    if "    teacher: str" not in open(script(m)).read():
        return []
    return ["--teacher", "oracle" if dataset == "gmm" else tiny_teacher]


@pytest.mark.parametrize("method", METHODS)
def test_imagenet_latent_bf16_accum_logs_an_fid(method, tmp_path, tiny_latents, tiny_latent_teacher):
    """Every method on a tiny imagenet-latent set, end to end, in bf16 (CPU autocast) with 2
    micro-batches: VAE decode (a tiny random AutoencoderKL), Inception features (a TorchScript
    stand-in), Frechet distance."""
    root, vae, incep = tiny_latents
    teacher = ["--teacher", tiny_latent_teacher] if teacher_flags(method, "mnist", "x") else []
    run_method(script(method), *TINY, *FAST.get(method, []), "--hidden", 32, "--depth", 2, "--heads", 2, "--patch-size", 2,
               "--batch-size", 8, "--steps", 2, "--eval-every", 2, "--eval-samples", 32, "--eval-steps", 1, "--dataset", "imagenet-latent",
               "--data-root", root, "--vae", vae, "--inception", incep, *teacher, "--precision", "bf16", "--grad-accum", 2,
               "--out-dir", tmp_path)
    summary = json.loads((tmp_path / method / "imagenet-latent" / "summary.json").read_text())
    assert summary["final"]["fid@1"] > 0 and (tmp_path / method / "imagenet-latent" / "samples.png").exists()
    assert summary["hardware"]["precision"] == "bf16"
    assert all(torch.isfinite(v).all() for v in read_all(tmp_path / method / "imagenet-latent" / "ckpt.safetensors").values() if v.is_floating_point())


def torchrun(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([exe, "--nproc_per_node", "2", *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CLEANFLOW_CACHE": os.path.join(ROOT, ".cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TIMING = re.compile(r"sec|fpe|time")  # wall-clock numbers: the only logged values allowed to differ


def logged(run):
    """Logged numbers by step (timings left out; the resume row is not a step)."""
    out = {}
    for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        if "resumed_with" not in r:
            out.setdefault(r["step"], {}).update({k: v for k, v in r.items() if not TIMING.search(k)})
    return out


def ddp_flags(method, tiny_teacher):
    return [*TINY, *TINY_IMG, *FAST.get(method, []), "--dataset", "mnist", "--eval-every", 100, "--ckpt-every", 1, "--lr", 1e-3,
            *teacher_flags(method, "mnist", tiny_teacher)]


def assert_close(a, b, tol):
    ta, tb = read_all(a / "ckpt.safetensors"), read_all(b / "ckpt.safetensors")
    assert ta.keys() == tb.keys()
    worst = {k: (ta[k].double() - tb[k].double()).abs().max().item() for k in ta if ta[k].is_floating_point() and ta[k].numel()}
    assert max(worst.values()) <= tol, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("method", METHODS)
def test_resume_and_ddp_match_one_straight_process(method, tmp_path, tiny_teacher):
    """On mnist with the DiT, one process with 2 micro-batches run straight for 2 steps (S) against
    1. the same stopped after step 1 and resumed: bit-identical checkpoint (every net, EMA, optimizer
    state, step) and identical logged numbers (`--resume` continues exactly);
    2. torchrun with 2 processes x 1 micro-batch: the same global batch and the same noise per
    micro-batch, so every trained network (generator, fake, discriminator, auxiliary), its EMA and
    optimizer must agree to float rounding. An unsynchronized net, or ranks drawing the same noise,
    makes them differ."""
    flags = ddp_flags(method, tiny_teacher)
    s, r, d = tmp_path / "straight", tmp_path / "resumed", tmp_path / "ddp"
    run_method(script(method), *flags, "--steps", 2, "--grad-accum", 2, "--out-dir", s)
    run_method(script(method), *flags, "--steps", 1, "--grad-accum", 2, "--out-dir", r)
    run_method(script(method), "--steps", 2, "--resume", r / method / "mnist")  # every other flag from args.json
    torchrun(script(method), *flags, "--steps", 2, "--out-dir", d)
    s, r, d = (x / method / "mnist" for x in (s, r, d))
    assert_close(s, r, 0.0)
    ls, lr_ = logged(s), logged(r)
    assert ls and all(ls[k] == lr_.get(k) for k in ls), (ls, lr_)  # the resumed run also logged its stop at step 1
    assert_close(s, d, 1e-4)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in rows if "loss" in x or "fake_loss" in x]
    assert steps and steps == sorted(set(steps))  # each row written once, by rank 0


def test_ddp_resume_restores_every_rank(tmp_path, tiny_teacher):
    """torchrun stopped after step 1 and resumed against one process run straight (dmd2: the most
    state): a resume restoring rank 0's data position or noise on every rank makes them differ. The
    code is shared, so one file is enough."""
    flags = ddp_flags("dmd2", tiny_teacher)
    a, b = tmp_path / "ddp", tmp_path / "one"
    torchrun(script("dmd2"), *flags, "--steps", 1, "--out-dir", a)
    torchrun(script("dmd2"), *flags, "--steps", 2, "--resume", a / "dmd2" / "mnist")
    run_method(script("dmd2"), *flags, "--steps", 2, "--grad-accum", 2, "--out-dir", b)
    assert_close(a / "dmd2" / "mnist", b / "dmd2" / "mnist", 1e-4)


def test_copies_of_common_and_kernels_shadow_the_installed_ones(tmp_path):
    for part in ("common", "kernels"):
        shutil.copytree(os.path.join(ROOT, part), tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    probe = tmp_path / "where.py"
    probe.write_text("import common, kernels; print(common.__file__); print(kernels.__file__)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600).stdout
    assert out.count(str(tmp_path)) == 2, out  # the copies are used, not the repo's (pip install -e .)


@pytest.mark.parametrize("method", METHODS)
def test_copied_method_runs_alone(method, tmp_path, tiny_teacher):
    """Also the gmm smoke run: the file copied with common/ and kernels/ into an empty folder."""
    for part in ("common", "kernels"):
        shutil.copytree(os.path.join(ROOT, part), tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(script(method), tmp_path / f"{method}.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    flags = [*TINY, *FAST.get(method, []), *teacher_flags(method, "gmm", tiny_teacher), "--dropout", 0.1, "--eval-every", 100]
    proc = subprocess.run([sys.executable, str(tmp_path / f"{method}.py"), *map(str, [*flags, "--out-dir", tmp_path / "runs"])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "runs" / method / "gmm"
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and summary["fpe"] > 0 and summary["seed"] == 0
    assert all(k in summary["final"] for k in ["fm_err@1", "sec_per_step"]) and len([r for r in rows if "fm_err@1" in r]) == 1
    assert (run / "samples.png").stat().st_size > 1000 and (run / "model.safetensors").exists()


# ---------------------------------------------------------------- bad input: one line naming the flag or file
BAD = [
    (["--dataset", "imagenet"], "--dataset 'imagenet'"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent"], "--data-root /nonexistent"),
    (["--steps", 0], "--steps 0"),
    (["--batch-size", -1], "--batch-size -1"),
    (["--ema-decay", 1.5], "--ema-decay 1.5"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run"),
    (["--ratio", 1.2], "--ratio 1.2"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "inf"], "--lr inf"),
    (["--adam-betas", 1.5, 0.9], "--adam-betas"),
    (["--weight-decay", -1], "--weight-decay -1"),
    (["--eval-steps"], "--eval-steps"),
    (["--device", "cuda"], "--device cuda"),
    (["--precision", "fp8"], "--precision fp8"),
    (["--batch-size", 30, "--grad-accum", 4], "--batch-size 30"),
    (["--dataset", "mnist", "--patch-size", 5], "--patch-size 5"),
    (["--dataset", "mnist", "--heads", 3], "--heads 3"),
    (["--label-dropout-rows", "last"], "--label-dropout-rows last"),
    (["--out-dir", "/proc/cleanflow"], "--out-dir /proc/cleanflow"),
]


@pytest.mark.parametrize("flags,needle", BAD)
def test_bad_input_gets_one_line(flags, needle, tmp_path):
    out = flags if "--out-dir" in flags else [*flags, "--out-dir", tmp_path]
    proc = run_inline(script("meanflow"), *out)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "fm").write_text("not a folder")
    proc = run_inline(script("fm"), *TINY, "--out-dir", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--out-dir" in proc.stderr.splitlines()[-1]


def test_optional_extras_named(tmp_path):
    for flag, module in (("--tensorboard", "torch.utils.tensorboard"), ("--track", "wandb")):
        try:
            __import__(module)
            continue  # installed: nothing to refuse
        except ImportError:
            pass
        proc = run_inline(script("fm"), *TINY, flag, "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and flag in proc.stderr.splitlines()[-1]


# ---------------------------------------------------------------- run folders
def first_run(tmp_path, method="fm", steps=2, extra=()):
    run_method(script(method), *TINY, "--steps", steps, *extra, "--out-dir", tmp_path)
    return tmp_path / method / "gmm"


def test_resume_refuses_another_method_or_data_set(tmp_path):
    run = first_run(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for m, extra in (("meanflow", []), ("fm", ["--dataset", "moons"])):
        proc = run_inline(script(m), *extra, "--resume", run)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "not a" in proc.stderr.splitlines()[-1], proc.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


def test_resume_reuses_args_and_logs_overrides(tmp_path):
    run = first_run(tmp_path, extra=["--lr", 3e-4, "--time-dist", "uniform"])
    args0 = (run / "args.json").read_text()
    run_method(script("fm"), "--resume", run, "--steps", 3)  # bare: every other flag from args.json
    assert (run / "args.json").read_text() == args0  # the original arguments are kept
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "resumed_with": {"steps": 3}} in rows
    assert [r["lr"] for r in rows if r.get("step") == 3 and "lr" in r] == [3e-4]  # not the default 1e-3
    proc = run_inline(script("fm"), "--resume", run, "--hidden", 64, "--steps", 4)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "hidden" in proc.stderr.splitlines()[-1]


def test_finished_run_resumed_changes_nothing(tmp_path):
    run = first_run(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    proc = run_method(script("fm"), "--resume", run, "--steps", 2)
    assert "nothing to do" in proc.stdout
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_torn_log_line_and_stale_tmp_files(tmp_path):
    run = first_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # a kill mid-write
    (run / "ckpt.safetensors.tmp12345").write_bytes(b"x" * 100)  # a kill during a checkpoint write
    proc = run_method(script("fm"), "--resume", run, "--steps", 3)
    assert "torn last line" in proc.stderr
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]  # all parse
    assert rows[-1]["step"] == 3 and not list(run.glob("*.tmp*"))


def test_corrupt_checkpoint_is_one_line(tmp_path):
    run = first_run(tmp_path)
    (run / "ckpt.safetensors").write_bytes(b"\x00garbage")
    proc = run_inline(script("fm"), "--resume", run, "--steps", 3)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--resume" in proc.stderr.splitlines()[-1]


def test_final_checkpoint_survives_a_failing_evaluation(tmp_path):
    # a full disk at the final grid: the checkpoint of the last step is already written
    probe = tmp_path / "fail_grid.py"
    probe.write_text("import runpy, sys, common.eval as ev\n"
                     "def boom(*a, **k): raise OSError(28, 'No space left on device')\n"
                     "ev.save_grid = boom\n"
                     f"sys.argv = [{script('fm')!r}] + sys.argv[1:]\n"
                     f"runpy.run_path({script('fm')!r}, run_name='__main__')\n")
    proc = run_method(str(probe), *TINY, "--steps", 3, "--ckpt-every", 100, "--out-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr  # (the progress bar prints its last state after the line)
    assert any("cannot write" in line and "No space left" in line for line in proc.stderr.splitlines())
    from common.dit import load_state
    assert load_state(tmp_path / "fm" / "gmm" / "ckpt.safetensors")["step"] == 3


def test_full_disk_during_a_checkpoint_keeps_the_last_one(tmp_path):
    probe = tmp_path / "fail_save.py"
    probe.write_text("import runpy, sys, common.dit as d\n"
                     "orig, n = d.save_file, [0]\n"
                     "def flaky(t, path, metadata=None):\n"
                     "    n[0] += 1\n"
                     "    if n[0] > 2:\n"  # the first checkpoint (2 files) succeeds, the next one hits a full disk mid-write
                     "        open(path, 'wb').write(b'partial'); raise OSError(28, 'No space left on device')\n"
                     "    return orig(t, path, metadata=metadata)\n"
                     "d.save_file = flaky\n"
                     f"sys.argv = [{script('fm')!r}] + sys.argv[1:]\n"
                     f"runpy.run_path({script('fm')!r}, run_name='__main__')\n")
    proc = run_method(str(probe), *TINY, "--steps", 4, "--ckpt-every", 2, "--out-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert any("cannot write" in line and "No space left" in line for line in proc.stderr.splitlines())
    run = tmp_path / "fm" / "gmm"
    from common.dit import load_state
    assert load_state(run / "ckpt.safetensors")["step"] == 2 and not list(run.glob("*.tmp*"))


def test_a_finished_run_is_never_overwritten(tmp_path):
    run = first_run(tmp_path)
    before = (run / "ckpt.safetensors").read_bytes()
    proc = run_inline(script("fm"), *TINY, "--steps", 2, "--seed", 1, "--out-dir", tmp_path)
    assert proc.returncode != 0 and "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "ckpt.safetensors").read_bytes() == before


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    proc = run_method(script("fm"), *TINY, "--steps", 50, "--lr", 1e30, "--grad-clip", 0, "--ckpt-every", 1, "--out-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    step = int(re.search(r"step (\d+): non-finite", proc.stderr).group(1))
    state = read_all(tmp_path / "fm" / "gmm" / "ckpt.safetensors")
    assert step >= 1 and "last good checkpoint is kept" in proc.stderr
    assert all(torch.isfinite(v).all() for k, v in state.items() if v.is_floating_point())


def test_identical_runs_write_identical_files(tmp_path):
    a, b = first_run(tmp_path / "a"), first_run(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- the shape of the files
def blocks(path):
    """The banner blocks ('# ---- name' up to the next banner) of a file's main part."""
    text = open(path).read()
    main = text[text.index('if __name__ == "__main__":'):]
    parts = re.split(r"\n(\s*# ---- [^\n]*)\n", main)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


SHARED = ["# ---- seeding, device, distributed", "# ---- data", "# ---- resume", "# ---- logging", "# ---- evaluation",
          "# ---- checkpoint", "# ---- cost: one forward pass of the same network on a training micro-batch",
          "# ---- log, evaluate, checkpoint (every method file ends its step with this block)", "# ---- summary"]


def generic_args(path):
    text = open(path).read()
    return text[text.index("class Args:"):text.index("    # method\n")]


def unused_imports(path):
    """Names a file imports at top level and never reads (what pyflakes would flag)."""
    tree = ast.parse(open(path).read())
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            imported |= {a.asname or a.name for a in node.names}
    return sorted(imported - {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)})


@pytest.mark.parametrize("method", METHODS)
def test_boilerplate_identical_across_method_files(method):
    ref = blocks(script("fm"))
    assert all(name in ref for name in SHARED)
    other = blocks(script(method))
    for name in SHARED:
        assert other.get(name) == ref[name], f"methods/{method}.py: block '{name}' differs from methods/fm.py"
    assert generic_args(script(method)) == generic_args(script("fm")), f"methods/{method}.py: generic Args differ"
    text = open(script(method)).read()
    assert len(text.splitlines()) < 450, f"methods/{method}.py is over 450 lines"
    assert "METHODS.md" not in text and "KERNEL.md" not in text and "../" not in text  # self-contained docstrings
    assert not unused_imports(script(method)), f"methods/{method}.py imports {unused_imports(script(method))} unused"


def test_readme_results_table_is_regenerated_from_results():
    proc = run_method(os.path.join(ROOT, "results", "make_table.py"), "--check", check=False)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("```bash\n")[1].split("```")[0].strip().splitlines()
    assert len(block) == 2 and "pytest" in block[1] and "methods/" in block[0]
    assert "n==1' README.md | sed -n 2p" in open(os.path.join(ROOT, ".ci", "run")).read()
