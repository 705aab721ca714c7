"""The generated documentation and the run readers: results/make_table.py (README methods table, the
per-method pages, results/leaderboard.md, --check, one-line errors on bad input), results/compare.py
(any run folders, a fresh one included) and the --help layout of common/run.py's parse_args."""
import contextlib
import io
import json
import os
import runpy
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "results"))
import compare  # noqa: E402
import make_table as mt  # noqa: E402


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A copy of what make_table reads and writes (no weights, no images), with make_table pointed at it."""
    skip = shutil.ignore_patterns("*.safetensors", "*.png", "__pycache__")
    for d in ("results", "methods"):
        shutil.copytree(os.path.join(ROOT, d), tmp_path / d, ignore=skip)
    (tmp_path / "kernels").mkdir()
    for f in ("README.md", "kernels/README.md"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    monkeypatch.setattr(mt, "ROOT", str(tmp_path))
    return tmp_path


def err(fn, *a):
    with pytest.raises(SystemExit) as e:
        fn(*a)
    msg = str(e.value.code)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_check_passes_on_the_repository():
    assert mt.main(["--check"]) == 0


def test_check_names_a_stale_page_and_regenerating_fixes_it(repo, monkeypatch):
    page = repo / "results" / "imf" / "README.md"
    text = page.read_text()
    assert "| 29.7 |" in text  # imf's mnist 1-step fid at step 5000, from results/imf/mnist/metrics.jsonl
    page.write_text(text.replace("| 29.7 |", "| 28.7 |", 1))
    assert "results/imf/README.md" in err(mt.main, ["--check"])
    # a new evaluation row changes the page, the leaderboard and the README's methods table
    with open(repo / "results" / "meanflow" / "mnist" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5000, "fid@1": 12.5, "fid@2": 11.0, "fid@4": 10.0}) + "\n")
    monkeypatch.setattr(mt, "figure", lambda *a, **k: True)  # no curves drawn in this test
    with contextlib.redirect_stdout(io.StringIO()):
        assert mt.main([]) == 0
    assert "| 29.7 |" in page.read_text()
    board = (repo / "results" / "leaderboard.md").read_text()
    assert "| 12.5 | 11 | 10 |" in board
    assert "| 12.5 | [page](results/meanflow/README.md) |" in (repo / "README.md").read_text()
    for m in ("meanflow", "imf"):  # the curves are checked for existence only: draw placeholders
        for d in ("gmm", "mnist"):
            (repo / "results" / m / f"curves_{d}.png").write_bytes(b"")
    stale = err(mt.main, ["--check"])
    assert "README" not in stale and "leaderboard" not in stale and "curves_" in stale  # only the other methods' curves


def test_bad_input_is_one_line_and_writes_nothing(repo):
    readme = repo / "README.md"
    before = readme.read_text()
    assert "--chek" in err(mt.main, ["--chek"])
    assert readme.read_text() == before
    readme.write_text(before.replace("<!-- methods:end -->", ""))
    assert "README.md" in err(mt.main, [])
    readme.write_text(before)
    summary = repo / "results" / "tvm" / "gmm" / "summary.json"
    good = summary.read_text()
    summary.write_text(good[: len(good) // 2])
    assert "results/tvm/gmm/summary.json" in err(mt.main, ["--check"])
    s = json.loads(good)
    del s["wall_time_s"]
    summary.write_text(json.dumps(s))
    row = [r for r in mt.page_runs("tvm").splitlines() if "tvm/gmm](gmm)" in r][0]
    assert "| — | CPU" in row  # the wall-time cell
    log = repo / "results" / "fm" / "gmm" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3] + [lines[3][:20]] + lines[4:]) + "\n")
    assert "results/fm/gmm/metrics.jsonl:4" in err(mt.main, ["--check"])
    assert readme.read_text() == before


def fake_run(root, rel, seed, steps, batch, evals, metric="ed", **extra):
    d = root / rel
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps({"seed": seed, "steps": steps, "batch_size": batch, "dataset": rel.split("/")[2],
                                             "eval_every": 500, **extra}))
    rows = [{"step": s, "sec_per_step": 0.1, "fpe": 3.0} for s in range(100, steps + 1, 100)]
    rows += [{"step": s, f"{metric}@1": v, f"{metric}@2": v / 2, f"{metric}@4": v / 4} for s, v in evals]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["step"])))
    (d / "summary.json").write_text(json.dumps({"method": rel.split("/")[1], "fpe": 3.0, "sec_per_step": 0.1}))


def test_leaderboard_reads_the_standard_step_pools_seeds_and_lists_other_budgets(tmp_path, monkeypatch):
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "fm.py").write_text('"""fm."""\n')
    (tmp_path / "methods" / "dmd2.py").write_text('"""dmd2."""\n')
    fake_run(tmp_path, "results/fm/gmm", 0, 5000, 256, [(1000, 0.08), (2000, 0.021), (3000, 0.02), (5000, 0.001)])
    fake_run(tmp_path, "results/fm/gmm/variants/s1", 1, 3000, 256, [(1000, 0.09), (2000, 0.05), (3000, 0.04)])
    fake_run(tmp_path, "results/dmd2/gmm", 0, 800, 256, [(400, 0.5), (800, 0.3)])
    fake_run(tmp_path, "results/dmd2/mnist", 0, 2000, 32, [(2000, 40.0)], metric="fid")
    fake_run(tmp_path, "results/fm/mnist", 0, 6000, 64, [(5000, 50.0), (6000, 45.0)], metric="fid", alpha_k_end=6000, **mt.MNIST_DIT)
    monkeypatch.setattr(mt, "ROOT", str(tmp_path))
    board = mt.leaderboard()
    row = [r for r in board.splitlines() if r.startswith("| [fm]")][0].split(" | ")
    assert row[2:4] == ["0, 1", "3000 of 3000/5000"]
    assert row[4:7] == ["0.03 ± 0.01", "0.015 ± 0.005", "0.0075 ± 0.0025"]  # the step-3000 rows, not step 5000's 0.001
    assert row[10] == "2000 (500); 3000 (500)"  # first evaluation within 10% of each run's best up to step 3000
    assert "not at the standard budget (ran 800 steps): no evaluation at step 3000 | 800 | 0.3 | 0.15 | 0.075 |" in board
    assert "not at the standard budget (ran 2000 steps): --batch-size 32 (standard 64)" in board
    assert mt.standard_fid1("dmd2") == "— (ran 2000)"
    assert "(ran 6000 steps): --alpha-k-end 6000 past step 5000 | 6000 | 45 |" in board  # a curriculum not ended at 5000


def test_a_new_method_file_gets_a_skeleton_page(repo, monkeypatch):
    shutil.copy(repo / "methods" / "fm.py", repo / "methods" / "newm.py")
    assert "results/newm/README.md (missing)" in err(mt.main, ["--check"])
    monkeypatch.setattr(mt, "figure", lambda *a, **k: True)
    with contextlib.redirect_stdout(io.StringIO()):
        mt.main([])
    page = (repo / "results" / "newm" / "README.md").read_text()
    assert "<!-- runs:start -->\nNo reference run yet.\n<!-- runs:end -->" in page and "[newm.py](methods/newm.py)" in (repo / "README.md").read_text()


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """A few steps of meanflow on gmm, in-process, logging every step and evaluating twice."""
    out = tmp_path_factory.mktemp("runs")
    argv = sys.argv
    sys.argv = ["meanflow.py", "--steps", "4", "--batch-size", "16", "--hidden", "16", "--depth", "1", "--eval-every", "2",
                "--eval-samples", "64", "--eval-batch", "64", "--eval-steps", "1", "2", "--log-every", "1", "--ckpt-every", "4",
                "--out-dir", str(out)]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(os.path.join(ROOT, "methods", "meanflow.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return str(out / "meanflow" / "gmm")


def test_compare_on_repository_runs_and_a_fresh_run(fresh_run, tmp_path):
    png = str(tmp_path / "cmp.png")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compare.main([os.path.join(ROOT, "results", "meanflow", "mnist"), os.path.join(ROOT, "results", "imf", "mnist"), fresh_run, "--out", png])
    rows = {r.split(" | ")[0].lstrip("| "): r.split(" | ") for r in buf.getvalue().splitlines() if r.startswith("| /")}
    summary = json.load(open(os.path.join(ROOT, "results", "imf", "mnist", "summary.json")))
    imf = rows[os.path.join(ROOT, "results", "imf", "mnist")]
    assert imf[5:10] == ["fid", "5000", f"{summary['final']['fid@1']:.3g}", f"{summary['final']['fid@2']:.3g}", f"{summary['final']['fid@4']:.3g}"]
    fresh = rows[fresh_run]
    metrics = [json.loads(line) for line in open(os.path.join(fresh_run, "metrics.jsonl"))]
    last = [r for r in metrics if "fm_err@1" in r][-1]
    assert fresh[3:8] == ["4", "4", "fm_err", "4", f"{last['fm_err@1']:.3g}"] and fresh[9] == "—"  # no 4-step evaluation asked
    wall = sum(r["sec_per_step"] for r in metrics if "sec_per_step" in r)  # logged every step: the sum of the windows
    assert compare.cumulative(compare.read_run(fresh_run), "sec_per_step")[-1] == (4, pytest.approx(wall))
    assert os.path.getsize(png) > 10000
    os.remove(os.path.join(fresh_run, "summary.json"))  # a run in progress: read from its log alone
    assert compare.table([compare.read_run(fresh_run)]).count("| fm_err | 4 |") == 1


def test_compare_bad_input_is_one_line(tmp_path):
    assert "no such directory" in err(compare.main, [str(tmp_path / "nope")])
    assert "no metrics.jsonl" in err(compare.main, [str(tmp_path)])
    assert "--metric" in err(compare.main, [os.path.join(ROOT, "results", "fm", "gmm"), "--metric", "fiid"])
    assert "--outt: unknown flag" in err(compare.main, [os.path.join(ROOT, "results", "fm", "gmm"), "--outt", "x.png"])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "ed@1": 0.\n')
    assert "metrics.jsonl:2" in err(compare.main, [str(tmp_path)])


def test_help_opens_with_the_description_and_boxes_the_method_flags(monkeypatch):
    import methods.meanflow as mf
    from common.run import parse_args

    monkeypatch.setattr(sys, "argv", ["methods/meanflow.py", "--help"])
    monkeypatch.setitem(sys.modules, "__main__", mf)
    monkeypatch.setenv("COLUMNS", "200")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        parse_args(mf.Args)
    assert e.value.code == 0
    out = buf.getvalue()
    text = [line for line in out.splitlines() if line.strip() and not line.startswith("usage")]
    assert text[0].strip() == mf.__doc__.splitlines()[0]
    own, shared = out.split("meanflow-flags")[1].split("shared-flags")
    assert "--ratio" in own and "--cfg-kappa" in own and "--seed" not in own and "--device" not in own
    assert "--seed" in shared and "--device" in shared and "--ratio" not in shared


def test_readers_keep_a_steps_last_row_and_weight_log_windows_by_length(tmp_path):
    rows = [{"step": 50, "sec_per_step": 0.2, "fpe": 4.0}, {"step": 100, "sec_per_step": 0.4, "fpe": 2.0},
            {"step": 100, "ed@1": 0.5}, {"step": 100, "ed@1": 0.3}]  # a resumed run re-evaluated step 100
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = compare.read_run(str(tmp_path))
    assert compare.evals(run, "ed@1") == [(100, 0.3)] and compare.at_step(run, 100) == {"ed@1": 0.3}
    assert compare.cumulative(run, "sec_per_step") == [(0, 0.0), (50, pytest.approx(10.0)), (100, pytest.approx(30.0))]
    assert compare.cumulative(run, "fpe") == [(0, 0.0), (50, 200.0), (100, 300.0)]


def test_page_flags_are_the_files_own_args():
    import dataclasses

    import methods.tvm as tvm
    fields = [f for f in dataclasses.fields(tvm.Args)]
    own = fields[[f.name for f in fields].index("device") + 1:]
    rows = mt.page_flags("tvm").splitlines()[2:]
    assert [r.split(" | ")[0].strip("| `") for r in rows] == ["--" + f.name.replace("_", "-") for f in own]
    assert [r.split(" | ")[1].strip("`") for r in rows] == [repr(f.default) for f in own]


def test_readme_is_a_front_page():
    """The README stays a front page of at most 25 KB as method files (and their table rows) are added:
    details belong on the pages (results/<method>/README.md) and beside what they describe."""
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size <= 25 * 1024, f"README.md is {size} bytes: move details to the pages"


def test_findings_name_the_best_run_at_the_standard_step_and_those_within_ten_percent(tmp_path, monkeypatch):
    """results/README.md's 'what the leaderboard shows' is generated from the standard step, not the last one."""
    (tmp_path / "methods").mkdir()
    for m in ("fm", "meanflow", "dmd2", "ayf"):
        (tmp_path / "methods" / f"{m}.py").write_text(f'"""{m}."""\n')
    monkeypatch.setattr(mt, "DISTILLED", ("dmd2", "ayf"))
    fake_run(tmp_path, "results/fm/gmm", 0, 5000, 256, [(3000, 0.05), (5000, 0.001)])  # step 5000 must not count
    fake_run(tmp_path, "results/meanflow/gmm", 0, 3000, 256, [(3000, 0.0104)])
    fake_run(tmp_path, "results/dmd2/gmm", 0, 3000, 256, [(3000, 0.0100)])
    fake_run(tmp_path, "results/ayf/gmm", 0, 3000, 256, [(3000, 0.0125)])
    monkeypatch.setattr(mt, "ROOT", str(tmp_path))
    mt._CACHE = {}
    row = [r for r in mt.findings().splitlines() if r.startswith("| gmm | 1 |")][0].split(" | ")
    assert row[3:8] == ["dmd2 0.01", "meanflow 0.0104", "meanflow 0.0104", "dmd2 0.01", "3 of 3 (0.05)"], row
