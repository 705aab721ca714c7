"""The step-0 baseline of results/dmd2/mnist and results/fsf_dmd/mnist: the teacher snapshot both
distilled (teacher_fm_step2000.safetensors, the fm reference run's EMA at step 2000, copied while that
run was still training), evaluated with the same Evaluator, seed and 2000 samples as the runs:
Euler without guidance at 1, 2, 4 steps (= the DMD2 generator's and, up to the untrained h input,
the FSF-DMD generator's one-step sample at initialization). Writes teacher_metrics.json here.
Run from the repo root: OMP_NUM_THREADS=1 python results/dmd2/mnist/eval_teacher.py"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
from common.data import make_loader  # noqa: E402
from common.dit import load  # noqa: E402
from common.eval import Evaluator  # noqa: E402

net = load(os.path.join(HERE, "teacher_fm_step2000.safetensors")).eval()


@torch.no_grad()
def euler(e, y, steps):
    ts = torch.linspace(1, 0, steps + 1)
    for k in range(steps):
        e = e - (ts[k] - ts[k + 1]) * net(e, ts[k].expand(len(e)), ts[k].expand(len(e)), y)
    return e


metrics = Evaluator(make_loader("mnist", 64, 0), 2000, 0)(euler, (1, 2, 4))
json.dump(metrics, open(os.path.join(HERE, "teacher_metrics.json"), "w"), indent=1)
print(metrics)
