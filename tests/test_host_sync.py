"""No host-device synchronization inside a training step, checked statically on every method file.

A sync (the host waits for the device) stalls the launch queue that eager mode lives on. Without a
GPU it cannot be observed, so the AST of each methods/*.py is read instead: the step functions
are the module-level functions that main()'s training loop names (called, or passed on, e.g. as
a lambda's body), plus everything those call in turn; the loop body itself (logging every
--log-every steps) and the functions nested in main (checkpoint, evaluation) are not a step.
Inside a step function these are errors:
  - ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``nonzero`` / ``argwhere``;
  - ``int(x)`` / ``float(x)`` / ``bool(x)`` of an expression that calls anything but a Python
    builtin or ``math`` (i.e. of a tensor);
  - ``torch.tensor(..., device=...)`` / ``torch.as_tensor(..., device=...)`` (or ``**kw``): a
    blocking copy of host numbers (``torch.full``/``new_zeros`` build them on the device);
  - a ``torch.distributions`` object without ``validate_args=``: its checks read the device.
A line that has a reason to do one of these on host tensors says so with ``# host-sync-ok: why``.
"""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = sorted(glob.glob(os.path.join(ROOT, "methods", "*.py")))
SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "nonzero", "argwhere"}
HOST_CALLS = {"len", "round", "min", "max", "abs", "sum", "int", "float", "bool", "getattr"}


def _name(node):
    """'torch.tensor' for torch.tensor, 'x.max' for x.max, 'f' for f; None otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else f"?.{node.attr}"
    return None


def _is_main(node):
    if isinstance(node, ast.FunctionDef):
        return node.name == "main"
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def _loop_of_main(tree):
    """The main block's (``if __name__ == "__main__":`` or ``def main``) training loop: its
    outermost for/while whose body calls a *_loss function."""
    main = next(f for f in tree.body if _is_main(f))
    for node in ast.walk(main):
        if isinstance(node, (ast.For, ast.While)):
            calls = {_name(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
            if any(c and c.endswith("_loss") for c in calls):
                return main, node
    raise AssertionError("no training loop calling a *_loss function in main()")


def _periodic(node):
    """An ``if`` that runs every --log/eval/ckpt-every steps, not every step."""
    return isinstance(node, ast.If) and "_every" in ast.unparse(node.test)


def _names_used(node, skip_nested=True):
    """Names referenced under node (not inside nested function definitions or periodic ifs)."""
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        for child in ast.iter_child_nodes(n):
            if skip_nested and (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                                or _periodic(child)):
                continue
            if isinstance(child, ast.Name):
                out.add(child.id)
            todo.append(child)
    return out


def step_functions(tree):
    """Module-level functions reachable from the training loop (see the module docstring)."""
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name != "main"}
    main, loop = _loop_of_main(tree)
    used = _names_used(loop)
    # names bound in main outside the loop to lambdas / partials (teacher_v = lambda ...: f(...))
    assigns = [n for n in ast.walk(main) if isinstance(n, ast.Assign)]
    nested = [n for f in ast.walk(main) if isinstance(f, ast.FunctionDef) and f is not main
              for n in ast.walk(f)]
    for node in assigns:
        if any(node is n for n in nested):
            continue
        if isinstance(node.value, (ast.Lambda, ast.Call)):
            targets = {t.id for t in node.targets if isinstance(t, ast.Name)}
            if targets & used:
                used |= _names_used(node.value)
    reach, todo = set(), [n for n in used if n in funcs]
    while todo:
        n = todo.pop()
        if n not in reach:
            reach.add(n)
            todo += [m for m in _names_used(funcs[n], skip_nested=False) if m in funcs]
    return {n: funcs[n] for n in reach}


def _calls_tensor_code(expr):
    for c in ast.walk(expr):
        if isinstance(c, ast.Call):
            name = _name(c.func) or ""
            if not (name in HOST_CALLS or name.startswith("math.")):
                return True
    return False


def _host_only(e):
    """True for expressions that can only be host values: numbers, args.*, len(...), math.*,
    and torch.* functions without a device= applied to such (e.g. a CPU binomial draw)."""
    if isinstance(e, ast.Constant):
        return True
    if isinstance(e, ast.Attribute):
        return _name(e) is not None and _name(e).startswith("args.")
    if isinstance(e, (ast.BinOp, ast.UnaryOp, ast.Tuple, ast.List)):
        return all(_host_only(c) for c in ast.iter_child_nodes(e)
                   if not isinstance(c, (ast.operator, ast.unaryop, ast.expr_context)))
    if isinstance(e, ast.Call):
        name = _name(e.func) or ""
        if name == "len":
            return True
        host_fn = name in HOST_CALLS or name.startswith("math.") or (
            name.startswith("torch.") and name.count(".") == 1
            and not any(k.arg == "device" for k in e.keywords))
        return host_fn and all(_host_only(a) for a in e.args)
    return False


def violations(source):
    """[(function, line, what)] of the host syncs in the step functions of a method's source."""
    tree = ast.parse(source)
    lines = source.splitlines()
    out = []
    for fname, f in sorted(step_functions(tree).items()):
        for node in ast.walk(f):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func) or ""
            what = None
            if name.rsplit(".", 1)[-1] in SYNC_METHODS and "." in name:
                what = name.rsplit(".", 1)[-1]
            elif (name in ("int", "float", "bool") and node.args and _calls_tensor_code(node.args[0])
                  and not _host_only(node.args[0])):
                what = f"{name}() of a tensor"
            elif name in ("torch.tensor", "torch.as_tensor") and any(k.arg in ("device", None)
                                                                     for k in node.keywords):
                what = f"{name}(..., device=...)"  # or **kw, which may hold a device
            elif name.startswith("torch.distributions.") and not any(
                    k.arg == "validate_args" for k in node.keywords):
                what = f"{name} with argument validation"
            if what and "# host-sync-ok:" not in lines[node.lineno - 1]:
                out.append((fname, node.lineno, what))
    return out


@pytest.mark.parametrize("path", METHODS, ids=lambda p: os.path.basename(p))
def test_no_host_sync_in_a_step(path):
    with open(path) as fh:
        source = fh.read()
    found = violations(source)
    assert not found, "host syncs in a training step: " + "; ".join(
        f"{os.path.basename(path)}:{line} {fn}: {what}" for fn, line, what in found)


def test_checker_finds_the_syncs_it_names():
    """The checker itself: each forbidden pattern in a function the loop reaches (directly, via
    another function, via a lambda bound in main) is reported; loop-body logging, evaluation
    code, host numbers and marked lines are not."""
    src = '''
import math, torch
def helper(x, K):
    a = K.nonzero()
    n = int(K.max())
    m = int(round(2.5 * len(x)) + math.ceil(0.3))
    ok = int(K.max())  # host-sync-ok: K is a CPU tensor here
    return x.sum().item() + n + m
def velocity(x):
    kw = dict(device=x.device)
    law = torch.distributions.Normal(torch.tensor(0.0, **kw), 1.0)
    return torch.tensor([0.0, 1.0], device=x.device)
def thing_loss(x, K):
    c = torch.tensor(1.0)
    k = int(torch.binomial(torch.tensor(float(len(x))), torch.tensor(args.p)))  # a CPU draw
    return helper(x, K), float(x.mean()), int(torch.sum(x))
def sample(x):
    return x.cpu().tolist()
def main():
    vel = lambda x: velocity(x)
    def evaluate():
        return sample(1).item()
    while True:
        loss = thing_loss(1, 2)
        vel(loss)
        print(float(loss.item()))
        if step % args.eval_every == 0:
            sample(loss)
'''
    found = {(fn, what) for fn, _, what in violations(src)}
    assert found == {("helper", "nonzero"), ("helper", "int() of a tensor"), ("helper", "item"),
                     ("velocity", "torch.tensor(..., device=...)"),
                     ("velocity", "torch.distributions.Normal with argument validation"),
                     ("thing_loss", "float() of a tensor"), ("thing_loss", "int() of a tensor")}, found


# ---------------------------------------------------------------------------------------------
# The rest of the GPU path that runs on CPU: precision defaults, evaluation precision, logging
# ---------------------------------------------------------------------------------------------

def _setup_args(tmp_path, **kw):
    import types

    return types.SimpleNamespace(**{**dict(batch_size=4, grad_accum=1, device="auto", precision="auto", tf32=False,
                                           out_dir=str(tmp_path), exp_name="m", dataset="gmm", resume=None), **kw})


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_precision_is_bf16_and_tf32_on_cuda_only(tmp_path, monkeypatch, cuda):
    """--precision auto (the default) resolves in setup: bf16 + TF32 on CUDA, fp32 on CPU; an
    explicit --precision is kept; the evaluation follows the run's precision."""
    import torch

    import common.eval as ev
    from common.run import setup

    # the TF32 switches are proxied by __setattr__ on objects with an instance __dict__: pytest >= 9.2's
    # monkeypatch would restore them with delattr (an AttributeError, and every later undo skipped, so
    # torch.cuda.is_available stayed patched for the rest of the worker). Saved and restored by hand.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(ev, "PRECISION", "fp32")
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        args = _setup_args(tmp_path)
        _, _, device, _, _ = setup(args, "m")
        assert device.type == ("cuda" if cuda else "cpu")
        assert (args.precision, args.tf32) == (("bf16", True) if cuda else ("fp32", False))
        assert torch.backends.cuda.matmul.allow_tf32 is cuda and ev.PRECISION == args.precision
        args = _setup_args(tmp_path, precision="fp32", exp_name="n")
        setup(args, "m")
        assert (args.precision, args.tf32, ev.PRECISION) == ("fp32", False, "fp32")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_runs_under_the_run_precision(monkeypatch, precision):
    """The sampler (and the feature net) run under bf16 autocast iff the run's precision is bf16."""
    import torch

    import common.eval as ev
    from common.data import make_loader

    monkeypatch.setattr(ev, "PRECISION", precision)
    loader = make_loader("gmm", 8, 0)
    seen = []

    def sample_fn(e, y, k):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return e

    ev.Evaluator(loader, n=64, seed=0)(sample_fn, steps=(1,))
    assert seen and all(s == (precision == "bf16") for s in seen)
    probe = ev._nograd(lambda x: torch.is_autocast_enabled("cpu"))
    assert probe(torch.zeros(1)) == (precision == "bf16")


def test_mean_terms_averages_over_ranks(monkeypatch):
    """Under torch.distributed the logged terms are the ranks' mean (one all-reduce), in each
    term's dtype; a single process gets its own micro-batch mean, untouched."""
    import torch

    from common.run import mean_terms

    terms = [{"loss": torch.tensor(1.0), "n": torch.tensor(3.0, dtype=torch.float64)},
             {"loss": torch.tensor(2.0), "n": torch.tensor(5.0, dtype=torch.float64)}]
    single = mean_terms(terms)
    assert single["loss"].item() == 1.5 and single["n"].item() == 4.0
    other_rank = torch.tensor([2.5, 8.0], dtype=torch.float64)  # the other rank's means
    calls = []

    def all_reduce(t):
        calls.append(t.clone())
        t += other_rank

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    out = mean_terms(terms)
    assert len(calls) == 1
    assert out["loss"].item() == 2.0 and out["loss"].dtype == torch.float32
    assert out["n"].item() == 6.0 and out["n"].dtype == torch.float64


def test_frechet_once_on_rank_0(monkeypatch):
    """The Frechet distance (a 2048-d sqrtm) runs on rank 0 only; the others get its value."""
    import torch

    import common.eval as ev

    dist = torch.distributed
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", lambda t: t)  # this process alone: what it sent comes back
    for rank, want, ran in ((0, 7.5, [1]), (1, 0.0, [])):
        calls = []
        monkeypatch.setattr(ev, "_rank_world", lambda r=rank: (r, 2))
        assert ev._from_rank0(lambda: calls.append(1) or 7.5) == want
        assert calls == ran


def test_save_state_copies_to_the_cpu_without_cloning_on_the_device(tmp_path, monkeypatch):
    """save_state copies each tensor to the CPU (no second copy of the state where it lives)."""
    import torch

    from common.dit import load_state, save_state

    cloned = []
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: cloned.append(self.device) or torch.Tensor.new_empty(self, 0))
    w = torch.randn(3, 4)
    state = {"net": {"w": w, "tied": w}, "rng": torch.get_rng_state(), "step": 3}
    save_state(state, tmp_path / "s.safetensors")
    monkeypatch.undo()
    back = load_state(tmp_path / "s.safetensors")
    assert not cloned and torch.equal(back["net"]["w"], w) and torch.equal(back["net"]["tied"], w) and back["step"] == 3
