"""LSD: Lagrangian self-distillation, a flow map trained from data, its own teacher through its own JVP.

Paper: Boffi, Albergo, Vanden-Eijnden, "How to build a consistency model: Learning flow maps via
self-distillation", NeurIPS 2025 (arXiv 2505.18825). Official code (JAX): github.com/nmboffi/flow-maps,
read through the fork roni-dot/regularized-loss-flow-maps at afdaefa (losses.py, loss_args.py,
flow_map.py, edm2_net.py, configs/; read to check every constant below; nothing copied). The same
program trains LSD and ESD: `diff methods/lsd.py methods/esd.py` is Lagrangian against Eulerian.

Idea: flow matching on the diagonal s = t pins the velocity u(x, t, t) to v*; off the diagonal the
map f(x_t, t, s) = x_t - (t - s) u(x_t, t, s) is made consistent with that velocity, the network
being its own teacher (current weights under stop-gradient; no EMA: App. F.4, an EMA teacher
"offered no gain and sometimes led to instability"). Boffi's tau = 1 - t (data at tau = 1) and
X_{a,b} = x + (b - a) phi: phi_{1-t,1-s} = -u, and each Boffi residual is minus ours (same R^2).

    rows 0..m-1, m = max(1, floor(eta B)): s = t ~ U(0, 1),  l = sum_dims (u(x_t, t, t) - (e - x))^2   (dropout on)
    rows m..B-1: (t, s) = (max, min) of two U(0, 1) draws (uniform on the triangle s <= t),  dropout off:
        l = sum_dims R^2,  R = the off-diagonal residual (`residual`)
    loss = mean_rows (exp(-w) l + w),  w = w(t, s) a learned log-variance (w(t, t) on the diagonal rows)

LAGRANGIAN (this file, losses.py:154-205): the endpoint moves with the velocity found there,
d/ds f = v*(f, s): (u, du_ds) = jvp(s -> u(x_t, t, s), 1), df_ds = u - (t - s) du_ds,
R = df_ds - sg(u(sg f, s, s)). The gradient flows through u AND du_ds (reverse mode over forward mode,
as tvm.py); f is detached before the teacher call. TVM's terminal term with the current weights as target.

The weight is EDM2's uncertainty weight, minimum over w at w = log l: each row is divided by a learned
scale of its loss (at the optimum e^w = E[l | t, s]). Official: w = MPConv(PosEmb(s_tau) + PosEmb(t_tau))
inside the EDM2 net (edm2_net.py:486-501). Our shared networks have no such head, so `LogVar` is a tiny
module of this file (Fourier features of t and s, one zero-initialized linear layer: w = 0 at the
start), as in scm.py: in the optimizer and the gradient clip with the net, synced by DDP, checkpointed
(`saved["logvar"]`); not in the EMA, which is the sampling net and never calls it. The loss sums over
dimensions (official); the logged mse_fm / mse_sd are per dimension. Sampling: K flow-map steps
x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1}, y) on t_k = linspace(1, 0, K + 1) (flow_map.py:121-141).

Deviations: AdamW (the shared optimizer flags) instead of RAdam lr 1e-2 with inverse-sqrt decay after
35k steps and EDM2's weight projection to the sphere after every step; our DiT / MLP (t, h = t - s
embeddings by adaLN) instead of the EDM2 U-Net with its c_in / c_out and data scaling; the log-variance
head is separate (above). Labels: 10% of the rows become the null label (the official class_dropout;
every released config is unconditional). Boffi et al. report the best checkpoint per step count over
the whole run (G.2); our leaderboard reads the standard step and shows the best apart.

Cost: seed 002 counts 10 forward-pass equivalents (both terms on the full batch). With the 75/25 split:
0.75 x FM 3 + 0.25 x (JVP 2 + backward through both outputs 4 + teacher 1) = 4.0 per row (estimate).

Run:        python methods/lsd.py                       (2-D gmm)
            python methods/lsd.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999   (same DiT and budget as MeanFlow's)
Paper defaults (CIFAR-10, EDM2 U-Net): RAdam lr 1e-2, batch 512, 400k steps, EMA 0.9999, dropout 0.13,
eta 0.75, grad clip 1. Reference: results/lsd/<dataset>/
"""
import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
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
    diag_frac: float = 0.75
    """eta: the first max(1, floor(eta B)) rows of each micro-batch are diagonal (s = t, flow matching), the rest off-diagonal (official 0.75)"""
    logvar_freqs: int = 16
    """Fourier frequencies per time of the log-variance head w(t, s)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.compile:  # torch 2.14: layer_norm's forward AD fails on Dynamo's fake tensors (as tvm.py)
        raise SystemExit("--compile: the dual-number JVP (torch.autograd.forward_ad) does not compile yet; run without --compile")
    if not 0 <= args.diag_frac <= 1:
        raise SystemExit(f"--diag-frac {args.diag_frac}: expected a fraction in [0, 1]")
    if args.logvar_freqs < 1:
        raise SystemExit(f"--logvar-freqs {args.logvar_freqs}: expected at least 1")


# ---------------------------------------------------------------- ALGO LOGIC
def sample_times(n, m, device, dtype=torch.float32):
    """(t, s): s = t ~ U(0, 1) on the first m rows; (max, min) of two U(0, 1) draws on the others, i.e.
    uniform on the triangle s <= t (loss_args.py:26-46,97-113)."""
    a, b = torch.rand(2, n, device=device, dtype=dtype)
    diag = torch.arange(n, device=device) < m
    return torch.where(diag, a, torch.maximum(a, b)), torch.where(diag, a, torch.minimum(a, b))


class LogVar(nn.Module):
    """The learned log-variance w(t, s) of the weight exp(-w) l + w (EDM2's uncertainty head): Fourier
    features of t and of s, one zero-initialized linear layer (w = 0 at the start), in fp32."""

    def __init__(self, n_freq=16):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * 2 ** torch.linspace(-3, 3, n_freq), persistent=False)
        self.linear = nn.Linear(4 * n_freq, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t, s):
        with torch.autocast(t.device.type, enabled=False):
            dt = self.linear.weight.dtype
            z = torch.stack([t, s], 1).to(dt)[:, :, None] * self.freqs.to(dt)
            return self.linear(torch.cat([z.cos(), z.sin()], 1).flatten(1))[:, 0]


@contextlib.contextmanager
def eval_mode(*nets):
    """Dropout off for the off-diagonal rows and the teacher (official train=False); nets may be plain callables."""
    modes = [getattr(n, "training", None) for n in nets]
    for n in nets:
        if hasattr(n, "eval"):
            n.eval()
    try:
        yield
    finally:
        for n, mode in zip(nets, modes):
            if mode:
                n.train()


def residual(net, teacher, x_t, t, s, y):
    """LAGRANGIAN: R = d/ds f(x_t, t, s) - sg(teacher(sg f, s, s)), (u, du_ds) by forward-mode AD in s
    (tangent 1 on s only) with grad, f = x_t - (t - s) u, df_ds = u - (t - s) du_ds (losses.py:154-205).
    The gradient flows through u and du_ds; f is detached before the teacher call (no grad)."""
    col = lambda a: a.view(-1, *[1] * (x_t.dim() - 1))  # noqa: E731
    with fwAD.dual_level():
        u, du_ds = fwAD.unpack_dual(net(x_t, t, fwAD.make_dual(s, torch.ones_like(s)), y))
    du_ds = torch.zeros_like(u) if du_ds is None else du_ds  # a field that ignores s
    f, df_ds = x_t - col(t - s) * u, u - col(t - s) * du_ds
    with torch.no_grad():
        v_end = teacher(f.detach(), s, s, y)
    return df_ds - v_end


def self_distillation_loss(net, teacher, logvar, x, y, args):
    """Flow matching on the first rows, the self-distillation residual on the others, each row weighted by
    exp(-w) l + w (losses.py:36-59,380-424). `net`: the trained network (with grad); `teacher`: the same
    weights, called under no_grad (the loop passes the unwrapped net); `logvar`: w(t, s). Returns (loss, terms)."""
    n, dims = x.shape[0], [1] * (x.dim() - 1)
    m = min(n, max(1, int(n * args.diag_frac)))
    t, s = sample_times(n, m, x.device, x.dtype)
    e = torch.randn_like(x)
    x_t = (1 - t.view(-1, *dims)) * x + t.view(-1, *dims) * e
    l_fm = (net(x_t[:m], t[:m], t[:m], y[:m]) - (e - x)[:m]).pow(2).flatten(1).sum(1)  # dropout as the loop set it (on)
    if m < n:
        with eval_mode(net, teacher):
            l_sd = residual(net, teacher, x_t[m:], t[m:], s[m:], y[m:]).pow(2).flatten(1).sum(1)
    else:
        l_sd = l_fm.new_zeros(0)
    l = torch.cat([l_fm, l_sd])
    w = logvar(t, s).to(l.dtype)
    loss = (torch.exp(-w) * l + w).mean()
    D, zero = x[0].numel(), l.new_zeros(())
    return loss, {"loss": loss.detach(), "mse_fm": l_fm.detach().mean() / D, "mse_sd": l_sd.detach().mean() / D if m < n else zero,
                  "logvar": w.detach().mean()}


def drop_labels(y, null, args):
    """Label dropout to the null class, each row with probability --label-dropout."""
    return torch.where(torch.rand(len(y), device=y.device) < args.label_dropout, null, y)


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
    logvar = LogVar(args.logvar_freqs).to(device)  # the loss weight's w(t, s), trained with the net
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    params = [*net.parameters(), *logvar.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "logvar": logvar, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net, ddp_logvar = ddp(net, world), ddp(logvar, world)
    self_distillation_loss = compiled(self_distillation_loss, args)  # --compile (common/run.py)

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
            y = drop_labels(y, null, args)
            with no_sync([ddp_net, ddp_logvar], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = self_distillation_loss(ddp_net, net, ddp_logvar, x, y, args)  # teacher: the current weights
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
