"""Compiles every Triton kernel of kernels/attention_jvp.py ahead of time for sm_80 (A100) and
sm_90 (H100), without a GPU, and writes compile.md next to this file: shared memory, registers and
spill stack per thread (read from the cubin with the cuobjdump that ships with Triton) and the
tiles chosen, and the global loads in the PTX (16-byte loads incl. cp.async, scalar loads of the element
width), per kernel x target x dtype x head dim, each compiled with the specialization a DiT call's launch
gets (kernels.attention_jvp.compile_ahead: q/k/v views of one qkv tensor). Nothing is run.

    python results/attention_jvp/compile.py   # CPU time per group in the table

A "before" table compiles the tiles of the previous version (BLOCK_M 64, BLOCK_N 32 at head dim
72, 4 warps, Triton's default 3 stages) in the cases that did not fit or that the test guards.
"""
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import kernels.attention_jvp as A  # noqa: E402

TARGETS = {"sm_80": (80, 166_912), "sm_90": (90, 232_448)}
PRECS = {"fp32 ieee": (torch.float32, "ieee"), "fp32 tf32": (torch.float32, "tf32"),
         "bf16": (torch.bfloat16, "tf32"), "fp16": (torch.float16, "tf32")}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def regs_and_stack(kernel):
    """(registers, spill stack bytes) per thread from `cuobjdump -res-usage` on the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    return int(re.search(r"REG:(\d+)", out)[1]), int(re.search(r"STACK:(\d+)", out)[1])


def cpu_seconds():
    """User + system time of this process and its finished children (ptxas): wall time on a
    shared machine says little."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def variant(name, flags):
    if name == "_fwd_kernel":
        return {(False, False): "fwd plain", (True, False): "fwd+jvp fused",
                (True, True): "fwd tangent two-pass"}[flags["HAS_JVP"], flags["TWO_PASS"]]
    return name.strip("_").replace("_kernel", "") + (" +tangent" if flags["HAS_GT"] else " plain")


def rows(cases, t=None):
    """One row per compiled kernel of each (target, precision, head dim, group) case."""
    for tname, pname, d, kind in cases:
        arch, budget = TARGETS[tname]
        dtype, prec = PRECS[pname]
        t0 = cpu_seconds()
        for name, flags, tl_, k in A.compile_ahead(kind, dtype, d, prec,
                                                   GPUTarget("cuda", arch, 32), budget, t):
            reg, stack = regs_and_stack(k)
            shared = k.metadata.shared
            wide, scalar = A.ptx_loads(k.asm["ptx"], dtype)
            yield (variant(name, flags), tname, pname, d,
                   "{}x{} D{} w{} s{}".format(*tl_[:3], *tl_[4:]), f"{shared:,}",
                   "yes" if shared <= budget else "**NO**", reg, stack, wide, scalar,
                   "yes" if "cp.async" in k.asm["ptx"] else "no", f"{cpu_seconds() - t0:.0f}")
        print(tname, pname, d, kind, f"{cpu_seconds() - t0:.0f} s CPU", flush=True)


def table(rows_):
    head = ("kernel", "target", "dtype", "head dim", "tiles (MxN, BLOCK_D, warps, stages)",
            "shared B", "fits", "regs", "spill stack B", "16-byte loads", "scalar loads", "cp.async",
            "compile CPU s (group, so far)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows_]


def main():
    head = ["# Triton attention-JVP kernels compiled ahead of time without a GPU; not run", "",
            f"Triton {triton.__version__}, `python results/attention_jvp/compile.py`. "
            "Budgets: sm_80 (A100) 166,912 B, sm_90 (H100) 232,448 B of shared memory per block. "
            "Registers and spill stack per thread from `cuobjdump -res-usage`; global loads counted "
            "in the PTX (16-byte loads including cp.async; scalar loads of the element width: fp32 "
            "kernels keep a few for the row statistics). Every kernel is compiled with the "
            "specialization its launch gets on a DiT block's call (q/k/v views of one qkv tensor, the "
            "head dim a constant, strides divided by their power-of-2 factor; "
            "`kernels.attention_jvp.compile_ahead`); a case compiled before comes from Triton's cache "
            "(compile time near 0).", ""]
    old = (64, 32, 128, 128, 4, 3)  # previous tiles at head dim 72/128 (3 = Triton's default)
    before = [("sm_90", "fp32 tf32", 72, "jvp"), ("sm_90", "fp32 tf32", 72, "bwd_jvp"),
              ("sm_80", "fp32 tf32", 72, "bwd"), ("sm_80", "bf16", 72, "bwd_jvp")]
    after = [(tn, pn, d, kind) for d in (72, 128, 64) for tn in TARGETS for pn in PRECS
             for kind in A.VARIANTS]
    sections = [("Before: the previous tiles (64 x 32, 4 warps, 3 stages) in the cases that did "
                 "not fit", before, old),
                ("After: tiles chosen by `kernels.attention_jvp.tiles`", after, None)]
    path = Path(__file__).with_name("compile.md")
    out = list(head)
    for title, cases, t in sections:
        out += [f"## {title}", ""] + table([])
        for r in rows(cases, t):  # rewritten after every kernel: a stopped run keeps its rows
            out.append("| " + " | ".join(map(str, r)) + " |")
            path.write_text("\n".join(out) + "\n")
        out.append("")
    path.write_text("\n".join(out) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
