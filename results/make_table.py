"""Regenerates the README's results table from results/<method>/<dataset>/summary.json (and the
table of other samplers and guidance scales from the runs' final metrics.jsonl rows), and
pastes the attention benchmark's printout (results/attention_jvp/bench_cpu.txt), the cost table
(results/cost/cost.md), the steps-to-best table (results/fsf_dmd/steps_to_best.md), the memory
table (results/memory/memory.md) and the kernel compile table (results/attention_jvp/compile.md)
into the README.

    python results/make_table.py          # rewrite the table between the README markers
    python results/make_table.py --check  # exit 1 if the README table is stale (used by the tests)
"""
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- results:start -->", "<!-- results:end -->"
BENCH = os.path.join(ROOT, "results", "attention_jvp", "bench_cpu.txt")  # `python -m kernels.bench > ...`
COST = os.path.join(ROOT, "results", "cost", "cost.md")  # results/cost/measure.sh, then table.py
STEPS = os.path.join(ROOT, "results", "fsf_dmd", "steps_to_best.md")
MEMORY = os.path.join(ROOT, "results", "memory", "memory.md")  # results/memory/measure.py (meta device)
COMPILE = os.path.join(ROOT, "results", "attention_jvp", "compile.md")  # results/attention_jvp/compile.py
# tables derived from logged runs by a script: regenerated here, so --check also catches a stale .md
DERIVED = {COST: os.path.join(ROOT, "results", "cost", "table.py"), STEPS: os.path.join(ROOT, "results", "fsf_dmd", "steps_to_best.py")}


def fmt(v, digits=3):
    return "—" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def best(run_dir, key):
    """The best (lowest) value of `key` over the run's evaluations, and its step."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(r) for r in open(path)] if os.path.exists(path) else []
    rows = [r for r in rows if key in r]
    if len(rows) < 2:
        return "—"
    r = min(rows, key=lambda r: r[key])
    return f"{fmt(r[key])} ({r['step']})"


def table():
    rows = ["| method | data | train steps | metric | 1 step | 2 steps | 4 steps | more steps | best 1 step (at step) | s/step | FPE | wall time | hardware | run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "*", "*", "summary.json"))):
        s = json.load(open(path))
        final = s.get("final", {})
        names = [m for m in ("fid", "ed", "fm_err") if f"{m}@1" in final]  # gmm: both ed and fm_err
        metric = names[0] if names else None
        cell = lambda k: " / ".join(fmt(final.get(f"{m}@{k}")) for m in names) if names else "—"
        more = sorted((int(k.split("@")[1]) for k in final if metric and k.startswith(metric + "@") and int(k.split("@")[1]) > 4))
        hw = s.get("hardware", {})
        hardware = hw.get("gpu") or f"CPU {hw.get('cpu', '?')} x{hw.get('threads', '?')}"
        rel = os.path.relpath(os.path.dirname(path), ROOT)
        rows.append("| " + " | ".join([
            f"[{s['method']}](methods/{s['method']}.py)", s["dataset"], str(s["steps"]), " / ".join(names) or "—",
            *(cell(k) for k in (1, 2, 4)),
            ", ".join(f"{k}: {cell(k)}" for k in more) or "—", best(os.path.dirname(path), f"{metric}@1") if metric else "—",
            fmt(s.get("sec_per_step")), fmt(s.get("fpe"), 2), f"{s['wall_time_s'] / 60:.1f} min", hardware, f"[{rel}]({rel})"]) + " |")
    return "\n".join(rows)


def scale_first(name):
    """Sort key of a sampler suffix: guidance scales (w2, w4) by value, then named samplers."""
    w = name[1:] if name[:1] == "w" else ""
    return (0, float(w), "") if w.replace(".", "", 1).isdigit() else (1, 0.0, name)


def samplers_table():
    """The other samplers and sampling guidance scales of a run (logged as metric@k_<name>, e.g. imf's
    --sample-cfg scales `_w2`, alpha-Flow's `_consistency`), at the run's final step."""
    rows = ["| method | data | train steps | sampler | metric | 1 step | 2 steps | 4 steps | more steps |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(ROOT, "results", "*", "*", "summary.json"))):
        s = json.load(open(path))
        mpath = os.path.join(os.path.dirname(path), "metrics.jsonl")
        last = {}
        for r in (json.loads(line) for line in open(mpath)) if os.path.exists(mpath) else ():
            if r.get("step") == s["steps"]:
                last.update({k: v for k, v in r.items() if "@" in k and "_" in k.split("@")[1]})
        for name in sorted({k.split("_", 2)[-1] for k in last}, key=scale_first):
            names = [m for m in ("fid", "ed", "fm_err") if f"{m}@1_{name}" in last]
            cell = lambda k: " / ".join(fmt(last.get(f"{m}@{k}_{name}")) for m in names)
            more = sorted(int(k.split("@")[1].split("_")[0]) for k in last if k.startswith(names[0] + "@") and k.endswith("_" + name))
            label = f"guidance w = {name[1:]}" if scale_first(name)[0] == 0 else name
            rows.append("| " + " | ".join([f"[{s['method']}](methods/{s['method']}.py)", s["dataset"], str(s["steps"]), label, " / ".join(names),
                                           *(cell(k) for k in (1, 2, 4)), ", ".join(f"{k}: {cell(k)}" for k in more if k > 4) or "—"]) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    new = f"{head}{START}\n{table()}\n{END}{tail}"
    stale = []
    for md, script in DERIVED.items():
        out = subprocess.run([sys.executable, script], capture_output=True, text=True, check=True).stdout
        if not os.path.exists(md) or open(md).read() != out:
            stale.append(os.path.relpath(md, ROOT))
            if "--check" not in sys.argv:
                open(md, "w").write(out)
    if "<!-- samplers:start -->" in new:  # generated, like the results table
        head, rest = new.split("<!-- samplers:start -->")
        _, tail = rest.split("<!-- samplers:end -->")
        new = f"{head}<!-- samplers:start -->\n{samplers_table()}\n<!-- samplers:end -->{tail}"
    pasted = [("bench", BENCH, True), ("cost", COST, False), ("steps", STEPS, False), ("memory", MEMORY, False), ("compile", COMPILE, False)]
    for name, path, fence in pasted:  # pasted verbatim
        if os.path.exists(path) and f"<!-- {name}:start -->" in new:
            head, rest = new.split(f"<!-- {name}:start -->")
            _, tail = rest.split(f"<!-- {name}:end -->")
            body = open(path).read().strip()
            body = f"```\n{body}\n```" if fence else body
            new = f"{head}<!-- {name}:start -->\n{body}\n<!-- {name}:end -->{tail}"
    if "--check" in sys.argv:
        if stale or new != text:
            sys.exit(f"README results table or {', '.join(stale) or 'its sources'} stale: run python results/make_table.py")
        sys.exit(0)
    open(readme, "w").write(new)
