"""Inductive Moment Matching (IMM): few-step generation by matching, at time s, the distributions that one
flow-map jump carries there from two times t > r, trained from data. [recon]

Paper: Zhou, Ermon, Song, "Inductive Moment Matching", ICML 2025 (arXiv 2503.07565). Official code:
github.com/lumalabs/imm, INFERENCE ONLY (its README leaves "Add training scripts" unchecked): read for the
parametrization and the sampler. The training step here is a RECONSTRUCTION [recon] from the paper's prose
(Alg. 1, eq. 13, App. C.6 / C.8) and two third-party trainers read to check it (an unattributed IMMLoss
file in the style of the official code, and github.com/sefalkner/IMM-Training); nothing copied. Until
official training code exists, treat every training detail below as ours.

Idea: a flow map f(x_t, t, s) = x_t - (t - s) u(x_t, t, s) pushes p_t to p_s. Any r in [s, t) gives a
second route, f(., r, s) on x_r ~ p_r; if the jump from r is right (the induction hypothesis, enforced
with the net's own stop-gradient output), matching the two pushforwards at s by a maximum mean
discrepancy makes the jump from t right too. Per GROUP of M rows sharing (t, r, s):

    x_t = (1 - t) x + t e,   x_r = (1 - r) x + r e      (the SAME (x, e): the paper's DDIM interpolant)
    y_t = f(x_t, t, s) = x_t - (t - s) net(x_t, t, s, y)            (with grad)
    y_r = sg f(x_r, r, s)                                          (current weights, same dropout masks)
    MMD_g = mean_{i,j} k(y_t^i, y_t^j) + k(y_r^i, y_r^j) - 2 k(y_t^i, y_r^j)        (V-statistic)
    k(a, b) = exp(-max(|a - b|, 1e-4) / ((t - s) D))                (Laplace, D = dimensions; App. C.8)
    loss = mean_g w(t) MMD_g,   w(t) = (1-t)^a / ((1-t)^2 + t^2) * (-dlambda/dt)/2 * sigmoid(b - lambda_t),
                                lambda_t = 2 log((1 - t) / t)      (eq. 13; a = 2, b = 4)

Times (App. C.6, per group): eta = t / (1 - t), i.e. log eta = logit t; log eta_t ~ N(-1.1, 2^2) truncated
to [logit eps, logit T] (T = 0.994, eps = 0); log eta_s the same law truncated above at log eta_t;
eta_r = eta_t - (eta(T) - eta(eps)) / 2^k (k = 12), r = max(r, s): r = s on about a quarter of the groups,
where the target is the interpolant x_s itself (a built-in boundary condition). Sampler (official
generate_images.py, "pushforward"): x <- f(x, t_k, t_{k+1}) on linspace(T, eps, K + 1) from x = e (as the
official code, e stands in for x_T; guidance, off by default, on the output as official: u_u + w (u_c - u_u)).

Conversion [official preconds.py, f_type euler_fm]: f = x_t - (t - s) sigma_d F with noise N(0, sigma_d^2),
sigma_d = 0.5, on images in [-1, 1]; that is our path on x / sigma_d with net = sigma_d F. The kernel's
1 / |c_out| = 1 / (sigma_d (t - s)) on their scale is 1 / (t - s) on ours. The net embeds (t, t - s): the
paper's a = 2 checkpoint (its "stride" embedding); c_in preconditioning is left to our networks.

Property (measured, tests/test_imm.py, float64 on the mixture): the exact flow map pushes p_t and p_r both
to p_s, so the population MMD is 0, but it is NOT a fixed point of the minibatch loss with the paper's
coupled x_r: a group's i = i cross pairs (y_t, y_r from the same (x, e)) pull along the unit vector of
f(x_r) - f(x_t), whose conditional mean is not 0; along a test direction the semi-gradient's zero sits at
eps* = -0.045..-0.057 (M = 4) and -0.039..-0.048 (M = 16), seeds 0-2 (spec: -0.038 at both). `--particles
independent` (x_r from another group's data, fresh noise) with `--mmd u` (the unbiased U-statistic: self
pairs i != j) is stationary at the exact map, with a restoring slope along that direction ~100x weaker.

Deviations / choices: label dropout per row (10%), the dropped label for both y_t and y_r (the unattributed
trainer gives y_r the kept label); `--target ema` (EMA weights for y_r) is offered, the default is the
current weights (the spec; the paper's theta^- = sg theta). `--kernel l2` (k = -|a - b|^2 / ((t - s)^2 D))
with M = 1 is two-time consistency training (the paper's own reduction).

Run:        python methods/imm.py                     (2-D gmm)
            python methods/imm.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999
Paper defaults (ImageNet 256, DiT-XL/2, batch 4096 per the 3p README): M 4, k 12, a 2 (gap embedding) or 1,
b 4, P_mean -1.1, P_std 2, T 0.994, eps 0, label dropout 0.1, sampling 8 steps with guidance 1.5 (our default
1.0, comparable with the exact unguided oracle). Reference: results/imm/<dataset>/
"""
import contextlib
import copy
import math
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
    group_size: int = 4
    """M: rows per group sharing (t, r, s); the MMD is taken within each group (paper: 4)"""
    time_mu: float = -1.1
    """mean of log eta_t = logit t (P_mean)"""
    time_sigma: float = 2.0
    """std of log eta_t (P_std)"""
    t_max: float = 0.994
    """T: the largest training time and the sampler's start (paper: 0.994)"""
    t_min: float = 0.0
    """eps: the smallest time and the sampler's end (paper: 0 ImageNet, 0.006 CIFAR-10)"""
    gap_k: int = 12
    """k: eta_r = eta_t - (eta(T) - eta(eps)) / 2^k (paper: 12)"""
    weight_a: float = 2.0
    """a of the weight w(t) (paper: 2 with the gap embedding, 1 with the s embedding)"""
    weight_b: float = 4.0
    """b of the weight w(t)'s sigmoid(b - lambda_t)"""
    kernel: str = "laplace"
    """laplace: exp(-|a - b| / ((t - s) D)) (paper); l2: -|a - b|^2 / ((t - s)^2 D) (M = 1: consistency training)"""
    particles: str = "coupled"
    """coupled: x_r from the same (x, e) as x_t (paper); independent: x_r from the previous group's rows, fresh noise"""
    mmd: str = "v"
    """v: the V-statistic over all M^2 pairs (paper); u: the unbiased U-statistic (self pairs i != j)"""
    target: str = "online"
    """net that makes y_r (no grad): online (the current weights, paper / spec) or ema (the EMA weights)"""
    sample_cfg: float = 1.0
    """sampling guidance w on the output, u_u + w (u_c - u_u) (paper ImageNet: 1.5; 1: none)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.group_size < 1:
        raise SystemExit(f"--group-size {args.group_size}: expected an integer >= 1")
    if not 0 <= args.t_min < args.t_max < 1:
        raise SystemExit(f"--t-min {args.t_min}, --t-max {args.t_max}: expected 0 <= t-min < t-max < 1")
    if args.time_sigma <= 0 or args.gap_k < 0:
        raise SystemExit(f"--time-sigma {args.time_sigma} > 0 and --gap-k {args.gap_k} >= 0 expected")
    for name, allowed in (("kernel", ("laplace", "l2")), ("particles", ("coupled", "independent")), ("mmd", ("v", "u")),
                          ("target", ("online", "ema"))):
        if getattr(args, name) not in allowed:
            raise SystemExit(f"--{name} {getattr(args, name)}: expected {' or '.join(allowed)}")
    if args.mmd == "u" and args.group_size < 2:
        raise SystemExit(f"--group-size {args.group_size} with --mmd u: the U-statistic needs groups of 2 or more")


# ---------------------------------------------------------------- ALGO LOGIC
def truncated_normal(n, mu, sigma, lo, hi, device):
    """N(mu, sigma^2) truncated to [lo, hi] (per row) by the inverse CDF, in float64."""
    cdf = lambda z: torch.special.ndtr(((z if torch.is_tensor(z) else torch.full((), z, dtype=torch.float64, device=device)) - mu) / sigma)  # noqa: E731
    a, b = cdf(lo), cdf(hi)
    return mu + sigma * torch.special.ndtri(a + torch.rand(n, dtype=torch.float64, device=device) * (b - a))


def sample_trs(n, args, device):
    """(t, r, s) of n groups (App. C.6): log eta = logit t ~ N(time_mu, time_sigma^2) truncated to [logit eps,
    logit T] for t, and above at logit t for s; eta_r = eta_t - (eta(T) - eta(eps)) / 2^k; r = max(r, s)."""
    lo, hi = (math.log(args.t_min / (1 - args.t_min)) if args.t_min > 0 else -math.inf), math.log(args.t_max / (1 - args.t_max))
    le_t = truncated_normal(n, args.time_mu, args.time_sigma, lo, hi, device)
    le_s = truncated_normal(n, args.time_mu, args.time_sigma, lo, le_t, device)
    gap = (args.t_max / (1 - args.t_max) - args.t_min / (1 - args.t_min)) / 2**args.gap_k
    eta_r = (le_t.exp() - gap).clamp(min=0)
    s = torch.sigmoid(le_s)
    return torch.sigmoid(le_t), torch.maximum(eta_r / (1 + eta_r), s), s


def weight(t, a, b):
    """w(t) of eq. 13: alpha^a / (alpha^2 + sigma^2) * (-dlambda/dt) / 2 * sigmoid(b - lambda), lambda = 2 log(alpha / sigma)."""
    lam = 2 * (torch.log1p(-t) - torch.log(t))
    return (1 - t) ** a / ((1 - t) ** 2 + t**2) / (t * (1 - t)) * torch.sigmoid(b - lam)


def kernel(p, q, h, kind):
    """k(p_i, q_j) for every pair of every group: p, q [G, M, D], h = t - s [G] -> [G, M, M] (App. C.8)."""
    d2 = (p[:, :, None] - q[:, None]).pow(2).sum(-1)
    h, D = h.view(-1, 1, 1), p.shape[-1]
    if kind == "laplace":  # the distance clamped at 1e-4: no infinite gradient at p_i = q_j (the diagonal of k(p, p))
        return torch.exp(-d2.clamp(min=1e-8).sqrt() / (h * D))
    return -d2 / (h**2 * D)


def mmd(p, q, h, args):
    """Per-group MMD^2 between particles p and q: the V-statistic (all M^2 pairs) or the U-statistic (self pairs i != j)."""
    kpp, kqq, kpq = kernel(p, p, h, args.kernel), kernel(q, q, h, args.kernel), kernel(p, q, h, args.kernel)
    if args.mmd == "v":
        return kpp.mean((1, 2)) + kqq.mean((1, 2)) - 2 * kpq.mean((1, 2))
    off = ~torch.eye(p.shape[1], dtype=torch.bool, device=p.device)
    return kpp[:, off].mean(1) + kqq[:, off].mean(1) - 2 * kpq.mean((1, 2))


def imm_loss(net, target, x, y, args):
    """IMM loss (Alg. 1 with the MMD of eq. 13): groups of M rows share (t, r, s); y_r by `target`, no grad."""
    n, M, dims = x.shape[0], args.group_size, [1] * (x.dim() - 1)
    G = n // M
    t, r, s = (z.to(x.dtype).repeat_interleave(M).view(-1, *dims) for z in sample_trs(G, args, x.device))
    e = torch.randn_like(x)
    x_t = (1 - t) * x + t * e
    if args.particles == "coupled":  # the paper's x_r: the same (x, e) as x_t
        x_r, y_r = (1 - r) * x + r * e, y
    else:  # an independent draw from p_r: the previous group's data (and labels) with fresh noise
        x_r, y_r = (1 - r) * x.roll(M, 0) + r * torch.randn_like(x), y.roll(M, 0)
    fork = args.dropout > 0 and getattr(target, "training", False)
    with torch.no_grad(), (torch.random.fork_rng([x.device] if x.is_cuda else []) if fork else contextlib.nullcontext()):
        f_r = x_r - (r - s) * target(x_r, r.flatten(), s.flatten(), y_r)  # forked RNG: the student's forward draws the same masks
    f_t = x_t - (t - s) * net(x_t, t.flatten(), s.flatten(), y)
    h, tg = (t - s).flatten()[::M], t.flatten()[::M]
    m = mmd(f_t.reshape(G, M, -1), f_r.reshape(G, M, -1), h, args)  # fp32 in bf16 runs too: x_t is fp32
    loss = (weight(tg, args.weight_a, args.weight_b) * m).mean()
    return loss, {"loss": loss.detach(), "mmd": m.detach().mean(), "r_is_s": (r.flatten()[::M] == s.flatten()[::M]).float().mean()}


def drop_labels(y, null, args):
    """Label dropout to the null class, each row with probability --label-dropout."""
    return torch.where(torch.rand(len(y), device=y.device) < args.label_dropout, null, y)


@torch.no_grad()
def sample(net, e, y, steps, null, args):
    """K pushforward steps x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1}, y) on linspace(T, eps, K + 1) from x = e
    (official generate_images.py); guidance on the output for labeled rows when --sample-cfg != 1."""
    ts = torch.linspace(args.t_max, args.t_min, steps + 1, device=e.device)
    guided = args.sample_cfg != 1 and bool((y != null).any())
    x = e
    for k in range(steps):
        t, s = ts[k].expand(len(x)), ts[k + 1].expand(len(x))
        if guided:
            u_c, u_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]), torch.cat([y, torch.full_like(y, null)])).chunk(2)
            u = torch.where((y != null).view(-1, *[1] * (x.dim() - 1)), u_u + args.sample_cfg * (u_c - u_u), u_c)
        else:
            u = net(x, t, s, y)
        x = x - (ts[k] - ts[k + 1]) * u
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
    target = ema if args.target == "ema" else net  # y_r, no grad: the plain module (no DDP hooks)
    if (args.batch_size // (world * args.grad_accum)) % args.group_size:
        raise SystemExit(f"--group-size {args.group_size}: the micro-batch of {args.batch_size // (world * args.grad_accum)} rows "
                         "(--batch-size / processes / --grad-accum) is not a multiple of it")
    if args.particles == "independent" and args.batch_size // (world * args.grad_accum) < 2 * args.group_size:
        raise SystemExit(f"--particles independent: a micro-batch needs 2 groups or more (--group-size {args.group_size})")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, null, args)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    imm_loss = compiled(imm_loss, args)  # --compile (common/run.py)

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
                    loss, t_i = imm_loss(ddp_net, target, x, y, args)
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
