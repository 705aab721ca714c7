"""Prints the cost table (markdown) from the summaries written by results/cost/measure.sh."""
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
print("| run | JVP rows | training guidance | s/step | forward s | FPE |")
print("|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(HERE, "runs", "*", "*", "mnist", "summary.json"))):
    s = json.load(open(path))
    args = json.load(open(os.path.join(os.path.dirname(path), "args.json")))
    name = os.path.relpath(path, os.path.join(HERE, "runs")).split(os.sep)[0]
    jvp = f"{args['ratio']:.0%}" if "ratio" in args else "none"
    cfg = "k 0.5 (2 extra fwd)" if args.get("cfg_kappa", 0) > 0 else "none"
    print(f"| {name} | {jvp} | {cfg} | {s['sec_per_step']:.3f} | {s['fwd_time_s']:.4f} | {s['fpe']:.2f} |")
hw = s["hardware"]
print(f"\nCPU ({hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}), batch {args['batch_size']}, "
      f"{s['params']} parameters; median of {s['steps']} steps. No GPU.")
