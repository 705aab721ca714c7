"""Where imm's loss puts its weight in t: the share of groups, and of the summed weight w(t) of eq. 13, at large t,
for the paper's time law and weight (a = 2 with the gap embedding) and the one-flag changes. The 1-step sampler
jumps from T = 0.994 to 0, so the maps from large t are the ones a 1-step sample uses.

    python results/imm/time_weight.py          (Monte Carlo, 10^6 groups, seed 0; prints a table)
"""
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from methods.imm import sample_trs, weight  # noqa: E402

SETTINGS = [("paper (a = 2)", dict()), ("--weight-a 1", dict(weight_a=1.0)), ("--time-mu 1.1", dict(time_mu=1.1))]

if __name__ == "__main__":
    print("| setting | P(t > 0.8) | P(t > 0.9) | share of sum w(t) at t > 0.5 | at t > 0.8 | at t > 0.9 | at t > 0.8 and s < 0.2 |")
    print("|---|---|---|---|---|---|---|")
    for name, change in SETTINGS:
        a = SimpleNamespace(**{**dict(time_mu=-1.1, time_sigma=2.0, t_max=0.994, t_min=0.0, gap_k=12, weight_a=2.0, weight_b=4.0), **change})
        torch.manual_seed(0)
        t, _, s = sample_trs(10**6, a, "cpu")
        w = weight(t, a.weight_a, a.weight_b)
        share = lambda m: f"{(w[m].sum() / w.sum()).item():.4f}"  # noqa: E731
        print(f"| {name} | {(t > 0.8).double().mean():.3f} | {(t > 0.9).double().mean():.3f} | {share(t > 0.5)} | {share(t > 0.8)} "
              f"| {share(t > 0.9)} | {share((t > 0.8) & (s < 0.2))} |")
