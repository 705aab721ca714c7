"""Shortcut models: one network for every step size, trained by doubling its own step (no JVP).

Paper: Frans, Hafner, Levine, Abbeel, "One Step Diffusion via Shortcut Models", ICLR 2025
(arXiv 2410.12557). Official code (JAX): github.com/kvfrans/shortcut-models @6010043 (read to
check every constant below, nothing copied; `targets_shortcut.py`, `train.py`, `model.py`).

Idea: condition the velocity network on the step size d as well; one step of size d should equal
two steps of size d/2 (paper eq. 5, the compositional or "shortcut" rule). In cleanflow notation
the network is the average velocity over [t - d, t], u = net(x_t, t, t - d, y), and each batch has
    flow-matching rows (7/8):  || net(x_t, t, t - h, y) - (e - x) ||^2,   t ~ U{1/T, 2/T, ..., 1}
    bootstrap rows (1/8):      || net(x_t, t, t - d, y) - sg(clip((u1 + u2) / 2)) ||^2,  with
        u1 = ema(x_t, t, t - d/2, y),  x' = clip(x_t - (d/2) u1),  u2 = ema(x', t - d/2, t - d, y)
(paper eq. 6, Alg. 1), clip to [-4, 4], EMA weights in eval mode, levels d in {1, 1/2, ..., 2/T}
(T = 128: d down to 1/64), t on the grid of d, t = 1 - j d with j ~ U{0, ..., 1/d - 1}, so s >= 0.
Per-row mean over dimensions, then a batch mean over both parts with equal weights (official).
Level allocation as the official code: n_boot // L rows for each of the L levels, smallest d
first, the remainder to d = 1. On class-conditional data the rows of the smallest level get
guided targets, u = u_null + w (u_c - u_null) in both half-steps (official `bootstrap_cfg`,
w = 1.5 on ImageNet); bootstrap labels are never dropped, flow-matching labels are (10%).
Sampling: K in {1, 2, 4, ..., T} steps x <- x - (1/K) net(x, t_k, t_k - 1/K, y), no guidance.

Conversion from the official convention (noise at tau = 0, data at tau = 1, velocity x - e, the
integer level log2(1/d) embedded): t = 1 - tau, s = t - d, net(x, t, s) = -s_theta(x, 1 - t,
log2(1/(t - s))); the official sigma_min = 1e-5 is dropped.
Deviations from the official code (the code wins where the paper is silent; these are choices):
- flow-matching rows at h = 0 (the paper's eq. 6), not at the smallest level h = 1/T as the code
  does (issue #11 of the official repo); `--fm-h 0.0078125` restores the code. tests/test_shortcut.py
  shows why the default is 0: the exact velocity field is NOT the fixed point of the h = 1/T rows.
- our network embeds the continuous gap h = t - s (as every cleanflow method), not the level index.
- the two parts draw their times, noise and images independently (the code reuses one key for both
  parts' times and noise, and images[:B/8] in both, leaving the batch tail unused).
- a batch too small to hold one row of every level is an error (the code silently drops levels).
- sampling uses the EMA weights (the code's default `use_ema 0` samples with the raw weights).
- the gradient norm is clipped at 1 (--grad-clip, the generic default of every file); the official code does not
  clip (issue 21's audit). Pass --grad-clip 0 to follow it; the reference runs in results/shortcut/ clip at 1.
- the sampler steps are in the flow-map form above; off-grid step counts (not a power of two or
  above T) run with a warning.
Official ImageNet-256 settings: AdamW lr 1e-4, betas (0.9, 0.999), wd 0.1, constant lr, batch 256,
EMA 0.999 (the bootstrap net), 810k steps, bf16; FID-50k at 1 / 4 / 128 steps: DiT-B 40.3 / 28.3 /
15.5, DiT-XL 10.6 / 7.8 / 3.8; CelebA-HQ DiT-B 20.5 / 13.8 / 6.9.
Cost: a forward-backward on the batch plus two no-grad EMA forwards on B/8 rows (~3.25 forward
passes; 8 in Dieleman's table, which counts both terms on the full batch).

EMA: the targets of level d come from the EMA's level d/2, so the levels are learned one after the
other, each behind the EMA's horizon. With the official decay 0.999 gmm needs far more than 3000
steps (measured at step 3000: 1-step fm_err 1.10, 128-step 0.09); with 0.99 the 1-step fm_err is
0.09 by step 1000. The reference runs use --ema-decay 0.99.

Run:        python methods/shortcut.py --ema-decay 0.99 --eval-steps 1 2 4 8 128     (gmm; the reference run took 13 min on 1 CPU thread)
            python methods/shortcut.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.99 --eval-steps 1 2 4 8 128
Reference:  results/shortcut/<dataset>/
"""
import copy
import math
import os
import sys
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
    denoise_timesteps: int = 128
    """T: flow-matching t on {1/T, ..., 1}, bootstrap levels d in {1, 1/2, ..., 2/T}, sampling K in {1, 2, ..., T} (official 128)"""
    bootstrap_every: int = 8
    """one row in this many is a bootstrap row (official 8)"""
    fm_h: float = 0.0
    """gap h of the flow-matching rows, net(x_t, t, t - h) (paper 0; official code 1/T = 0.0078125)"""
    bootstrap_cfg: float = 1.0
    """guidance w of the bootstrap targets at the smallest level on class-conditional data (official 1.5 on ImageNet; 1: none)"""
    clip: float = 4.0
    """clip of the bootstrap midpoint x' and of the target to [-clip, clip] (official 4; 0: off)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    T, levels = args.denoise_timesteps, int(math.log2(max(args.denoise_timesteps, 1)))
    if T < 2 or T & (T - 1):
        raise SystemExit(f"--denoise-timesteps {T}: expected a power of two >= 2")
    if args.bootstrap_every < 2:
        raise SystemExit(f"--bootstrap-every {args.bootstrap_every}: expected an integer >= 2 (some rows must be flow matching)")
    micro = args.batch_size // (int(os.environ.get("WORLD_SIZE", 1)) * args.grad_accum)  # what one loss call sees
    if micro // args.bootstrap_every < levels:  # the official code silently drops levels here
        raise SystemExit(f"--batch-size {args.batch_size}: a micro-batch of {micro} has {micro // args.bootstrap_every} bootstrap rows (one in "
                         f"--bootstrap-every {args.bootstrap_every}), fewer than the {levels} levels of --denoise-timesteps {T}; "
                         f"expected micro-batches of at least {levels * args.bootstrap_every}")
    if not 0 <= args.fm_h <= 1 / T:
        raise SystemExit(f"--fm-h {args.fm_h}: expected a value in [0, 1 / --denoise-timesteps = {1 / T}]")
    if args.bootstrap_cfg < 0 or args.clip < 0:
        raise SystemExit(f"--bootstrap-cfg {args.bootstrap_cfg} / --clip {args.clip}: expected values >= 0")
    off = [k for k in args.eval_steps if k > T or k & (k - 1)]
    if off:
        print(f"warning: --eval-steps {off}: off the training grid (powers of two up to --denoise-timesteps {T}); sampling anyway", file=sys.stderr)


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def level_sizes(n_boot, T):
    """Step sizes d of the bootstrap rows, the official allocation [targets_shortcut.py:13-14]:
    n_boot // L rows for each of the L = log2(T) levels, smallest d = 2/T first, remainder d = 1."""
    L = int(math.log2(T))
    k = torch.arange(L - 1, -1, -1).repeat_interleave(n_boot // L)
    return 2.0 ** -torch.cat([k, torch.zeros(n_boot - len(k), dtype=k.dtype)]).float()


def sample_bootstrap_ts(n_boot, T, device):
    """t on the grid of d: t = 1 - j d, j ~ U{0, ..., 1/d - 1}, and s = t - d >= 0."""
    d = level_sizes(n_boot, T).to(device)
    t = 1 - torch.floor(torch.rand(n_boot, device=device) / d) * d
    return t, t - d


def sample_fm_ts(n, args, device):
    """Flow-matching rows: t ~ U{1/T, ..., 1}, s = t - fm_h (s = t: the velocity)."""
    t = torch.randint(1, args.denoise_timesteps + 1, (n,), device=device) / args.denoise_timesteps
    return t, t - args.fm_h


@torch.no_grad()
def ema_velocity(ema, x, t, s, y, null, w, n_cfg):
    """ema(x, t, s, y); the first n_cfg rows guided, u_null + w (u_c - u_null) (one batched call)."""
    if w == 1.0 or n_cfg == 0:
        return ema(x, t, s, y)
    u = ema(torch.cat([x, x[:n_cfg]]), torch.cat([t, t[:n_cfg]]), torch.cat([s, s[:n_cfg]]),
            torch.cat([y, torch.full_like(y[:n_cfg], null)]))
    u_c, u_u = u[:len(x)], u[len(x):]
    return torch.cat([u_u + w * (u_c[:n_cfg] - u_u), u_c[n_cfg:]])


@torch.no_grad()
def bootstrap_target(ema, x_t, t, s, y, null, args, n_cfg=0):
    """Target of net(x_t, t, s): the mean of two EMA half-steps (paper eq. 6), clipped as the
    official code does [targets_shortcut.py:36-78]; rows < n_cfg guided."""
    clip = (lambda z: z.clamp(-args.clip, args.clip)) if args.clip > 0 else (lambda z: z)
    m = (t + s) / 2
    u1 = ema_velocity(ema, x_t, t, m, y, null, args.bootstrap_cfg, n_cfg)
    x_m = clip(x_t - bc(t - m, x_t) * u1)
    u2 = ema_velocity(ema, x_m, m, s, y, null, args.bootstrap_cfg, n_cfg)
    return clip((u1 + u2) / 2)


def shortcut_loss(net, ema, x, y, null, args):
    """Shortcut loss (Alg. 1): bootstrap rows first, flow-matching rows after, ONE forward with
    grad on both. `y` are the raw labels: only the flow-matching rows' are dropped here."""
    n, L = len(x), int(math.log2(args.denoise_timesteps))
    nb = n // args.bootstrap_every
    if nb < L:
        raise ValueError(f"{nb} bootstrap rows cannot hold the {L} step-size levels")
    e = torch.randn_like(x)
    t_b, s_b = sample_bootstrap_ts(nb, args.denoise_timesteps, x.device)
    t_f, s_f = sample_fm_ts(n - nb, args, x.device)
    t, s = torch.cat([t_b, t_f]), torch.cat([s_b, s_f])
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    drop = (torch.rand(n, device=x.device) < args.label_dropout) & (torch.arange(n, device=x.device) >= nb)
    y = torch.where(drop, torch.full_like(y, null), y)
    n_cfg = nb // L if null > 0 else 0  # the smallest level's rows (unconditional data: no guidance)
    u_tgt = torch.cat([bootstrap_target(ema, x_t[:nb], t_b, s_b, y[:nb], null, args, n_cfg), (e - x)[nb:]])
    l = ((net(x_t, t, s, y) - u_tgt) ** 2).flatten(1).mean(1)  # per-row mean over dims (official)
    loss = l.mean()
    return loss, {"loss": loss.detach(), "loss_fm": l[nb:].mean().detach(), "loss_boot": l[:nb].mean().detach()}


@torch.no_grad()
def sample(net, e, y, steps):
    """K-step flow-map sampler x <- x - (1/K) net(x, t_k, t_k - 1/K, y), t_k = 1 - k/K (exact on dyadic grids)."""
    ts = 1 - torch.arange(steps + 1, device=e.device) / steps
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
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    shortcut_loss = compiled(shortcut_loss, args)  # --compile (common/run.py)

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
            # label dropout inside shortcut_loss: flow-matching rows only, bootstrap labels are never dropped
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = shortcut_loss(ddp_net, ema, x, y, null, args)
                (loss / args.grad_accum).backward()
            terms.append(t_i)
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
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
