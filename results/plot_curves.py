"""Quality over training of the runs on one data set, from results/<method>/<dataset>/metrics.jsonl.

    python results/plot_curves.py --dataset mnist          # writes results/curves_mnist.png

One panel per number of sampling steps (1, 2, 4): the metric of every run that logged it, against
training steps (the x-axis is each file's own --steps count: dmd2 updates its generator once in
`ttur` steps, mfd runs `ratio` auxiliary updates per step). The runs trained from data (fm, the
teacher, with Euler sampling; meanflow, imf, alphaflow, tvm, shortcut) are drawn as horizontal lines at their final quality, and
so is the teacher's 50-step quality.
"""
import argparse
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import evals, read_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FROM_DATA = ("fm", "meanflow", "imf", "alphaflow", "tvm", "shortcut")  # drawn as lines; the distilled runs as curves


def curves(dataset, metric):
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "*", dataset, "metrics.jsonl"))):
        run = read_run(os.path.dirname(path))  # results/compare.py's reader: a corrupt row is a one-line error
        out[path.split(os.sep)[-3]] = {k: evals(run, f"{metric}@{k}") for k in (1, 2, 4, 50)}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--metric", default="fid")
    args = ap.parse_args()
    data = curves(args.dataset, args.metric)
    if not data:
        raise SystemExit(f"--dataset {args.dataset}: no results/*/{args.dataset}/metrics.jsonl")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, k in zip(axes, (1, 2, 4)):
        for i, (method, by_k) in enumerate(data.items()):
            pts = by_k[k]
            if not pts:
                continue
            color = plt.get_cmap("tab20")(i % 20)
            last = pts[-1][1]
            if method in FROM_DATA:  # trained from data: their final quality is the reference
                ax.axhline(last, color=color, ls="--", lw=1, label=f"{method}{' teacher, Euler' if method == 'fm' else ''} (final): {last:.3g}")
            else:
                ax.plot(*zip(*pts), "o-", color=color, ms=3, label=f"{method}: best {min(v for _, v in pts):.3g}")
            if method == "fm" and by_k[50]:
                ax.axhline(by_k[50][-1][1], color=color, ls=":", lw=1, label=f"fm teacher, 50 steps: {by_k[50][-1][1]:.3g}")
        ax.set_title(f"{args.dataset}: {args.metric} of {k}-step samples")
        ax.set_xlabel("training step (the method's --steps count)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"{args.metric} (lower is better)")
    fig.tight_layout()
    out = os.path.join(ROOT, "results", f"curves_{args.dataset}.png")
    fig.savefig(out, dpi=110)
    print(out)
