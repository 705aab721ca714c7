"""The project's GPU check: one script, one call on a lent GPU, a JSON and a markdown report.

    python results/gpu/check.py --out DIR            (on a GPU: at most about 8 minutes on one H200)
    python results/gpu/check.py --dry-run --out DIR  (every section at tiny shapes on the CPU; a test runs it)

Sections (each time-boxed; an error or timeout in one is recorded and the next runs):
  0 environment: GPU, driver, torch, Triton, the packages the method files need
  1 kernel correctness against a float64 reference: o, do and all six gradients of the fused
    attention_jvp; the two-pass tangent of sdpa under torch.func.jvp and under forward-mode AD, and its
    backward; a whole DiT (forward + JVP + backward) on the Triton path against the float64 reference
    path. Shapes (2,16,256,72) and (2,12,256,64) as views of one qkv tensor (the DiT's layout),
    (1,4,1000,128), causal (N 300, M 257, D 64); fp32 (IEEE dots), tf32, bf16, fp16
  2 attention speed in bf16 (triton.testing.do_bench, median): PyTorch's fused forward ("flash"), our
    Triton forward, fused forward+JVP, two-pass JVP (torch.func.jvp of sdpa), naive torch.func.jvp
    through math attention, backward through (o, do); time, TFLOP/s, peak memory above the inputs
  3 training-step throughput with the method files' own losses (bf16 autocast, TF32, fused AdamW):
    fm, MeanFlow and TVM on DiT-B/2 and XL/2 (ImageNet 256 latents: 4x32x32, patch 2)
  4 mnist in bf16 with the method files run as a user runs them: 300 steps of meanflow and 200 of tvm
    (the reference runs' DiT and budget); losses against the CPU reference runs at the same step
  5 the FID pipeline's time split (sampling / VAE decode / Inception / Frechet distance) with
    random-weight stand-ins of SD-VAE (diffusers AutoencoderKL, SD's config) and Inception-v3
    (torchvision's architecture, TorchScript): their weights cannot travel

The GPU machine has no tyro, clean-fid, diffusers or mlxtend: `results/gpu/wheels.sh` downloads them
as wheels into .wheels/ (git-ignored), which travels with the run and is installed into /tmp there.
Nothing here writes into the repository except --out.

On this workplace's lent H200 (device tool): the tracked tree is ~160 MB (run weights and images) against the
tool's 64 MiB, so run from a branch whose index drops them (`git rm -r --cached` of results/**/*.safetensors and
*.png, both added to .gitignore there: ~3.5 MB), with carry [".wheels"] and the command
    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
    --target /tmp/site .wheels/*.whl && export PYTHONPATH=/tmp/site || exit 3; export PYTHONUNBUFFERED=1
    CLEANFLOW_CACHE=$PWD/.cache; python3 results/gpu/check.py --out $OUT --budget 480 2>&1 | tee $OUT/log.txt
and timeout_s 560; then copy the report into results/gpu/ and commit it on main.
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import kernels.attention_jvp as A  # noqa: E402

T0 = time.time()


# ---------------------------------------------------------------- helpers
def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn, dry):
    """Median milliseconds of fn() (events on CUDA via triton.testing.do_bench; host clock on CPU)."""
    if dry:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_mb(fn, dry):
    """Peak CUDA memory (MB) above what was allocated before fn() ran (None on CPU)."""
    if dry:
        return None
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel(a, b):
    """||a - b|| / ||b|| in float64 (NaN/inf anywhere gives inf)."""
    if a is None or b is None:
        return None
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def qkv_views(B, H, N, D, dtype, device, gen):
    """q, k, v as (B, H, N, D) views of one [B, N, 3, H, D] tensor, exactly as the DiT's attention makes them."""
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=torch.float32, generator=gen).to(dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


class Report:
    def __init__(self, out, dry):
        self.out, self.dry = out, dry
        self.data = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "dry_run": dry, "sections": {}}
        self.md = []

    def section(self, key, title, rows, notes=(), seconds=None, error=None):
        self.data["sections"][key] = {"title": title, "rows": rows, "notes": list(notes), "seconds": seconds, "error": error}
        self.write()

    def write(self):
        os.makedirs(self.out, exist_ok=True)
        name = self.data.get("name", "report")
        for ext, text in ((".json", json.dumps(self.data, indent=1, default=str)), (".md", self.markdown())):
            tmp = os.path.join(self.out, f".{name}{ext}.tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.out, name + ext))

    def markdown(self):
        d = self.data
        lines = [f"# GPU check: {d.get('gpu', '?')}, {d['started']}", "",
                 "Written by `results/gpu/check.py`" + (" with `--dry-run` (CPU, tiny shapes: checks the script, measures nothing)" if d["dry_run"] else "")
                 + f"; total {d.get('total_s', 0):.0f} s.", ""]
        for key, s in d["sections"].items():
            lines += [f"## {key}. {s['title']}" + (f" ({s['seconds']:.0f} s)" if s["seconds"] is not None else ""), ""]
            if s["error"]:
                lines += ["**error:**", "", "```", s["error"].strip()[-2000:], "```", ""]
            if s["rows"]:
                cols = list(dict.fromkeys(k for r in s["rows"] for k in r))
                lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                for r in s["rows"]:
                    lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
                lines.append("")
            lines += [f"- {n}" for n in s["notes"]] + ([""] if s["notes"] else [])
        return "\n".join(lines) + "\n"


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0 or math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------- 0 environment
def s0_env(dev, dry):
    rows = [{"item": "python", "value": sys.version.split()[0]}, {"item": "torch", "value": torch.__version__},
            {"item": "cuda (torch)", "value": torch.version.cuda}, {"item": "platform", "value": platform.platform()}]
    try:
        import triton
        rows.append({"item": "triton", "value": triton.__version__})
    except Exception as err:  # noqa: BLE001
        rows.append({"item": "triton", "value": f"missing ({err})"})
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        rows += [{"item": "gpu", "value": p.name}, {"item": "compute capability", "value": f"{p.major}.{p.minor}"},
                 {"item": "multiprocessors", "value": p.multi_processor_count},
                 {"item": "memory GiB", "value": round(p.total_memory / 2**30, 1)},
                 {"item": "shared memory per block (opt-in)", "value": A.smem_budget(dev)}]
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
            rows.append({"item": "nvidia-smi: driver, sm clock, max sm clock, power limit, temp", "value": smi})
        except Exception as err:  # noqa: BLE001
            rows.append({"item": "nvidia-smi", "value": f"failed ({err})"})
    for name in ("tyro", "cleanfid", "diffusers", "mlxtend", "safetensors", "numpy", "scipy"):
        try:
            mod = __import__(name)
            rows.append({"item": f"package {name}", "value": getattr(mod, "__version__", "present")})
        except Exception as err:  # noqa: BLE001
            rows.append({"item": f"package {name}", "value": f"missing ({type(err).__name__})"})
    rows.append({"item": "attention dispatch (module BACKEND, PRIMAL)", "value": f"{A.BACKEND}, {getattr(A, 'PRIMAL', '-')}"})
    return rows, []


# ---------------------------------------------------------------- 1 correctness
TOL = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 3e-2, "fp16": 1e-2}  # ||err|| / ||ref|| bounds (METHOD: tf32 ~3e-4, bf16 1e-3..1e-2)
DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attn_case(shape, causal, prec, dev, gen, views, primal="auto"):
    """Errors of the Triton path against the float64 closed form for one shape and precision. `primal`: who
    computes sdpa's primal forward and plain backward (auto: PyTorch's fused attention on CUDA; kernel: ours)."""
    A.PRIMAL = primal
    try:
        return _attn_case(shape, causal, prec, dev, gen, views, primal)
    finally:
        A.PRIMAL = "auto"


def _attn_case(shape, causal, prec, dev, gen, views, primal):
    B, H, N, D = shape[:4]
    M = shape[4] if len(shape) > 4 else N
    dt = DTYPE[prec]
    if views and M == N:
        q, k, v = qkv_views(B, H, N, D, dt, dev, gen)
        dq, dk, dv = qkv_views(B, H, N, D, dt, dev, gen)
    else:
        mk = lambda n: torch.randn(B, H, n, D, device=dev, generator=gen).to(dt)  # noqa: E731
        q, k, v, dq, dk, dv = mk(N), mk(M), mk(M), mk(N), mk(M), mk(M)
    g, gt = torch.randn(B, H, N, D, device=dev, generator=gen).to(dt), torch.randn(B, H, N, D, device=dev, generator=gen).to(dt)
    x64 = [a.detach().double() for a in (q, k, v, dq, dk, dv)]
    o_r, do_r, lse_r, mu_r = A.attention_jvp_reference(*x64, causal=causal)
    grads_r = A.attention_backward_reference(*x64, o_r, do_r, lse_r, mu_r, g.double(), gt.double(), causal=causal)
    plain_r = A.attention_backward_reference(*x64[:3], None, None, None, o_r, None, lse_r, None, g.double(), None, causal=causal)[:3]
    row = {"shape": "x".join(map(str, (B, H, N, M, D))) + (" causal" if causal else "") + (" qkv-views" if views and M == N else ""), "prec": prec,
           "sdpa primal": (A.primal_kind(q, k, v, causal) if hasattr(A, "primal_kind") else None) or "ours"}
    ins = [a.detach().clone().requires_grad_(True) for a in (q, k, v, dq, dk, dv)]
    # fused forward + JVP and the backward through both outputs
    o, do = A.attention_jvp(*ins, causal=causal)
    gr = torch.autograd.grad((o.float() * g.float()).sum() + (do.float() * gt.float()).sum(), ins)
    row["o"], row["do"] = rel(o, o_r), rel(do, do_r)
    row["grads fused (max of 6)"] = max(rel(a, b) for a, b in zip(gr, grads_r))
    # two-pass: torch.func.jvp of sdpa, then backward through (o, do) with the tangents as inputs
    f = lambda a, b, c: A.sdpa(a, b, c, causal=causal)  # noqa: E731
    o2, do2 = torch.func.jvp(f, tuple(ins[:3]), tuple(ins[3:]))
    gr2 = torch.autograd.grad((o2.float() * g.float()).sum() + (do2.float() * gt.float()).sum(), ins)
    row["do two-pass (func.jvp)"] = rel(do2, do_r)
    row["grads two-pass (max of 6)"] = max(rel(a, b) for a, b in zip(gr2, grads_r))
    fwAD = torch.autograd.forward_ad
    with fwAD.dual_level():
        o3, do3 = fwAD.unpack_dual(A.sdpa(*(fwAD.make_dual(a.detach(), t.detach()) for a, t in zip(ins[:3], ins[3:])), causal=causal))
    row["do forward-AD"] = rel(do3, do_r)
    pl = [a.detach().clone().requires_grad_(True) for a in (q, k, v)]
    op = A.sdpa(*pl, causal=causal)
    gp = torch.autograd.grad((op.float() * g.float()).sum(), pl)
    row["o plain"] = rel(op, o_r)
    row["grads plain (max of 3)"] = max(rel(a, b) for a, b in zip(gp, plain_r))
    vals = [x for key, x in row.items() if key not in ("shape", "prec", "sdpa primal")]
    row["pass"] = all(x is not None and x <= TOL[prec] for x in vals)
    return row


def whole_dit(dev, dry, gen):
    """A DiT (forward + JVP along (x, t) + backward) on the Triton path against the float64 reference path."""
    from common.dit import DiT
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden=64, depth=2, heads=2, num_classes=10) if dry else \
        dict(input_size=32, patch_size=2, in_channels=4, hidden=1152, depth=2, heads=16, num_classes=1000)
    torch.manual_seed(0)
    net = DiT(**cfg).to(dev)
    with torch.no_grad():  # adaLN-zero starts at an exact zero output: give every weight a random value
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, device=dev, generator=gen))
    B, s = 4, cfg["input_size"]
    x, v = torch.randn(B, 4, s, s, device=dev, generator=gen), torch.randn(B, 4, s, s, device=dev, generator=gen)
    t = torch.rand(B, device=dev, generator=gen)
    y = torch.randint(0, cfg["num_classes"], (B,), device=dev, generator=gen)

    def run(model, backend, amp):
        A.BACKEND = backend
        A.PRIMAL = "kernel" if backend == "reference" else "auto"  # the float64 reference: closed form throughout
        try:
            model.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                dtp = next(model.parameters()).dtype
                u, du = torch.func.jvp(lambda a, b: model(a, b, b * 0.5, y), (x.to(dtp), t.to(dtp)), (v.to(dtp), torch.ones_like(t, dtype=dtp)))
                ((u.float() ** 2).mean() + (du.float() ** 2).mean()).backward()
            return u.detach(), du.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        finally:
            A.BACKEND, A.PRIMAL = "auto", "auto"

    import copy
    ref = run(copy.deepcopy(net).double(), "reference", False)
    rows = []
    backend = "reference" if dry else "triton"
    for prec, amp in (("fp32", False), ("bf16", True)):
        if prec == "fp32" and dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        got = run(net, backend, amp)
        r = {"shape": f"DiT h{cfg['hidden']} d{cfg['depth']} heads {cfg['heads']} N {(s // 2) ** 2} B {B}", "prec": prec,
             "u": rel(got[0], ref[0]), "du": rel(got[1], ref[1]), "weight grads": rel(got[2], ref[2])}
        r["pass"] = all(r[k] <= (1e-4 if prec == "fp32" else 5e-2) for k in ("u", "du", "weight grads"))
        rows.append(r)
    return rows


def s1_correct(dev, dry):
    gen = torch.Generator(device=dev).manual_seed(0)
    if dry:
        cases = [((2, 2, 16, 8), False, "fp32", True, "auto"), ((1, 2, 12, 8, 9), True, "fp32", False, "auto")]
    else:
        cases = [((2, 16, 256, 72), False, p, True, "auto") for p in ("fp32", "tf32", "bf16", "fp16")]
        cases += [((2, 16, 256, 72), False, "bf16", True, "kernel"), ((2, 12, 256, 64), False, "bf16", True, "kernel")]
        cases += [((2, 12, 256, 64), False, p, True, "auto") for p in ("fp32", "bf16")]
        cases += [((1, 4, 1000, 128), False, "bf16", False, "auto"), ((1, 2, 300, 64, 257), True, "bf16", False, "auto"),
                  ((1, 2, 256, 64, 256), True, "bf16", False, "auto")]
    rows = []
    for shape, causal, prec, views, primal in cases:
        if not dry:
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        try:
            rows.append(attn_case(shape, causal, prec, dev, gen, views, primal))
        except Exception as err:  # noqa: BLE001
            rows.append({"shape": str(shape), "prec": prec, "pass": False, "error": f"{type(err).__name__}: {str(err)[:200]}"})
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = False
    rows += whole_dit(dev, dry, gen)
    notes = [f"relative error ||x - ref|| / ||ref|| against float64 closed forms; bounds: {TOL} (DiT: 1e-4 fp32, 5e-2 bf16 autocast)",
             "fp32 = IEEE dots (TF32 off), tf32 = torch.backends.cuda.matmul.allow_tf32 on (the kernel follows it)"]
    return rows, notes


# ---------------------------------------------------------------- 2 attention speed
def naive(q, k, v, causal=False):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return s.softmax(-1) @ v


def s2_speed(dev, dry):
    dt = torch.float32 if dry else torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(1)
    if dry:
        shapes = [("dit", 2, 2, 16, 8)]
    else:
        shapes = [("DiT-XL/2 (qkv views)", 32, 16, 256, 72), ("DiT-B/2 (qkv views)", 32, 12, 256, 64)]
        shapes += [(f"N {n}", b, 16, n, 64) for n, b in ((1024, 8), (4096, 2), (8192, 1), (16384, 1))]
    rows = []
    fwd_triton = getattr(A, "_triton_forward", None)
    for label, B, H, N, D in shapes:
        if label.startswith("DiT") or dry:
            q, k, v = qkv_views(B, H, N, D, dt, dev, gen)
            dq, dk, dv = qkv_views(B, H, N, D, dt, dev, gen)
        else:
            q, k, v, dq, dk, dv = (torch.randn(B, H, N, D, device=dev, generator=gen).to(dt) for _ in range(6))
        g, gt = torch.randn_like(q), torch.randn_like(q)
        flops_fwd = 4 * B * H * N * N * D  # two matmuls
        ins = [a.detach().clone().requires_grad_(True) for a in (q, k, v, dq, dk, dv)]

        def bwd(fused):
            def run():
                o, do = A.attention_jvp(*ins) if fused else torch.func.jvp(A.sdpa, tuple(ins[:3]), tuple(ins[3:]))
                return torch.autograd.grad((o * g).sum() + (do * gt).sum(), ins)
            return run

        def naive_bwd():
            o, do = torch.func.jvp(naive, tuple(ins[:3]), tuple(ins[3:]))
            return torch.autograd.grad((o * g).sum() + (do * gt).sum(), ins)

        cases = {
            "flash fwd": (lambda: F.scaled_dot_product_attention(q, k, v), flops_fwd),
            "ours fwd (Triton)": ((lambda: fwd_triton(q, k, v, None, None, None, False, 1 / math.sqrt(D))) if fwd_triton and not dry else
                                  (lambda: A.sdpa(q, k, v)), flops_fwd),
            "sdpa fwd (what the DiT calls)": (lambda: A.sdpa(q, k, v), flops_fwd),
            "fused fwd+jvp": (lambda: A.attention_jvp(q, k, v, dq, dk, dv), 2.5 * flops_fwd),
            "two-pass jvp (func.jvp of sdpa)": (lambda: torch.func.jvp(A.sdpa, (q, k, v), (dq, dk, dv)), 2.5 * flops_fwd),
            "naive func.jvp (math attention)": (lambda: torch.func.jvp(naive, (q, k, v), (dq, dk, dv)), 2.5 * flops_fwd),
            "fused fwd+jvp+bwd(o,do)": (bwd(True), 2.5 * flops_fwd * 3),
            "two-pass jvp+bwd(o,do)": (bwd(False), 2.5 * flops_fwd * 3),
            "naive jvp+bwd(o,do)": (naive_bwd, 2.5 * flops_fwd * 3),
        }
        base = {}
        for name, (fn, flops) in cases.items():
            r = {"shape": f"{label} {B}x{H}x{N}x{D}", "case": name}
            try:
                grad_ctx = torch.enable_grad() if "bwd" in name else torch.no_grad()
                with grad_ctx:
                    ms = bench(fn, dry)
                    mem = peak_mb(fn, dry)
                r.update({"ms": ms, "TFLOP/s (nominal)": flops / ms / 1e9, "peak MB": mem})
                base[name] = (ms, mem)
            except torch.OutOfMemoryError:
                r["ms"] = "OOM"
            except Exception as err:  # noqa: BLE001
                r["ms"] = f"{type(err).__name__}: {str(err)[:120]}"
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(r)
        fl, fu, nv = base.get("flash fwd"), base.get("fused fwd+jvp"), base.get("naive func.jvp (math attention)")
        tp = base.get("two-pass jvp (func.jvp of sdpa)")
        summ = {"shape": f"{label} {B}x{H}x{N}x{D}", "case": "RATIOS"}
        if fl and fu:
            summ["fused fwd+jvp / flash fwd (goal <= 4)"] = fu[0] / fl[0]
        if nv and fu:
            summ["naive / fused time (goal >= 2.5 at N >= 4k)"] = nv[0] / fu[0]
        if nv and tp:
            summ["naive / two-pass time"] = nv[0] / tp[0]
        if nv and fu and nv[1] and fu[1]:
            summ["naive / fused memory (goal >= 20 at 16k)"] = nv[1] / fu[1]
        rows.append(summ)
    notes = ["bf16 inputs; median of triton.testing.do_bench (warm-up 25 ms, rep 100 ms); peak MB: torch.cuda peak above the inputs",
             "TFLOP/s nominal: 4BHN^2D per forward, 2.5x that for forward+JVP, 3x more with the backward (a yardstick, not counted work)",
             "'ours fwd (Triton)' calls the Triton forward kernel directly; 'sdpa fwd' is what the DiT's attention runs"]
    return rows, notes


# ---------------------------------------------------------------- 3 training steps
def load_method(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"method_{name}", os.path.join(ROOT, "methods", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_step_case(method, size, batch, dev, dry, grad_ckpt=False, reps=5, compile=False):
    import copy

    import common.run as R
    from common.dit import DiT
    mod = load_method(method)
    args = mod.Args()
    args.compile = compile  # --compile: the file's loss with its backward under torch.compile (common/run.py)
    R.COMPILE_BACKEND = "aot_eager" if dry else "inductor"  # the dry run checks the wiring, not inductor's code generation
    loss_fn = R.compiled(getattr(mod, f"{method}_loss"), args)
    cfgs = {"B/2": (768, 12, 12), "XL/2": (1152, 28, 16), "tiny": (32, 1, 2)}
    hidden, depth, heads = cfgs[size]
    res, ncls = (8, 10) if dry else (32, 1000)
    kw = dict(n_cond=1, qk_norm=args.qk_norm, norm=args.norm, modnorm=args.modnorm) if method == "tvm" else dict(qk_norm=args.qk_norm)
    torch.manual_seed(0)
    net = DiT(res, 2, 4, hidden, depth, heads, 4.0, ncls, **kw).to(dev)
    net.grad_ckpt = grad_ckpt
    target = copy.deepcopy(net).requires_grad_(False).eval() if method == "tvm" else None
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=dev.type == "cuda")
    x = torch.randn(batch, 4, res, res, device=dev)
    y = torch.randint(0, ncls, (batch,), device=dev)
    amp = torch.autocast(dev.type, torch.bfloat16, enabled=not dry)

    def step():
        with amp:
            if method == "fm":
                loss, _ = loss_fn(net, x, y, args)
            elif method == "meanflow":
                loss, _ = loss_fn(net, x, y, args, ncls)
            else:
                loss, _ = loss_fn(net, target, x, y, args, ncls)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(1 if dry else 2):
        step()
    sync()
    warm = time.perf_counter() - t0  # with --compile: the compilation
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    ms = (time.perf_counter() - t0) / reps * 1e3
    row = {"method": method, "DiT": size, "batch/GPU": batch, "grad ckpt": grad_ckpt, "compile": compile, "warm-up s": warm,
           "ms/step": ms, "images/s": batch / ms * 1e3,
           "peak GB": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
           "params M": sum(p.numel() for p in net.parameters()) / 1e6}
    try:  # GPU-kernel time over wall time, from the profiler over 2 steps
        from torch.profiler import ProfilerActivity, profile
        assert dev.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(2):
                step()
            sync()
            wall = time.perf_counter() - t0
        kern = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
        row["GPU busy (kernel time / wall)"] = kern / wall
        row["kernels/step"] = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / 2
    except Exception as err:  # noqa: BLE001
        row["GPU busy (kernel time / wall)"] = None if dev.type != "cuda" else f"profiler: {type(err).__name__}"
    return row


def s3_train(dev, dry, budget_end):
    if dry:
        plan = [("fm", "tiny", 2, False), ("meanflow", "tiny", 2, False), ("meanflow", "tiny", 2, True), ("tvm", "tiny", 2, False),
                ("meanflow", "tiny", 2, "compile")]
    else:  # "compile": --compile instead of --grad-ckpt (tvm refuses --compile: its dual-number JVP does not trace)
        plan = [("fm", "B/2", 32, False), ("meanflow", "B/2", 32, False), ("meanflow", "B/2", 256, False),
                ("meanflow", "B/2", 256, True), ("tvm", "B/2", 32, False), ("tvm", "B/2", 64, False),
                ("meanflow", "XL/2", 32, False), ("tvm", "XL/2", 32, False), ("fm", "B/2", 32, "compile"), ("meanflow", "B/2", 32, "compile")]
    rows = []
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for method, size, batch, ckpt in plan:
        if time.time() > budget_end:
            rows.append({"method": method, "DiT": size, "batch/GPU": batch, "ms/step": "skipped (section time box)"})
            continue
        try:
            rows.append(train_step_case(method, size, batch, dev, dry, ckpt is True, compile=ckpt == "compile"))
        except torch.OutOfMemoryError:
            rows.append({"method": method, "DiT": size, "batch/GPU": batch, "grad ckpt": ckpt, "ms/step": "OOM"})
        except Exception as err:  # noqa: BLE001
            rows.append({"method": method, "DiT": size, "batch/GPU": batch, "ms/step": f"{type(err).__name__}: {str(err)[:160]}"})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    notes = ["one process, bf16 autocast with fp32 master weights, TF32 on, fused AdamW; each method file's own loss function on random "
             "latents 4x32x32 (ImageNet 256 through SD-VAE), patch 2 (256 tokens), 1000 classes; median-free mean of 5 steps after 2 warm-up steps",
             "compile True: the loss with its backward under torch.compile (inductor, fallback_random) as --compile does; "
             "warm-up s: the first steps' wall time (with compile: the compilation); eager otherwise",
             "GPU busy: CUDA kernel time summed by torch.profiler over 2 steps / their wall time under the profiler (1.0 = never waiting on the host; the profiler adds host time, so this is a lower bound)"]
    return rows, notes


# ---------------------------------------------------------------- 4 mnist runs
def reference_loss(method, step):
    """Mean logged loss of the CPU reference run in the 100 steps up to `step`."""
    path = os.path.join(ROOT, "results", method, "mnist", "metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    vals = [r["loss"] for r in rows if "loss" in r and step - 100 < r["step"] <= step]
    return sum(vals) / len(vals) if vals else None


def reference_flags(method):
    """The flags of the CPU reference run results/<method>/mnist (args.json) that differ from the file's defaults,
    less the run-folder, budget and evaluation ones."""
    import dataclasses
    ref = json.load(open(os.path.join(ROOT, "results", method, "mnist", "args.json")))
    skip = {"steps", "out_dir", "eval_every", "eval_samples", "eval_batch", "ckpt_every", "log_every", "device", "precision", "resume",
            "exp_name", "tf32", "track", "tensorboard", "dataset", "data_root"}
    out = []
    for f in dataclasses.fields(load_method(method).Args):
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        if f.name in skip or f.name not in ref or ref[f.name] == default:
            continue
        val = ref[f.name]
        flag = "--" + f.name.replace("_", "-")
        if isinstance(val, bool):
            out.append(flag if val else "--no-" + flag[2:])
        elif isinstance(val, list):
            out += [flag, *map(str, val)]
        elif val is not None:
            out += [flag, str(val)]
    return out


def s4_mnist(dev, dry):
    rows = []
    plan = [("meanflow", 300, reference_flags("meanflow")), ("tvm", 200, reference_flags("tvm"))]
    common = []
    if dry:
        common = ["--hidden", "16", "--depth", "1", "--heads", "2", "--patch-size", "7", "--batch-size", "8", "--eval-samples", "50", "--eval-batch", "50",
                  "--eval-steps", "1"]
        plan = [(m, 4, flags) for m, _, flags in plan]
    for method, steps, extra in plan:
        out = tempfile.mkdtemp(prefix=f"gpucheck_{method}_")
        cmd = [sys.executable, os.path.join(ROOT, "methods", f"{method}.py"), "--dataset", "mnist", "--steps", str(steps), *extra, *common,
               "--log-every", str(min(50, steps)), "--eval-every", str(steps), "--out-dir", out,
               "--device", "cpu" if dry else "cuda"] + ([] if dry else ["--precision", "bf16"])
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=150)
        row = {"method": method, "steps": steps, "exit": p.returncode, "wall s": time.time() - t0}
        if p.returncode != 0:
            row["error"] = (p.stderr or p.stdout).strip().splitlines()[-1][:300] if (p.stderr or p.stdout).strip() else "?"
            rows.append(row)
            continue
        summ = json.load(open(os.path.join(out, method, "mnist", "summary.json")))
        logged = [json.loads(line) for line in open(os.path.join(out, method, "mnist", "metrics.jsonl")) if line.strip()]
        losses = [r["loss"] for r in logged if "loss" in r and steps - 100 < r["step"] <= steps]
        row.update({"s/step": summ["sec_per_step"], "fpe": summ["fpe"], "finite": all(math.isfinite(r.get("loss", 0.0)) for r in logged),
                    "loss (mean of last 100 steps' rows)": sum(losses) / len(losses) if losses else None,
                    "CPU reference run, same steps": reference_loss(method, steps)})
        fin = summ.get("final", {})
        row.update({k: fin[k] for k in ("fid@1", "fid@2", "acc@1") if k in fin})
        if row["loss (mean of last 100 steps' rows)"] and row["CPU reference run, same steps"]:
            row["ratio to CPU"] = row["loss (mean of last 100 steps' rows)"] / row["CPU reference run, same steps"]
        rows.append(row)
    notes = ["the method files run as a user runs them (subprocess), --precision bf16 on cuda; the reference runs (results/<method>/mnist) "
             "ran in fp32 on a CPU with the same seed but other random streams (CUDA draws differently), so losses agree in law, not bit for bit",
             "fid at this early step is only a sanity figure (the reference runs train 5000 steps)"]
    return rows, notes


# ---------------------------------------------------------------- 5 FID pipeline
def s5_fid(dev, dry):
    import numpy as np

    from common.eval import frechet, resize_clean
    rows, n = [], 2 if dry else 256
    # stand-in generator: a DiT-B/2 one-step sampler (x = e - net(e, 1, 0, y))
    from common.dit import DiT
    net = DiT(8 if dry else 32, 2, 4, 32 if dry else 768, 1 if dry else 12, 2 if dry else 12, 4.0, 1000).to(dev).eval()
    e = torch.randn(n, 4, net.grid * 2, net.grid * 2, device=dev)
    y = torch.randint(0, 1000, (n,), device=dev)
    one = torch.ones(n, device=dev)

    def timed(fn, amp):
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=amp and not dry):
            fn()
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
        return out, time.perf_counter() - t0

    from diffusers.models import AutoencoderKL
    if dry:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                            latent_channels=4, norm_num_groups=8, layers_per_block=1)
    else:  # SD-VAE's architecture (stabilityai/sd-vae-ft-ema config), random weights
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=256)
    vae = vae.to(dev).eval()
    import torchvision

    class Incep(torch.nn.Module):  # Inception-v3's architecture up to the 2048-d pool, random weights
        def __init__(self):
            super().__init__()
            m = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
            m.fc = torch.nn.Identity()
            self.m = m

        def forward(self, x):
            return self.m._forward((x - 128) / 128)[0]

    incep = torch.jit.script(Incep().eval()).to(dev)
    for prec in ("fp32", "bf16"):
        amp = prec == "bf16"
        x, t_s = timed(lambda: e - net(e, one, 0 * one, y), amp)
        img, t_d = timed(lambda: torch.cat([vae.decode(z).sample.float() for z in x.float().split(32)]).clamp(-1, 1), amp)
        u8 = ((img + 1) * 127.5).round()
        f, t_i = timed(lambda: torch.cat([incep(resize_clean(b)).float() for b in u8.split(64)]), amp)
        rows.append({"precision": prec, "images": n, "image px": img.shape[-1], "sample ms/img": t_s / n * 1e3, "decode ms/img": t_d / n * 1e3,
                     "inception ms/img": t_i / n * 1e3, "50k images x 3 step counts, min (sample+decode+inception)": 3 * 50000 * (t_s + t_d + t_i) / n / 60})
    d = 64 if dry else 2048
    a = np.random.default_rng(0).standard_normal((4 * d, d))
    sig = a.T @ a / len(a)
    t0 = time.perf_counter()
    frechet((np.zeros(d), sig), (np.full(d, 0.01), sig * 1.1))
    rows.append({"precision": "float64 (scipy)", "Frechet distance s (one, 2048-d)": time.perf_counter() - t0, "cpu threads": torch.get_num_threads()})
    notes = ["stand-ins with random weights (the real SD-VAE and Inception weights cannot travel): the times are the real architectures' times",
             "sampling: a DiT-B/2 one-step sample; decode in chunks of 32 latents as common/eval.py does; Inception after clean-fid's 299 px resize",
             "the 50k column extrapolates the measured per-image time to a 50k-sample evaluation at 1, 2 and 4 steps counted as 3 x one step "
             "(the sampling share grows with the step count), on one GPU"]
    return rows, notes


# ---------------------------------------------------------------- main
SECTIONS = [("0", "environment", s0_env, 10), ("1", "kernel correctness against float64", s1_correct, 110),
            ("2", "attention speed (bf16)", s2_speed, 110), ("3", "training-step throughput", s3_train, 120),
            ("4", "mnist in bf16: meanflow 300 steps, tvm 200 steps", s4_mnist, 100), ("5", "FID pipeline time split", s5_fid, 60)]


def main():
    ap = argparse.ArgumentParser(prog="python results/gpu/check.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "gpu"), help="folder for <date>-<gpu>.json and .md")
    ap.add_argument("--dry-run", action="store_true", help="every section at tiny shapes on the CPU")
    ap.add_argument("--sections", default="012345", help="which sections to run, e.g. 013")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole check; a section that would overrun is skipped")
    a = ap.parse_args()
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("check.py: no CUDA device here (use --dry-run for the CPU check of the script)")
    dev = torch.device("cpu" if a.dry_run else "cuda")
    if a.dry_run:
        A.BACKEND = "reference"
    gpu = "cpu-dry-run" if a.dry_run else torch.cuda.get_device_name(dev)
    rep = Report(a.out, a.dry_run)
    rep.data["gpu"] = gpu
    rep.data["name"] = datetime.date.today().isoformat() + "-" + "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    for key, title, fn, estimate in SECTIONS:
        if key not in a.sections:
            continue
        left = a.budget - (time.time() - T0)
        if left < min(estimate, 30) and not a.dry_run:
            rep.section(key, title, [], [f"skipped: {left:.0f} s of the budget left, about {estimate} s needed"])
            continue
        t0 = time.time()
        print(f"[{time.time() - T0:6.1f}s] section {key}: {title}", flush=True)
        try:
            rows, notes = fn(dev, a.dry_run, t0 + estimate) if key == "3" else fn(dev, a.dry_run)
            rep.section(key, title, rows, notes, time.time() - t0)
        except Exception:  # noqa: BLE001
            rep.section(key, title, [], [], time.time() - t0, traceback.format_exc())
        rep.data["total_s"] = time.time() - T0
        rep.write()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rep.data["total_s"] = time.time() - T0
    rep.write()
    print(rep.markdown()[-6000:])
    bad = [k for k, s in rep.data["sections"].items() if s["error"] or any(r.get("pass") is False for r in s["rows"])]
    print(f"report: {os.path.join(a.out, rep.data['name'])}.md; sections with an error or a failed check: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
