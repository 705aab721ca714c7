"""Our MeanFlow training step against lucidrains' `rectified-flow-pytorch` MeanFlow, side by side in
one process on CPU: the same DiT (common.dit, methods/meanflow.py's defaults on mnist: hidden 256,
depth 4, 4 heads, patch 4, 10 classes), the same batch of mnist-shaped data, loss + backward.

    pip install --no-deps --target /tmp/rfp rectified-flow-pytorch==0.14.0   # needs einops
    OMP_NUM_THREADS=1 PYTHONPATH=.:/tmp/rfp python results/peers/meanflow_lucidrains.py

Two pairings: "all rows JVP" (ours --ratio 1, theirs prob_default_flow_obj 0: every step pays a
JVP on the whole batch) is like for like; "defaults" compares each as shipped (ours: a JVP on 25%
of the rows; theirs: a JVP on the whole batch in half of the steps, a plain forward otherwise,
so its mean over steps is reported). Time: median wall time of a step (loss + backward) over
interleaved repetitions. Memory: the bytes autograd saves for the backward (distinct storages, via
saved_tensors_hooks), i.e. the activation memory a GPU would hold at the step's peak; on CPU the
process's peak RSS mixes both implementations, so it is not used. Writes meanflow_lucidrains.md.
"""
import importlib.util
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common.dit import DiT  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "methods"))
import meanflow  # noqa: E402


def load_lucidrains():
    """rectified_flow_pytorch/mean_flow.py alone (the package __init__ imports many extras)."""
    spec = importlib.util.find_spec("rectified_flow_pytorch")
    if spec is None:
        raise SystemExit("rectified-flow-pytorch is not importable: see the command in this file's docstring")
    path = os.path.join(spec.submodule_search_locations[0], "mean_flow.py")
    mod_spec = importlib.util.spec_from_file_location("lucidrains_mean_flow", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    from importlib.metadata import version
    return mod.MeanFlow, version("rectified-flow-pytorch")


class TimeDelta(torch.nn.Module):
    """Their model signature (x, t, t - r, cond) on our DiT's (x, t, s = r, y)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, delta, y):
        return self.net(x, t, t - delta, y)


def saved_bytes(step):
    """Bytes of distinct storages autograd saves for the backward during step()."""
    seen = {}

    def pack(t):
        u = t
        while torch._C._functorch.is_functorch_wrapped_tensor(u):  # saved inside torch.func.jvp
            u = torch._C._functorch.get_unwrapped(u)
        try:
            seen[u.untyped_storage().data_ptr()] = u.untyped_storage().nbytes()
        except RuntimeError:  # no reachable storage: count the tensor itself
            seen[("t", id(t))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def main(batch=64, reps=5):
    MeanFlow, their_version = load_lucidrains()
    torch.manual_seed(0)
    net = DiT(input_size=28, patch_size=4, in_channels=1, hidden=256, depth=4, heads=4, num_classes=10)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    null = 10
    rows = []
    for pairing, ratio, prob in (("all rows JVP", 1.0, 0.0), ("defaults", 0.25, 0.5)):
        args = meanflow.Args(ratio=ratio)
        theirs = MeanFlow(TimeDelta(net), data_shape=(1, 28, 28), accept_cond=True, prob_default_flow_obj=prob)

        def ours_step():
            loss, _ = meanflow.meanflow_loss(net, x, y, args, null)
            loss.backward()

        def theirs_step(jvp):  # their per-step coin (random() < prob: no JVP), fixed each way
            theirs.prob_default_flow_obj = 0.0 if jvp else 1.0
            theirs(x, cond=y).backward()

        variants = {"ours": ours_step, "theirs (JVP step)": lambda: theirs_step(True)}
        if prob > 0:
            variants["theirs (plain step)"] = lambda: theirs_step(False)
        times = {k: [] for k in variants}
        for f in variants.values():  # warm-up
            net.zero_grad(set_to_none=True)
            f()
        for _ in range(reps):
            for k, f in variants.items():
                net.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        mem = {}
        for k, f in variants.items():
            net.zero_grad(set_to_none=True)
            mem[k] = saved_bytes(f)
        med = {k: statistics.median(v) for k, v in times.items()}
        if prob > 0:  # their mean step: a JVP step with probability 1 - prob
            med["theirs (mean step)"] = (1 - prob) * med["theirs (JVP step)"] + prob * med["theirs (plain step)"]
            mem["theirs (mean step)"] = max(mem["theirs (JVP step)"], mem["theirs (plain step)"])  # the peak
        ref_t, ref_m = med["ours"], mem["ours"]
        for k in med:
            rows.append((pairing, k, med[k] * 1e3, med[k] / ref_t, mem[k] / 2 ** 20, mem[k] / ref_m))
        print(pairing, {k: f"{v * 1e3:.0f} ms" for k, v in med.items()}, {k: f"{v / 2**20:.0f} MiB" for k, v in mem.items()},
              flush=True)

    lines = ["# Our MeanFlow step vs lucidrains' rectified-flow-pytorch MeanFlow (CPU, one process)", "",
             f"Same DiT (hidden 256, depth 4, 4 heads, patch 4: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M "
             f"parameters), same batch of {batch} mnist-shaped rows with labels, loss + backward. "
             f"rectified-flow-pytorch {their_version}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} thread(s), median of {reps} interleaved repetitions. Attention in both: "
             "kernels.attention_jvp.sdpa (the reference path on CPU), so the difference is the loss code. "
             "Memory: bytes autograd saves for the backward (distinct storages). "
             f"Load average at the end: {os.getloadavg()[0]:.1f} (other jobs share the CPUs: times are noisy, "
             "the repetitions interleave the implementations so that the ratios see the same load).", "",
             "`OMP_NUM_THREADS=1 PYTHONPATH=.:/tmp/rfp python results/peers/meanflow_lucidrains.py` "
             "(after `pip install --no-deps --target /tmp/rfp rectified-flow-pytorch==0.14.0`)", "",
             "| pairing | implementation | ms / step | time vs ours | saved for backward (MiB) | memory vs ours |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p} | {k} | {ms:.0f} | {tr:.2f}x | {mb:.1f} | {mr:.2f}x |" for p, k, ms, tr, mb, mr in rows]
    lines += ["", "Why: ours computes du/dt by a JVP without grad (autograd records no tangent) plus one plain "
              "forward with grad; theirs back-propagates through torch.func.jvp's primal, so autograd also keeps "
              "the tangent computation's intermediates. Ours with --ratio 0.25 runs the JVP on a quarter of "
              "the rows only."]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meanflow_lucidrains.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
