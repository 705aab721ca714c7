"""Activation memory of one MeanFlow training micro-batch, measured without a GPU.

Builds the DiT at the paper's B/2 and XL/2 shapes on the meta device (no memory, no compute) and
counts the bytes autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks;
parameters excluded) while methods/meanflow.py's loss runs, for:
  before   the JVP recorded for autograd (u and du/dt from one torch.func.jvp with grad; the
           code before issue 8), plus a plain forward on the s = t rows;
  after    methods/meanflow.py today: du/dt from a JVP without grad, then one forward with grad;
  +ckpt    the same with activation checkpointing of the DiT blocks (--grad-ckpt).
bf16 is emulated by bf16 weights and inputs on meta (autocast has no meta device); the DiT
returns fp32 either way. From the bf16 numbers it computes the largest per-GPU micro-batch that
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


def saved_bytes(net, batch, ratio, mode, dtype):
    args = SimpleNamespace(ratio=ratio, time_mu=-0.4, time_sigma=1.0, norm_p=1.0, norm_eps=0.01, cfg_omega=1.0,
                           cfg_kappa=0.0, cfg_t_min=0.0, cfg_t_max=1.0, dropout=0.0)
    x = torch.randn(batch, 4, 32, 32, device="meta", dtype=dtype)
    y = torch.zeros(batch, dtype=torch.long, device="meta")
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
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mf.meanflow_loss(net, x, y, args, 1000)
    finally:
        mf.mean_velocity_and_target = orig
    return total[0] / batch


if __name__ == "__main__":
    shapes = {"DiT-B/2": (768, 12, 12), "DiT-XL/2": (1152, 28, 16)}
    rows, fits = [], []
    for name, (hidden, depth, heads) in shapes.items():
        with torch.device("meta"):
            net = DiT(32, 2, 4, hidden, depth, heads, 4.0, 1000)
        params = sum(p.numel() for p in net.parameters())
        for dtype in (torch.float32, torch.bfloat16):
            net = net.to(dtype)
            for ratio in (0.25, 1.0):
                r = {m: saved_bytes(net, 4, ratio, m, dtype) / 2**20 for m in ("before", "after", "after+ckpt")}
                rows.append(f"| {name} | {params / 1e6:.0f}M | {str(dtype)[6:]} | {ratio} | {r['before']:.1f} | {r['after']:.1f} | "
                            f"{r['after+ckpt']:.1f} | {r['before'] / r['after']:.2f}x |")
                if dtype == torch.bfloat16:
                    free = 80e9 * 0.9 - 22 * params
                    fits.append(f"| {name} | {ratio} | {int(free // (r['after'] * 2**20))} | {int(free // (r['after+ckpt'] * 2**20))} |")
    out = ["# Activation memory of a MeanFlow training step (per sample, MiB)", "",
           "Measured on the meta device by counting the bytes autograd saves for the backward while "
           "methods/meanflow.py's loss runs (`python results/memory/measure.py`); 256 px latents (4x32x32), "
           "patch 2, 256 tokens. No GPU was used; bf16 = bf16 weights and inputs (autocast has no meta device).", "",
           "| net | params | dtype | ratio (s != t rows) | before: JVP recorded | after: no-grad JVP + forward | after + --grad-ckpt | saved |",
           "|---|---|---|---|---|---|---|---|", *rows, "",
           "## Largest per-GPU micro-batch on an 80 GB GPU in bf16 (COMPUTED, not run)", "",
           "90% of 80 GB minus 22 B/param (fp32 weights, grads, AdamW moments, EMA, bf16 copy), divided by the "
           "activation bytes per sample above. Allocator fragmentation and temporaries (the JVP's own "
           "working set is not saved, so it is not counted) make the real number smaller.", "",
           "| net | ratio | micro-batch | with --grad-ckpt |", "|---|---|---|---|", *fits, ""]
    open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.md"), "w").write("\n".join(out))
    print("\n".join(out))
