"""Prints the cost table (markdown) from the summaries written by results/cost/measure.sh, next to
an estimate by the rules of Dieleman's table (seed 002: forward 1, backward 2, forward + JVP 2,
backward through forward + JVP 4; no-grad passes count as forwards)."""
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def estimate(method, a):
    """(FPE per training step, how) by Dieleman's rules, read off each file's training step."""
    if method == "fm":
        return 3, "fwd + bwd (Dieleman: 3)"
    if method == "meanflow":  # JVP rows: fwd+JVP 2 and bwd 2 through u only (sg target); other rows 3
        e = 3 + a["ratio"] + (2 if a.get("cfg_kappa", 0) > 0 else 0)
        return e, f"3 + JVP share {a['ratio']:g}" + (" + 2 guidance fwd" if a.get("cfg_kappa", 0) > 0 else "") + " (Dieleman, all rows JVP: 4)"
    if method == "dmd2":  # every step: G fwd (no grad) + fake fwd/bwd; generator turn: G bwd + teacher + fake fwd
        gan_fake, gan_gen = (6, 3) if a["gan_weight"] > 0 else (0, 0)  # disc on fake + real x, gen through fake
        e = 4 + gan_fake + (4 + gan_gen) / a["ttur"]
        return e, f"4{' + 6 GAN' if gan_fake else ''} every step + ({4 + gan_gen}) every {a['ttur']}th"
    if method == "fsf_dmd":  # L_CD: teacher 1 + fwd/JVP 2 + fwd/bwd 3; L_FSF: M-1 no-grad jumps + 3 + teacher + EMA
        m = a["sim_steps"]
        return 6 + (m - 1) + 5, f"CD 6 (AYF-EMD in Dieleman's table: 6) + DM {m + 4}"
    if method == "mfd":  # ratio x (student fwd + aux fwd/bwd) + student fwd/bwd + 2 rollouts of E[K] steps
        n = max(1, round(1 / a["ode_step"])) if a["ode_step"] < 1 else 1
        ek = (n + 1) * (2 * n + 1) / (6 * n)  # E[ceil(|t - r| / h)] for uniform t, r and h = 1 / n
        return 4 * a["ratio"] + 3 + 2 * ek, f"4 x {a['ratio']} aux + 3 + 2 x E[K] {ek:.2f}"
    return None, "—"


def passes(name):
    """The summaries of one run name in every measurement pass (runs/, runs2/, ...)."""
    out = []
    for d in sorted(glob.glob(os.path.join(HERE, "runs*"))):
        out += [json.load(open(p)) for p in glob.glob(os.path.join(d, name, "*", "mnist", "summary.json"))]
    return out


print("| run | FPE (Dieleman's rules) | how | s/step | forward s | FPE measured |")
print("|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(HERE, "runs", "*", "*", "mnist", "summary.json"))):
    args = json.load(open(os.path.join(os.path.dirname(path), "args.json")))
    name = os.path.relpath(path, os.path.join(HERE, "runs")).split(os.sep)[0]
    ss = passes(name)
    s = ss[0]
    est, how = estimate(s["method"], args)
    cell = lambda key, f: " / ".join(f.format(x[key]) for x in ss)
    print(f"| {name} | {est:.3g} | {how} | {cell('sec_per_step', '{:.3f}')} | {cell('fwd_time_s', '{:.4f}')} | {cell('fpe', '{:.2f}')} |")
hw = s["hardware"]
print(f"\nCPU ({hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}), batch {args['batch_size']}, "
      f"{s['params']} parameters; median step time over the run (60 steps; mfd 20); forward time: median of 10 "
      "at start-up. Where a cell holds two numbers they are two passes of measure.sh, one after the other "
      "on the same quiet machine: their spread is the noise of these figures. One training step is the "
      "file's own --steps unit: a DMD2 step updates the generator once in `ttur`, an MFD step is `ratio` "
      "auxiliary updates and one student update. No GPU.")
