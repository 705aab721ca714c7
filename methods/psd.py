"""PSD: progressive self-distillation of a flow map in velocity space, trained from data (no teacher).

Paper: Boffi, Albergo, Vanden-Eijnden, "How to build a consistency model: Learning flow maps via
self-distillation", NeurIPS 2025 (arXiv 2505.18825), section 3 (PSD) and App. F. Official code
github.com/nmboffi/flow-maps (JAX), read through its fork roni-dot/regularized-loss-flow-maps at
afdaefa (py/common/losses.py psd_term, loss_args.py, edm2_net.py calc_weight); nothing copied.
`diff methods/splitmeanflow.py methods/psd.py` shows a teacher against self-distillation: the split
rows are the same line, the boundary rows regress onto e - x (flow matching) instead of a teacher.

Idea: the average velocity is additive over intervals: for s <= m <= t,
    (t - s) u(x_t, t, s) = (t - m) u(x_t, t, m) + (m - s) u(x_m, m, s),  x_m = x_t - (t - m) u(x_t, t, m),
so the current network, under stop-gradient, teaches itself a jump from two shorter ones, and the
diagonal s = t is flow matching on data. In the project notation (data at t = 0), l = (t - m) / (t - s):
    split rows (1 - p):     w_ts = w(t, s),  e^{-w_ts} ||net(x_t, t, s, y) - sg(l u2 + (1 - l) u1)||^2 + w_ts,
                            u2 = net(x_t, t, m, y), x_m = x_t - (t - m) u2, u1 = net(x_m, m, s, y)
    diagonal rows (p):      w_tt = w(t, t),  e^{-w_tt} ||net(x_t, t, t, y) - (e - x)||^2 + w_tt
Boffi's time tau = 1 - t runs noise -> data; his target (1 - h) phi_{s,u} + h phi_{u,t} with his
u = h s + (1 - h) t is ours with l = 1 - h (his phi = -u, every residual flips sign; the first jump, from
the noisier time, has the weight of its share of the interval). `--split uniform`: h ~ U(0, 1) (PSD-U);
`midpoint`: h = 1/2 (PSD-M). The loss is in VELOCITY space: the paper drops the (t - s)^2 of the
position-space residual ||f_ts - sg(f_ms(f_tm))||^2 on purpose ("PSD scaling"); the position-space form
is not what the code trains. Teacher = the CURRENT weights, no EMA (loss_args.py: teacher_params =
train_state.params; App. F.4: an EMA teacher "offered no gain"; `--ema-target` gives one anyway), run in
eval mode (dropout off), both jumps under no_grad. The exact map of v* is a fixed point: the diagonal
rows' minimizer is the posterior mean of e - x, i.e. v*, and the split identity holds for it.
Learned weight (`LogVar`, `--learned-weight`, the official images' use_weight): per row e^{-w} l + w,
minimum over w at w = log l (EDM2's uncertainty form), so e^{-w} tracks the loss scale at (t, s) and the
stationary point in u is unchanged (w depends on the times only). w(t, s) = g(t) + g(s): positional
(sin/cos, periods 2 pi .. 2 pi 1e4) embeddings of t and of s summed, one linear layer without bias, as the
code's mp_sum of two embeddings into one MPConv (embedding t instead of tau = 1 - t spans the same
functions). It is a separate tiny module trained with the net: in the optimizer and the gradient clip,
DDP-wrapped (its gradient all-reduced like the net's), in the checkpoint (`logvar`, restored by --resume);
not in the EMA: the EMA is what samples and is saved as the model, and nothing reads w from it (the code's
EMA holds w only because w lives inside its net).
Times [loss_args.py]: the first floor(p B) rows are diagonal with t ~ U(0, 1), the rest uniform on the
triangle (t = max, s = min of two U(0, 1) draws); p = 0.75. Sampling: K flow-map steps
x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y) on t_k = linspace(1, 0, K + 1) (flow_map.py).
Where: sample_ts (times), split_target (the self-teacher), LogVar (w), psd_loss, sample (sampler).

Deviations: AdamW (the code: RAdam, lr 1e-2 / sqrt(max(k / 35000, 1)), clip 1.0, EDM2 U-Net with weights
projected to the sphere, EMA 0.9999, batch 512 for 400k steps on CIFAR-10); our shared MLP / DiT. One
forward with grad on all rows in train mode (the code runs the split-row student with dropout off; same at
the default --dropout 0). The code takes max(1, floor(p B)) diagonal rows; here floor(p B). The code's w
layer starts random (a normalized MPConv), ours at 0; its checker MLP uses a constant w = 1 (a fixed e^-1
scale): `--no-learned-weight` is that up to the constant factor (w = 0). Labels: 10% become the null label
as in every file (the released configs are unconditional). Results [paper Table 1, best checkpoint per step count over the
whole run]: CIFAR-10 1/2/4/8/16 steps PSD-M FID 12.81/8.43/5.96/5.07/4.64, PSD-U 13.61/7.95/6.03/5.32/5.16.
Cost: one forward-backward on the batch and two no-grad forwards on the split rows (3 + 2 (1 - p) = 3.5
forward passes at p = 0.75; 8 in Dieleman's table, which counts every term on the full batch).

Run:        python methods/psd.py --eval-steps 1 2 4 8              (gmm, from data)
            python methods/psd.py --split midpoint                  (PSD-M)
            python methods/psd.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999 --eval-steps 1 2 4 8   (meanflow's DiT and budget)
Reference:  results/psd/<dataset>/
"""
import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from common.data import make_loader
from common.dit import DiT, MLP, save
from common.eval import Evaluator, save_grid, time_forward
from common.run import (Run, check_net, compiled, ddp, load_checkpoint, mean_terms, micro_seed, no_sync, parse_args,
                        setup, stop_if_nonfinite)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (the method file by default)"""
    seed: int = 0
    """seed of the initial weights, the noise and the data stream"""
    dataset: str = "gmm"
    """checkerboard | moons | spirals | 8gaussians | gmm | mnist | cifar10 | imagenet-latent"""
    data_root: str = "data"
    """folder of cifar10 (torchvision layout) or of imagenet-latent shards"""
    download: bool = False
    """let torchvision download cifar10 into --data-root (needs internet)"""
    out_dir: str = "runs"
    """runs are written to <out-dir>/<exp-name>/<dataset>/"""
    steps: int = 3000
    """number of training steps"""
    batch_size: int = 256
    """global batch size (the papers' number): split over processes and --grad-accum micro-batches"""
    grad_accum: int = 1
    """micro-batches per optimizer step (gradient accumulation)"""
    lr: float = 1e-3
    """AdamW learning rate"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup: int = 0
    """linear learning-rate warm-up steps"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    ema_decay: float = 0.999
    """decay of the EMA weights used for evaluation and the saved model"""
    hidden: int = 256
    """width of the network (MLP hidden units or DiT hidden size)"""
    depth: int = 4
    """number of residual MLP blocks or DiT blocks"""
    heads: int = 4
    """DiT attention heads"""
    patch_size: int = 4
    """DiT patch size"""
    qk_norm: bool = False
    """RMS-normalize queries and keys in the DiT"""
    dropout: float = 0.0
    """dropout inside the network"""
    label_dropout: float = 0.1
    """probability of replacing a label by the null class (classifier-free guidance)"""
    precision: str = "auto"
    """auto | fp32 | bf16 (autocast with fp32 master weights; times, targets and losses stay fp32); auto: bf16 and TF32 on CUDA, fp32 on CPU"""
    tf32: bool = False
    """allow TF32 matmuls on CUDA in fp32"""
    grad_ckpt: bool = False
    """activation checkpointing of the DiT blocks on forwards with grad (less memory, more compute)"""
    compile: bool = False
    """torch.compile the loss with its backward (attention is one graph node; eager's random numbers: --resume stays exact)"""
    log_every: int = 50
    """write a metrics row every this many steps"""
    eval_every: int = 1000
    """evaluate and save a sample grid every this many steps (and at the end)"""
    eval_samples: int = 2000
    """samples per evaluation (split over processes)"""
    eval_batch: int = 500
    """sampling batch per process during evaluation"""
    eval_steps: tuple[int, ...] = (1, 2, 4)
    """sampling step counts to evaluate"""
    vae: Optional[str] = None
    """local diffusers AutoencoderKL folder: latents are decoded for FID and grids"""
    inception: Optional[str] = None
    """clean-fid Inception TorchScript file (inception-2015-12-05.pt) for FID on RGB images"""
    fid_ref: Optional[str] = None
    """.npz with mu and sigma of the reference features (default: computed from the data)"""
    ckpt_every: int = 1000
    """write the training checkpoint every this many steps (and at the end)"""
    resume: Optional[str] = None
    """run folder or ckpt.safetensors to continue from; its args.json gives every flag not given here"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "cleanflow"
    """W&B project"""
    tensorboard: bool = False
    """also write TensorBoard scalars"""
    device: str = "auto"
    """auto | cpu | cuda"""
    # method
    boundary_p: float = 0.75
    """fraction p of the rows on the diagonal s = t, flow matching on e - x (code: diag_fraction 0.75)"""
    split: str = "uniform"
    """uniform (PSD-U: h ~ U(0, 1)) | midpoint (PSD-M: h = 1/2): where the interval is split, m = h t + (1 - h) s"""
    learned_weight: bool = True
    """learned log-variance weight w(t, s), per row e^-w l + w (code: on for images; its checker MLP has a constant w)"""
    ema_target: bool = False
    """split targets from the EMA weights instead of the current net (code: the current net; App. F.4: an EMA gave no gain)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if not 0 <= args.boundary_p <= 1 or args.split not in ("uniform", "midpoint"):
        raise SystemExit(f"--boundary-p {args.boundary_p} in [0, 1] / --split {args.split} uniform or midpoint expected")
    if args.boundary_p < 0.5:
        print(f"warning: --boundary-p {args.boundary_p} < 0.5: the split loss alone is solved by the flow map of any velocity field "
              "(u = 0 included); with few diagonal rows training may collapse toward such a trivial solution (code: 0.75)", file=sys.stderr)


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def sample_ts(n, n_bnd, device):
    """s = t ~ U(0, 1) on the first n_bnd rows (the diagonal); t = max, s = min of two U(0, 1) draws on the others."""
    a, b = torch.rand(2, n, device=device)
    bnd = torch.arange(n, device=device) < n_bnd
    return torch.where(bnd, a, torch.maximum(a, b)), torch.where(bnd, a, torch.minimum(a, b))


@torch.no_grad()
def split_target(tnet, x_t, t, s, l, y):
    """Interval splitting at m = (1 - l) t + l s: l u(x_t, t, m) + (1 - l) u(x_m, m, s), the average
    velocity over [s, t] if tnet is exact (x_m: tnet's own jump to m)."""
    was_training = getattr(tnet, "training", False)  # tnet may be a plain callable (tests: the oracle)
    if was_training:
        tnet.eval()
    m = (1 - l) * t + l * s
    u2 = tnet(x_t, t, m, y)
    u1 = tnet(x_t - bc(t - m, x_t) * u2, m, s, y)
    if was_training:
        tnet.train()
    return bc(l, x_t) * u2 + bc(1 - l, x_t) * u1


class LogVar(nn.Module):
    """The learned log-variance w(t, s) = g(t) + g(s): positional sin/cos embeddings of t and of s, summed,
    and one zero-initialized linear layer without bias (the code's calc_weight: mp_sum of two embeddings, MPConv)."""

    def __init__(self, channels=128):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(channels // 2) / (channels // 2)), persistent=False)
        self.linear = nn.Linear(channels, 1, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, t, s):
        with torch.autocast(t.device.type, enabled=False):
            dt = self.linear.weight.dtype
            emb = lambda a: torch.cat([(a.to(dt)[:, None] * self.freqs.to(dt)).cos(), (a.to(dt)[:, None] * self.freqs.to(dt)).sin()], 1)
            return self.linear((emb(t) + emb(s)) / math.sqrt(2))[:, 0]


def psd_loss(net, logvar, target_net, x, y, args):
    """Diagonal rows first, split rows after, ONE forward with grad on both; logvar=None: w = 0. Returns (loss, terms)."""
    n = len(x)
    nb = int(args.boundary_p * n)
    e = torch.randn_like(x)
    t, s = sample_ts(n, nb, x.device)
    h = torch.rand(n, device=x.device) if args.split == "uniform" else torch.full((n,), 0.5, device=x.device)
    l = 1 - h  # the code's m = h t + (1 - h) s in our time: l = (t - m) / (t - s) weighs the first jump, from t to m
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    with torch.no_grad():
        u_tgt = torch.cat([(e - x)[:nb], split_target(target_net, x_t[nb:], t[nb:], s[nb:], l[nb:], y[nb:])])
    err = ((net(x_t, t, s, y) - u_tgt) ** 2).flatten(1).sum(1)
    w = logvar(t, s).to(err.dtype) if logvar is not None else torch.zeros_like(err)
    loss = (torch.exp(-w) * err + w).mean()  # the minimum over w is at w = log err (EDM2's uncertainty weight)
    return loss, {"loss": loss.detach(), "loss_boundary": err[:nb].sum().detach() / max(nb, 1),
                  "loss_split": err[nb:].sum().detach() / max(n - nb, 1), "logvar": w.detach().mean()}


@torch.no_grad()
def sample(net, e, y, steps):
    """K-step flow-map sampler: x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    for k in range(steps):
        x = x - (ts[k] - ts[k + 1]) * net(x, ts[k].expand(len(x)), ts[k + 1].expand(len(x)), y)
    return x


if __name__ == "__main__":
    args, overrides = parse_args(Args)  # with --resume, the run's args.json gives every flag not given
    check_args(args)
    method = os.path.basename(__file__)[: -len(".py")]

    # ---- seeding, device, distributed
    rank, world, device, run_dir, ckpt_path = setup(args, method)
    torch.manual_seed(args.seed)  # the same initial weights on every rank; the loop reseeds per micro-batch
    amp = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    # ---- data
    loader = make_loader(args.dataset, args.batch_size, args.seed, args.data_root, args.download)  # yields this rank's share
    info = loader.info
    check_net(args, info)
    null = info["num_classes"]  # the null label id; unconditional data only ever uses it

    # ---- model
    def make_net(n_cond=0):
        if info["kind"] == "vector":
            return MLP(info["shape"][0], args.hidden, args.depth, info["num_classes"], n_cond, args.dropout)
        return DiT(info["shape"][1], args.patch_size, info["shape"][0], args.hidden, args.depth, args.heads, 4.0,
                   info["num_classes"], n_cond, args.qk_norm, args.dropout)

    net = make_net().to(device)
    net.grad_ckpt = args.grad_ckpt
    logvar = LogVar().to(device) if args.learned_weight else None  # w(t, s), trained with the net; not EMA'd (nothing samples with it)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    params = [*net.parameters(), *(logvar.parameters() if logvar is not None else [])]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    saved.update({"logvar": logvar} if logvar is not None else {})  # w: trained state, restored by --resume
    ddp_net, ddp_logvar = ddp(net, world), (ddp(logvar, world) if logvar is not None else None)
    psd_loss = compiled(psd_loss, args)  # --compile (common/run.py)

    # ---- resume
    step, wall0 = 0, 0.0  # wall0: wall time of earlier segments
    if args.resume:
        state = load_checkpoint(ckpt_path, method, args, net.config)
        for k, m in saved.items():
            m.load_state_dict(state[k])
        loader.load_state_dict(state["loader"])
        step, wall0 = state["step"], state["wall_time_s"]

    # ---- logging
    run = Run(args, method, run_dir, step, wall0, overrides, rank)  # the folder's lock, metrics.jsonl, what a kill left undone
    log = run.log

    # ---- evaluation
    evaluator = Evaluator(loader, args.eval_samples, args.seed, device=device, vae=args.vae, fid_ref=args.fid_ref,
                          inception=args.inception, batch=args.eval_batch)
    run.evaluates(lambda: evaluator(sample_fn, args.eval_steps),  # every rank samples its share; rank 0 draws the grid
                  lambda path: save_grid(sample_fn, loader, args.eval_steps, path, args.seed, decode=evaluator.decode), evaluator.note)

    # ---- checkpoint
    run.saves(lambda path: save(ema, path, dataset=args.dataset, method=method, step=step),
              lambda: {"config": net.config, **{k: m.state_dict() for k, m in saved.items()}, "loader": loader.state_dict()})

    # ---- cost: one forward pass of the same network on a training micro-batch
    x0, y0 = loader.sample(args.batch_size // (world * args.grad_accum), torch.Generator().manual_seed(args.seed))
    with amp:
        fwd_time = time_forward(net, x0.to(device), y0.to(device))
    run.start(fwd_time, net)  # first redoes what a kill at the resumed step left undone (its evaluation, the model)

    # ---- training loop
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < args.steps:
        tic = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        net.train()
        x, y = next(loader)  # this rank's share of the global batch
        terms = []
        for i, (x, y) in enumerate(zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum))):
            torch.manual_seed(micro_seed(args.seed, step, rank * args.grad_accum + i))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
            with no_sync([ddp_net, ddp_logvar], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = psd_loss(ddp_net, ddp_logvar, ema if args.ema_target else net, x, y, args)
                (loss / args.grad_accum).backward()
            terms.append(t_i)
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), "grad_norm": gnorm}
        stop_if_nonfinite(terms, step, run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the EMA records no autograd history
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - args.ema_decay)

        # ---- log, evaluate, checkpoint (every method file ends its step with this block)
        step += 1
        bar.update(1)
        run.log_step(step, terms, opt.param_groups[0]["lr"], time.perf_counter() - tic, bar)  # every --log-every steps, the last
        if step % args.ckpt_every == 0 or step == args.steps:
            run.checkpoint(step)  # model.safetensors, then ckpt.safetensors: the model is never older
        if step % args.eval_every == 0 or step == args.steps:
            run.evaluate(step)  # after the checkpoint: --resume redoes an evaluation that a kill interrupted
    bar.close()

    # ---- summary
    run.finish(device, world)  # summary.json; frees the folder's lock
    if world > 1:
        torch.distributed.destroy_process_group()
