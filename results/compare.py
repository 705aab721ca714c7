"""Compare run folders: a table and a curves figure for any runs, the repository's or your own.

    python results/compare.py runs/meanflow/gmm runs/tvm/gmm                 # table on stdout, compare.png
    python results/compare.py results/meanflow/mnist results/imf/mnist --out cmp.png --metric fid

A run folder is what a method file writes (`<out-dir>/<exp-name>/<dataset>/`): metrics.jsonl (one
JSON row per log or evaluation step), args.json and, once finished, summary.json. A run still in
progress (no summary.json yet) is read from its metrics.jsonl. The figure has one panel per x-axis:
training steps, wall time (the logged seconds per step summed over the log windows) and FPE-steps
(forward-pass equivalents: the logged FPE summed the same way); for each run the 1-step metric
is a solid line, 2 steps dashed, 4 steps dotted. results/make_table.py and results/plot_curves.py
read runs with the functions of this file.
"""
import json
import os
import sys

METRICS = ("fid", "ed", "fm_err")  # lower is better; fid on images, ed and fm_err on the 2-D sets


def fail(msg):
    raise SystemExit(msg)


def read_json(path, what="file"):
    """A JSON object from `path`; a one-line error for a missing, corrupt or non-object file."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        fail(f"{path}: no such {what}")
    except (OSError, ValueError) as err:
        fail(f"{path}: not a readable JSON {what} ({str(err).splitlines()[0]})")
    if not isinstance(obj, dict):
        fail(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_metrics(path):
    """The rows of a metrics.jsonl; a one-line error naming the line of a torn or corrupt row."""
    rows = []
    try:
        lines = open(path).read().splitlines()
    except OSError as err:
        fail(f"{path}: unreadable metrics log ({err.strerror or err})")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            fail(f"{path}:{i}: not a JSON row (a torn write?): {line[:60]!r}")
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            fail(f"{path}:{i}: expected a JSON object with an integer 'step'")
        rows.append(row)
    return rows


def read_run(run_dir):
    """{'dir', 'args', 'summary', 'rows'} of one run folder (args and summary may be {})."""
    if not os.path.isdir(run_dir):
        fail(f"{run_dir}: not a run folder (no such directory)")
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(mpath):
        fail(f"{run_dir}: not a run folder (no metrics.jsonl)")
    get = lambda name: read_json(os.path.join(run_dir, name), name) if os.path.isfile(os.path.join(run_dir, name)) else {}
    return {"dir": run_dir, "args": get("args.json"), "summary": get("summary.json"), "rows": read_metrics(mpath)}


def metric_of(run):
    """The metric the run logged: fid on images, else fm_err (gmm), else ed; None without evaluations."""
    keys = {k for r in run["rows"] for k in r}
    return next((m for m in ("fid", "fm_err", "ed") if f"{m}@1" in keys), None)


def evals(run, key):
    """[(step, value)] of `key` (e.g. 'fid@1') over the run's evaluations, in step order (a step logged
    twice, as by a resumed run that re-evaluates, keeps its last row)."""
    out = {}
    for r in run["rows"]:
        if isinstance(r.get(key), (int, float)):
            out[r["step"]] = float(r[key])
    return sorted(out.items())


def at_step(run, step):
    """Every evaluated value logged at exactly `step` (later rows win), {} if none."""
    out = {}
    for r in run["rows"]:
        if r["step"] == step:
            out.update({k: v for k, v in r.items() if "@" in k})
    return out


def last_step(run):
    return max((r["step"] for r in run["rows"]), default=0)


def cumulative(run, key):
    """[(step, sum of key x steps)] over the log windows: wall seconds for sec_per_step, FPE-steps for fpe."""
    out, prev, total = [(0, 0.0)], 0, 0.0
    for r in sorted((r for r in run["rows"] if isinstance(r.get(key), (int, float))), key=lambda r: r["step"]):
        if r["step"] > prev:
            total += r[key] * (r["step"] - prev)
            prev = r["step"]
            out.append((prev, total))
    return out


def interp(points, step):
    """Linear interpolation of a cumulative curve at `step` (None past its end)."""
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return None


def within(points, frac=0.1):
    """First evaluated step whose value is within `frac` of the best (lowest) of `points`."""
    if not points:
        return None
    best = min(v for _, v in points)
    return next(s for s, v in points if v <= best * (1 + frac))


def fmt(v, digits=3):
    return "—" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def label(run):
    s, a = run["summary"], run["args"]
    method = s.get("method") or a.get("exp_name") or "?"
    return f"{method}/{s.get('dataset') or a.get('dataset') or '?'} ({run['dir']})"


def table(runs, metric=None):
    head = ("| run | method | data | steps done | of | metric | at step | 1 step | 2 steps | 4 steps | best 1 step (at step) "
            "| within 10% of best at | s/step | FPE | wall time |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        m = metric or metric_of(run)
        s, a = run["summary"], run["args"]
        pts = evals(run, f"{m}@1") if m else []
        last = pts[-1][0] if pts else None
        vals = at_step(run, last) if last is not None else {}
        best = min(pts, key=lambda p: p[1]) if pts else None
        wall = s.get("wall_time_s") if isinstance(s.get("wall_time_s"), (int, float)) else (cumulative(run, "sec_per_step")[-1][1] or None)
        sps = s.get("sec_per_step") if isinstance(s.get("sec_per_step"), (int, float)) else None
        fpe = s.get("fpe") if isinstance(s.get("fpe"), (int, float)) else None
        rows.append("| " + " | ".join([
            run["dir"], str(s.get("method") or a.get("exp_name") or "?"), str(s.get("dataset") or a.get("dataset") or "?"),
            str(last_step(run)), fmt(a.get("steps")), m or "—", fmt(last),
            *(fmt(vals.get(f"{m}@{k}")) for k in (1, 2, 4)),
            f"{fmt(best[1])} ({best[0]})" if best else "—", fmt(within(pts)),
            fmt(sps), fmt(fpe, 2), "—" if wall is None else f"{wall / 60:.1f} min"]) + " |")
    return "\n".join(rows)


def figure(runs, out, metric=None, title=None, dpi=100):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    xs = (("training step", None), ("wall time (s, logged s/step summed)", "sec_per_step"), ("FPE-steps (logged FPE summed)", "fpe"))
    drawn = False
    for i, run in enumerate(runs):
        m = metric or metric_of(run)
        if m is None:
            continue
        color = plt.get_cmap("tab10")(i % 10)
        for ax, (_, key) in zip(axes, xs):
            cum = cumulative(run, key) if key else None
            for k, ls in ((1, "-"), (2, "--"), (4, ":")):
                pts = evals(run, f"{m}@{k}")
                if key:
                    pts = [(interp(cum, s), v) for s, v in pts]
                    pts = [(x, v) for x, v in pts if x is not None]
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", ms=3, color=color, label=f"{label(run)} {m}@{k}" if ax is axes[0] else None)
                    drawn = True
    for ax, (name, _) in zip(axes, xs):
        ax.set_xlabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric or ', '.join(sorted({metric_of(r) or '—' for r in runs}))} (lower is better); 1 step solid, 2 dashed, 4 dotted")
    if drawn:
        axes[0].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return drawn


def main(argv):
    usage = "usage: python results/compare.py RUN_DIR [RUN_DIR ...] [--out FILE.png] [--metric fid|fm_err|ed]"
    dirs, out, metric, i = [], "compare.png", None, 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(__doc__.splitlines()[0] + "\n\n" + usage)
            return 0
        if a in ("--out", "--metric"):
            if i + 1 >= len(argv):
                fail(f"{a}: expected a value ({usage})")
            if a == "--out":
                out = argv[i + 1]
            else:
                metric = argv[i + 1]
            i += 2
            continue
        if a.startswith("-"):
            fail(f"{a}: unknown flag ({usage})")
        dirs.append(a)
        i += 1
    if not dirs:
        fail(usage)
    if metric is not None and metric not in METRICS:
        fail(f"--metric {metric}: expected one of {', '.join(METRICS)}")
    if not out.endswith((".png", ".pdf", ".svg")):
        fail(f"--out {out}: expected a .png, .pdf or .svg file")
    runs = [read_run(d.rstrip("/")) for d in dirs]
    print(table(runs, metric))
    try:
        drawn = figure(runs, out, metric)
    except OSError as err:
        fail(f"--out {out}: cannot write the figure ({err.strerror or err})")
    print(f"\n{out}" if drawn else f"\n{out}: no evaluations to draw yet")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
