"""Consistency Trajectory Models (CTM): a flow map distilled from a flow-matching teacher along its ODE trajectory.

Paper: Kim, Lai, Liao, Murata, Takida, Uesaka, He, Mitsufuji, Ermon, "Consistency Trajectory
Models: Learning Probability Flow ODE Trajectory of Diffusion", ICLR 2024 (arXiv 2310.02279).
Official code: github.com/sony/ctm (commit 87cca3b, ImageNet-64: code/cm/karras_diffusion.py,
resample.py, script_util.py, sample_util.py), read to check the times, the target, the loss terms
and the sampler; nothing copied.

Idea: CTM learns G(x_t, t, s), the ODE solution from t to any s <= t. On our path (EDM sigma -> t =
sigma / (1 + sigma), x_t = x_sigma / (1 + sigma)) CTM's "euler" form G = (s/t) x_t + (1 - s/t) g with
g = x_t - t net(x_t, t, s, y) IS our flow map G(x_t, t, s) = x_t - (t - s) net(x_t, t, s, y), and
g(x_t, t, t) is the denoiser. On the N-point Karras grid t_0 > ... > t_{N-1} (sigma in [0.002, 80],
rho 7, mapped to t) a micro-batch draws k ~ p(k) proportional to k on {1..k_max}, then per row
n ~ U{0..N-1-k}, m ~ U{n+k..N-1}: t = t_n, t' = t_{n+k}, s = t_m (resample.py:70-94,
karras_diffusion.py:132-158). The teacher solves its ODE from t to t' in k Heun steps on the grid
(2k teacher calls, no grad), and both points are jumped to s and then to t_min:

    x'   = Heun_k(v_T; x_t, t -> t')                                   (no grad)
    est  = G_tgt(G_theta(x_t, t, s), s, t_min)      (outer: target net, frozen parameters, gradient through its input)
    tgt  = G_tgt(sg G_theta(x', t', s), s, t_min)   (inner: the CURRENT weights under no_grad; outer: target net)
    L_CTM = mean_dims (est - tgt)^2                                    (karras_diffusion.py:236-278,483-505)
    L_DSM = (1/sigma^2 + 1/sigma_d^2) mean_dims (g(x_sigma, sigma, sigma) - x)^2
          = ((1 - t)^2 + t^2 / sigma_d^2) mean_dims (net(x_t, t, t, y) - (e - x))^2     (exact: g - x = t (e - x - u))
    loss  = L_CTM + dsm_weight * lambda * L_DSM,  lambda = ||grad_W L_CTM|| / (||grad_W L_DSM|| + 1e-4) clamped to [0, 1e4]
            on the last layer W (VQGAN-style, karras_diffusion.py:103-108,382-396; --no-adaptive-dsm: lambda = 1)

The target net is an EMA of the student at 0.999 (official "fixed" target_ema_mode; --ema-target-decay),
apart from the sampling EMA (--ema-decay), and in train mode as the official's (train_util.py:572):
the student's inner forwards on x_t and x' share their dropout masks, as do the two outer jumps
(fork_rng; the official saves and at once restores the RNG state, karras_diffusion.py:481-482, which
shares nothing). DSM times: half sigma ~ LogNormal(-1.2, 1.2), exactly t ~ LN(-1.2, 1.2) on our path,
half sigma from the top 70% of the continuous rho-grid (resample.py:206-229). Sampling (sample_util.py:
457-520): gamma-sampling on t_k = linspace(1, t_min, K + 1): jump to s = sqrt(1 - gamma^2)(t_{k+1} -
t_min) + t_min, then re-noise to t_{k+1}; gamma = 0 is K flow-map steps, gamma = 1 the CM sampler.
Where: karras_ts (grid), sample_indices (k, n, m), heun (teacher), dsm_ts (DSM times), ctm_loss, sample.

Teacher calls per iteration: 2 E[k] = 2 (2 k_max + 1) / 3 on average: 23.3 at the CPU default N = 18
(k_max 17, CIFAR-10's), 52.7 at ImageNet-64's N = 40 (k_max 39), against seed 002's 7 FPE for the whole
step; logged as `teacher_calls`. Student side: two grad forwards (inner, DSM), the target net's outer
jump with an input gradient, two no-grad forwards for the target and, with the adaptive weight, two
extra partial backwards. Measured (1 thread on a shared 2-core CPU): mnist with the fm DiT teacher
18-40 FPE per step, about 9.5 + 1.1 teacher_calls (35 at the mean); gmm with the oracle teacher 12.6.
The CPU default is N = 18 (the CIFAR-10 grid) to halve that cost; one Heun step in t on it has a median
error of 5.6e-5 on the gmm oracle (4.8e-4 in sigma; tests/test_ctm.py). --k-max caps k (the official
GAN stage uses 20; --k-max 8: 11.3 calls).

Deviations: the teacher's Heun steps are taken in t (dx/dt = v), the official in sigma (dx/dsigma =
(x - D)/sigma): the same ODE, a different discretization (tests/test_ctm.py shows which). The outer jump
and sampling end at t_min = 0 (--t-min; the official stops at sigma_min = 0.002, t = 0.001996, with
c_skip / c_out: our map reaches 0 exactly); the grid itself keeps sigma_min. d = squared L2 (the
official LPIPS on 224-px upsampled images is not ported; mean over dimensions, as the official DSM).
The GAN term (StyleGAN-XL projected discriminator on DeiT / EfficientNet features, second stage) is
omitted. k is drawn per micro-batch (the official broadcasts one k from rank 0; here 2 processes equal
one process with --grad-accum 2). No guidance on the teacher (the official EDM teachers are unguided).
Sampling starts at t = 1 from pure noise (every file here); the official starts at sigma_max = 80 (t =
0.988, the top of the training grid). AdamW instead of RAdam. The student starts as a copy of the
teacher (official: from the EDM teacher); with --teacher oracle it starts from scratch.

Run:        python methods/ctm.py --teacher oracle --eval-every 500   (gmm, exact teacher velocity, student from scratch)
            python methods/ctm.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --eval-every 250
                --ckpt-every 250   (teacher results/fm/mnist/model.safetensors, student copied from it)
Paper recipe (ImageNet-64, CTM+DSM stage, commands/CTM+DSM_command.sh): --num-scales 40 --k-max 39 --lr 4e-4
    --batch-size 1440 --ema-target-decay 0.999 --ema-decay 0.999 --weight-decay 0 --dropout 0 --sigma-data 0.5
    (RAdam; the GAN stage: --k-max 20, lr 8e-6, batch 4224). CIFAR-10: --num-scales 18 --k-max 17 --lr 4e-4 --batch-size 128.
Reference:  results/ctm/<dataset>/
"""
import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
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
    teacher: str = "results/fm/{dataset}/model.safetensors"
    """fm checkpoint of the teacher ({dataset} is replaced), or `oracle` for the exact gmm velocity"""
    num_scales: int = 18
    """N, points of the Karras time grid (official start_scales: 40 ImageNet-64, 18 CIFAR-10; 18 here for the CPU cost)"""
    k_max: int = 17
    """k ~ p(k) proportional to k on {1..k_max} teacher Heun steps (official num_heun_step N - 1: 39 / 17; GAN stage 20)"""
    sigma_min: float = 0.002
    """smallest EDM sigma of the grid (t = sigma / (1 + sigma) = 0.001996)"""
    sigma_max: float = 80.0
    """largest EDM sigma of the grid (t = 80/81 = 0.988)"""
    rho: float = 7.0
    """Karras grid exponent"""
    t_min: float = 0.0
    """end time of the outer jump G(., s, t_min) and of sampling (official sigma_min 0.002: t = 0.001996)"""
    ema_target_decay: float = 0.999
    """decay of the target EMA that makes the outer jumps (official target_ema_mode fixed, start_ema 0.999)"""
    dsm_weight: float = 1.0
    """weight of the DSM term (official denoising_weight 1.0; 0: no DSM term)"""
    adaptive_dsm: bool = True
    """scale DSM by ||grad L_CTM|| / ||grad L_DSM|| on the last layer (official apply_adaptive_weight True)"""
    sigma_data: float = 0.5
    """sigma_d of the DSM weight 1/sigma^2 + 1/sigma_d^2 (official 0.5)"""
    dsm_mu: float = -1.2
    """DSM times, half of the rows: sigma ~ LogNormal(dsm_mu, dsm_sigma), i.e. t ~ LN(dsm_mu, dsm_sigma) (official -1.2)"""
    dsm_sigma: float = 1.2
    """std of that log-normal (official 1.2)"""
    dsm_top: float = 0.7
    """DSM times, other half: sigma uniform in grid position over the top dsm_top of the rho-grid (official diffusion_mult 0.7)"""
    sample_gamma: float = 0.0
    """gamma-sampling: 0 flow-map steps, 1 jump to t_min and re-noise (the CM sampler)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if not args.num_scales >= 2 or not 1 <= args.k_max <= args.num_scales - 1:
        raise SystemExit(f"--num-scales {args.num_scales} / --k-max {args.k_max}: expected N >= 2 and 1 <= k_max <= N - 1")
    if not 0 < args.sigma_min < args.sigma_max or not args.rho > 0:
        raise SystemExit(f"--sigma-min {args.sigma_min} / --sigma-max {args.sigma_max} / --rho {args.rho}: expected 0 < min < max and rho > 0")
    if not 0 <= args.t_min <= args.sigma_min / (1 + args.sigma_min):
        raise SystemExit(f"--t-min {args.t_min}: expected a time in [0, {args.sigma_min / (1 + args.sigma_min):.6g}] (the grid's smallest)")
    for name in ("ema_target_decay",):
        if not 0 <= getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a decay in [0, 1)")
    if not args.dsm_weight >= 0 or not args.sigma_data > 0 or not args.dsm_sigma > 0 or not 0 < args.dsm_top <= 1:
        raise SystemExit(f"--dsm-weight {args.dsm_weight} / --sigma-data {args.sigma_data} / --dsm-sigma {args.dsm_sigma} / "
                         f"--dsm-top {args.dsm_top}: expected weight >= 0, positive sigmas and dsm_top in (0, 1]")
    if not 0 <= args.sample_gamma <= 1:
        raise SystemExit(f"--sample-gamma {args.sample_gamma}: expected a value in [0, 1]")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def rho_sigma(u, args):
    """EDM sigma at grid position u in [0, 1] (0: sigma_max, 1: sigma_min) of the rho-grid."""
    a, b = args.sigma_max ** (1 / args.rho), args.sigma_min ** (1 / args.rho)
    return (a + u * (b - a)) ** args.rho


def karras_ts(args, like):
    """The N grid times t_0 > ... > t_{N-1} in our t = sigma / (1 + sigma) (script_util.py:150)."""
    sigma = rho_sigma(torch.arange(args.num_scales, device=like.device, dtype=torch.float64) / (args.num_scales - 1), args)
    return (sigma / (1 + sigma)).to(like.dtype)


def sample_indices(b, args, device):
    """k ~ p(k) proportional to k on {1..k_max}, once per micro-batch (karras_diffusion.py:132-158);
    per row n ~ U{0..N-1-k} and m ~ U{n+k..N-1} (resample.py:70-94)."""
    k = 1 + int(torch.multinomial(torch.arange(1.0, args.k_max + 1), 1))  # host-sync-ok: a draw on the host
    u = torch.rand(2, b, device=device, dtype=torch.float64)
    n = (u[0] * (args.num_scales - k)).long()
    m = n + k + (u[1] * (args.num_scales - n - k)).long()
    return k, n, m


@torch.no_grad()
def heun(teacher_v, x, ts, n, k, y):
    """k Heun steps in t of the teacher's ODE dx/dt = v_T on the grid, from t_n to t_{n+k}: 2k calls."""
    for j in range(k):
        a, b = ts[n + j], ts[n + j + 1]
        h = bc(b - a, x)
        d1 = teacher_v(x, a, y).to(x.dtype)
        d2 = teacher_v(x + h * d1, b, y).to(x.dtype)
        x = x + h * (d1 + d2) / 2
    return x


def jump(net, z, a, b, y):
    """The flow map G(z, a, b) = z - (a - b) net(z, a, b, y) (CTM's (b/a) z + (1 - b/a) g)."""
    return z - bc(a - b, z) * net(z, a, b, y).to(z.dtype)


def ctm_pair(net, target_net, x_t, x2, t, t2, s, y, t_min):
    """(estimate, target) of L_CTM. The target is computed first under fork_rng, so that the
    estimate's forwards draw the same dropout masks: inner with inner, outer with outer."""
    tmin = torch.full_like(s, t_min)
    devices = [x_t.device] if x_t.is_cuda else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        tgt = jump(target_net, jump(net, x2, t2, s, y), s, tmin, y)  # inner: current weights, no grad ("model_sg")
    est = jump(target_net, jump(net, x_t, t, s, y), s, tmin, y)  # outer: frozen target net, gradient through its input
    return est, tgt


def dsm_ts(b, args, like):
    """DSM times: the first half t ~ LN(dsm_mu, dsm_sigma), the rest from the top dsm_top of the rho-grid."""
    kw = dict(device=like.device, dtype=like.dtype)
    ln = torch.sigmoid(args.dsm_mu + args.dsm_sigma * torch.randn(b // 2, **kw))
    sigma = rho_sigma(args.dsm_top * torch.rand(b - b // 2, **kw), args)
    return torch.cat([ln, sigma / (1 + sigma)])


def dsm_loss(net, x, y, args):
    """(1/sigma^2 + 1/sigma_d^2) mean_dims (g(x_t, t, t) - x)^2 with g = x_t - t net(x_t, t, t, y),
    written as ((1 - t)^2 + t^2 / sigma_d^2) mean_dims (net - (e - x))^2 (exact, no 1/t^2)."""
    e = torch.randn_like(x)
    t = dsm_ts(len(x), args, x)
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    w = (1 - t) ** 2 + t**2 / args.sigma_data**2
    return (w * ((net(x_t, t, t, y).to(x.dtype) - (e - x)) ** 2).flatten(1).mean(1)).mean()


def ctm_loss(net, target_net, teacher_v, x, y, args, last=None):
    """L_CTM + dsm_weight * lambda * L_DSM on a data batch; `last`: the last-layer weight of the
    adaptive lambda (None: lambda = 1)."""
    e = torch.randn_like(x)
    ts = karras_ts(args, x)
    k, n, m = sample_indices(len(x), args, x.device)
    t, t2, s = ts[n], ts[n + k], ts[m]
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    x2 = heun(teacher_v, x_t, ts, n, k, y)  # the teacher's trajectory from t to t'
    est, tgt = ctm_pair(net, target_net, x_t, x2, t, t2, s, y, args.t_min)
    l_ctm = ((est - tgt) ** 2).flatten(1).mean(1).mean()
    l_dsm = dsm_loss(net, x, y, args) if args.dsm_weight > 0 else torch.zeros_like(l_ctm)
    lam = torch.ones_like(l_ctm)
    if args.adaptive_dsm and last is not None and args.dsm_weight > 0:  # karras_diffusion.py:103-108
        g_ctm = torch.autograd.grad(l_ctm, last, retain_graph=True)[0]
        g_dsm = torch.autograd.grad(l_dsm, last, retain_graph=True)[0]
        lam = (g_ctm.norm() / (g_dsm.norm() + 1e-4)).clamp(0, 1e4).detach()
    loss = l_ctm + args.dsm_weight * lam * l_dsm
    return loss, {"loss": loss.detach(), "ctm": l_ctm.detach(), "dsm": l_dsm.detach(), "dsm_lambda": lam,
                  "teacher_calls": torch.tensor(2.0 * k), "k": torch.tensor(float(k))}


@torch.no_grad()
def sample(net, e, y, steps, gamma=0.0, t_min=0.0):
    """gamma-sampling on t_k = linspace(1, t_min, K + 1) (sample_util.py:457-520, in t): jump from t_k
    to s = sqrt(1 - gamma^2)(t_{k+1} - t_min) + t_min, then re-noise to t_{k+1}:
    x <- a x + sqrt(t_{k+1}^2 - a^2 s^2) n, a = (1 - t_{k+1}) / (1 - s). gamma 0: flow-map steps;
    gamma 1: jump to t_min and re-noise (the CM sampler)."""
    ts = torch.linspace(1, t_min, steps + 1, device=e.device, dtype=e.dtype)
    x = e
    for k in range(steps):
        t, t_next = ts[k], ts[k + 1]
        s = (1 - gamma**2) ** 0.5 * (t_next - t_min) + t_min
        x = jump(net, x, t.expand(len(x)), s.expand(len(x)), y)
        if gamma > 0 and k < steps - 1:
            a = (1 - t_next) / (1 - s)
            x = a * x + (t_next**2 - a**2 * s**2).clamp(min=0).sqrt() * torch.randn_like(x)
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
    teacher_v = lambda x_t, t, y: teacher(x_t, t, t, y)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()  # sampling EMA
    ema_target = copy.deepcopy(net).requires_grad_(False).train()  # target EMA of the outer jumps (train mode: train_util.py:572)
    last = net.out[-1].weight if isinstance(net.out, torch.nn.Sequential) else net.out.weight  # the adaptive DSM weight's layer
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, args.sample_gamma, args.t_min)
    saved = {"net": net, "ema": ema, "ema_target": ema_target, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    ctm_loss = compiled(ctm_loss, args)  # --compile (common/run.py)

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
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = ctm_loss(ddp_net, ema_target, teacher_v, x, y, args, last)
                (loss / args.grad_accum).backward()
            terms.append(t_i)
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), "grad_norm": gnorm}
        stop_if_nonfinite(terms, step, run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the EMA records no autograd history
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - args.ema_decay)
            torch._foreach_lerp_(list(ema_target.parameters()), list(net.parameters()), 1 - args.ema_target_decay)

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
