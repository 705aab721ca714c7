"""Every method file as a user runs it, parametrized over methods/*.py so a new file is covered
the day it lands: on mnist, the file copied alone run straight with 2 micro-batches against the same
resumed (bit-identical) and against 2 processes as torchrun starts them (equal to float rounding);
imagenet-latent in bf16 with 2 micro-batches and an FID through a VAE (stand-ins); the boilerplate
blocks kept identical (the training loop's generic checks: test_loop.py). Runs are made in this
process or in forks of it wherever a fresh interpreter is not the point (each costs about 6 s of CPU
here); one test runs torchrun itself. Bad input and run-folder safety are tested on one file each
(the code is shared)."""
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

from conftest import ROOT, read_all, run_forked, run_here, run_inline, run_method

METHODS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "methods", "*.py")))
TINY = ["--steps", 4, "--batch-size", 32, "--log-every", 2, "--eval-every", 4, "--eval-samples", 200, "--ckpt-every", 2,
        "--hidden", 32, "--depth", 2]
TINY_IMG = ["--hidden", 32, "--depth", 2, "--heads", 2, "--patch-size", 7, "--batch-size", 8, "--eval-samples", 100]
# what a method needs to run in seconds (a method file may add its entry here)
FAST = {
    "mfd": ["--ode-step", 0.5, "--aux-ratio", 1],
    "shortcut": ["--denoise-timesteps", 4, "--bootstrap-every", 2],
    "rcm": ["--tangent-warmup", 0, "--ttur", 2],
}


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
    stand-in), Frechet distance. Run in this process (diffusers is imported once for all files)."""
    root, vae, incep = tiny_latents
    teacher = ["--teacher", tiny_latent_teacher] if teacher_flags(method, "mnist", "x") else []
    run_here(script(method), *TINY, *FAST.get(method, []), "--hidden", 32, "--depth", 2, "--heads", 2, "--patch-size", 2,
             "--batch-size", 8, "--steps", 2, "--eval-every", 2, "--eval-samples", 32, "--eval-steps", 1, "--dataset", "imagenet-latent",
             "--data-root", root, "--vae", vae, "--inception", incep, *teacher, "--precision", "bf16", "--grad-accum", 2,
             "--out-dir", tmp_path)
    summary = json.loads((tmp_path / method / "imagenet-latent" / "summary.json").read_text())
    assert summary["final"]["fid@1"] > 0 and (tmp_path / method / "imagenet-latent" / "samples.png").exists()
    assert summary["hardware"]["precision"] == "bf16"
    assert all(torch.isfinite(v).all() for v in read_all(tmp_path / method / "imagenet-latent" / "ckpt.safetensors").values() if v.is_floating_point())


def torchrun(*args, cwd=ROOT, pythonpath=ROOT):
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([exe, "--nproc_per_node", "2", *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pythonpath), "CLEANFLOW_CACHE": os.path.join(ROOT, ".cache")})
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


# what makes every network of a file train within the 2 steps of the runs below (dmd2: the generator
# only steps every --ttur steps, the discriminator only with the GAN on)
TRAIN_ALL = {
    "dmd2": ["--ttur", 2, "--gan-weight", 3e-3, "--backsim-steps", 2],
    "vsd": ["--gan-weight", 3e-3, "--backsim-steps", 2],
}


def ddp_flags(method, tiny_teacher, fid_ref):
    """mnist with the DiT, dropout on, every net trained, the smallest evaluation (its reference
    statistics from --fid-ref instead of a pass over the 5000 digits on every rank)."""
    return [*TINY, *TINY_IMG, *FAST.get(method, []), *TRAIN_ALL.get(method, []), "--dataset", "mnist", "--eval-every", 100,
            "--ckpt-every", 1, "--lr", 1e-3, "--dropout", 0.1, "--eval-samples", 16, "--fid-ref", fid_ref,
            *teacher_flags(method, "mnist", tiny_teacher)]


# checkpointed copies of logged numbers (dmd2's last generator-turn terms): under torchrun they are
# rank 0's micro-batch, not the global batch, as every logged loss term (issue 24: not all-reduced)
RANK0_LOG = ("/gen_log/",)


def assert_close(a, b, tol, skip=()):
    ta, tb = read_all(a / "ckpt.safetensors"), read_all(b / "ckpt.safetensors")
    assert ta.keys() == tb.keys()
    worst = {k: (ta[k].double() - tb[k].double()).abs().max().item() for k in ta
             if ta[k].is_floating_point() and ta[k].numel() and not k.startswith(skip)}
    assert max(worst.values()) <= tol, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def copy_alone(method, folder):
    """The file copied with common/ and kernels/ into an empty folder, as a user would copy it."""
    for part in ("common", "kernels"):
        shutil.copytree(os.path.join(ROOT, part), folder / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(script(method), folder / f"{method}.py")
    return folder / f"{method}.py"


@pytest.mark.parametrize("method", METHODS)
def test_copy_matches_ddp_and_a_resumed_run(method, tmp_path, tiny_teacher, mnist_fid_ref):
    """On mnist with the DiT (dropout on), the file copied alone with common/ and kernels/ into an
    empty folder and run there (in a fork of this process that imports only the copies; a fresh
    interpreter under torchrun: test_ddp_resume_restores_every_rank) with 2 micro-batches, straight
    for 2 steps (S): its summary, final grid and model file are there, and it matches
    1. the same stopped after step 1 and resumed with only --steps (R, in this process; every other
    flag from args.json): bit-identical checkpoint (every net, EMA, optimizer state, step, data
    stream) and identical logged numbers (`--resume` continues exactly); every part of the
    checkpoint changes in step 2 (each net trains: dmd2's generator and discriminator too);
    2. 2 processes x 1 micro-batch as torchrun starts them (D, forks of this process): the same
    global batch and the same noise per micro-batch, so every trained network (generator, fake,
    discriminator, auxiliary), its EMA and optimizer must agree with S to float rounding (an
    unsynchronized net, or ranks drawing the same noise, makes them differ); each metrics row
    written once (rank 0)."""
    flags = ddp_flags(method, tiny_teacher, mnist_fid_ref)
    run_here(script(method), *flags, "--steps", 1, "--grad-accum", 2, "--out-dir", tmp_path / "resumed")
    s, r, d = (tmp_path / x / method / "mnist" for x in ("straight", "resumed", "ddp"))
    step1 = read_all(r / "ckpt.safetensors")
    run_here(script(method), "--steps", 2, "--resume", r)
    (tmp_path / "copy").mkdir()
    copied = copy_alone(method, tmp_path / "copy")
    run_forked(copied, *flags, "--steps", 2, "--grad-accum", 2, "--out-dir", tmp_path / "straight", alone=tmp_path / "copy")
    run_forked(script(method), *flags, "--steps", 2, "--out-dir", tmp_path / "ddp", world=2)
    assert_close(s, r, 0.0)
    ls, lr_ = logged(s), logged(r)
    assert ls and all(ls[k] == lr_.get(k) for k in ls), (ls, lr_)  # the resumed run also logged its stop at step 1
    step2 = read_all(s / "ckpt.safetensors")
    part = lambda k: k.strip("/").split("/")[0]  # net, ema, opt, fake, disc, aux, ... (save_state's keys are paths)
    still = sorted({part(k) for k in step2} - {part(k) for k in step2 if k not in step1 or not torch.equal(step1[k], step2[k])})
    assert not still, f"not trained in step 2: {still}"
    assert_close(s, d, 1e-4, skip=RANK0_LOG)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in rows if "loss" in x or "fake_loss" in x]
    assert steps and steps == sorted(set(steps))  # each row written once, by rank 0
    assert json.loads((d / "summary.json").read_text())["world_size"] == 2
    summary, rows = json.loads((s / "summary.json").read_text()), [json.loads(x) for x in (s / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and summary["seed"] == 0 and summary["fpe"] > 0 and "sec_per_step" in summary["final"]
    evals = [x for x in rows if any(k.endswith("@1") for k in x)]
    assert len(evals) == 1 and set(evals[0]) - {"step", "eval_sec"} <= set(summary["final"])
    assert (s / "samples.png").stat().st_size > 1000 and (s / "model.safetensors").exists()


def test_ddp_resume_restores_every_rank(tmp_path, tiny_teacher, mnist_fid_ref):
    """torchrun (fresh interpreters) of dmd2 (the most state) copied alone with common/ and kernels/
    into an empty folder, stopped after step 1 and resumed, against one process run straight: a
    resume restoring rank 0's data position or noise on every rank makes them differ. The code is
    shared, so one file is enough; the other files run as torchrun starts them in
    test_copy_matches_ddp_and_a_resumed_run."""
    flags = ddp_flags("dmd2", tiny_teacher, mnist_fid_ref)
    a, b = tmp_path / "ddp", tmp_path / "one"
    (tmp_path / "copy").mkdir()
    copied = copy_alone("dmd2", tmp_path / "copy")
    torchrun(copied, *flags, "--steps", 1, "--out-dir", a, cwd=tmp_path / "copy", pythonpath=tmp_path / "copy")
    torchrun(copied, *flags, "--steps", 2, "--resume", a / "dmd2" / "mnist", cwd=tmp_path / "copy", pythonpath=tmp_path / "copy")
    run_here(script("dmd2"), *flags, "--steps", 2, "--grad-accum", 2, "--out-dir", b)
    assert_close(a / "dmd2" / "mnist", b / "dmd2" / "mnist", 1e-4, skip=RANK0_LOG)


def test_copies_of_common_and_kernels_shadow_the_installed_ones(tmp_path):
    for part in ("common", "kernels"):
        shutil.copytree(os.path.join(ROOT, part), tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    probe = tmp_path / "where.py"
    probe.write_text("import common, kernels; print(common.__file__); print(kernels.__file__)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600).stdout
    assert out.count(str(tmp_path)) == 2, out  # the copies are used, not the repo's (pip install -e .)


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


DROPS = [m for m in METHODS if "\ndef drop_labels(y, null, args):" in open(os.path.join(ROOT, "methods", f"{m}.py")).read()]


@pytest.mark.parametrize("method", DROPS)
def test_label_dropout_drops_at_its_rate_and_the_loop_uses_it(method):
    # the per-row label dropout of the from-data files: a fraction --label-dropout of the rows go to the null class,
    # the others keep their label, and the training loop calls it on every micro-batch
    from conftest import load_method

    m = load_method(method)
    args, null = m.Args(), 10
    assert args.label_dropout > 0
    y = torch.arange(20000) % null
    torch.manual_seed(0)
    out = m.drop_labels(y, null, args)
    dropped = out == null
    assert abs(dropped.float().mean().item() - args.label_dropout) < 0.01 and torch.equal(out[~dropped], y[~dropped])
    assert "y = drop_labels(y, null, args)" in open(os.path.join(ROOT, "methods", f"{method}.py")).read()
