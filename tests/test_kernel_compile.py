"""Ahead-of-time compilation of the attention-JVP Triton kernels for real GPUs, without a GPU.

Every kernel group of kernels/attention_jvp.py (plain forward, forward with a tangent in its
fused and two-pass forms, plain backward, backward through the tangent; the row-statistics kernel
included) is compiled by `triton.compile` for GPUTarget("cuda", 80, 32) (A100, 166,912 B of
shared memory per block) and GPUTarget("cuda", 90, 32) (H100, 232,448 B) with the tiles that
`tiles` picks for that budget, and the shared memory of the compiled kernel must fit. This is the
check a launch does on the device (Triton raises OutOfResources), made on CPU. bf16 is checked
only here (the Triton interpreter cannot run bf16 dots).

Compiling costs about 1-2 s of CPU per tf32/bf16/fp16 kernel and up to a minute per fp32-ieee
one (FMA dots), so a plain run (about 15 s of CPU with a cold Triton cache) checks the cases that
did not fit with the previous tiles (64 x 32, 3 stages; numbers from results/attention_jvp/compile.md) at
head dim 72 (DiT-XL/2; the same binary as 128); ATTN_COMPILE_ALL=1 checks every target x group
x dtype x head dim in {64, 72, 128} (results/attention_jvp/compile.py writes that matrix as a
table).
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
QUICK = [(90, "jvp", "tf32", 72),       # fused / two-pass tangent: 262,144 B with the old tiles
         (90, "bwd_jvp", "tf32", 72),   # backward through the tangent: 362,496 B (kv kernel)
         (80, "bwd_jvp", "bf16", 72),   # the same in bf16 on an A100: 186,368 B
         (80, "bwd_jvp", "tf32", 72)]   # fp32 on an A100: the tightest fit of the new tiles
ALL = list(itertools.product(TARGETS, GROUPS, PRECS, (64, 72, 128)))
CASES = ALL if os.environ.get("ATTN_COMPILE_ALL") == "1" else QUICK


@pytest.mark.parametrize("arch,kind,prec,d", CASES, ids=lambda x: str(x))
def test_kernels_fit_shared_memory(arch, kind, prec, d):
    from triton.backends.compiler import GPUTarget

    dtype, dot_prec = PRECS[prec]
    budget = TARGETS[arch]
    compiled = A.compile_ahead(kind, dtype, d, dot_prec, GPUTarget("cuda", arch, 32), budget)
    assert len(compiled) == len(A.VARIANTS[kind])
    for name, flags, t, kernel in compiled:
        assert kernel.metadata.shared <= budget, (
            f"{name} {flags} tiles {t} on sm_{arch}: {kernel.metadata.shared:,} B of shared "
            f"memory > {budget:,} B")


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
