"""Run-folder mechanics shared by the method files: arguments and `--resume`, the distributed
set-up, the checkpoint's identity, the metrics log and the summary. Mechanism only: every method
decision stays in methods/*.py, whose training loop reads top to bottom.

A run folder `<out-dir>/<exp-name>/<dataset>/` knows what it is: its checkpoint names the method
file and the data set, `--resume` refuses another method's or data set's checkpoint, reuses the
run's args.json (a flag given on the command line overrides it, and the override is recorded in
metrics.jsonl; args.json keeps the original), and a finished run resumed with `--steps` <= its
step changes nothing. Every bad flag or file is a one-line SystemExit naming it.

Distributed runs (torchrun): `--batch-size` is the global batch, split over processes and
`--grad-accum` micro-batches; every micro-batch reseeds torch from (seed, step, its global index),
so the noise differs across ranks, a resumed run draws exactly what an uninterrupted run draws,
and 2 processes x 1 micro-batch compute the same gradient as 1 process x 2 micro-batches.
"""
import contextlib
import dataclasses
import glob
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

from common.dit import write_atomic  # noqa: F401 - also common.run.write_atomic (the kill tests patch it there)


def resume_arg(argv):
    """The value of `--resume RUN` or `--resume=RUN` in argv (None when absent)."""
    for i, a in enumerate(argv):
        if a == "--resume" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--resume="):
            return a[len("--resume="):]
    return None


def _field_ok(value, default):
    """Whether an args.json value has the type of the field's default (None defaults take a string)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and all(_field_ok(v, default[0]) for v in value) if default else isinstance(value, (list, tuple))
    return value is None or isinstance(value, str) if default is None or isinstance(default, str) else True


def _saved_args(path, Args):
    """(args.json of the run at `path`, its text, the args.json text the checkpoint recorded or None)."""
    run = path if os.path.isdir(path) else os.path.dirname(path) or "."
    ckpt = os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(ckpt):
        return {}, None, None  # setup() names the missing checkpoint
    name = os.path.join(run, "args.json")
    if not os.path.isfile(name):
        raise SystemExit(f"--resume {path}: no args.json in {run} (it holds the run's flags; restore it to resume)")
    try:
        text = open(name).read()
        saved = json.loads(text)
        assert isinstance(saved, dict)
    except (OSError, ValueError, AssertionError) as err:
        raise SystemExit(f"--resume {path}: {name} is not a JSON object of flags ({err or 'not a dict'})") from None
    defaults = Args()
    for k, v in saved.items():
        if hasattr(defaults, k) and not _field_ok(v, getattr(defaults, k)):
            raise SystemExit(f"--resume {path}: {name} has {k} = {v!r}, expected a {type(getattr(defaults, k)).__name__} "
                             f"like {getattr(defaults, k)!r}")
    try:
        from safetensors import safe_open

        with safe_open(ckpt, framework="pt") as f:
            recorded = json.loads((f.metadata() or {}).get("state", "{}")).get("/args_json")
    except Exception:  # noqa: BLE001 - a corrupt checkpoint is named by load_checkpoint
        recorded = None
    return saved, text, recorded


def parse_args(Args):
    """tyro.cli(Args), except that with `--resume RUN` (or `--resume=RUN`) the run's args.json gives
    the defaults. Returns (args, overrides): the fields that differ from the resumed run's args.json,
    plus, when args.json was edited since the checkpoint, {"args.json": {field: [checkpoint's, now]}}."""
    import tyro

    path = resume_arg(sys.argv[1:])
    saved, text, recorded = _saved_args(path, Args) if path else ({}, None, None)
    fields = {f.name for f in dataclasses.fields(Args)}
    default = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields and k != "resume"})
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        _help(Args, default)
    args = tyro.cli(Args, default=default)
    overrides = {k: v for k, v in dataclasses.asdict(args).items() if k in saved and k not in ("resume", "out_dir")
                 and v != (tuple(saved[k]) if isinstance(saved[k], list) else saved[k])}
    if recorded is not None and recorded != text:  # args.json edited by hand since the checkpoint: recorded, not hidden
        was = json.loads(recorded)
        overrides["args.json"] = {k: [was.get(k), saved.get(k)] for k in sorted({*was, *saved}) if was.get(k) != saved.get(k)}
    _check_generic(args)
    return args, overrides


def _help(Args, default):
    """--help: the method file's one-line description, then the method's own flags (the fields after
    `device`, the last shared one) in a box apart from the shared ones. Display only: parsing is tyro.cli(Args)."""
    import ast
    import inspect
    import textwrap
    from typing import Annotated

    import tyro

    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(Args))).body[0].body
    except (OSError, TypeError, SyntaxError):  # no source (a frozen build): the flags without their docstrings
        body = []
    helps = {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])  # each field's docstring
             if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    fs = dataclasses.fields(Args)
    cut = [f.name for f in fs].index("device") + 1
    group = lambda name, part: dataclasses.make_dataclass(name, [(f.name, Annotated[f.type, tyro.conf.arg(help=helps.get(f.name, ""))],  # noqa: E731
                                                                  dataclasses.field(default=getattr(default, f.name))) for f in part])
    method = os.path.basename(sys.argv[0]).removesuffix(".py")
    Help = dataclasses.make_dataclass("Help", [(f"{method}_flags", Annotated[group("M", fs[cut:]), tyro.conf.OmitArgPrefixes]),
                                               ("shared_flags_of_every_method_file", Annotated[group("S", fs[:cut]), tyro.conf.OmitArgPrefixes])])
    doc = (sys.modules["__main__"].__doc__ or "").split("\n\n")[0].replace("\n", " ")
    tyro.cli(Help, description=doc, args=["--help"])


def _check_generic(args):
    """The generic flags every method file shares (its own flags are checked in the file), and one
    check for every float field of the file: finite and within float32 (1e39 overflows in AdamW)."""
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, float) and not (math.isfinite(x) and abs(x) < 3e38):
                raise SystemExit(f"--{f.name.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, tuple) else v}: "
                                 "expected a finite number (within float32's range)")
    for f in dataclasses.fields(args):  # an interval [x_min, x_max]: an empty one would silently switch a feature off
        lo, hi = f.name, f.name[:-4] + "_max"
        if lo.endswith("_min") and hasattr(args, hi) and getattr(args, lo) > getattr(args, hi):
            raise SystemExit(f"--{lo.replace('_', '-')} {getattr(args, lo)} > --{hi.replace('_', '-')} {getattr(args, hi)}: "
                             "expected min <= max")
    if args.eval_samples < 2:
        raise SystemExit(f"--eval-samples {args.eval_samples}: expected at least 2 (a distance needs a covariance)")
    if not 0 <= args.seed < 2**31:
        raise SystemExit(f"--seed {args.seed}: expected an integer in [0, 2^31)")
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_samples", "eval_batch", "ckpt_every",
                 "hidden", "depth", "heads", "patch_size"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    for name in ("ema_decay", "label_dropout", "dropout"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise SystemExit(f"--lr {args.lr}: expected a finite positive learning rate")
    if not all(0 <= b < 1 for b in args.adam_betas) or not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise SystemExit(f"--adam-betas {args.adam_betas} / --weight-decay {args.weight_decay}: expected betas in [0, 1) and a weight decay >= 0")
    if not args.eval_steps or any(k <= 0 for k in args.eval_steps):
        raise SystemExit(f"--eval-steps {args.eval_steps}: expected one or more positive step counts")
    if args.precision not in ("auto", "fp32", "bf16") or args.device not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"--precision {args.precision} / --device {args.device}: expected auto|fp32|bf16 / auto|cpu|cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if not (math.isfinite(args.grad_clip) and args.grad_clip >= 0) or args.warmup < 0:
        raise SystemExit(f"--grad-clip {args.grad_clip} / --warmup {args.warmup}: expected values >= 0")
    for flag, module, extra in (("tensorboard", "torch.utils.tensorboard", "tensorboard"), ("track", "wandb", "wandb")):
        if getattr(args, flag):
            try:
                __import__(module)
            except ImportError:
                raise SystemExit(f"--{flag}: needs the optional package {extra} (pip install -e '.[track]')") from None


def setup(args, method):
    """Process group, device, TF32, the run folder. Returns (rank, world, device, run_dir, ckpt_path)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(f"--batch-size {args.batch_size}: the global batch must be divisible by {world} processes "
                         f"x --grad-accum {args.grad_accum}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    if args.precision == "auto":  # the papers' setting on a GPU; resolved here, so args.json (and a resume) keep it
        args.precision, args.tf32 = ("bf16", True) if device.type == "cuda" else ("fp32", args.tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    import common.eval  # evaluation runs under the run's precision
    common.eval.PRECISION = args.precision
    run_dir, ckpt_path = os.path.join(args.out_dir, args.exp_name, args.dataset), None
    if args.resume:
        ckpt_path = os.path.join(args.resume, "ckpt.safetensors") if os.path.isdir(args.resume) else args.resume
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"--resume {args.resume}: no training checkpoint there (expected a ckpt.safetensors file or a run folder holding one)")
        run_dir = os.path.dirname(ckpt_path) or "."
    elif os.path.exists(os.path.join(run_dir, "ckpt.safetensors")):  # never overwrite a run
        raise SystemExit(f"--out-dir {args.out_dir}: {run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another --out-dir / --exp-name")
    if rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            probe = os.path.join(run_dir, f".write_test{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as err:
            raise SystemExit(f"--out-dir {args.out_dir}: cannot write the run folder {run_dir} ({err.strerror})") from None
    return rank, world, device, run_dir, ckpt_path


def check_net(args, info):
    """The DiT's shape constraints, named by flag (before a ValueError from inside the network), and
    the evaluation flags that the data set would ignore."""
    latent = "mean" in info or args.dataset == "imagenet-latent"
    used = {"vae": latent, "inception": info["kind"] == "image" and args.dataset != "mnist", "fid_ref": info["kind"] == "image"}
    for name, ok in used.items():
        if getattr(args, name) is not None and not ok:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: --dataset {args.dataset} does not use it "
                             f"({'mnist is scored by its own digit CNN' if args.dataset == 'mnist' and name == 'inception' else 'only for ' + ('latent' if name == 'vae' else 'image') + ' data'}); drop the flag")
    if info["kind"] == "image" and (info["shape"][1] % args.patch_size or args.hidden % args.heads or (args.hidden // args.heads) % 2
                                    or args.hidden % 4):
        raise SystemExit(f"--patch-size {args.patch_size} / --heads {args.heads} / --hidden {args.hidden}: the image side "
                         f"{info['shape'][1]} must be divisible by the patch size, the hidden size by 4 and by the heads (even head dim)")


def load_checkpoint(path, method, args, config):
    """The training state at `path`, refused (one line) when it belongs to another method file,
    data set or network, or when the run already reached --steps."""
    from common.dit import load_state

    try:
        state = load_state(path)
    except Exception as err:  # safetensors raises its own error type for a corrupt header
        raise SystemExit(f"--resume {path}: not a readable training checkpoint ({(str(err).splitlines() or [''])[0][:200]})") from None
    old = json.load(open(os.path.join(os.path.dirname(path), "args.json"))) if os.path.isfile(os.path.join(os.path.dirname(path), "args.json")) else {}
    was = state.get("method", old.get("exp_name")), state.get("dataset", old.get("dataset"))
    if was[0] not in (None, method) or was[1] not in (None, args.dataset):
        raise SystemExit(f"--resume {path}: a {was[0]} run on {was[1]}, not a {method} run on --dataset {args.dataset}; "
                         "resume it with its own method file and data set")
    if state["config"] != config:
        diff = {k: (state["config"].get(k), config.get(k)) for k in config if state["config"].get(k) != config.get(k)}
        raise SystemExit(f"--resume {path}: the checkpoint's network differs in {diff} (checkpoint, requested); "
                         "a resumed run keeps its network: drop those flags")
    if state["step"] > args.steps or (state["step"] == args.steps and not undone(os.path.dirname(path) or ".", args.steps, args)):
        print(f"--resume {path}: the run is already at step {state['step']} >= --steps {args.steps}; nothing to do, nothing changed")
        sys.exit(0)
    return state


def ddp(module, world):
    """DistributedDataParallel for a trained network. broadcast_buffers=False: the DiT's only
    buffer (the fixed position embedding) is the same everywhere, and DDP's buffer broadcast
    inside torch.func.jvp is an in-place copy the transform refuses (pytorch #130932)."""
    if world == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)


def compiled(fn, args):
    """--compile: `fn` (a loss: the network's forwards, its JVPs and the loss, and through AOTAutograd
    its backward) under torch.compile, else `fn` itself. Attention is one node of the graph
    (kernels/attention_jvp.py), so the network has no graph break. fallback_random: inductor's own
    random numbers differ from eager's (the gradients by ~100%), eager's keep a run and its
    `--resume` the same numbers as without --compile up to rounding. The first steps compile (slow)."""
    if not args.compile:
        return fn
    if COMPILE_BACKEND != "inductor":
        return torch.compile(fn, backend=COMPILE_BACKEND)
    return torch.compile(fn, options={"fallback_random": True})


COMPILE_BACKEND = "inductor"  # tests use "aot_eager": the same Dynamo graphs and AOTAutograd, no code generation


def no_sync(modules, skip):
    """Within it, DDP modules do not all-reduce (all micro-batches but the last)."""
    stack = contextlib.ExitStack()
    for m in modules:
        if skip and hasattr(m, "no_sync"):
            stack.enter_context(m.no_sync())
    return stack


def micro_seed(seed, step, index):
    """The seed of one micro-batch: a function of (seed, step, global micro-batch index) only."""
    return (seed * 1_000_003 + step) * 4099 + index


def mean_terms(terms):
    """Average of the micro-batches' loss terms (dicts of 0-d tensors), still tensors; under
    torch.distributed also over the ranks (one all-reduce), so the log shows the global batch."""
    out = {k: sum(t[k] for t in terms) / len(terms) for k in terms[0]}
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return out
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.stack([torch.as_tensor(v).detach().to(dev, torch.float64) for v in out.values()])
    torch.distributed.all_reduce(flat)
    flat = flat / torch.distributed.get_world_size()
    return {k: flat[i].to(torch.as_tensor(v).dtype) for i, (k, v) in enumerate(out.items())}


def read_rows(path, strict=False):
    """The rows of a metrics.jsonl; a torn last line (a kill mid-write) is dropped with a warning."""
    rows, lines = [], open(path).read().splitlines() if os.path.exists(path) else []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1 and strict:
                raise SystemExit(f"{path}: line {i + 1} is not JSON (only a torn last line is dropped)") from None
            if strict:
                warnings.warn(f"{path}: dropped a torn last line (a kill mid-write)")
    return rows


def is_eval_row(row):
    """The row of a method file's evaluation (`eval_sec`; older runs: metric@K keys without a sampler suffix)."""
    return "eval_sec" in row or ("loss" not in row and "resumed_with" not in row and
                               any("@" in k and "_" not in k.split("@")[1] for k in row))


def undone(run_dir, step, args, rows=None):
    """What a kill at the checkpoint of `step` left undone in the run folder: the evaluation of
    that step ("eval": its metrics row, "grid": samples_<step>.png), the published model ("model":
    missing or older than the checkpoint) and, at the last step, "samples" (samples.png, a copy of
    the last grid) and "summary" (summary.json of this step)."""
    from common.dit import read_meta

    rows = read_rows(os.path.join(run_dir, "metrics.jsonl")) if rows is None else rows
    todo, grid = set(), os.path.join(run_dir, f"samples_{step:07d}.png")
    if step % args.eval_every == 0 or step == args.steps:
        if not any(r.get("step") == step and is_eval_row(r) for r in rows):
            todo.add("eval")
        if not os.path.isfile(grid):
            todo.add("grid")
    try:
        if read_meta(os.path.join(run_dir, "model.safetensors")).get("step", -1) < step:
            todo.add("model")
    except (OSError, ValueError):
        todo.add("model")
    if step == args.steps:
        same = lambda a, b: os.path.isfile(a) and os.path.isfile(b) and open(a, "rb").read() == open(b, "rb").read()
        if not same(grid, os.path.join(run_dir, "samples.png")):
            todo.add("samples")
        try:
            if json.load(open(os.path.join(run_dir, "summary.json")))["steps"] != step:
                todo.add("summary")
        except (OSError, ValueError, KeyError, TypeError):
            todo.add("summary")
    return todo


def take_lock(run_dir):
    """<run>/run.lock holds the PID (and host) of the process writing the run folder; a second
    run there is refused, a lock of a process that is gone (same host) is taken over. Removed at exit."""
    import atexit
    import socket

    path, me = os.path.join(run_dir, "run.lock"), f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid, host = (open(path).read().split() + ["", ""])[:2]
                pid = int(pid)
            except (OSError, ValueError):
                pid, host = 0, socket.gethostname()  # torn or emptied: nobody can own it
            alive = pid == os.getpid() and host == socket.gethostname()  # this process (a test running files in-process)
            if host == socket.gethostname() and pid > 0 and pid != os.getpid():
                try:
                    os.kill(pid, 0)
                    alive = None  # another live process
                except ProcessLookupError:
                    pass
                except PermissionError:
                    alive = None
            if alive is None or host != socket.gethostname():
                raise SystemExit(f"{run_dir}: another run (PID {pid} on {host}) is writing into this folder; wait for it to end, "
                                 f"or delete {path} if that process is gone") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale (its process is gone) or ours
            continue
        try:
            with os.fdopen(fd, "w") as f:
                f.write(me)
        except OSError as err:
            os.remove(path)
            raise SystemExit(f"cannot write {path} ({err.strerror or err}); files written before are kept") from None
        break
    else:
        raise SystemExit(f"{run_dir}: cannot take the lock {path}")

    def release():
        with contextlib.suppress(OSError):
            if open(path).read() == me:
                os.remove(path)

    atexit.register(release)
    return release


class Run:
    """The run folder while a method file trains (rank 0 writes): its lock, metrics.jsonl (and
    TensorBoard / W&B when asked), the checkpoint, the evaluations, the summary and what a kill left
    undone. On resume, rows after the checkpoint are dropped, a torn last line is dropped with a
    warning, the overrides (and a hand edit of args.json) are logged as a `resumed_with` row;
    args.json is written for a new run only.

    Order of the files of a step, so that a kill at any moment is finished by `--resume RUN`:
    model.safetensors, then ckpt.safetensors (the model is never older than the checkpoint); then
    the evaluation: grid samples_<step>.png, samples.png at the end, then its metrics row (with
    `eval_sec`); summary.json last. At start-up, what the checkpoint's step lacks (see `undone`) is
    redone before training goes on: the same numbers as an uninterrupted run. Every file is written
    atomically; metrics.jsonl is appended (a torn last line is dropped on resume)."""

    def __init__(self, args, method, run_dir, step, wall0, overrides, rank=0):
        self.args, self.method, self.dir, self.rank, self.step, self.wall0 = args, method, run_dir, rank, step, wall0
        _ARGS.append(args)
        self.path, self.writer, self.wandb, self.release = os.path.join(run_dir, "metrics.jsonl"), None, None, None
        self.times, self.last, self.metrics, self.ckpt_step, self.t0 = [], {}, {}, step if args.resume else None, time.time()
        self.rows = [r for r in read_rows(self.path, strict=rank == 0) if r["step"] <= step] if args.resume else []
        self.todo = undone(run_dir, step, args, self.rows) if args.resume else set()
        args_json = os.path.join(run_dir, "args.json")
        self.args_json = open(args_json).read() if args.resume and os.path.isfile(args_json) else json.dumps(dataclasses.asdict(args), indent=1)
        sys.excepthook = self._excepthook
        if rank != 0:
            return
        self.release = take_lock(run_dir)
        for stale in glob.glob(os.path.join(run_dir, "*.tmp*")):  # left by a killed write
            os.remove(stale)
        self._write(lambda: write_atomic(self.path, lambda tmp: open(tmp, "w").writelines(json.dumps(r) + "\n" for r in self.rows)),
                    "metrics.jsonl")  # on resume keep only the rows up to the checkpoint
        if not args.resume:
            self._write(lambda: write_atomic(args_json, lambda tmp: open(tmp, "w").write(self.args_json)), "args.json")
        elif overrides:
            self.log({"step": step, "resumed_with": overrides})
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(run_dir)
        if args.track:
            import wandb

            self.wandb = wandb
            wandb.init(project=args.wandb_project, name=f"{args.exp_name}-{args.dataset}-{args.seed}", config=dataclasses.asdict(args))

    def _write(self, fn, what):
        return write_files(fn, f"{what} in {self.dir}")

    def log(self, row):
        if self.rank != 0:
            return
        line = json.dumps(row) + "\n"
        self._write(lambda: open(self.path, "a").write(line), "metrics.jsonl")
        for k, v in row.items():
            if self.writer is not None and isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def evaluates(self, metrics_fn, grid_fn, note=None):
        """metrics_fn() evaluates (called on every rank), grid_fn(path) draws the sample grid; `note`
        says why a metric is skipped."""
        self.metrics_fn, self.grid_fn, self.note = metrics_fn, grid_fn, note

    def saves(self, model_fn, state_fn):
        """model_fn(path) writes model.safetensors (the EMA network); state_fn() is the training state
        (networks, optimizers, data stream) as a dict for ckpt.safetensors."""
        self.model_fn, self.state_fn = model_fn, state_fn

    def start(self, fwd_time, net):
        """Before the loop: what a kill at the checkpoint's step left undone, redone as it would have been."""
        self.fwd_time, self.params, self.t0 = fwd_time, sum(p.numel() for p in net.parameters()), time.time()
        if "model" in self.todo and self.rank == 0:
            self._write(lambda: self.model_fn(os.path.join(self.dir, "model.safetensors")), "model.safetensors")
        if self.step == self.args.steps:  # the summary's rows, as an uninterrupted run holds them
            at = [r for r in self.rows if r["step"] == self.step]
            self.last = next((r for r in at[::-1] if "loss" in r), {})
            self.metrics = next(({k: v for k, v in r.items() if k not in ("step", "eval_sec")} for r in at[::-1] if is_eval_row(r)), {})
        if self.todo & {"eval", "grid", "samples"}:
            self.evaluate(self.step, metrics="eval" in self.todo)

    def wall_time(self):
        return self.wall0 + time.time() - self.t0

    def log_step(self, step, terms, lr, sec, bar):
        """Every --log-every steps and at the last: the row of this step's terms, lr and cost."""
        self.step = step
        self.times.append(sec)
        if step % self.args.log_every == 0 or step == self.args.steps:
            med = float(np.median(self.times[-self.args.log_every:]))
            self.last = {"step": step, **{k: float(v) for k, v in terms.items()}, "lr": lr, "sec_per_step": med,
                         "fpe": med / (self.fwd_time * self.args.grad_accum)}
            bar.set_postfix(loss=f"{self.last['loss']:.4f}", fpe=f"{self.last['fpe']:.1f}")
            self.log(self.last)

    def checkpoint(self, step):
        """model.safetensors first, then ckpt.safetensors (atomic each)."""
        if self.rank == 0:
            from common.dit import save_state

            self._write(lambda: self.model_fn(os.path.join(self.dir, "model.safetensors")), "model.safetensors")
            state = {"method": self.method, "dataset": self.args.dataset, "step": step, **self.state_fn(),
                     "wall_time_s": self.wall_time(), "args_json": self.args_json}
            self._write(lambda: save_state(state, os.path.join(self.dir, "ckpt.safetensors")), "the checkpoint")
        self.ckpt_step = step

    def evaluate(self, step, metrics=True):
        """Metrics (every rank), then rank 0: the grid samples_<step>.png, samples.png at the last
        step, then the metrics row. metrics=False: only the files (the row exists)."""
        tic = time.time()
        if metrics:
            self.metrics = self.metrics_fn()
        if self.rank != 0:
            return
        grid = os.path.join(self.dir, f"samples_{step:07d}.png")  # kept, also when a resumed run goes on
        if metrics or not os.path.isfile(grid):
            self._write(lambda: write_atomic(grid, self.grid_fn), os.path.basename(grid))
        if step == self.args.steps:
            self._write(lambda: write_atomic(os.path.join(self.dir, "samples.png"), lambda tmp: copy_file(grid, tmp)), "samples.png")
        if metrics:
            self.log({"step": step, **self.metrics, "eval_sec": time.time() - tic})
            tqdm.write(f"step {step}: " + (", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items()) or "no metrics")
                       + (f" ({self.note})" if self.note else ""))

    def finish(self, device, world):
        """summary.json (atomic) when this process trained or the summary is missing; releases the lock."""
        import platform

        if self.rank == 0 and (self.times or "summary" in self.todo):
            rows = [r["sec_per_step"] for r in self.rows if "sec_per_step" in r]
            sec = float(np.median(self.times or rows or [math.nan]))
            args = self.args
            summary = {"method": self.method, "dataset": args.dataset, "seed": args.seed, "steps": self.step,
                       "wall_time_s": self.wall_time(), "sec_per_step": sec, "fwd_time_s": self.fwd_time,
                       "fpe": sec / (self.fwd_time * args.grad_accum), "params": self.params,
                       "final": {**self.last, **self.metrics}, "world_size": world,
                       "hardware": {"device": str(device), "cpu": platform.processor() or platform.machine(),
                                    "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": args.precision,
                                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
                       "command": " ".join(sys.argv)}
            self._write(lambda: write_atomic(os.path.join(self.dir, "summary.json"),
                                             lambda tmp: json.dump(summary, open(tmp, "w"), indent=1)), "summary.json")
            print(f"done: {self.dir}/summary.json, samples.png, metrics.jsonl")
        if self.release:
            self.release()
        sys.excepthook = sys.__excepthook__

    def _excepthook(self, kind, err, tb):
        """Ctrl-C and out-of-memory as one line; anything else as Python prints it."""
        kept = (f"the checkpoint of step {self.ckpt_step} is kept" if self.ckpt_step is not None else "no checkpoint was written yet")
        if issubclass(kind, KeyboardInterrupt):
            print(f"\ninterrupted at step {self.step}; {kept}; continue with --resume {self.dir}", file=sys.stderr)
        elif issubclass(kind, torch.OutOfMemoryError) or (issubclass(kind, RuntimeError) and "can't allocate memory" in str(err)):
            print(f"out of memory at step {self.step} ({(str(err).splitlines() or [''])[0][:160]}); lower --batch-size, raise "
                  f"--grad-accum or pass --grad-ckpt; {kept}", file=sys.stderr)
        else:
            sys.__excepthook__(kind, err, tb)


GENERIC = {"exp_name", "seed", "dataset", "data_root", "download", "out_dir", "steps", "batch_size", "grad_accum", "lr", "adam_betas",
           "weight_decay", "warmup", "grad_clip", "ema_decay", "hidden", "depth", "heads", "patch_size", "qk_norm", "dropout",
           "label_dropout", "precision", "tf32", "grad_ckpt", "compile", "log_every", "eval_every", "eval_samples", "eval_batch", "eval_steps",
           "vae", "inception", "fid_ref", "ckpt_every", "resume", "track", "wandb_project", "tensorboard", "device"}
_ARGS = []  # the running file's args (set by Run), for the NaN guard's message


def stop_if_nonfinite(terms, step, run_dir):
    """The NaN guard: one device sync per step. Stops before a bad update reaches the weights, naming
    the non-finite terms and the flags that feed the loss (the method's own, --lr, the teacher, the data)."""
    dev = next((v.device for v in terms.values() if torch.is_tensor(v)), "cpu")
    vals = [torch.as_tensor(v, dtype=torch.float32, device=dev).detach().reshape(()) for v in terms.values()]
    if bool(torch.isfinite(torch.stack(vals)).all()):
        return
    bad = {k: float(v) for k, v in terms.items() if not math.isfinite(float(v))}
    kept = (f"the last good checkpoint is kept in {run_dir}" if os.path.exists(os.path.join(run_dir, "ckpt.safetensors"))
            else "no checkpoint was written yet")
    feeds = "--lr and the data (--data-root)"
    if _ARGS:
        args = _ARGS[-1]
        own = [f"--{f.name.replace('_', '-')} {getattr(args, f.name)}" for f in dataclasses.fields(args) if f.name not in GENERIC]
        feeds = (f"the loss terms' flags ({', '.join(f for f in own if not f.startswith('--teacher')) or 'none'}), --lr {args.lr}, "
                 + (f"the teacher (--teacher {args.teacher}: are its outputs finite?), " if hasattr(args, "teacher") else "")
                 + f"the data (--dataset {args.dataset}, --data-root {args.data_root})")
    raise SystemExit(f"step {step}: non-finite {', '.join(f'{k} {v}' for k, v in bad.items())} "
                     f"(terms {({k: round(float(v), 6) for k, v in terms.items()})}); check {feeds}; {kept}")


def write_files(fn, what):
    """Runs a writer; a full disk or a read-only folder becomes one line (what is saved stays)."""
    from safetensors import SafetensorError

    try:
        return fn()
    except OSError as err:
        raise SystemExit(f"cannot write {what} ({err.strerror or err}); files written before are kept") from None
    except SafetensorError as err:  # safetensors' own error for a full disk (not an OSError)
        why = "No space left on device" if "StorageFull" in str(err) or "No space" in str(err) else str(err).splitlines()[0][:160]
        raise SystemExit(f"cannot write {what} ({why}); files written before are kept") from None


def copy_file(src, dst):
    with open(src, "rb") as a, open(dst, "wb") as b:
        b.write(a.read())
