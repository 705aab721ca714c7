"""sCM: continuous-time consistency models, sCT (from data) and sCD (from a teacher), in one file.

Paper: Lu, Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", ICLR 2025
(arXiv 2410.11081). NO OFFICIAL CODE. Read to check the details (nothing copied): NVIDIA's FastGen
(github.com/NVlabs/FastGen, fastgen/methods/consistency_model/sCM.py, fastgen/configs/methods/config_scm.py,
fastgen/configs/experiments/EDM/config_s{ct,cd}_*.py) and revsic/torch-flow-models (src/flowmodels/sct.py).

Idea: a consistency function f(x_t, t) = x_t - t u, u = net(x_t, t, 0, y) (the flow map to s = 0, so
f(x, 0) = x by construction), made constant along the probability-flow ODE by driving its total time
derivative to zero: a stop-gradient regression of u along the (normalized) tangent df/dt, with df/dt
from one forward-mode JVP of the network itself (sg(theta), no EMA target, no discretization).
TrigFlow -> ours (exact for any data scale sigma_d): sigma = sigma_d tan(th), t = sigma / (1 + sigma),
x_th = c(t) x_t, c(t) = cos th + sigma_d sin th = ((1 - t)^2 + t^2 / sigma_d^2)^(-1/2), dt/dth = sigma_d / c^2;
the TrigFlow output is F = u / c(t) + (terms without the network), and the paper's tangent
cos(th) df/dth is, in ours,
    (u, du_dt) = jvp(net(., ., 0, y), (x_t, t), (v, 1))        no grad, current weights, fp32, same dropout masks
    g = k(t) (v - sg(u) - r t du_dt),   k(t) = sigma_d (1 - t) / c(t)      (= k df/dt at r = 1)
    g_n = g / (||g|| / sqrt(D) + c)     (`--tangent-norm rms`, default; `l2`: g / (||g|| + c); `none`: g)
    L = e^{-w(t)} / D ||u - sg(u) - c(t) g_n||^2 / c(t)^2 + w(t)   (the paper's ||F - sg(F) - g_n||^2, adaptive weight)
with v = e - x (sCT, `--mode sct`) or the teacher's guided velocity v_c + (w - 1)(v_c - v_u) (sCD, `--mode scd`).
u moves along +g_n, so f moves along -df/dt. At r = 1 the exact map gives df/dt = 0 (sCD: exactly, with any
normalization; sCT: only in expectation over p(x, e | x_t), and the normalization biases it: see the page).
Times: ln(sigma_d tan th) ~ N(p_mean, p_std^2) IS our logit-normal t ~ LN(p_mean, p_std) (any sigma_d).
Tangent warm-up r = min(1, step / tangent_warmup) on the -t du_dt term: at r = 0 and r = 1 the fixed points
are TrigFlow's (u = v, f = the Tweedie x0; the consistent map), the path between differs (TrigFlow puts r on
its own -(sin cos x_th + sigma_d dF/dth) term). The adaptive weight w(t) (`LogVar`) is a separate tiny
module, EDM2's uncertainty head: Fourier features of ln(sigma) / 4 = logit(t) / 4 and one zero-initialized
linear layer, trained with the net (FastGen: a linear head on the network's own time embedding; our shared
networks have none). At its optimum e^w = the per-time mean of the bracket, so every t-only factor in front
(1 / c^2, FastGen's prior weight 1 / sigma and its extra 1 / D) cancels; they are left out.
Sampling: 1 step f(e, 1) (our path reaches pure noise; EDM codes start at sigma 80); 2 steps: f, re-noise
with fresh noise to the TrigFlow angle `--mid-angle` 1.1 (t = 0.496 at sigma_d 0.5), f again; K > 2: the
angles linspace(pi/2, 0, K + 1) (revsic).
Where: sample_t (times), trig (c, k), guided (teacher), tangent (JVP, g), normalize, LogVar (w), scm_loss,
sample_times / sample (sampler).

Choices: the RMS norm (FastGen g_norm_spatial_invariance, default on, and FACM's sCM reproduction; the
two public reproductions that report FIDs), not the L2 norm of revsic and of the paper's formula as
written: at 64x64x3 the effective constant differs by sqrt(D) = 111, at mnist's 784 by 28, at gmm's 2 by
1.4; RMS keeps c = 0.1 meaning the same at every resolution. `--tangent-norm l2` gives the other.
Deviations: the EDM boundary machinery (sigma_min 0.002, c_skip/c_out) is dropped (f(x, 0) = x exactly);
times are not truncated to FastGen's sigma in [0.002, 80] (mass 2e-4 at LN(-1, 1.4)); the JVP is exact
(FastGen's finite-difference option is not ported); AdamW, no RAdam; FastGen's logvar starts at 0 in front
of its 1 / (sigma D) weight, ours at 0 in front of 1. Both modes start from the teacher's weights when
--teacher is a checkpoint (the paper pretrains TrigFlow, FastGen an EDM net; ours is the fm teacher). With
`--teacher oracle` (gmm) sCD distills the exact velocity and both modes start from a FRESH net. Labels: 10%
become the null label (--label-dropout 0.1, as in every file); FastGen passes the condition unchanged:
--label-dropout 0 follows it. The JVP runs in fp32 under --precision bf16 (FastGen precision_amp_jvp),
inside fork_rng so that the grad forward that follows draws the same dropout masks.

Run:        python methods/scm.py --teacher oracle --sigma-d 1.3 --eval-every 500   (gmm: sCD of the exact velocity;
                sigma_d = the mixture's std 1.30; --mode sct: from data, a fresh net)
            python methods/scm.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --eval-every 250
                --ckpt-every 250 --tangent-warmup 200   (teacher results/fm/mnist/model.safetensors; add --mode sct)
Paper / code recipes (FastGen's configs; ImageNet-64 is not a data set here, the flags are what carries over):
  CIFAR-10 sCT: --dataset cifar10 --mode sct --p-mean -1.0 --p-std 1.4 --sigma-d 0.5 --batch-size 512 --steps 350000
                --lr 1e-4 --adam-betas 0.9 0.99 --dropout 0.2 --grad-clip 0 --tangent-warmup 10000 --ema-decay 0.9999
                --label-dropout 0 (RAdam; FastGen starts from EDM with p_std 1.8; 2 steps: EDM sigma 0.821)
  CIFAR-10 sCD: the same with --mode scd --dropout 0 --steps 500000
  ImageNet-64 sCD: --mode scd --p-std 1.6 --batch-size 1024 --steps 600000 --lr 7e-5 --adam-betas 0.9 0.99
                --grad-clip 10 --precision bf16 --dropout 0 --label-dropout 0 (Adam eps 1e-11 and inverse-sqrt
                decay after 35k steps are not ported)
Reference: results/scm/<dataset>/
"""
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from common.data import make_loader
from common.dit import DiT, MLP, load_teacher, save
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
    mode: str = "scd"
    """scd: consistency distillation (tangent from the teacher's velocity) | sct: consistency training (tangent e - x)"""
    teacher: str = "results/fm/{dataset}/model.safetensors"
    """fm checkpoint ({dataset} is replaced): sCD's teacher, and both modes' initial weights; `oracle`: the exact gmm velocity, a fresh net"""
    teacher_cfg: float = 1.0
    """guidance w of the sCD teacher, v = v_c + (w - 1)(v_c - v_u) (1: none)"""
    sigma_d: float = 0.5
    """data scale sigma_d of TrigFlow (0.5 for [-1, 1] pixels, paper; the data std otherwise, gmm 1.30): sets k(t) and the 2-step time"""
    p_mean: float = -1.0
    """mean of ln(sigma), t ~ LN(p_mean, p_std) (paper CIFAR-10 and ImageNet-64: -1.0)"""
    p_std: float = 1.4
    """std of ln(sigma) (paper CIFAR-10: 1.4; ImageNet-64: 1.6)"""
    tangent_norm: str = "rms"
    """rms: g / (||g|| / sqrt(D) + c) (FastGen) | l2: g / (||g|| + c) (revsic, the paper's formula) | none"""
    norm_eps: float = 0.1
    """c of the tangent normalization (paper and FastGen: 0.1)"""
    tangent_warmup: int = 500
    """steps over which the weight r of the -t du/dt term ramps from 0 to 1 (0: r = 1 from the start; paper 10000)"""
    mid_angle: float = 1.1
    """TrigFlow angle of the intermediate time of 2-step sampling (paper and revsic: 1.1)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.mode not in ("sct", "scd"):
        raise SystemExit(f"--mode {args.mode}: expected sct or scd")
    if args.tangent_norm not in ("rms", "l2", "none"):
        raise SystemExit(f"--tangent-norm {args.tangent_norm}: expected rms, l2 or none")
    for name in ("sigma_d", "p_std", "norm_eps"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive value")
    if args.tangent_warmup < 0:
        raise SystemExit(f"--tangent-warmup {args.tangent_warmup}: expected an integer >= 0")
    if not 0 < args.mid_angle < math.pi / 2:
        raise SystemExit(f"--mid-angle {args.mid_angle}: expected a TrigFlow angle in (0, pi/2)")
    if args.teacher_cfg != 1.0 and (args.mode == "sct" or not args.teacher_cfg >= 0):
        raise SystemExit(f"--teacher-cfg {args.teacher_cfg}: expected a value >= 0, and only with --mode scd")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def sample_t(n, args, like):
    """ln(sigma_d tan th) ~ N(p_mean, p_std^2) is exactly t = sigmoid(N(p_mean, p_std^2)) (sigma = t / (1 - t))."""
    return torch.sigmoid(args.p_mean + args.p_std * torch.randn(n, device=like.device, dtype=like.dtype))


def trig(t, sigma_d):
    """c(t) = cos th + sigma_d sin th (x_th = c x_t) and k(t) = sigma_d (1 - t) / c(t) (g = k df/dt)."""
    c = torch.rsqrt((1 - t) ** 2 + (t / sigma_d) ** 2)
    return c, sigma_d * (1 - t) / c


def guided(teacher, x_t, t, y, null, w):
    """sCD's teacher velocity v_c + (w - 1)(v_c - v_u) (FastGen sCM)."""
    if w == 1.0:
        return teacher(x_t, t, t, y)
    v_c, v_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).chunk(2)
    return v_c + (w - 1) * (v_c - v_u)


def tangent(net, x_t, t, y, v, r, sigma_d):
    """One forward WITH grad u = net(x_t, t, 0, y) and the no-grad TrigFlow tangent g = k(t) df/dt,
    df/dt = v - sg(u) - r t du_dt. du_dt: one torch.func.jvp along (v, 1) under no_grad with the current
    weights, in fp32; fork_rng makes the grad forward reuse its dropout masks."""
    s = torch.zeros_like(t)
    with torch.no_grad():
        devices = [x_t.device] if x_t.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.autocast(x_t.device.type, enabled=False):
            du = torch.func.jvp(lambda z, t_: net(z, t_, s, y), (x_t, t), (v, torch.ones_like(t)))[1]
    u = net(x_t, t, s, y)
    with torch.no_grad():
        g = bc(trig(t, sigma_d)[1], x_t) * (v - u.detach().to(x_t.dtype) - r * bc(t, x_t) * du)
    return u, g


def normalize(g, kind, c):
    """Tangent normalization g / (||g|| + c): rms divides the norm by sqrt(D) (FastGen), l2 does not."""
    if kind == "none":
        return g
    norm = g.flatten(1).norm(dim=1) / (g[0].numel() ** 0.5 if kind == "rms" else 1.0)
    return g / bc(norm + c, g)


class LogVar(nn.Module):
    """The adaptive weight w(t), a learned log-variance (EDM2's uncertainty head): Fourier features of
    logit(t) / 4 = ln(sigma) / 4 and one zero-initialized linear layer."""

    def __init__(self, n_freq=32):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * 2 ** torch.linspace(-3, 2, n_freq), persistent=False)
        self.linear = nn.Linear(2 * n_freq, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t):
        with torch.autocast(t.device.type, enabled=False):
            z = torch.logit(t.to(self.linear.weight.dtype), eps=1e-6)[:, None] / 4 * self.freqs.to(self.linear.weight.dtype)
            return self.linear(torch.cat([z.cos(), z.sin()], 1))[:, 0]


def scm_loss(net, logvar, teacher_v, x, y, r, args):
    """sCM loss on a data batch x: x_t = (1 - t) x + t e, the tangent of the teacher (sCD) or of e - x (sCT)."""
    e = torch.randn_like(x)
    t = sample_t(len(x), args, x)
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    with torch.no_grad():
        v = teacher_v(x_t, t, y).to(x.dtype) if args.mode == "scd" else e - x
    u, g = tangent(net, x_t, t, y, v, r, args.sigma_d)
    c = bc(trig(t, args.sigma_d)[0], x)
    u = u.to(x.dtype)  # fp32 in training (the DiT returns fp32 under autocast), float64 in the oracle tests
    mse = ((u - u.detach() - c * normalize(g, args.tangent_norm, args.norm_eps)) / c).pow(2).flatten(1).mean(1)  # ||F - sg(F) - g_n||^2 / D
    w = logvar(t).to(x.dtype)
    loss = (torch.exp(-w) * mse + w).mean()
    g_norm = g.flatten(1).norm(dim=1) / (g[0].numel() ** 0.5 if args.tangent_norm == "rms" else 1.0)
    return loss, {"loss": loss.detach(), "mse": mse.detach().mean(), "g_norm": g_norm.mean(), "logvar": w.detach().mean(),
                  "r": torch.tensor(float(r))}


def sample_times(steps, sigma_d, mid_angle):
    """t_0 = 1 > t_1 > ... > t_{K-1}: the TrigFlow angles pi/2, mid_angle (K = 2) or linspace(pi/2, 0, K + 1)[:-1],
    as t = sigma_d sin th / (cos th + sigma_d sin th)."""
    th = torch.tensor([math.pi / 2, mid_angle], dtype=torch.float64) if steps == 2 else torch.linspace(math.pi / 2, 0, steps + 1, dtype=torch.float64)[:-1]
    t = sigma_d * th.sin() / (th.cos() + sigma_d * th.sin())
    return torch.cat([torch.ones(1, dtype=torch.float64), t[1:]]).float()


@torch.no_grad()
def sample(net, e, y, ts):
    """Multistep consistency sampling: x0 = f(x, t_k) = x - t_k net(x, t_k, 0, y), then re-noise with fresh
    noise to t_{k+1}: x = (1 - t_{k+1}) x0 + t_{k+1} n."""
    x = e
    for k, t in enumerate(ts.to(e.device, e.dtype)):
        x0 = x - t * net(x, t.expand(len(x)), torch.zeros(len(x), device=e.device, dtype=e.dtype), y)
        x = (1 - ts[k + 1].item()) * x0 + ts[k + 1].item() * torch.randn_like(e) if k + 1 < len(ts) else x0
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

    teacher, teacher_net = load_teacher(args.teacher, args.dataset, info, device, loader.gmm)
    teacher_v = lambda x_t, t, y: guided(teacher, x_t, t, y, null, args.teacher_cfg)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    logvar = LogVar().to(device)  # the adaptive weight w(t), trained with the net
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    params = [*net.parameters(), *logvar.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), sample_times(k, args.sigma_d, args.mid_angle))
    saved = {"net": net, "logvar": logvar, "ema": ema, "opt": opt}
    ddp_net, ddp_logvar = ddp(net, world), ddp(logvar, world)
    scm_loss = compiled(scm_loss, args)  # --compile (common/run.py)

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
            r = min(1.0, (step + 1) / args.tangent_warmup) if args.tangent_warmup else 1.0
            with no_sync([ddp_net, ddp_logvar], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = scm_loss(ddp_net, ddp_logvar, teacher_v, x, y, r, args)
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
