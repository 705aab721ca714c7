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
import warnings

import torch


def parse_args(Args):
    """tyro.cli(Args), except that with `--resume RUN` the run's args.json gives the defaults.
    Returns (args, overrides): the fields that differ from the resumed run's args.json."""
    import tyro

    argv, saved = sys.argv[1:], {}
    if "--resume" in argv and argv.index("--resume") + 1 < len(argv):
        path = argv[argv.index("--resume") + 1]
        run = path if os.path.isdir(path) else os.path.dirname(path)
        try:
            saved = json.load(open(os.path.join(run, "args.json"))) if os.path.isfile(os.path.join(run, "args.json")) else {}
        except (OSError, ValueError) as err:
            raise SystemExit(f"--resume {path}: unreadable args.json ({err})") from None
    fields = {f.name for f in dataclasses.fields(Args)}
    default = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields and k != "resume"})
    if "-h" in argv or "--help" in argv:
        _help(Args, default)
    args = tyro.cli(Args, default=default)
    overrides = {k: v for k, v in dataclasses.asdict(args).items() if k in saved and k not in ("resume", "out_dir")
                 and v != (tuple(saved[k]) if isinstance(saved[k], list) else saved[k])}
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
    """The generic flags every method file shares (its own flags are checked in the file)."""
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
        for stale in glob.glob(os.path.join(run_dir, "*.tmp*")):  # left by a killed write
            os.remove(stale)
    return rank, world, device, run_dir, ckpt_path


def check_net(args, info):
    """The DiT's shape constraints, named by flag (before a ValueError from inside the network)."""
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
    if state["step"] >= args.steps:
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


class RunLog:
    """metrics.jsonl (and TensorBoard / W&B when asked). On resume, rows after the checkpoint
    are dropped and a torn last line (a kill mid-write) is dropped with a warning; args.json is
    written for a new run only, and the overrides of a resumed run are logged as a row."""

    def __init__(self, args, run_dir, step, overrides, enabled=True):
        self.path, self.enabled, self.writer = os.path.join(run_dir, "metrics.jsonl"), enabled, None
        if not enabled:
            return
        rows = []
        if args.resume and os.path.exists(self.path):
            lines = open(self.path).read().splitlines()
            for i, line in enumerate(lines):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    if i < len(lines) - 1:
                        raise SystemExit(f"{self.path}: line {i + 1} is not JSON (only a torn last line is dropped)") from None
                    warnings.warn(f"{self.path}: dropped a torn last line (a kill mid-write)")
        with open(self.path + ".tmp", "w") as f:  # on resume keep only the rows up to the checkpoint
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
        os.replace(self.path + ".tmp", self.path)
        if not args.resume:
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=1)
        elif overrides:
            self.log({"step": step, "resumed_with": overrides})
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(run_dir)
        if args.track:
            import wandb

            self.wandb = wandb
            wandb.init(project=args.wandb_project, name=f"{args.exp_name}-{args.dataset}-{args.seed}", config=dataclasses.asdict(args))

    def log(self, row):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if self.writer is not None and isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(k, v, row["step"])
        if getattr(self, "wandb", None):
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])


def stop_if_nonfinite(terms, step, run_dir):
    """The NaN guard: one device sync per step. Stops before a bad update reaches the weights."""
    dev = next((v.device for v in terms.values() if torch.is_tensor(v)), "cpu")
    vals = [torch.as_tensor(v, dtype=torch.float32, device=dev).detach().reshape(()) for v in terms.values()]
    if bool(torch.isfinite(torch.stack(vals)).all()):
        return
    kept = (f"the last good checkpoint is kept in {run_dir}" if os.path.exists(os.path.join(run_dir, "ckpt.safetensors"))
            else "no checkpoint was written yet; check the data (--data-root) and --lr")
    raise SystemExit(f"step {step}: non-finite loss or gradient {({k: float(v) for k, v in terms.items()})}; {kept}")


def write_files(fn, what):
    """Runs a writer; a full disk or a read-only folder becomes one line (what is saved stays)."""
    try:
        return fn()
    except OSError as err:
        raise SystemExit(f"cannot write {what} ({err.strerror or err}); files written before are kept") from None


def copy_atomic(src, dst):
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        with open(src, "rb") as a, open(tmp, "wb") as b:
            b.write(a.read())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
