"""Steps to best quality, FSF-DMD against DMD2 (seed 003: 4K against 15K iterations), read from
the reference runs' logs results/{dmd2,fsf_dmd}/<dataset>/metrics.jsonl.

    python results/fsf_dmd/steps_to_best.py > results/fsf_dmd/steps_to_best.md

For every run and number of sampling steps: the best logged value, the training step where it was
logged, the first step within 10% of it, the generator updates these steps are (DMD2 updates its
generator once in `ttur` steps), the wall time to that first step (steps x the run's median logged
s/step; the runs shared the CPU with other jobs, so compare them only roughly), and whether the run had stopped improving (the best is not the
last evaluation). A best at the last evaluation means the run had not peaked: its step is only a
lower bound of the steps to best quality.
"""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

print("| method | data | metric | best | at step | first within 10% | generator updates to best | time to within 10% | evaluations | peaked? |")
print("|---|---|---|---|---|---|---|---|---|---|")
for dataset, metric in (("gmm", "ed"), ("mnist", "fid")):
    for method in ("dmd2", "fsf_dmd"):
        run = os.path.join(ROOT, "results", method, dataset)
        if not os.path.exists(os.path.join(run, "metrics.jsonl")):
            continue
        args = json.load(open(os.path.join(run, "args.json")))
        per_gen = args.get("ttur", 1)  # training steps per generator update
        rows = [json.loads(r) for r in open(os.path.join(run, "metrics.jsonl"))]
        sec = sorted(r["sec_per_step"] for r in rows if "sec_per_step" in r)[len([r for r in rows if "sec_per_step" in r]) // 2]
        for k in (1, 2):
            pts = [(r["step"], r[f"{metric}@{k}"]) for r in rows if f"{metric}@{k}" in r]
            if not pts:
                continue
            step, val = min(pts, key=lambda p: p[1])
            near = next(s for s, v in pts if v <= 1.1 * val)
            peaked = "yes" if step < pts[-1][0] else f"no (best at the last of {pts[-1][0]} steps)"
            print(f"| {method} | {dataset} | {metric}@{k} | {val:.3g} | {step} | {near} | {step // per_gen} | {near * sec / 60:.0f} min | "
                  f"{len(pts)} (every {pts[1][0] - pts[0][0] if len(pts) > 1 else '—'}) | {peaked} |")
