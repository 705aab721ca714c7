"""Is lsd's (and esd's) failure on mnist in the velocity or in the maps? Evaluates a saved model (the EMA weights)
two ways on the same 2000 noises and labels (common/eval.py's Evaluator, seed 0): the file's flow-map sampler
x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1}), and Euler on the diagonal x <- x - (t_k - t_{k+1}) u(x, t_k, t_k), the
velocity the flow-matching rows train. fm.py's reference run is the yardstick for a velocity at this budget.

    OMP_NUM_THREADS=1 python results/lsd/velocity.py > results/lsd/velocity.md     (about 4 minutes per model on 1 CPU thread)
    python results/lsd/velocity.py fmm/mnist          (only the rows of the models named: results/<name>/model.safetensors)
"""
import os
import sys

import torch

R = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(R, ".."))
from common.data import make_loader  # noqa: E402
from common.dit import load  # noqa: E402
from common.eval import Evaluator  # noqa: E402

MODELS = ["lsd/mnist", "esd/mnist", "fmm/mnist", "fm/mnist"]


def sampler(net, diagonal):
    @torch.no_grad()
    def run(e, y, k):
        ts, x = torch.linspace(1, 0, k + 1), e
        for i in range(k):
            t = ts[i].expand(len(x))
            x = x - (ts[i] - ts[i + 1]) * net(x, t, t if diagonal else ts[i + 1].expand(len(x)), y)
        return x
    return run


if __name__ == "__main__":
    ev = Evaluator(make_loader("mnist", 64, 0), 2000, 0)
    if len(sys.argv) == 1:
        print("| model (EMA) | sampler | fid@1 | fid@4 | fid@16 | acc@4 | acc@16 |\n|---|---|---|---|---|---|---|")
    for m in sys.argv[1:] or MODELS:
        net = load(os.path.join(R, m, "model.safetensors")).eval()
        for name, diagonal in (("flow map u(x, t_k, t_k+1)", False), ("Euler on the diagonal u(x, t_k, t_k)", True)):
            if m.split("/")[0] == "fm" and not diagonal:
                continue  # fm's net has one time: its map sampler is the Euler sampler
            r = ev(sampler(net, diagonal), (1, 4, 16))
            print(f"| results/{m} | {name} | {r['fid@1']:.1f} | {r['fid@4']:.1f} | {r['fid@16']:.1f} | {r['acc@4']:.3f} | {r['acc@16']:.3f} |", flush=True)
