"""Our MeanFlow training step against lucidrains' MeanFlow (rectified-flow-pytorch), side by side in one
process on the CPU: the same DiT, batch, optimizer and data; time per step and peak tensor memory.

    pip install --no-deps rectified-flow-pytorch==0.14.0 einops
    OMP_NUM_THREADS=1 python results/peers/meanflow_vs_lucidrains.py [--steps 20] [--out results/peers]

The peer's mean_flow.py is loaded by its file path: the package's __init__ imports every other module
of the package and their many requirements, which MeanFlow itself does not use. Its model call is
model(x_t, t, t - s, y); ours is net(x_t, t, s, y): a wrapper passes s = t - (t - s), so both push the
tangent (v, 1, 0) on (x_t, t, s). What differs is how the JVP is taken: ours one JVP without grad
(its output is detached in the target anyway) plus one forward with grad; the peer one torch.func.jvp
recorded by autograd (primal and tangent). Three settings: every row a JVP row (ours --ratio 1, the
peer prob_default_flow_obj 0), no JVP row (ratio 0 / prob 1), and each file's default (ours: 25% of
the rows in every batch; the peer: the whole batch with probability 0.5, drawn per step).
Times: median over `--steps` interleaved steps (ours, peer, ours, ...) after 2 warm-up steps each;
memory: the peak total size of the tensors alive during one step (kernels.bench.PeakTensorMemory;
tensor data only, no allocator overhead). The figures depend on the machine and its load: the ratios
are the result.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from common.dit import DiT  # noqa: E402
from kernels.bench import PeakTensorMemory  # noqa: E402


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peer_module():
    try:
        import rectified_flow_pytorch  # noqa: F401 - only to find the installed files (its __init__ may fail)
    except ImportError as err:
        if "rectified_flow_pytorch" in str(err):
            raise SystemExit("rectified-flow-pytorch is not installed: pip install --no-deps rectified-flow-pytorch==0.14.0 einops")
    except Exception:  # noqa: BLE001 - the package exists but its __init__ needs what MeanFlow does not
        pass
    spec = importlib.util.find_spec("rectified_flow_pytorch")
    path = os.path.join(list(spec.submodule_search_locations)[0], "mean_flow.py")
    return load(path, "peer_mean_flow")


def main():
    ap = argparse.ArgumentParser(prog="python results/peers/meanflow_vs_lucidrains.py", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each implementation per setting")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "peers"))
    ap.add_argument("--report-only", action="store_true", help="rewrite README.md from the saved JSON, measure nothing")
    a = ap.parse_args()
    if a.report_only:
        return write_readme(json.load(open(os.path.join(a.out, "meanflow_vs_lucidrains.json"))), a.out)
    peer = peer_module()
    ours = load(os.path.join(ROOT, "methods", "meanflow.py"), "ours_meanflow")
    torch.manual_seed(0)
    # the meanflow mnist reference run's DiT (hidden 128, depth 4, heads 4, patch 4) and batch
    cfg = dict(input_size=28, patch_size=4, in_channels=1, hidden=128, depth=4, heads=4, num_classes=10)
    x = torch.randn(a.batch, 1, 28, 28)
    y = torch.randint(0, 10, (a.batch,))

    class Wrap(torch.nn.Module):  # the peer's call (x_t, t, t - s, y) onto our DiT's (x_t, t, s, y)
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x_t, t, dt, y):
            return self.net(x_t, t, t - dt, y)

    rows = []
    for setting, ratio, prob in (("every row a JVP row", 1.0, 0.0), ("no JVP row (flow matching)", 0.0, 1.0),
                                 ("each file's default", 0.25, 0.5)):
        net_o, net_p = DiT(**cfg), DiT(**cfg)
        net_p.load_state_dict(net_o.state_dict())
        args = ours.Args(ratio=ratio)
        mf = peer.MeanFlow(Wrap(net_p), accept_cond=True, adaptive_loss_weight_p=1.0, prob_default_flow_obj=prob)
        opt_o, opt_p = (torch.optim.AdamW(n.parameters(), lr=1e-4) for n in (net_o, net_p))

        def step_o():
            loss, _ = ours.meanflow_loss(net_o, x, y, args, 10)
            loss.backward()
            opt_o.step()
            opt_o.zero_grad(set_to_none=True)

        def step_p():
            loss = mf(x, cond=y)
            loss.backward()
            opt_p.step()
            opt_p.zero_grad(set_to_none=True)

        times = {"ours": [], "peer": []}
        for _ in range(2):
            step_o(), step_p()
        for _ in range(a.steps):
            for name, fn in (("ours", step_o), ("peer", step_p)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        mem = {}
        for name, fn in (("ours", step_o), ("peer", step_p)):
            peaks = []
            for _ in range(3 if prob not in (0.0, 1.0) else 1):  # the peer's default draws its branch per step
                with PeakTensorMemory() as tr:
                    fn()
                peaks.append(tr.peak / 2**20)
            mem[name] = max(peaks)
        t_o, t_p = statistics.median(times["ours"]), statistics.median(times["peer"])
        rows.append({"setting": setting, "ours s/step": t_o, "peer s/step": t_p, "peer / ours time": t_p / t_o,
                     "ours peak MB": mem["ours"], "peer peak MB": mem["peer"], "peer / ours memory": mem["peer"] / mem["ours"]})
        print(rows[-1], flush=True)
    info = {"date": datetime.date.today().isoformat(), "where": f"CPU ({platform.processor() or platform.machine()}), "
            f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at the end", "torch": torch.__version__,
            "batch": a.batch, "dit": cfg, "steps": a.steps, "peer": "rectified-flow-pytorch 0.14.0, rectified_flow_pytorch/mean_flow.py",
            "command": "OMP_NUM_THREADS=1 python results/peers/meanflow_vs_lucidrains.py " + " ".join(sys.argv[1:])}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "meanflow_vs_lucidrains.json.tmp"), "w") as f:
        json.dump({**info, "rows": rows}, f, indent=1)
    os.replace(os.path.join(a.out, "meanflow_vs_lucidrains.json.tmp"), os.path.join(a.out, "meanflow_vs_lucidrains.json"))
    print(write_readme({**info, "rows": rows}, a.out))


def write_readme(data, out):
    """results/peers/README.md from the measurement's JSON (the numbers are never typed by hand)."""
    rows = data["rows"]
    cols = list(rows[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join([
        "# Peers: our MeanFlow step beside other implementations", "",
        "Generated by `results/peers/meanflow_vs_lucidrains.py` (its docstring says what is compared and how); "
        "rewrite this page from the JSON with `--report-only`.", "",
        f"## MeanFlow: cleanflow vs lucidrains' rectified-flow-pytorch ({data['date']})", "",
        f"Same DiT ({data['dit']['hidden']} wide, depth {data['dit']['depth']}, {data['dit']['heads']} heads, patch "
        f"{data['dit']['patch_size']}, mnist 28 px), batch {data['batch']}, AdamW, median of {data['steps']} interleaved steps. "
        f"Measured on {data['where']}; torch {data['torch']}; peer: {data['peer']}.", "",
        *md, "",
        "- Every row a JVP row: ours takes the JVP without grad and then one forward with grad (one forward more than the peer), "
        "the peer records its JVP for autograd (primal and tangent) and back-propagates through the primal: ours costs more "
        "time and less than half the memory.",
        "- No JVP row: both are a plain flow-matching step on the same network (a check of the harness: ratio 1).",
        "- Each file's default: ours puts a JVP on 25% of the rows of every batch; the peer on the whole batch in half the steps "
        "(the paper's 25-50%); its peak memory is the largest of 3 steps drawn while memory was read: the first row's figure "
        "if one of them was a JVP step, the flow-matching figure if none was.",
        f"- Command: `{data['command']}`. On a loaded shared CPU the seconds move; the ratios are the result.", ""])
    tmp = os.path.join(out, "README.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "README.md"))
    return text


if __name__ == "__main__":
    main()
