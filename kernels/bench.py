"""Benchmark of attention with a JVP: `python -m kernels.bench [--quick] [--smoke]`.

What is timed (each row one (shape, method)); "ours" = kernels.attention_jvp:
  fwd            forward only: PyTorch's fused attention ("flash", the speed of light) and ours
  fwd+jvp        output and tangent: ours fused (attention_jvp), ours through torch.func.jvp(sdpa)
                 (two-pass tangent), torch.func.jvp over naive attention and over the math backend
  +bwd(o)        fwd+jvp then backward through o only
  +bwd(o,do)     fwd+jvp then backward through o and do (TVM)
  dit-step       a full DiT training step whose loss uses torch.func.jvp (MeanFlow-style)
  tvm-step       a full TVM training step (methods/tvm.py, w = 1, its DiT options): the JVP along s
                 WITH grad (forward-AD dual numbers, as the method; naive: torch.func.jvp, since
                 PyTorch's softmax forward-AD rule breaks a backward through the tangent), a
                 no-grad target-EMA forward, the flow-matching forward, one backward through both
                 attention outputs; bf16 autocast on CUDA (as --precision bf16)
Columns: time (median of the reps on CUDA, best on CPU), peak memory above the inputs, time / flash forward of the same shape
(ideal forward+JVP is about 3x), and time / the naive torch.func.jvp of the same mode.

On CUDA the shapes are the targets of the kernel (DiT-XL/2 at 256 px: 256 tokens, 16 heads, D 72;
long sequences 1k-16k), "ours" is the Triton kernel, memory is torch.cuda peak allocation.
On CPU (no GPU here) "ours" is the closed-form reference (it materializes P), shapes are small,
and memory is the peak size of the tensors allocated while the case runs once, tracked by a
TorchDispatchMode (tensor data only, no allocator overhead). CPU numbers say nothing about
GPU performance.
`--smoke` runs tiny shapes in-process (no memory column); with TRITON_INTERPRET=1 it drives the
Triton kernels through the interpreter, which checks the CUDA code path end to end (timings
there are meaningless).
"""
import argparse
import math
import statistics
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kernels.attention_jvp as A


def naive(q, k, v, causal=False, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-2, -1)
    return s.softmax(-1) @ v


def math_backend(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


# (mode, method) pairs; the first fwd row of each shape is the "flash" reference for ratios
ATTN_CASES = [
    ("fwd", "flash"), ("fwd", "ours"),
    ("fwd+jvp", "ours-fused"), ("fwd+jvp", "ours-sdpa"), ("fwd+jvp", "naive"), ("fwd+jvp", "math"),
    ("+bwd(o)", "ours-fused"), ("+bwd(o)", "ours-sdpa"), ("+bwd(o)", "naive"),
    ("+bwd(o,do)", "ours-fused"), ("+bwd(o,do)", "ours-sdpa"), ("+bwd(o,do)", "naive"),
]


def attn_fn(mode, method, B, H, N, D, dtype, device):
    """Builds inputs and returns a closure running one (mode, method)."""
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda: torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)  # noqa: E731
    need_grad = mode.startswith("+bwd")
    xs = [mk().requires_grad_(need_grad) for _ in range(6)]
    cot = [mk(), mk()]

    if mode == "fwd":
        f = F.scaled_dot_product_attention if method == "flash" else A.sdpa

        def run():
            with torch.no_grad():
                return f(*xs[:3])
        return run

    def fwd_jvp():
        if method == "ours-fused":
            return A.attention_jvp(*xs)
        base = {"ours-sdpa": A.sdpa, "naive": naive, "math": math_backend}[method]
        return torch.func.jvp(base, tuple(xs[:3]), tuple(xs[3:]))

    def run():
        if not need_grad:
            with torch.no_grad():
                return fwd_jvp()
        o, do = fwd_jvp()
        loss = (o * cot[0]).sum()
        if mode == "+bwd(o,do)":
            loss = loss + (do * cot[1]).sum()
        grads = torch.autograd.grad(loss, xs, allow_unused=True)
        return grads
    return run


def dit_fn(method, cfg, batch, device):
    """A MeanFlow-style training step: u, du/dt = jvp(net, (x, t, s), (v, 1, 0)); loss on both."""
    import common.dit as dit
    torch.manual_seed(0)
    dit.sdpa = A.sdpa if method == "ours-sdpa" else naive  # the module-level name dit.py calls
    net = dit.DiT(**cfg).to(device)
    # lr 0: the step's cost is kept but the weights stay put, so every timed rep sees the same
    # numbers (with a real lr the du-loss of a random net blows the weights up within a few reps)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    s_ = cfg["input_size"]
    x = torch.randn(batch, cfg["in_channels"], s_, s_, device=device)
    v = torch.randn_like(x)
    t = torch.rand(batch, device=device)
    s = t * torch.rand(batch, device=device)
    y = torch.randint(0, cfg["num_classes"], (batch,), device=device)

    def run():
        opt.zero_grad(set_to_none=True)
        u, du = torch.func.jvp(lambda a, b, c: net(a, b, c, y), (x, t, s),
                               (v, torch.ones_like(t), torch.zeros_like(s)))
        ((u - v) ** 2).mean().add((du ** 2).mean()).backward()
        opt.step()
    return run


def tvm_fn(method, cfg, batch, device):
    """One TVM training step as methods/tvm.py takes it (see the module docstring)."""
    import copy

    import common.dit as dit
    fwAD = torch.autograd.forward_ad
    torch.manual_seed(0)
    dit.sdpa = A.sdpa if method == "ours-sdpa" else naive
    net = dit.DiT(**cfg, n_cond=1, qk_norm=True, norm="rms", modnorm=True).to(device)
    target = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: see dit_fn
    amp = torch.autocast(device, torch.bfloat16, enabled=device == "cuda")
    s_ = cfg["input_size"]
    x = torch.randn(batch, cfg["in_channels"], s_, s_, device=device)
    e = torch.randn_like(x)
    t, s2 = torch.rand(batch, device=device), torch.rand(batch, device=device)
    s = t * torch.rand(batch, device=device)
    col = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    x_t, x_s2 = (1 - col(t)) * x + col(t) * e, (1 - col(s2)) * x + col(s2) * e
    y = torch.randint(0, cfg["num_classes"], (batch,), device=device)
    c, one = torch.ones(batch, 1, device=device), torch.ones(batch, device=device)

    def jvp_s():
        if method == "ours-sdpa":
            with fwAD.dual_level():
                return fwAD.unpack_dual(net(x_t, t, fwAD.make_dual(s, one), y, c))
        return torch.func.jvp(lambda s_: net(x_t, t, s_, y, c), (s,), (one,))

    def run():
        opt.zero_grad(set_to_none=True)
        with amp:
            u, du = jvp_s()
            f, df = x_t - col(t - s) * u, u - col(t - s) * du
            with torch.no_grad():
                v_end = target(f, s, s, y, c)
            u_fm = net(x_s2, s2, s2, y, c)
        (((df - v_end) ** 2).mean() + ((u_fm - (e - x)) ** 2).mean()).backward()
        opt.step()
    return run


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(run, device, reps):
    run()  # warm-up (Triton compilation, allocator)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    # median on CUDA; the minimum on a shared CPU, where other work only ever adds time
    return statistics.median(times) if device == "cuda" else min(times)


def measure(spec, device, reps, memory):
    """Returns (seconds, peak MB or None, error string or None) for one case spec."""
    try:
        run = build(spec, device)
        mem = None
        if memory and device == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            sync(device)
            mem = (torch.cuda.max_memory_allocated() - base) / 2**20
        elif memory:
            with PeakTensorMemory() as tracker:
                run()
            mem = tracker.peak / 2**20
        return timeit(run, device, reps), mem, None
    except torch.OutOfMemoryError:
        return None, None, "OOM"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def build(spec, device):
    if spec["kind"] == "attn":
        return attn_fn(spec["mode"], spec["method"], *spec["shape"], getattr(torch, spec["dtype"]),
                       device)
    return (tvm_fn if spec["mode"] == "tvm-step" else dit_fn)(spec["method"], spec["cfg"], spec["batch"], device)


class PeakTensorMemory(TorchDispatchMode):
    """CPU stand-in for torch.cuda.max_memory_allocated: the peak total size of the tensor
    storages created inside the context and still alive (freed storages are seen through weak
    references; PyTorch keeps one Python object per storage)."""

    def __enter__(self):
        self.cur = self.peak = 0
        self.live = {}
        return super().__enter__()

    def _add(self, t):
        st = t.untyped_storage()
        key = id(st)
        if key in self.live or st.nbytes() == 0:
            return
        n = st.nbytes()

        def freed(_, key=key, n=n):
            self.cur -= n
            self.live.pop(key, None)
        self.live[key] = weakref.ref(st, freed)
        self.cur += n
        self.peak = max(self.peak, self.cur)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._add(t)
        return out


def plan(device, quick, smoke):
    if smoke:
        shapes, dtype = [(1, 2, 40, 16)], "float32"
        dit_cfg, dit_batch = dict(input_size=8, patch_size=2, in_channels=1, hidden=32, depth=1,
                                  heads=2, num_classes=10), 2
    elif device == "cuda":
        dtype = "bfloat16"  # 16-bit as in training; fp32 would measure TF32/IEEE dot choices
        shapes = [(32, 16, 256, 72), (8, 16, 1024, 64), (2, 16, 4096, 64)]
        shapes += [] if quick else [(1, 16, 8192, 64), (1, 16, 16384, 64)]
        dit_cfg = dict(input_size=32, patch_size=2, in_channels=4, hidden=1152, heads=16,
                       depth=4 if quick else 28, num_classes=1000)  # DiT-XL/2 at 256 px
        dit_batch = 32
    else:
        dtype = "float32"
        shapes = [(1, 16, 256, 72)] + ([] if quick else [(1, 4, 1024, 64)])
        dit_cfg = dict(input_size=16, patch_size=2, in_channels=4, hidden=128, heads=4, depth=2,
                       num_classes=10)
        dit_batch = 8
    specs = [dict(kind="attn", mode=m, method=meth, shape=list(s), dtype=dtype)
             for s in shapes for m, meth in ATTN_CASES]
    specs += [dict(kind="dit", mode=mode, method=meth, cfg=dit_cfg, batch=dit_batch)
              for mode in ("dit-step", "tvm-step") for meth in ("ours-sdpa", "naive")]
    return specs, dtype


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer/smaller shapes")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, no memory column")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    device = args.device
    warnings.filterwarnings("ignore", category=FutureWarning)
    reps = args.reps or (2 if args.smoke else 10 if device == "cuda" else 5)
    specs, dtype = plan(device, args.quick, args.smoke)
    backend = ("Triton" if device == "cuda" or A.INTERPRET else "closed-form reference")
    if device == "cuda":
        where = f"CUDA: {torch.cuda.get_device_name()}"
    else:
        where = ("CPU, no GPU on this machine" + (" (Triton interpreter: timings meaningless)"
                                                  if A.INTERPRET else ""))
    print(f"# attention JVP benchmark -- {where}; dtype {dtype}; 'ours' = {backend} path; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'median' if device == 'cuda' else 'best'} of {reps}")
    header = (f"{'shape (B,H,N,D) / model':<28}{'mode':<12}{'method':<12}{'time ms':>10}"
              f"{'peak MB':>10}{'x flash fwd':>13}{'x naive':>9}")
    print(header)
    print("-" * len(header))
    flash, naive_t = {}, {}
    rows = []
    for spec in specs:
        key = tuple(spec["shape"]) if spec["kind"] == "attn" else "dit"
        sec, mem, err = measure(spec, device, reps, memory=not args.smoke)
        if spec["mode"] == "fwd" and spec["method"] == "flash" and sec:
            flash[key] = sec
        rows.append((spec, key, sec, mem, err))
    for spec, key, sec, mem, err in rows:  # naive times first, then print with ratios
        if spec["method"] == "naive" and sec:
            naive_t[(key, spec["mode"])] = sec
    for spec, key, sec, mem, err in rows:
        label = (str(tuple(spec["shape"])) if spec["kind"] == "attn" else
                 f"DiT h{spec['cfg']['hidden']} d{spec['cfg']['depth']} "
                 f"N{(spec['cfg']['input_size'] // spec['cfg']['patch_size']) ** 2} bs{spec['batch']}")
        t = err or f"{sec * 1e3:.2f}"
        m = "-" if mem is None else f"{mem:.0f}"
        rf = f"{sec / flash[key]:.2f}" if sec and key in flash else "-"
        rn = f"{sec / naive_t[(key, spec['mode'])]:.2f}" if sec and (key, spec["mode"]) in naive_t else "-"
        print(f"{label:<28}{spec['mode']:<12}{spec['method']:<12}{t:>10}{m:>10}{rf:>13}{rn:>9}")
    note = ""
    if device != "cuda":
        note = ("Triton interpreter run: checks the code path, timings are meaningless."
                if A.INTERPRET else "CPU figures (reference path), not a GPU measurement.")
    print("ideal on a GPU: fwd+jvp ~3x flash fwd. " + note)


if __name__ == "__main__":
    main()
