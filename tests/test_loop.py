"""What the training loop of every method file does, parametrized over methods/*.py (a new file is
covered the day it lands), read from the checkpoints of a tiny gmm run made in this process with
every checkpoint captured (one per step): each optimizer holds whole networks and no EMA; each net
changes exactly on the steps its own optimizer steps, at the update ratio asked (`--ttur 3`: the
generator on every third step only; `--aux-ratio 3`: three auxiliary steps per student step); every
EMA moves toward the net by 1 - its decay whenever the net moves; model.safetensors is the EMA, and
`--ema-decay 0` makes it the trained net; the learning rate of every optimizer rises through `--warmup`
(also as logged). The run doubles as the gmm smoke run (dropout on, one evaluation at the end)."""
import glob
import json
import os

import pytest
import torch

from conftest import ROOT, read_all, run_here

METHODS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "methods", "*.py")))
TINY = ["--batch-size", 16, "--hidden", 16, "--depth", 2, "--log-every", 1, "--ckpt-every", 1, "--eval-every", 100,
        "--eval-samples", 100, "--eval-steps", 1, "--lr", 1e-3]
# what a file needs to run in a second, to train every net (dmd2: the GAN's discriminator) and to
# keep an EMA apart from the net (dmd2 saves the raw generator unless --eval-ema)
EXTRA = {
    "mfd": ["--ode-step", 0.5],
    "shortcut": ["--denoise-timesteps", 4, "--bootstrap-every", 2],
    "dmd2": ["--eval-ema", "--gan-weight", 3e-3],
    "vsd": ["--gan-weight", 3e-3],
    "rcm": ["--tangent-warmup", 0],
}
# every EMA a checkpoint may hold (all track `net`): the flag of its decay and the decay used here
# (distinct values: EMAs given each other's decay are caught)
EMAS = {"ema": ("--ema-decay", 0.75), "ema_target": ("--ema-target-decay", 0.5), "ema_fake": ("--fake-ema-decay", 0.6)}
STEPS, WARMUP, RATIO = 6, 4, 3


def text(m):
    return open(os.path.join(ROOT, "methods", f"{m}.py")).read()


def has(m, flag):
    return f"    {flag[2:].replace('-', '_')}: " in text(m)


def flags(m):
    out = [*TINY, *EXTRA.get(m, [])]
    if "    teacher: str" in text(m):
        out += ["--teacher", "oracle"]
    for flag, decay in EMAS.values():
        out += [flag, decay] if has(m, flag) else []
    for flag in ("--ttur", "--aux-ratio"):  # update ratios
        out += [flag, RATIO] if has(m, flag) else []
    return out


def owners(saved):
    """{optimizer name: [names of the nets whose parameters it holds]}; asserts that each optimizer
    holds whole nets, no net is in two optimizers, every trained net in one, and no EMA in any."""
    nets = {k: v for k, v in saved.items() if isinstance(v, torch.nn.Module) and any(True for _ in v.parameters())
            and (k == "net" or v is not saved["net"])}  # (dmd2's default `ema` is the net itself)
    opts = {k: v for k, v in saved.items() if isinstance(v, torch.optim.Optimizer)}
    out = {}
    for name, opt in opts.items():
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        out[name] = [k for k, net in nets.items() if {id(p) for p in net.parameters()} <= held]
        whole = {id(p) for k in out[name] for p in nets[k].parameters()}
        assert whole == held, f"{name} holds parameters that are not whole nets of the checkpoint ({out[name]})"
    taken = [k for ks in out.values() for k in ks]
    assert len(taken) == len(set(taken)), f"a net in two optimizers: {out}"
    emas = [k for k in nets if k.startswith("ema")]
    assert not set(emas) & set(taken), f"an EMA in an optimizer: {out}"
    assert set(taken) | set(emas) == set(nets), f"nets no optimizer trains: {set(nets) - set(taken) - set(emas)}"
    return out


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def opt_steps(state):
    """How many steps an optimizer has made (AdamW counts per parameter: the most)."""
    return max((int(s["step"]) for s in state["state"].values()), default=0)


@pytest.mark.parametrize("method", METHODS)
def test_training_loop(method, tmp_path):
    snaps = []
    g = run_here(os.path.join(ROOT, "methods", f"{method}.py"), *flags(method), "--steps", STEPS, "--warmup", WARMUP,
                 "--dropout", 0.1, "--out-dir", tmp_path, capture=snaps)
    run = tmp_path / method / "gmm"
    assert [s["step"] for s in snaps] == list(range(1, STEPS + 1))
    # the smoke run: a summary, one evaluation (the final one), a grid and the model file
    summary, rows = json.loads((run / "summary.json").read_text()), [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == STEPS and summary["fpe"] > 0 and summary["seed"] == 0
    assert all(k in summary["final"] for k in ["fm_err@1", "sec_per_step"]) and len([r for r in rows if "fm_err@1" in r]) == 1
    assert (run / "samples.png").stat().st_size > 1000 and (run / "model.safetensors").exists()

    # each optimizer steps its own nets, at the ratio asked
    own = owners(g["saved"])
    gen = next(o for o, ks in own.items() if "net" in ks)
    expect = {o: [1] * STEPS for o in own}
    if has(method, "--ttur"):
        expect[gen] = [int(k % RATIO == 0) for k in range(1, STEPS + 1)]
    if has(method, "--aux-ratio"):
        expect[next(o for o, ks in own.items() if "aux" in ks)] = [RATIO] * STEPS
    for o in own:
        counts = [0] + [opt_steps(s[o]) for s in snaps]
        assert [b - a for a, b in zip(counts, counts[1:])] == expect[o], f"{o}: steps per loop step {counts}"
        for k in range(1, STEPS):  # a net changes exactly on its optimizer's steps
            for net in own[o]:
                assert changed(snaps[k - 1][net], snaps[k][net]) == (expect[o][k] > 0), f"{net} at step {k + 1}"

    # every EMA moves toward the net by 1 - decay whenever the net moves (and may stand still when it does not)
    emas = [k for k in g["saved"] if k.startswith("ema") and g["saved"][k] is not g["saved"]["net"]]
    assert "ema" in emas and all(k in EMAS for k in emas), f"EMAs {emas}: give each one's decay flag in EMAS"
    moved = 0.0
    for k in range(1, STEPS):
        net, before = snaps[k]["net"], snaps[k - 1]
        for e in emas:
            w = 1 - EMAS[e][1]
            err = max((snaps[k][e][n].double() - (before[e][n].double() + w * (net[n].double() - before[e][n].double()))).abs().max().item()
                      for n in net)
            if changed(before["net"], net):
                moved = max(moved, max((net[n] - before[e][n]).abs().max().item() for n in net))
                assert err < 1e-6, f"{e} at step {k + 1}: {err:.2g} off the step toward the net by {w}"
            else:
                assert err < 1e-6 or not changed(before[e], snaps[k][e]), f"{e} moved at step {k + 1}, the net did not"
    assert moved > 1e-4  # the EMA test saw real moves
    model = read_all(run / "model.safetensors")  # the saved model is the EMA
    assert model.keys() == snaps[-1]["ema"].keys() and all(torch.equal(model[k], snaps[-1]["ema"][k]) for k in model)

    # warm-up: every optimizer's learning rate rises to its value, and the logged one with it
    for o in own:
        lrs = [s[o]["param_groups"][0]["lr"] for s in snaps]
        assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP])) and lrs[WARMUP - 1:] == [lrs[-1]] * (STEPS - WARMUP + 1), (o, lrs)
        assert lrs[0] < lrs[-1] / 2 or WARMUP == 1
    assert lrs_of(rows) == [s[gen]["param_groups"][0]["lr"] for s in snaps] and lrs_of(rows)[-1] == 1e-3


def lrs_of(rows):
    return [r["lr"] for r in rows if "lr" in r]


@pytest.mark.parametrize("method", METHODS)
def test_ema_decay_0_saves_the_trained_net(method, tmp_path):
    snaps = []
    run_here(os.path.join(ROOT, "methods", f"{method}.py"), *flags(method), "--ema-decay", 0, "--steps", RATIO,
             "--out-dir", tmp_path, capture=snaps)
    model, net = read_all(tmp_path / method / "gmm" / "model.safetensors"), snaps[-1]["net"]
    assert model.keys() == net.keys() and all(torch.equal(model[k], net[k]) for k in net)
    assert changed(snaps[0]["net"], net)
