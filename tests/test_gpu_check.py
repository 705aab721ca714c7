"""results/gpu/check.py --dry-run: every section of the GPU check runs at tiny shapes on the CPU and
reports no error and no failed correctness check (the report's own pass flags)."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
           "CLEANFLOW_CACHE": os.environ.get("CLEANFLOW_CACHE", os.path.join(ROOT, ".cache"))}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "results", "gpu", "check.py"), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [report] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    data = json.load(open(tmp_path / report))
    assert data["dry_run"] and sorted(data["sections"]) == list("012345")
    for key, s in data["sections"].items():
        assert s["error"] is None and s["rows"], key
        assert all(r.get("pass", True) for r in s["rows"]), key
    # section 1 compared the fused and two-pass paths with the float64 reference (not a vacuous pass)
    errs = [r["grads fused (max of 6)"] for r in data["sections"]["1"]["rows"] if "grads fused (max of 6)" in r]
    assert errs and max(errs) < 1e-5
    # section 3 timed every planned step, eager and compiled (an exception would leave its text in ms/step)
    rows = data["sections"]["3"]["rows"]
    assert all(isinstance(r["ms/step"], float) for r in rows), rows
    assert {r["compile"] for r in rows} == {False, True}
    # section 4 ran both method files to the end and logged finite losses
    assert {r["method"] for r in data["sections"]["4"]["rows"] if r["exit"] == 0 and r["finite"]} == {"meanflow", "tvm"}
    assert (tmp_path / report.replace(".json", ".md")).read_text().count("## ") == 6
