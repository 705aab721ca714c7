"""Activation memory of one MeanFlow training micro-batch, measured without a GPU.

Builds the DiT at the paper's B/2 and XL/2 shapes on the meta device (no memory, no compute) and
counts the bytes autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks;
parameters excluded) while methods/meanflow.py's loss runs, for:
  before   the JVP recorded for autograd (u and du/dt from one torch.func.jvp with grad; the
           code before issue 8), plus a plain forward on the s = t rows;
  after    methods/meanflow.py today: du/dt from a JVP without grad, then one forward with grad;
  +ckpt    the same with activation checkpointing of the DiT blocks (--grad-ckpt).
fp32 is measured at full depth on meta. Autocast has no meta device, so bf16 is measured on the
CPU under torch.autocast("cpu", bfloat16) at the full width and depths 1 and 2, and extrapolated
linearly in depth (the blocks are identical); the same extrapolation of fp32 is printed next to
the full-depth meta figure as a check. From the bf16 numbers it computes the largest per-GPU micro-batch that
fits an 80 GB GPU: 80 GB x 0.9 minus the static memory (fp32 weights, grads, AdamW moments and
EMA = 20 B/param, plus a bf16 weight copy = 2 B/param). COMPUTED, not run on a GPU.

    python results/memory/measure.py     (writes results/memory/memory.md)
"""
import importlib.util
import os
import sys
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common.dit import DiT  # noqa: E402

spec = importlib.util.spec_from_file_location("meanflow", os.path.join(ROOT, "methods", "meanflow.py"))
mf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mf)


def old_mean_velocity_and_target(net, x_t, t, s, y, v_g, m):
    """The pre-issue-8 code: plain forward on rows < m, a JVP recorded for autograd on the rest."""
    u, u_tgt = [net(x_t[:m], t[:m], t[:m], y[:m])] if m else [], [v_g[:m]] if m else []
    if m < len(x_t):
        u_j, du_dt = torch.func.jvp(lambda z, t_: net(z, t_, s[m:], y[m:]), (x_t[m:], t[m:]), (v_g[m:], torch.ones_like(t[m:])))
        u.append(u_j)
        u_tgt.append(v_g[m:] - (t[m:] - s[m:]).view(-1, 1, 1, 1) * du_dt)
    return torch.cat(u), torch.cat(u_tgt)


def saved_bytes(net, batch, ratio, mode, bf16=False):
    args = SimpleNamespace(ratio=ratio, time_mu=-0.4, time_sigma=1.0, norm_p=1.0, norm_eps=0.01, cfg_omega=1.0,
                           cfg_kappa=0.0, cfg_t_min=0.0, cfg_t_max=1.0, dropout=0.0)
    dev = next(net.parameters()).device
    x = torch.randn(batch, 4, 32, 32, device=dev)
    y = torch.zeros(batch, dtype=torch.long, device=dev)
    total = [0]

    def pack(t):
        if not (t.is_leaf and t.requires_grad):  # parameters are not activations
            total[0] += t.numel() * t.element_size()
        return t

    net.grad_ckpt = mode == "after+ckpt"
    orig = mf.mean_velocity_and_target
    if mode == "before":
        mf.mean_velocity_and_target = lambda net_, x_t, t, s, y_, v_g, m, dropout: old_mean_velocity_and_target(net_, x_t, t, s, y_, v_g, m)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            mf.meanflow_loss(net, x, y, args, 1000)
    finally:
        mf.mean_velocity_and_target = orig
    return total[0] / batch


if __name__ == "__main__":
    torch.manual_seed(0)
    shapes = {"DiT-B/2": (768, 12, 12), "DiT-XL/2": (1152, 28, 16)}
    modes = ("before", "after", "after+ckpt")
    rows, fits = [], []
    for name, (hidden, depth, heads) in shapes.items():
        with torch.device("meta"):
            params = sum(p.numel() for p in DiT(32, 2, 4, hidden, depth, heads, 4.0, 1000).parameters())
        for ratio in (0.25, 1.0):
            with torch.device("meta"):
                full = {m: saved_bytes(DiT(32, 2, 4, hidden, depth, heads, 4.0, 1000), 4, ratio, m) / 2**20 for m in modes}
            ext = {}
            for bf16 in (False, True):
                small = [{m: saved_bytes(DiT(32, 2, 4, hidden, d, heads, 4.0, 1000), 4, ratio, m, bf16) / 2**20 for m in modes}
                         for d in (1, 2)]
                ext[bf16] = {m: small[0][m] + (depth - 1) * (small[1][m] - small[0][m]) for m in modes}
            rows.append(f"| {name} | {params / 1e6:.0f}M | {ratio} | " + " | ".join(
                f"{full[m]:.1f} ({ext[False][m]:.1f}) / {ext[True][m]:.1f}" for m in modes) + f" | {full['before'] / full['after']:.2f}x |")
            free = 80e9 * 0.9 - 22 * params
            peak_ckpt = ext[True]["after+ckpt"] + ext[True]["after"] / depth  # plus one block's activations during its recompute
            fits.append(f"| {name} | {ratio} | {int(free // (ext[True]['after'] * 2**20))} | {int(free // (peak_ckpt * 2**20))} |")
    out = ["Activation memory of one MeanFlow training step, MiB per sample: bytes autograd saves for the backward "
           "while methods/meanflow.py's loss runs (`python results/memory/measure.py`); 256 px latents (4x32x32), patch 2, "
           "256 tokens. Each cell: fp32 measured at full depth on the meta device (in brackets: extrapolated from depths 1-2 "
           "on the CPU, a check) / bf16 under CPU autocast, extrapolated from depths 1-2. No GPU was used.", "",
           "| net | params | ratio (s != t rows) | before: JVP recorded | after: no-grad JVP + forward | after + --grad-ckpt | fp32 saved |",
           "|---|---|---|---|---|---|---|", *rows, "",
           "Largest per-GPU micro-batch on an 80 GB GPU in bf16 (COMPUTED, not run):", "",
           "90% of 80 GB minus 22 B/param (fp32 weights, grads, AdamW moments, EMA, bf16 copy), divided by the "
           "activation bytes per sample above (with --grad-ckpt: the saved bytes plus one block's activations, "
           "recomputed in the backward). Allocator fragmentation and temporaries (the no-grad JVP's own "
           "working set is not saved, so it is not counted) make the real number smaller.", "",
           "| net | ratio | micro-batch | with --grad-ckpt |", "|---|---|---|---|", *fits, ""]
    open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.md"), "w").write("\n".join(out))
    print("\n".join(out))
