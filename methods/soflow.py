"""SoFlow (Solution Flow Models): MeanFlow with du/dt by an annealed finite difference of the current net, from data.

Paper: Luo, Yuan, Liu, "SoFlow: Solution Flow Models for One-Step Generative Modeling", ICLR 2026
(arXiv 2512.15657). Official code (PyTorch): github.com/zlab-princeton/SoFlow (models.py, train.py,
inference.py, cifar.yaml, imagenet.yaml; read to check every constant below; nothing copied).

Idea: the network is the solution operator f(x_t, t, s) = x_t - (t - s) u(x_t, t, s) of the ODE (the official
a = 1, b = s - t "Euler" coefficients: our average velocity u). On the s != t rows ("consistency" rows) a
middle time l in [s, t) and x_l = x_t - (t - l) v_g on the same line are drawn, and the map must agree:

    D = (f(x_t, t, s) - sg f(x_l, l, s)) / (t - l),   f(x_l, l, s) by the CURRENT net under no_grad
      = v_g - u - (l - s) (u - u_l) / (t - l)                         (an exact identity, u_l = net(x_l, l, s, y))

i.e. MeanFlow's regression u -> sg(v_g - (t - s) du/dt) with du/dt replaced by the backward finite difference
(u - u_l) / (t - l) and (t - s) by (l - s); as r -> 0 it is MeanFlow's loss with SoFlow's weight:

    u_tgt = v_g - (l - s) sg(u - u_l) / (t - l),   mse = mean_dims (u - sg(u_tgt))^2,   loss = mean( c mse / sg((mse + eps)^p) )

with c = 1 on the s = t (flow-matching) rows and c = 1/2 on the others: the official consistency loss is the surrogate
mean_dims(-u . sg(w D)), whose gradient is half that of w mse (the exact gradient of w |D|^2 is 2 / r larger
again; the code drops it). The weight acts on the MEAN over dims (official; meanflow.py's on the sum).
Times (independent draws, official train.py): s = t ~ LN(mu0, sig0) on the first 1 - ratio of the rows; on the
others t ~ LN(mu2, sig2) clamped >= min_gap, s = min(LN(mu1, sig1), t - min_gap) (about 14% of the rows at
s = t - min_gap with the ImageNet laws), l = min(t - r (t - s), t - min_gap) with r = r0 (r1 / r0)^(step / steps):
the gap t - l SHRINKS from r0 (t - s) to r1 (t - s) over training (the finite difference is annealed).
Guidance (official, on labeled rows, no grad, current weights): v_g = w v + k v_c + (1 - w - k) v_u with the
guidance part decayed smoothly near t = 1: w(t) = 1 - k + g(t) (w - 1 + k), g = 1 for t <= cfg_decay_time,
else 1 - exp(-cfg_decay_k d / (1 - d)), d = (1 - t) / (1 - cfg_decay_time); effective scale 1 + g(t) (w / (1 - k) - 1).
Official (cfg_scale W, mix_ratio m): w = m W, k = 1 - m. Dropped labels (random rows) get v.
Samplers (--samplers, each evaluated; the first draws the grids): consistency (official, its 2-NFE headline):
x0 = x - t_k net(x, t_k, 0), re-noised x = (1 - t_{k+1}) x0 + t_{k+1} n with fresh n, t_k = 1 - k / K; and
flow-map steps x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}). At one step they are the same.

A property of the method, not a bug: trained from data, v is e - x, and the finite difference's bias is
E[D | x_t] at the exact map. Measured on the 2-D mixture (tests/test_soflow.py, float64, 128 points, 64 posterior
draws each, the ImageNet time laws, r = 1e-3, seeds 0-3; CPU): with the marginal velocity v* the residual is O(r)
(rms 9e-4 to 1.4e-3); with the conditional e - x averaged over p(x | x_t) the bias is heavy-tailed: rms 0.02 to
0.67 against a median of 8e-4 to 1.1e-3, carried by a few rows. The adaptive weight (p > 0) moves the stationary
point from data as in meanflow.py (RMS shift 0.24-0.40 at p = 1). Cost: one no-grad forward on the s != t rows (no
JVP), then one forward with grad on the whole batch: 3 + ratio FPE (seed 002 counts 7 for FM and consistency batches
apart).

Deviations: our DiT embeds (t, h = t - s) by adaLN, as the official DiT's two embedders of t and t - s (the U-Net
of CIFAR-10 is not ported: no EDM augmentation). The guidance forwards run in eval mode (official: train mode;
the same without dropout). With --dropout > 0 the finite-difference forward runs on the whole batch in a forked
RNG, so its masks are the forward's (official: the same RNG state restored). Label dropout: our generic
--label-dropout (official: 0.1 only when guidance is on, none otherwise). In bf16 (--precision auto on CUDA) the
difference of two forwards is rounding: measured under CPU autocast (random-init MLP and mnist DiT, r = 0.1 to 1e-3),
|FD - JVP| / |JVP| is 3 to 135 in bf16 against 0.004 to 0.3 in fp32: under autocast both forwards of the difference
run in fp32 (one more no-grad forward; official: fp32 with TF32 matmuls on, whose rounding is not measured here).

Run:        python methods/soflow.py                    (2-D gmm)
            python methods/soflow.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999   (the reference run)
Paper recipes as flags (our defaults are the ImageNet ones without guidance):
  ImageNet 256 (DiT-B/4, imagenet.yaml): --ratio 0.25 --time-mu -0.2 -1.0 0.2 --time-sigma 1.0 0.8 0.8 --fd-r0 0.1
      --fd-r1 0.002 --norm-p 1.0 --norm-eps 0.01 --cfg-omega 0.75 --cfg-kappa 0.75 --cfg-decay-time 0.8 --lr 1e-4
      --adam-betas 0.9 0.99 --batch-size 256 --steps 400000 --ema-decay 0.9999 --grad-clip 0 (XL/2: 1.2M steps;
      FID-50k 1 / 2 NFE 2.96 / 2.66)
  CIFAR-10 (U-Net, uncond., cifar.yaml): --ratio 1.0 (no flow-matching rows) --time-mu -0.9 -4.0 -0.9 --time-sigma 1.6
      1.6 1.6 --fd-r0 1.0 --fd-r1 3.125e-4 --norm-p 0.75 --norm-eps 1e-3 --label-dropout 0 --lr 1e-4 --batch-size 1024
      --steps 800000 --ema-decay 0.9999 --grad-clip 0 --dropout 0.3 (official: RAdam, EDM augment p 0.12, EMA every
      16 steps in float64; FID-50k 1 / 2 NFE 2.86 / 2.28)
Reference: results/soflow/<dataset>/
"""
import contextlib
import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
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
    ratio: float = 0.25
    """fraction of the batch with s != t, the consistency rows (official 1 - velocity_loss_ratio: ImageNet 0.25, CIFAR-10 1.0)"""
    time_mu: tuple[float, float, float] = (-0.2, -1.0, 0.2)
    """means of the logit-normal draws of (t = s of the s = t rows, s, t) (ImageNet; CIFAR-10 -0.9 -4.0 -0.9)"""
    time_sigma: tuple[float, float, float] = (1.0, 0.8, 0.8)
    """stds of the same three draws (ImageNet; CIFAR-10 1.6 1.6 1.6)"""
    min_gap: float = 1e-4
    """t >= min_gap, s <= t - min_gap, l <= t - min_gap (official 1e-4)"""
    fd_r0: float = 0.1
    """finite-difference gap at step 0: t - l = r (t - s), r = r0 (r1 / r0)^(step / steps) (ImageNet 0.1, CIFAR-10 1.0)"""
    fd_r1: float = 0.002
    """the gap's r at the end of training (ImageNet 0.002, CIFAR-10 3.125e-4)"""
    norm_p: float = 1.0
    """adaptive-weight power p (paper: 1.0 ImageNet, 0.75 CIFAR-10)"""
    norm_eps: float = 0.01
    """adaptive-weight constant eps, added to the MEAN over dims of the squared residual (ImageNet 0.01, CIFAR-10 1e-3)"""
    cfg_omega: float = 1.0
    """training guidance w (class-conditional data only; w 1 with k 0: no guidance, as here; ImageNet 0.75 = mix x scale)"""
    cfg_kappa: float = 0.0
    """training guidance k, mixing in the model's conditional velocity (ImageNet 0.75 = 1 - mix: scale w / (1 - k) = 3)"""
    cfg_decay_time: float = 0.8
    """the guidance decays smoothly to none between t = cfg_decay_time and t = 1 (ImageNet 0.8; 1: no decay)"""
    cfg_decay_k: float = 0.025
    """k of the decay g = 1 - exp(-k d / (1 - d)), d = (1 - t) / (1 - cfg_decay_time) (official 0.025)"""
    label_dropout_rows: str = "random"
    """random: each row with probability p (official cfg_mask); first: Bin(B, p) dropped labels on the first rows, the
    s = t rows (meanflow's official cond_drop)"""
    samplers: tuple[str, ...] = ("consistency", "flow")
    """samplers evaluated (consistency: jump to 0 and re-noise, official; flow: flow-map steps); the first draws the grids"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    for name in ("ratio", "cfg_decay_time", "fd_r0", "fd_r1"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if not args.fd_r0 > 0 or not args.fd_r1 > 0 or not 0 < args.min_gap < 0.5 or min(args.time_sigma) <= 0:
        raise SystemExit(f"--fd-r0 {args.fd_r0} / --fd-r1 {args.fd_r1} > 0, --min-gap {args.min_gap} in (0, 0.5), "
                         f"--time-sigma {' '.join(map(str, args.time_sigma))} > 0 expected")
    if args.norm_eps <= 0 or args.norm_p < 0 or args.cfg_kappa >= 1 or args.cfg_decay_k <= 0:
        raise SystemExit(f"--norm-eps {args.norm_eps} > 0, --norm-p {args.norm_p} >= 0, --cfg-kappa {args.cfg_kappa} < 1, "
                         f"--cfg-decay-k {args.cfg_decay_k} > 0 expected")
    if args.cfg_omega / (1 - args.cfg_kappa) < 1:
        raise SystemExit(f"--cfg-omega {args.cfg_omega} / --cfg-kappa {args.cfg_kappa}: the guidance scale w / (1 - k) must be >= 1")
    if args.label_dropout_rows not in ("first", "random"):
        raise SystemExit(f"--label-dropout-rows {args.label_dropout_rows}: expected first or random")
    if not args.samplers or not set(args.samplers) <= {"flow", "consistency"}:
        raise SystemExit(f"--samplers {' '.join(args.samplers)}: expected consistency and/or flow")


# ---------------------------------------------------------------- ALGO LOGIC
def fd_ratio(step, args):
    """r = r0 (r1 / r0)^(step / steps) (official 'Exponent' l_schedule): the gap t - l = r (t - s) shrinks."""
    return args.fd_r0 * (args.fd_r1 / args.fd_r0) ** (step / args.steps)


def sample_ts(n, n_fd, r, args, like):
    """Independent logit-normal draws (in the dtype of `like`): s = l = t ~ LN(mu0, sig0) on the first n - n_fd rows;
    on the others t ~ LN(mu2, sig2) >= min_gap, s = min(LN(mu1, sig1), t - min_gap), l = min(t - r (t - s), t - min_gap)."""
    mu, sigma = (torch.stack([like.new_full((1,), v) for v in vs]) for vs in (args.time_mu, args.time_sigma))  # no host copy
    a, b, c = torch.sigmoid(mu + sigma * torch.randn(3, n, device=like.device, dtype=like.dtype))
    t = c.clamp(min=args.min_gap)
    s = torch.minimum(b, t - args.min_gap)
    l = torch.minimum(t + (s - t) * r, t - args.min_gap)
    fm = torch.arange(n, device=like.device) < n - n_fd
    return torch.where(fm, a, t), torch.where(fm, a, s), torch.where(fm, a, l)


def guidance_decay(t, args):
    """g(t) = 1 for t <= cfg_decay_time, else 1 - exp(-k d / (1 - d)), d = (1 - t) / (1 - cfg_decay_time) in [0, 1)."""
    if args.cfg_decay_time >= 1:
        return torch.ones_like(t)
    d = ((1 - t) / (1 - args.cfg_decay_time)).clamp(0, 1 - 1e-6)
    return torch.where(t <= args.cfg_decay_time, 1.0, 1 - torch.exp(-args.cfg_decay_k * d / (1 - d)))


@torch.no_grad()
def guided_velocity(net, x_t, t, v, y, null, args):
    """Training-time CFG target v_g (official v + g(t) (W - 1) (v - v_u), mixed with v_c), labeled rows only."""
    if null == 0 or (args.cfg_omega == 1 and args.cfg_kappa == 0):
        return v
    was_training = getattr(net, "training", False)  # net may be a plain callable (tests: the oracle)
    if was_training:
        net.eval()
    if args.cfg_kappa == 0:
        v_c, v_u = 0.0, net(x_t, t, t, torch.full_like(y, null))
    else:
        v_c, v_u = net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).chunk(2)
    if was_training:
        net.train()
    w = (1 - args.cfg_kappa + guidance_decay(t, args) * (args.cfg_omega - 1 + args.cfg_kappa)).view(-1, *[1] * (x_t.dim() - 1))
    v_g = w * v + args.cfg_kappa * v_c + (1 - w - args.cfg_kappa) * v_u
    return torch.where((y != null).view(-1, *[1] * (x_t.dim() - 1)), v_g, v)


def mean_velocity_and_target(net, x_t, t, s, l, y, v_g, m, dropout):
    """u = net(x_t, t, s, y) (one forward, with grad) and the target u_tgt = v_g - (l - s) du/dt (no grad), du/dt the
    backward difference (u - u_l) / (t - l) of the CURRENT net, u_l = net(x_l, l, s, y) at x_l = x_t - (t - l) v_g
    under no_grad, in a forked RNG so the forward draws the same dropout masks; only rows m.. (s != t) need it (rows
    0..m-1 have s = t: their target is v_g), unless dropout asks for the whole batch's masks."""
    j = 0 if dropout > 0 else m
    amp = torch.is_autocast_enabled(x_t.device.type)
    fork = lambda: torch.random.fork_rng([x_t.device] if x_t.is_cuda else []) if dropout > 0 else contextlib.nullcontext()  # noqa: E731
    u_tgt = v_g.clone()
    if j < len(x_t):  # under bf16 autocast both ends of the difference run in fp32 (in bf16 it is rounding: docstring)
        with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False) if amp else contextlib.nullcontext():
            with fork():
                u_l = net(x_t[j:] - (t[j:] - l[j:]).view(-1, *[1] * (x_t.dim() - 1)) * v_g[j:], l[j:], s[j:], y[j:])[m - j:]
            if amp:
                with fork():
                    u_0 = net(x_t[j:], t[j:], s[j:], y[j:])[m - j:].float()
    u = net(x_t, t, s, y)
    if m < len(x_t):
        du_dt = ((u_0 if amp else u[m:].detach()) - u_l) / (t[m:] - l[m:]).view(-1, *[1] * (x_t.dim() - 1))
        u_tgt[m:] = v_g[m:] - (l[m:] - s[m:]).view(-1, *[1] * (x_t.dim() - 1)) * du_dt
    return u, u_tgt


def soflow_loss(net, x, y, args, null, step):
    """SoFlow loss at training step `step` (its finite-difference gap r) with the adaptive weight. Returns (loss, terms)."""
    n, dims = x.shape[0], [1] * (x.dim() - 1)
    n_fd, r = round(args.ratio * n), fd_ratio(step, args)
    e = torch.randn_like(x)
    t, s, l = sample_ts(n, n_fd, r, args, x)
    x_t = (1 - t.view(-1, *dims)) * x + t.view(-1, *dims) * e
    v_g = guided_velocity(net, x_t, t, e - x, y, null, args)
    u, u_tgt = mean_velocity_and_target(net, x_t, t, s, l, y, v_g, n - n_fd, args.dropout)
    mse = ((u - u_tgt.detach()) ** 2).flatten(1).mean(1)  # the weight acts on the MEAN over dims (official)
    m, zero = n - n_fd, mse.new_zeros(())
    c = torch.where(torch.arange(n, device=x.device) < m, 1.0, 0.5)  # the official consistency surrogate: half the gradient
    loss = (c * mse / (mse.detach() + args.norm_eps) ** args.norm_p).mean()
    return loss, {"loss": loss.detach(), "mse": mse.detach().mean(), "mse_fm": mse[:m].detach().mean() if m else zero,
                  "mse_con": mse[m:].detach().mean() if n_fd else zero, "fd_r": mse.new_full((), r)}


def drop_labels(y, null, args):
    """Label dropout to the null class (see --label-dropout-rows)."""
    if args.label_dropout_rows == "first":
        k = int(torch.binomial(torch.tensor(float(len(y))), torch.tensor(args.label_dropout)))
        return torch.where(torch.arange(len(y), device=y.device) < k, null, y)
    return torch.where(torch.rand(len(y), device=y.device) < args.label_dropout, null, y)


@torch.no_grad()
def sample(net, e, y, steps, sampler="consistency"):
    """K steps on t_k = linspace(1, 0, K + 1): consistency (official) x0 = x - t_k net(x, t_k, 0, y), re-noised
    x <- (1 - t_{k+1}) x0 + t_{k+1} n with fresh n; or flow map x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    for k in range(steps):
        t = ts[k].expand(len(x))
        if sampler == "flow":
            x = x - (ts[k] - ts[k + 1]) * net(x, t, ts[k + 1].expand(len(x)), y)
        else:
            x = (1 - ts[k + 1]) * (x - ts[k] * net(x, t, 0 * t, y)) + ts[k + 1] * torch.randn_like(x)
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
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_with = lambda how: (lambda e, y, k: sample(ema, e.to(device), y.to(device), k, how))
    sample_fn = sample_with(args.samplers[0])
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    soflow_loss = compiled(soflow_loss, args)  # --compile (common/run.py)

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
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = soflow_loss(ddp_net, x, y, args, null, step)
                (loss / args.grad_accum).backward()
            terms.append(t_i)
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), "grad_norm": gnorm}
        stop_if_nonfinite(terms, step, run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the EMA records no autograd history
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - args.ema_decay)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:  # the other --samplers
            log({"step": step + 1, **{f"{k}_{h}": v for h in args.samplers[1:] for k, v in evaluator(sample_with(h), args.eval_steps).items() if "@" in k}})

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
