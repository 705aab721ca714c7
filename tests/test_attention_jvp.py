"""Tests of kernels/attention_jvp.py (all on CPU).

Three groups:
1. The closed-form reference (the CPU path) against torch.func.jvp + autograd on naive attention
   in float64, gradcheck, and the `sdpa` drop-in under torch.func.jvp / forward_ad / plain autograd.
2. The Triton kernels under the Triton interpreter against the float64 oracle. TRITON_INTERPRET
   must be set before triton is imported, so `test_triton_interpreter[shard]` re-runs this file
   in a subprocess with TRITON_INTERPRET=1 and `-k interp`; there the `test_interp` cases run
   (split in two shards so `pytest -n 2` runs them in parallel). Running the file directly with
   TRITON_INTERPRET=1 also works: the launcher then skips and the cases run inline.
3. Integration with common.dit.DiT: same parameter gradients as naive attention for a loss on
   the output and the JVP, forward-mode dual tensors, and a plain training step.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import kernels.attention_jvp as A

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]


def naive(q, k, v, causal=False, scale=None):
    """Textbook attention (materializes P); bottom-right causal alignment like the kernel."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-2, -1)
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(m - n + 1), float("-inf"))
    return s.softmax(-1) @ v


def rand(*shape, dtype=torch.float64, gen=None):
    return torch.randn(*shape, dtype=dtype, generator=gen)


def make_inputs(B=2, H=2, N=13, M=11, D=8, DV=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    DV = D if DV is None else DV
    shapes = [(B, H, N, D), (B, H, M, D), (B, H, M, DV)] * 2
    return [rand(*s, gen=g).to(dtype) for s in shapes], [rand(B, H, N, DV, gen=g).to(dtype)
                                                         for _ in range(2)]


def oracle(q, k, v, dq, dk, dv, g, gt, causal=False, scale=None):
    """float64 (o, do) by torch.func.jvp on naive attention, and the six gradients of
    <g, o> + <gt, do> by autograd (a None cotangent counts as zero).

    Causal with N > M: the first N - M query rows see no key; the kernel defines their outputs
    (and so their gradients) as zero, where naive attention gives NaN."""
    e = q.shape[2] - k.shape[2]
    if causal and e > 0:
        cut = lambda x: None if x is None else x[:, :, e:]  # noqa: E731
        o, do, grads = oracle(cut(q), k, v, cut(dq), dk, dv, cut(g), cut(gt), causal, scale)
        pad = lambda x: torch.cat([x.new_zeros(*x.shape[:2], e, x.shape[3]), x], 2)  # noqa: E731
        return pad(o), pad(do), [pad(grads[0]), *grads[1:3], pad(grads[3]), *grads[4:]]
    xs = [x.detach().double().requires_grad_() for x in (q, k, v, dq, dk, dv)]
    o, do = torch.func.jvp(lambda a, b, c: naive(a, b, c, causal, scale), tuple(xs[:3]),
                           tuple(xs[3:]))
    loss = 0.0
    if g is not None:
        loss = loss + (o * g.double()).sum()
    if gt is not None:
        loss = loss + (do * gt.double()).sum()
    grads = torch.autograd.grad(loss, xs, allow_unused=True) if torch.is_tensor(loss) else [None] * 6
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(xs, grads)]
    return o.detach(), do.detach(), grads


def close(a, b, atol, rtol=0.0, what=""):
    err = (a.double() - b.double()).abs().max().item()
    tol = atol + rtol * b.double().abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setattr(A, "BACKEND", "reference")


# ---------------------------------------------------------------------------------------------
# 1. Reference path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N,M,scale", [(13, 13, None), (7, 12, 0.3), (12, 12, 1.7)])
def test_reference_fused_matches_autodiff(reference, causal, N, M, scale):
    (q, k, v, dq, dk, dv), (g, gt) = make_inputs(N=N, M=M, D=8, DV=6)
    o0, do0, grads0 = oracle(q, k, v, dq, dk, dv, g, gt, causal, scale)
    xs = [x.clone().requires_grad_() for x in (q, k, v, dq, dk, dv)]
    o, do = A.attention_jvp(*xs, causal=causal, scale=scale)
    close(o, o0, 1e-12, what="o")
    close(do, do0, 1e-12, what="do")
    grads = torch.autograd.grad((o * g).sum() + (do * gt).sum(), xs)
    for name, a, b in zip("q k v dq dk dv".split(), grads, grads0):
        close(a, b, 1e-12, what=f"grad {name}")


@pytest.mark.parametrize("drop", ["g", "gt"])
def test_reference_one_cotangent(reference, drop):
    (q, k, v, dq, dk, dv), (g, gt) = make_inputs(N=9, M=10)
    g, gt = (None, gt) if drop == "g" else (g, None)
    _, _, grads0 = oracle(q, k, v, dq, dk, dv, g, gt, causal=True)
    xs = [x.clone().requires_grad_() for x in (q, k, v, dq, dk, dv)]
    o, do = A.attention_jvp(*xs, causal=True)
    loss = (do * gt).sum() if g is None else (o * g).sum()
    grads = torch.autograd.grad(loss, xs, allow_unused=True)
    for name, a, b in zip("q k v dq dk dv".split(), grads, grads0):
        close(torch.zeros_like(b) if a is None else a, b, 1e-12, what=f"grad {name}")


def test_reference_gradcheck(reference):
    (q, k, v, dq, dk, dv), _ = make_inputs(B=1, H=1, N=5, M=6, D=3)
    xs = [x.requires_grad_() for x in (q, k, v, dq, dk, dv)]
    assert torch.autograd.gradcheck(lambda *a: A.attention_jvp(*a, causal=True), xs)
    # sdpa: backward AND its forward-mode rule checked against finite differences
    assert torch.autograd.gradcheck(lambda *a: A.sdpa(*a), xs[:3], check_forward_ad=True)
    assert torch.autograd.gradcheck(lambda *a: A.sdpa(*a, causal=True), xs[:3],
                                    check_forward_ad=True)


@pytest.mark.parametrize("mode", ["func", "forward_ad"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_sdpa_jvp_and_backward_through_tangent(reference, mode, causal):
    (q, k, v, dq, dk, dv), (g, gt) = make_inputs(N=10, M=14 if not causal else 10)
    o0, do0, grads0 = oracle(q, k, v, dq, dk, dv, g, gt, causal)
    o, do, grads = sdpa_jvp_and_grads(q, k, v, dq, dk, dv, g, gt, causal, mode)
    close(o, o0, 1e-12, what="o")
    close(do, do0, 1e-12, what="do")
    for name, a, b in zip("q k v dq dk dv".split(), grads, grads0):
        close(a, b, 1e-12, what=f"grad {name}")


def sdpa_jvp_and_grads(q, k, v, dq, dk, dv, g, gt, causal, mode):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, dq, dk, dv)]
    if mode == "func":
        o, do = torch.func.jvp(lambda a, b, c: A.sdpa(a, b, c, causal), tuple(xs[:3]),
                               tuple(xs[3:]))
    else:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) for p, t in zip(xs[:3], xs[3:])]
            o, do = fwAD.unpack_dual(A.sdpa(*duals, causal=causal))
    grads = torch.autograd.grad((o * g).sum() + (do * gt).sum(), xs)
    return o, do, grads


@pytest.fixture
def torch_primal(monkeypatch):
    """sdpa's primal forward and plain backward through PyTorch's fused CPU attention (the
    stand-in for flash / efficient on CUDA), the tangent through the reference."""
    monkeypatch.setattr(A, "BACKEND", "reference")
    monkeypatch.setattr(A, "PRIMAL", "torch")


def _forbid_plain_kernel_calls(monkeypatch):
    """Our kernels may only run for a tangent or a backward through one."""
    forward, backward = A._forward, A._backward

    def fwd(q, k, v, dq, dk, dv, *a, **kw):
        assert not (dq is None and dk is None and dv is None), "plain forward hit our kernels"
        return forward(q, k, v, dq, dk, dv, *a, **kw)

    def bwd(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, *a):
        assert gt is not None, "plain backward hit our kernels"
        return backward(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, *a)

    monkeypatch.setattr(A, "_forward", fwd)
    monkeypatch.setattr(A, "_backward", bwd)


@pytest.mark.parametrize("mode", ["func", "forward_ad"])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_primal_sdpa_jvp_and_backward_through_tangent(torch_primal, monkeypatch, mode,
                                                            causal):
    """Primal from PyTorch's kernel (its lse feeds the tangent), tangent and the backward
    through it from ours: same float64 numbers as torch.func.jvp + autograd on naive attention."""
    (q, k, v, dq, dk, dv), (g, gt) = make_inputs(N=10, M=14 if not causal else 10)
    assert A.primal_kind(q, k, v, causal) == "cpu"
    o0, do0, grads0 = oracle(q, k, v, dq, dk, dv, g, gt, causal)
    calls = []
    monkeypatch.setattr(A, "_torch_forward",
                        lambda *a, f=A._torch_forward: calls.append(a[0]) or f(*a))
    o, do, grads = sdpa_jvp_and_grads(q, k, v, dq, dk, dv, g, gt, causal, mode)
    assert calls == ["cpu"]
    close(o, o0, 1e-12, what="o")
    close(do, do0, 1e-12, what="do")
    for name, a, b in zip("q k v dq dk dv".split(), grads, grads0):
        close(a, b, 1e-12, what=f"grad {name}")


@pytest.mark.parametrize("causal", [False, True])
def test_torch_primal_plain_calls_never_reach_our_kernels(torch_primal, monkeypatch, causal):
    """A plain forward + backward (fm, dmd2, mfd, sampling) runs PyTorch's kernels only; under a
    JVP only the tangent and the backward through it reach ours."""
    (q, k, v, dq, dk, dv), (g, gt) = make_inputs(N=12, M=12)
    _forbid_plain_kernel_calls(monkeypatch)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o = A.sdpa(*xs, causal=causal)
    grads = torch.autograd.grad((o * g).sum(), xs)
    o0, _, grads0 = oracle(q, k, v, dq, dk, dv, g, None, causal)
    close(o, o0, 1e-12, what="o")
    for name, a, b in zip("qkv", grads, grads0):
        close(a, b, 1e-12, what=f"grad {name}")
    o, do, grads = sdpa_jvp_and_grads(q, k, v, dq, dk, dv, g, gt, causal, "func")
    close(do, oracle(q, k, v, dq, dk, dv, g, gt, causal)[1], 1e-12, what="do")


def test_torch_primal_choice_and_fallback(monkeypatch):
    """Where PyTorch's kernel applies, and a failing one falls back to ours with a warning."""
    (q, k, v, *_), (g, _) = make_inputs(N=9, M=7)
    monkeypatch.setattr(A, "PRIMAL", "auto")
    assert A.primal_kind(q, k, v) is None  # CPU default: the reference, as before
    monkeypatch.setattr(A, "PRIMAL", "torch")
    assert A.primal_kind(q, k, v) == "cpu"
    assert A.primal_kind(q, k, v, causal=True) is None  # N != M: alignments differ
    monkeypatch.setattr(A, "PRIMAL", "kernel")
    assert A.primal_kind(q, k, v) is None
    monkeypatch.setattr(A, "PRIMAL", "torch")
    monkeypatch.setattr(A, "BACKEND", "reference")
    monkeypatch.setattr(A, "FALLBACKS", {})

    def broken(*a):
        raise RuntimeError("no kernel for this input\nsecond line")

    monkeypatch.setattr(A, "_torch_forward", broken)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    with pytest.warns(UserWarning, match="no kernel for this input"):
        o = A.sdpa(*xs)
    close(o, naive(q, k, v), 1e-12, what="o")
    assert A.FALLBACKS == {"cpu forward: RuntimeError: no kernel for this input": 1}


@pytest.mark.parametrize("kind,dtype", [("flash", torch.bfloat16), ("efficient", torch.float32),
                                         ("efficient", torch.float16)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernels_called_as_their_schemas_say(kind, dtype, causal):
    """The CUDA flash / memory-efficient ops run here on the meta device (shapes only): their
    arguments match the installed PyTorch's schemas, and lse[..., :N] is the (B, H, N) log-sum-exp
    the tangent reads (the efficient kernel pads its rows)."""
    B, N, H, D = 2, 45, 3, 72
    q, k, v = torch.empty(B, N, 3, H, D, device="meta", dtype=dtype).permute(2, 0, 3, 1, 4)
    o, lse, extra = A._torch_forward(kind, q, k, v, causal, 0.1)
    assert o.shape == q.shape and o.dtype == dtype
    assert lse.dtype == torch.float32 and lse.shape[:2] == (B, H) and lse.shape[2] >= N
    assert lse[..., :N].contiguous().shape == (B, H, N)
    grads = A._torch_backward(kind, extra, torch.empty_like(o), q, k, v, o, lse, causal, 0.1)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_reference_sdpa_plain_matches_torch(reference):
    """No JVP: same values and gradients as PyTorch's own attention (fp32 and bf16)."""
    F = torch.nn.functional
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)]:
        (q, k, v, *_), (g, _) = make_inputs(N=17, M=17, D=16, dtype=dtype)
        for causal in (False, True):
            xs = [x.clone().requires_grad_() for x in (q, k, v)]
            ys = [x.clone().requires_grad_() for x in (q, k, v)]
            o = A.sdpa(*xs, causal=causal)
            o0 = F.scaled_dot_product_attention(*ys, is_causal=causal)
            assert o.dtype == dtype
            close(o, o0, tol, what="o")
            (o * g).sum().backward()
            (o0 * g).sum().backward()
            for a, b in zip(xs, ys):
                close(a.grad, b.grad, tol, rtol=tol, what="grad")


@pytest.mark.parametrize("causal", [False, True])
def test_reference_sdpa_mixed_dtypes_under_autocast(reference, causal):
    """CPU autocast bf16 with fp32 q/k (as after an RMSNorm) and bf16 v: sdpa computes in bf16,
    also under torch.func.jvp, and gradients come back in each input's own dtype."""
    (q, k, v, dq, dk, dv), (g, gt) = make_inputs(N=12, M=12, D=16, dtype=torch.float32)
    v, dv = v.bfloat16(), dv.bfloat16()
    bf = [x.bfloat16() for x in (q, k, v, dq, dk, dv)]
    o0, do0, grads0 = oracle(*bf, g, gt, causal)
    xs = [x.clone().requires_grad_() for x in (q, k, v, dq, dk, dv)]
    with torch.autocast("cpu", torch.bfloat16):
        o, do = torch.func.jvp(lambda a, b, c: A.sdpa(a, b, c, causal), tuple(xs[:3]),
                               tuple(xs[3:]))
        assert o.dtype == do.dtype == torch.bfloat16
        loss = (o.float() * g).sum() + (do.float() * gt).sum()
    grads = torch.autograd.grad(loss, xs)
    close(o, o0, 1e-2, rtol=1e-2, what="o")
    close(do, do0, 1e-2, rtol=1e-2, what="do")
    for name, x, a, b in zip("q k v dq dk dv".split(), xs, grads, grads0):
        assert a.dtype == x.dtype, name
        close(a, b, 3e-2, rtol=3e-2, what=f"grad {name}")
    with torch.autocast("cpu", torch.bfloat16):  # no JVP at all
        close(A.sdpa(*xs[:3], causal=causal), o0, 1e-2, rtol=1e-2, what="plain o")


def test_reference_special_tangents(reference):
    """Zero tangents give do == 0; a tangent along v only gives do == attention(q, k, dv)."""
    (q, k, v, dq, dk, dv), _ = make_inputs(N=9, M=12)
    z = torch.zeros_like
    _, do = A.attention_jvp(q, k, v, z(q), z(k), z(v))
    assert do.abs().max() == 0
    _, do = torch.func.jvp(A.sdpa, (q, k, v), (z(q), z(k), dv))
    close(do, naive(q, k, dv), 1e-12, what="do along v")


def test_reference_strided_and_empty_rows(reference):
    """Non-contiguous inputs; causal with N > M leaves rows with no key: zeros, not NaN."""
    q = rand(2, 9, 3, 8).transpose(1, 2)  # (B, H, N, D) view of a (B, N, H, D) tensor
    k, v = rand(2, 3, 5, 8), rand(2, 3, 5, 8)
    dq, dk, dv = rand(2, 3, 9, 8), rand(2, 3, 5, 8), rand(2, 3, 5, 8)
    o, do = A.attention_jvp(q, k, v, dq, dk, dv, causal=True)
    assert torch.isfinite(o).all() and torch.isfinite(do).all()
    assert o[:, :, :4].abs().max() == 0 and do[:, :, :4].abs().max() == 0  # rows 0..N-M-1
    o0, do0, _ = oracle(q, k, v, dq, dk, dv, None, None, causal=True)
    close(o, o0, 1e-12, what="o")
    close(do, do0, 1e-12, what="do")


def test_module_imports_without_triton():
    """With `import triton` failing the module still imports and runs the reference."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels.attention_jvp as A\n"
            "assert not A.HAS_TRITON\n"
            "q = torch.randn(1, 1, 4, 8)\n"
            "o, do = torch.func.jvp(A.sdpa, (q, q, q), (q, q, q))\n"
            "print('ok', tuple(do.shape))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels under the interpreter
# ---------------------------------------------------------------------------------------------

# Tolerances against the float64 oracle. The kernel keeps lse/mu in fp32, hence ~1e-6 even in fp32.
TOL = {torch.float32: 2e-5, torch.float16: 2e-2}


def _case(kind, dtype=torch.float32, N=37, M=37, D=16, DV=None, causal=False, g=True, gt=True,
          tangent="all", H=2, primal="kernel"):
    return dict(kind=kind, dtype=dtype, N=N, M=M, D=D, DV=DV, causal=causal, g=g, gt=gt,
                tangent=tangent, H=H, primal=primal)


INTERP_CASES = [
    # fused kernel + backward through both outputs
    _case("fused"),
    _case("fused", causal=True, N=33, M=47, D=24),
    _case("fused", N=29, M=18, D=40, DV=16),               # N != M, head dim padded to 64
    _case("fused", N=17, M=20, D=72, H=1),                 # DiT-XL head dim, padded to 128
    _case("fused", dtype=torch.float16, N=21, M=35),
    _case("fused", dtype=torch.float16, causal=True, N=40, M=40, D=32),
    _case("fused", g=False),                               # cotangent of o absent
    _case("fused", gt=False, causal=True),                 # cotangent of do absent
    _case("fused", tangent="zero"),                        # do == 0
    _case("fused", tangent="v"),                           # do == attention of dv
    _case("fused", tangent="qk", causal=True, N=20, M=26),
    _case("fused", causal=True, N=30, M=17),               # causal N > M: rows with no key
    # sdpa drop-in: plain, torch.func.jvp and forward_ad (two-pass tangent), strided inputs
    _case("plain", N=45, M=31),
    _case("plain", dtype=torch.float16, causal=True),
    _case("func", N=19, M=33),
    _case("func", dtype=torch.float16, causal=True, N=24, M=24),
    _case("forward_ad", causal=True, N=26, M=26),
    _case("strided", N=23, M=23),
    _case("dit"),
    # primal from PyTorch's CPU flash kernel (its lse, laid out (B, N, H), feeds our tangent)
    _case("plain", N=45, M=31, primal="torch"),
    _case("func", N=19, M=33, primal="torch"),
    _case("forward_ad", dtype=torch.float16, causal=True, N=24, M=24, primal="torch"),
    _case("strided", N=23, M=23, D=72, primal="torch"),
    _case("dit", primal="torch"),
]


def _shard(cases):
    spec = os.environ.get("ATTN_JVP_SHARD")  # "i/n", set by the launcher below
    if not spec:
        return cases
    i, n = map(int, spec.split("/"))
    return cases[i::n]


def _case_id(c):
    dt = {torch.float32: "fp32", torch.float16: "fp16"}[c["dtype"]]
    flags = [c["kind"], dt, f"N{c['N']}M{c['M']}D{c['D']}"] + (["causal"] if c["causal"] else [])
    flags += [] if c["g"] else ["noG"]
    flags += [] if c["gt"] else ["noGt"]
    flags += [] if c["tangent"] == "all" else [f"t-{c['tangent']}"]
    flags += [] if c["primal"] == "kernel" else [f"primal-{c['primal']}"]
    return "-".join(flags)


# Only collected under the interpreter (elsewhere the launcher below stands for these cases).
@pytest.mark.skipif(not (INTERP and A.HAS_TRITON), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("c", _shard(INTERP_CASES) if INTERP else [], ids=_case_id)
def test_interp(c, monkeypatch):
    monkeypatch.setattr(A, "BACKEND", "triton")
    monkeypatch.setattr(A, "PRIMAL", c["primal"])
    if c["primal"] == "torch":
        _forbid_plain_kernel_calls(monkeypatch)
    if c["kind"] == "dit":
        return _check_dit_jvp_grads(rtol=1e-4)
    dtype, tol, causal = c["dtype"], TOL[c["dtype"]], c["causal"]
    (q, k, v, dq, dk, dv), (g, gt) = make_inputs(B=1, H=c["H"], N=c["N"], M=c["M"], D=c["D"],
                                                 DV=c["DV"], dtype=dtype, seed=c["N"])
    if c["tangent"] == "zero":
        dq, dk, dv = torch.zeros_like(dq), torch.zeros_like(dk), torch.zeros_like(dv)
    elif c["tangent"] == "v":
        dq, dk = torch.zeros_like(dq), torch.zeros_like(dk)
    elif c["tangent"] == "qk":
        dv = torch.zeros_like(dv)
    g = g if c["g"] else None
    gt = gt if c["gt"] else None
    o0, do0, grads0 = oracle(q, k, v, dq, dk, dv, g, gt, causal)
    names = "q k v dq dk dv".split()

    if c["kind"] == "fused":
        xs = [x.clone().requires_grad_() for x in (q, k, v, dq, dk, dv)]
        o, do = A.attention_jvp(*xs, causal=causal)
        assert o.dtype == do.dtype == dtype
        if c["tangent"] == "zero":
            assert do.abs().max() == 0
        if c["tangent"] == "v":
            close(do, naive(q.double(), k.double(), dv.double(), causal), tol, what="do along v")
        loss = sum((a.float() * b.float()).sum() for a, b in ((o, g), (do, gt)) if b is not None)
        grads = torch.autograd.grad(loss, xs, allow_unused=True)
    elif c["kind"] == "plain":  # sdpa without any JVP: the HAS_JVP=False kernels
        if c["primal"] == "kernel":  # a plain call allocates no tangent and no mu
            _, do_, _, mu_ = A._triton_forward(q, k, v, None, None, None, causal, 0.5)
            assert do_ is None and mu_ is None
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = A.sdpa(*xs, causal=causal)
        do = do0
        o0, _, grads0 = oracle(q, k, v, dq, dk, dv, g, None, causal)
        grads = torch.autograd.grad((o.float() * g.float()).sum(), xs)
        names = names[:3]
    elif c["kind"] == "strided":  # (B, N, H, D) storage seen as (B, H, N, D), like the DiT
        def view(x):
            return x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        xs = [view(x) for x in (q, k, v, dq, dk, dv)]
        assert not xs[0].is_contiguous()
        o, do, grads = sdpa_jvp_and_grads(*xs, g, gt, causal, "func")
    else:  # "func" / "forward_ad": the two-pass tangent and its backward
        o, do, grads = sdpa_jvp_and_grads(q, k, v, dq, dk, dv, g, gt, causal, c["kind"])

    assert torch.isfinite(o).all() and torch.isfinite(do).all()
    close(o, o0, tol, what="o")
    close(do, do0, tol, rtol=tol, what="do")
    for name, a, b in zip(names, grads, grads0):
        close(torch.zeros_like(b) if a is None else a, b, tol, rtol=tol, what=f"grad {name}")


@pytest.mark.skipif(INTERP, reason="already running under the interpreter")
@pytest.mark.skipif(not A.HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("shard", [0, 1])
def test_triton_interpreter(shard):
    """Runs the `test_interp` cases in a subprocess with TRITON_INTERPRET=1 (shard i of 2)."""
    env = dict(os.environ, TRITON_INTERPRET="1", ATTN_JVP_SHARD=f"{shard}/2")
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-k", "test_interp", str(Path(__file__).resolve())]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    n_expected = len(INTERP_CASES[shard::2])
    assert f"{n_expected} passed" in out.stdout, tail


# ---------------------------------------------------------------------------------------------
# 3. Integration with the shared DiT
# ---------------------------------------------------------------------------------------------

def _dit_and_batch(seed=0):
    from common.dit import DiT

    torch.manual_seed(seed)
    net = DiT(input_size=8, patch_size=2, in_channels=1, hidden=32, depth=2, heads=2,
              num_classes=10)
    with torch.no_grad():  # adaLN-zero makes attention invisible at init: perturb everything
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 1, 8, 8)
    t = torch.rand(3)
    s = t * torch.rand(3)
    y = torch.tensor([1, 4, 10])
    v = torch.randn_like(x)
    return net, x, t, s, y, v


def _dit_jvp_grads(net, x, t, s, y, v):
    """MeanFlow-style: u and du/dt along (v, 1, 0); loss on both; parameter gradients."""
    net.zero_grad()
    u, du = torch.func.jvp(lambda x_, t_, s_: net(x_, t_, s_, y), (x, t, s),
                           (v, torch.ones_like(t), torch.zeros_like(s)))
    ((u ** 2).mean() + (du ** 2).mean()).backward()
    return u.detach(), du.detach(), [p.grad.clone() for p in net.parameters()]


def _check_dit_jvp_grads(rtol):
    """Our sdpa vs naive attention in the same fp32 DiT, errors relative to each tensor's max."""
    import common.dit as dit

    net, x, t, s, y, v = _dit_and_batch()
    u, du, grads = _dit_jvp_grads(net, x, t, s, y, v)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(dit, "sdpa", naive)
        u0, du0, grads0 = _dit_jvp_grads(net, x, t, s, y, v)
    finally:
        mp.undo()
    close(u, u0, 1e-7, rtol=rtol, what="u")
    close(du, du0, 1e-7, rtol=rtol, what="du")
    for (name, _), a, b in zip(net.named_parameters(), grads, grads0):
        assert b.abs().max() > 0, name
        close(a, b, 1e-7, rtol=rtol, what=f"grad {name}")


def test_dit_jvp_loss_on_output_and_tangent(reference):
    _check_dit_jvp_grads(rtol=1e-5)


def test_dit_forward_ad_dual_tensors(reference):
    import common.dit as dit

    net, x, t, s, y, v = _dit_and_batch(1)
    with fwAD.dual_level():
        out = net(fwAD.make_dual(x, v), fwAD.make_dual(t, torch.ones_like(t)), s, y)
        u, du = fwAD.unpack_dual(out)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(dit, "sdpa", naive)
        with torch.no_grad():
            u0, du0 = torch.func.jvp(lambda x_, t_: net(x_, t_, s, y), (x, t),
                                     (v, torch.ones_like(t)))
    finally:
        mp.undo()
    assert du is not None and du.abs().max() > 0
    close(u, u0, 1e-7, rtol=1e-5, what="u")
    close(du, du0, 1e-7, rtol=1e-5, what="du")


def test_dit_plain_training_step(reference):
    """No JVP anywhere: a normal optimizer step gives the same gradients as naive attention."""
    import common.dit as dit

    net, x, t, s, y, v = _dit_and_batch(2)
    grads = []
    for attn in (A.sdpa, naive):
        mp = pytest.MonkeyPatch()
        mp.setattr(dit, "sdpa", attn)
        try:
            net.zero_grad()
            ((net(x, t, s, y) - v) ** 2).mean().backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        finally:
            mp.undo()
    for a, b in zip(*grads):
        close(a, b, 1e-7, rtol=1e-5, what="grad")
    before = [p.detach().clone() for p in net.parameters()]
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert any((p - b).abs().max() > 0 for p, b in zip(net.parameters(), before))


def test_bench_smoke_runs():
    """`python -m kernels.bench --smoke` prints its table (tiny shapes, reference path)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kernels.bench", "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CPU, no GPU on this machine" in out.stdout and "dit-step" in out.stdout, out.stdout
