"""`--compile` (common/run.py `compiled`): the losses under torch.compile.

1. No graph break: the DiT's attention is one node of the graph (kernels/attention_jvp.py `_sdpa`,
   allow_in_graph; before, Dynamo broke the graph at every attention call: "Unsupported custom jvp"),
   so a 2-block DiT forward and MeanFlow's loss (a torch.func.jvp through the DiT, then a forward with
   grad) are one graph each (counted by torch._dynamo.explain, no code generation).
2. The compiled loss and its backward equal eager's (float64, to rounding), with dropout on (the
   forked RNG of the JVP), and the Triton kernels are graph nodes too (custom ops with a shape
   rule; checked under the Triton interpreter in a subprocess).
3. Random numbers: inductor draws eager's numbers (fallback_random), so a compiled run follows the
   eager one; a compiled run stopped and resumed equals an uninterrupted compiled run bit for bit.
The runs use the aot_eager backend (the same Dynamo graphs and AOTAutograd, no C++ code
generation, which takes minutes on 2 CPU cores); test 3's random numbers use inductor itself.
"""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import common.run
from common.dit import DiT
from conftest import ROOT, load_method, read_all, run_here

mf = load_method("meanflow")


def tiny_dit(seed=0, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = DiT(input_size=8, patch_size=4, in_channels=1, hidden=16, depth=2, heads=2, num_classes=10, dropout=dropout)
    for p in net.parameters():  # adaLN-zero leaves the output 0: random weights make every path count
        p.data.normal_(0, 0.2)
    return net.to(dtype)


def test_dit_forward_and_meanflow_loss_have_no_graph_break():
    net, x = tiny_dit(), torch.randn(4, 1, 8, 8)
    t, y = torch.rand(4), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    ex = torch._dynamo.explain(net)(x, t, t / 2, y)
    assert ex.graph_break_count == 0, [r.reason.splitlines()[0] for r in ex.break_reasons]
    torch._dynamo.reset()
    ex = torch._dynamo.explain(mf.meanflow_loss)(net, x, y, mf.Args(ratio=0.5), 10)
    assert ex.graph_count == 1 and ex.graph_break_count == 0, [r.reason.splitlines()[0] for r in ex.break_reasons]
    torch._dynamo.reset()


@pytest.mark.parametrize("dropout, dtype", [(0.0, torch.float32), (0.2, torch.float64)])
def test_compiled_meanflow_loss_and_gradients_equal_eager(dropout, dtype, monkeypatch):
    """fp32: the times (fp32) reach the net as they are (a slice t[j:] under torch.func.jvp); float64: to rounding."""
    backend = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(common.run, "COMPILE_BACKEND", backend)
    args = mf.Args(ratio=0.5, dropout=dropout)
    fn = common.run.compiled(mf.meanflow_loss, types.SimpleNamespace(compile=True))
    x, y = torch.randn(6, 1, 8, 8, dtype=dtype), torch.randint(0, 11, (6,))
    out = []
    for f in (mf.meanflow_loss, fn):
        net = tiny_dit(1, dropout, dtype).train()
        torch.manual_seed(5)
        loss, terms = f(net, x, y, args, 10)
        loss.backward()
        out.append((loss.detach(), terms["mse_mf"], [p.grad for p in net.parameters()], torch.randn(())))
    torch._dynamo.reset()
    assert backend.frame_count >= 1  # it did compile
    (l0, m0, g0, r0), (l1, m1, g1, r1) = out
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)
    assert m0 > 0 and torch.allclose(l0, l1, rtol=rtol, atol=0) and torch.allclose(m0, m1, rtol=rtol, atol=0)
    assert all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(g0, g1))
    assert r0 == r1  # the loss drew as many random numbers from the global generator


def test_triton_kernels_are_graph_nodes_under_the_interpreter():
    code = """
import torch, torch._dynamo
import kernels.attention_jvp as A
A.BACKEND = "triton"
calls = []
for name in ("_fwd_op", "_bwd_op"):
    op = getattr(A, name)
    setattr(A, name, lambda *a, _op=op, _n=name: (calls.append(_n), _op(*a))[1])
torch.manual_seed(0)
q, k, v, dq, dk, dv, g = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(7))
def f(q, k, v):
    o, do = torch.func.jvp(A.sdpa, (q, k, v), (dq, dk, dv))
    return (o * g).sum() + (do * do).sum()
out = []
for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
    x = [a.clone().requires_grad_() for a in (q, k, v)]
    loss = fn(*x)
    out.append([loss, *torch.autograd.grad(loss, x)])
assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(*out)), [(a - b).abs().max() for a, b in zip(*out)]
assert "_fwd_op" in calls and "_bwd_op" in calls, calls
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if "No module named 'triton'" in proc.stderr:
        pytest.skip("needs triton")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_inductor_draws_the_eager_random_numbers():
    def noisy(x):
        return x * torch.randn_like(x) + torch.rand_like(x)

    x = torch.linspace(1, 2, 64)
    torch.manual_seed(3)
    want = noisy(x)
    torch._dynamo.reset()
    torch.manual_seed(3)
    got = common.run.compiled(noisy, types.SimpleNamespace(compile=True))(x)
    torch._dynamo.reset()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got - want).abs().max()


def test_compiled_run_resumes_exactly(tmp_path, monkeypatch):
    """meanflow on gmm with --compile and dropout (the forked RNG): 3 steps straight, and 2 steps
    then --resume to 3: bit-identical checkpoints and logged losses; and the compiled run's losses
    equal an eager run's (to rounding)."""
    backend = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(common.run, "COMPILE_BACKEND", backend)
    script = os.path.join(ROOT, "methods", "meanflow.py")
    flags = ["--batch-size", 16, "--hidden", 16, "--depth", 2, "--log-every", 1, "--eval-every", 100,
             "--eval-samples", 50, "--eval-steps", 1, "--dropout", 0.1, "--ratio", 0.5]
    run_here(script, *flags, "--compile", "--steps", 3, "--out-dir", tmp_path / "a")
    run_here(script, *flags, "--compile", "--steps", 2, "--out-dir", tmp_path / "b")
    run_here(script, "--steps", 3, "--resume", tmp_path / "b" / "meanflow" / "gmm")
    compiles = backend.frame_count
    run_here(script, *flags, "--steps", 3, "--out-dir", tmp_path / "e")
    torch._dynamo.reset()
    assert compiles >= 3 and backend.frame_count == compiles  # each --compile run compiled, the eager one did not
    runs = {k: tmp_path / k / "meanflow" / "gmm" for k in "abe"}
    ta, tb = read_all(runs["a"] / "ckpt.safetensors"), read_all(runs["b"] / "ckpt.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    loss = {k: {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
            for k, d in runs.items()}
    assert loss["a"] == loss["b"] and sorted(loss["a"]) == [1, 2, 3]
    assert all(abs(loss["a"][s] - loss["e"][s]) <= 1e-5 * abs(loss["e"][s]) for s in loss["e"])
    assert json.loads((runs["a"] / "args.json").read_text())["compile"] is True


def test_every_method_file_compiles_its_losses():
    """The flag exists in every file (test_methods checks the Args) and does something in each: a
    loss of the file goes through `compiled`."""
    import glob
    import re

    for path in glob.glob(os.path.join(ROOT, "methods", "*.py")):
        text = open(path).read()
        names = re.findall(r"^    (\w+(?:, \w+)*) = (compiled\(\w+, args\)(?:, compiled\(\w+, args\))*)", text, re.M)
        assert names, f"{path}: no loss goes through common.run.compiled"
        for lhs, rhs in names:
            assert lhs.split(", ") == re.findall(r"compiled\((\w+), args\)", rhs)
            assert all(re.search(rf"^def {n}\(", text, re.M) for n in lhs.split(", ")), path
