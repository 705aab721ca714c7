"""Ahead-of-time compilation of the attention-JVP Triton kernels for real GPUs, without a GPU.

`A.compile_ahead` runs the launch code itself on CPU tensors laid out like a DiT block's call
(q/k/v and their tangents views of one (B, N, 3, H, d) qkv tensor, cotangents views of the
(B, N, H d) output; `A.dit_inputs`), records the kernel calls instead of launching them, and
compiles each with the specialization Triton gives those very arguments (`A._specialize`, checked
against Triton's own binder below) for GPUTarget("cuda", 80, 32) (A100, 166,912 B of shared
memory per block) or ("cuda", 90, 32) (H100, 232,448 B). Each compiled kernel must fit that
budget (a launch would raise OutOfResources) and must VECTORIZE: at head dim 72 with a head
stride of 72 elements Triton cannot prove 16-byte alignment unless the launch tells it (head dim
and strides as constants / divided by their power-of-2 factor), and then every tile load is a
16-bit scalar load (128-322 per kernel) with no cp.async. bf16 is checked only here (the Triton
interpreter cannot run bf16 dots).

Compiling costs 2-15 s of CPU per group with a cold Triton cache (fp32-ieee up to a minute:
FMA dots), so a plain run checks the DiT training path in bf16 at head dims 64, 72 and 128 and
the tightest fp32 fits; ATTN_COMPILE_ALL=1 checks every target x group x dtype x head dim in
{64, 72, 128} (results/attention_jvp/compile.py writes that matrix as a table).
"""
import itertools
import os
import types

import pytest
import torch

import kernels.attention_jvp as A

pytestmark = pytest.mark.skipif(not A.HAS_TRITON or A.INTERPRET,
                                reason="needs triton, and real (not interpreted) kernels")

TARGETS = {80: 166_912, 90: 232_448}
PRECS = {"ieee": (torch.float32, "ieee"), "tf32": (torch.float32, "tf32"),
         "bf16": (torch.bfloat16, "tf32"), "fp16": (torch.float16, "tf32")}
GROUPS = ("fwd", "jvp", "bwd", "bwd_jvp")
QUICK = [(90, "jvp", "bf16", 72),       # DiT-XL/2 in bf16: the tangent (fused and two-pass)
         (90, "bwd_jvp", "bf16", 72),   # ... and the backward through it (TVM)
         (90, "jvp", "bf16", 64),       # DiT-B/2
         (80, "bwd_jvp", "fp16", 128),  # head dim 128 on an A100
         (90, "bwd_jvp", "tf32", 72),   # fp32 on an H100: the tightest fit (229,376 B)
         (80, "jvp", "tf32", 72)]       # fp32 on an A100
ALL = list(itertools.product(TARGETS, GROUPS, PRECS, (64, 72, 128)))
CASES = ALL if os.environ.get("ATTN_COMPILE_ALL") == "1" else QUICK


@pytest.mark.parametrize("arch,kind,prec,d", CASES, ids=lambda x: str(x))
def test_launched_kernels_fit_and_vectorize(arch, kind, prec, d):
    from triton.backends.compiler import GPUTarget

    dtype, dot_prec = PRECS[prec]
    budget = TARGETS[arch]
    compiled = A.compile_ahead(kind, dtype, d, dot_prec, GPUTarget("cuda", arch, 32), budget)
    names = [name for name, _ in A.VARIANTS[kind]]
    assert [name for name, *_ in compiled] == (["_bwd_pre_kernel"] + names[1:] if "bwd" in kind
                                               else names)
    for name, flags, t, kernel in compiled:
        what = f"{name} {flags} tiles {t} on sm_{arch}"
        assert kernel.metadata.shared <= budget, (
            f"{what}: {kernel.metadata.shared:,} B of shared memory > {budget:,} B")
        wide, scalar = A.ptx_loads(kernel.asm["ptx"], dtype)
        assert wide > 0, f"{what}: no 16-byte global load"
        # fp32: a few scalar loads of the fp32 row statistics (lse, mu, Delta, Dt) remain
        assert scalar <= (16 if dtype == torch.float32 else 0), f"{what}: {scalar} scalar loads"
        if t[5] >= 2 and name != "_bwd_pre_kernel":  # a pipelined loop streams through cp.async
            assert "cp.async" in kernel.asm["ptx"], f"{what}: no cp.async"


def test_specialization_is_the_one_triton_launches():
    """`_specialize` gives the signature, constants and alignment hints Triton's own binder
    derives from the same arguments (private Triton API: skipped where it differs)."""
    jit = pytest.importorskip("triton.runtime.jit")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    if not hasattr(jit, "create_function_from_signature"):
        pytest.skip("this Triton has no create_function_from_signature")
    backend = make_backend(GPUTarget("cuda", 90, 32))
    plan = A._Plan(232_448, "tf32")
    q, k, v, dq, dk, dv, o, lse, g, gt = A.dit_inputs(72, torch.bfloat16)
    A._triton_forward(q, k, v, dq, dk, dv, False, 0.1, o=o, lse=lse, plan=plan)
    A._triton_backward(q, k, v, dq, dk, dv, o, o, lse, torch.zeros_like(lse), g, gt, False, 0.1,
                       plan=plan)
    assert len(plan.calls) == 4
    for fn, args, meta in plan.calls:
        binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, options = binder(*args, **meta)
        _, sig, consts, attrs = fn._pack_args(backend, meta, bound, spec, options)
        mine_sig, mine_consts, mine_attrs = A._specialize(fn, args, dict(meta))
        assert sig == mine_sig, fn.__name__
        assert {fn.arg_names[p[0]]: x for p, x in consts.items()} == mine_consts, fn.__name__
        assert {p: x for p, x in attrs.items() if x} == mine_attrs, fn.__name__
        # the DiT call at head dim 72: strides 72 / 3456 come in divided by A = 8
        values = dict(zip(fn.arg_names, args))
        assert meta["A"] == 8 and values["DV"] == 72 and mine_consts["DV"] == 72


def test_smem_budget_reads_device_properties(monkeypatch):
    """The opt-in limit of the device properties wins; without it, the table by capability."""
    props = types.SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=123_456)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert A.smem_budget(0) == 123_456
    del props.shared_memory_per_block_optin
    assert A.smem_budget(0) == 232_448
    props.major, props.minor = 8, 6
    assert A.smem_budget(0) == 101_376


def test_tiles_shrink_with_budget():
    """A smaller budget never gets larger tiles or a deeper pipeline."""
    for kind, d, dtype in itertools.product(GROUPS, (64, 72, 128, 256),
                                            (torch.float32, torch.bfloat16)):
        h100, a100, small = (A.tiles(kind, dtype, d, d, b) for b in (232_448, 166_912, 101_376))
        for bigger, smaller in ((h100, a100), (a100, small)):
            assert all(s <= b for s, b in zip(smaller, bigger)), (kind, d, dtype, bigger, smaller)
