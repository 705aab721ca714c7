"""Baseline for results/mfd/mnist: the metrics of the teacher snapshot that run distilled (the fm
reference run was still training; its step-2000 EMA weights are teacher_fm_step2000.safetensors),
with the same Evaluator, seed and sample count as the method runs, Euler without guidance.
Run from the repo root: python results/mfd/mnist/eval_teacher.py"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
from common.data import make_loader  # noqa: E402
from common.dit import load, read_meta  # noqa: E402
from common.eval import Evaluator  # noqa: E402

torch.set_num_threads(1)
path = os.path.join(HERE, "teacher_fm_step2000.safetensors")
net = load(path).eval()


@torch.no_grad()
def euler(e, y, steps):
    ts = torch.linspace(1, 0, steps + 1)
    for k in range(steps):
        e = e - (ts[k] - ts[k + 1]) * net(e, ts[k].expand(len(e)), ts[k].expand(len(e)), y)
    return e


metrics = Evaluator(make_loader("mnist", 64, 0), 2000, 0)(euler, (1, 2, 4, 16, 50))
out = {"teacher": os.path.basename(path), "teacher_step": read_meta(path)["step"], **metrics}
json.dump(out, open(os.path.join(HERE, "teacher_eval.json"), "w"), indent=1)
print(out)
