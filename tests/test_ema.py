"""Every EMA update in the method files runs under torch.no_grad(). Without it, an in-place lerp of
weights that need no grad toward weights that do records autograd history: the EMA becomes a non-leaf
tensor with requires_grad and an ever longer graph (measured: about 530 bytes per tensor per step, 1 GB
over a 20k-step run of 100 tensors), and a forward through the EMA with grad on would reach the net."""
import ast
import copy
import glob
import os

import pytest
import torch

from conftest import ROOT

FILES = sorted(glob.glob(os.path.join(ROOT, "methods", "*.py")))


def test_a_lerp_outside_no_grad_records_history():
    """The reason for the static check below (so that it cannot outlive a change in PyTorch unnoticed)."""
    net = torch.nn.Linear(2, 2)
    ema, ema_ok = copy.deepcopy(net).requires_grad_(False), copy.deepcopy(net).requires_grad_(False)
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 0.5)
    with torch.no_grad():
        torch._foreach_lerp_(list(ema_ok.parameters()), list(net.parameters()), 0.5)
    assert ema.weight.grad_fn is not None and ema.weight.requires_grad
    assert ema_ok.weight.is_leaf and not ema_ok.weight.requires_grad
    assert torch.equal(ema.weight.detach(), ema_ok.weight)


def _under_no_grad(node, parents):
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.With) and any("no_grad" in ast.unparse(item.context_expr) for item in node.items):
            return True
        if isinstance(node, ast.FunctionDef) and any("no_grad" in ast.unparse(d) for d in node.decorator_list):
            return True
    return False


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.basename(p)[:-3])
def test_ema_updates_run_under_no_grad(path):
    tree = ast.parse(open(path).read())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lerps = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr in ("_foreach_lerp_", "lerp_") and "parameters()" in ast.unparse(n)]
    assert lerps, "no EMA update found: the check needs updating for this file"
    bad = [ast.unparse(n) for n in lerps if not _under_no_grad(n, parents)]
    assert not bad, f"EMA updates outside torch.no_grad(): {bad}"
