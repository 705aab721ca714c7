"""Improved MeanFlow (iMF): MeanFlow as a velocity regression, with guidance as network inputs.

Paper: Geng, Lu, Wu, Shechtman, Kolter, He, "Improved Mean Flows: On the Challenges of
Fastforward Generative Models", 2025 (arXiv 2512.02012). Official code (JAX):
github.com/Lyy-iiis/imeanflow @ bf60cd7 (imf.py, models/imfDiT.py; read to check every constant
and the guidance rule below; nothing copied). The official code uses this notation (r = s).

Idea: MeanFlow regresses u on a target built from u's own JVP; iMF moves the JVP to the other
side and regresses a velocity. The compound velocity (official imf.py:366-376)

    V(x_t, t, s) = u(x_t, t, s) + (t - s) sg(du/dt),   du/dt = jvp(net(., ., s, y, c), (x_t, t), (v_c, 1))

equals v*(x_t, t) exactly when u is the average velocity, so L = || V - sg(v_g) ||^2 is a
flow-matching loss whose x-tangent is the model's own guided velocity v_c, not e - x (lower
variance; at s = t, V = u is the instantaneous velocity and L is plain flow matching).
Guidance as inputs (official imf.py:141-179, imfDiT.py:300-303): per row w = cfg_max^a,
a ~ U(0, 1) (p(w) ~ 1/w on [1, cfg_max]; --cfg-beta b != 1: p(w) ~ w^-b), an interval
t_min ~ U(0, mid), t_max ~ U(mid, 1), forced to [0, 1] on the s = t rows; the network embeds
c = (1 - 1/w, t_min, t_max). Target (no grad, current weights; official imf.py:212-261,295-325):
w_eff = w inside [t_min, t_max], else 1; v_c = v(x_t, t, y, (1 - 1/w_eff, 0, 1)),
v_u = v(x_t, t, null, (0, 0, 1)), v_g = (e - x) + (1 - 1/w_eff)(v_c - v_u): its fixed point is
v_c = v_u + w_eff (v_cond - v_u), ordinary CFG. Loss per row (official imf.py:380-393):
l_u = sum_dims (V - v_g)^2 weighted l / sg(l + c)^p (c = 0.01, p = 1; raw MSEs logged per dimension, as in every
file). From data this weight moves the stationary point off the exact map (a property, not a bug): with e - x drawn
from p(x | x_t) of the mixture (tests/test_imf.py, CPU) the shift is 0.23-0.34 RMS at p = 1, noise 0.04 at p = 0.

Two formulations (`--v-head`): by default a single head, v := net(x_t, t, t, y, c) (u at h = 0,
seed 002's reading of iMF): v comes for free, and the s = t rows train it through l_u. With
`--v-head` the network has a second output branch (its own final layer on the shared trunk)
trained by l_v = sum_dims (v_aux - v_g)^2 from the same forward (same h, w, interval), the v of
the target and tangent comes from it, and it is dropped at sampling: the official layout, where
the branch is 8 transformer blocks on a (depth - 8)-block trunk (imfDiT.py:134-138,240-267).
Single head is the default: one output, no extra loss, and nothing to drop at sampling time.

Label dropout (--label-dropout-rows): `first` (default) is the official code at bf60cd7
(imf.py:263-293): num_drop ~ Bin(B, p), the FIRST num_drop rows (s = t rows) get the null label
and the target v_g = e - x; their w and interval inputs stay. The null class is then trained at
h = 0 only, which is the only place the target asks for it (v_u). The official code drops after
computing the target; here the labels are dropped first and a dropped row's target is set to
e - x, which gives the same loss (an s = t row needs no tangent). `random` drops each row with
probability p; a dropped s != t row then takes the unconditional tangent v_u (the repository's
later random-row dropout keeps the conditional v_c there, which misses the exact solution).

Cost: only the s != t rows pay for a JVP (the JVP term is multiplied by t - s = 0 elsewhere), as
in meanflow.py. The tangent is computed without grad (it is stopped anyway), then ONE forward
with grad gives u (and v_aux). The target costs one no-grad forward on a doubled batch.
Deviations: our adaLN DiT embeds (t, h, y, c); the official net has in-context tokens, h only
(no t), RoPE, SwiGLU, RMSNorm. The official code evaluates v_c twice (at w and w_eff); once is
enough. With --dropout > 0 the JVP runs on the whole batch in a forked RNG, so its masks are
the forward's.
Sampling (official imf.py:90-112): K flow-map steps x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1},
y, c) at a chosen (w, interval): --sample-cfg (each scale is evaluated; the first one draws the
grids) and --sample-interval. Official eval: B/2 w 8 [.4, .65]; XL/2 w 8 [.42, .62].

Run:        python methods/imf.py                       (2-D gmm; the reference run took 40 min on 1 CPU thread)
            python methods/imf.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999 --sample-cfg 1 2 4   (the reference run)
Paper defaults (ImageNet 256): AdamW lr 1e-4, betas (0.9, 0.95), wd 0, batch 1024, 10-epoch
warm-up, no grad clip, EMA 0.9999, ratio 0.5, c 0.01, p 1, label dropout 0.1, w in [1, 8].
Reference: results/imf/<dataset>/
"""
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
    ratio: float = 0.5
    """fraction of the batch with s != t (official data_proportion = 1 - ratio = 0.5)"""
    time_mu: float = -0.4
    """mean of the logit-normal time draws"""
    time_sigma: float = 1.0
    """std of the logit-normal time draws"""
    norm_p: float = 1.0
    """adaptive-weight power p (official 1.0)"""
    norm_eps: float = 0.01
    """adaptive-weight constant c (official 0.01, on a sum over dims)"""
    cfg_max: float = 8.0
    """training guidance scales w lie in [1, cfg_max] (official (1 + 7)^a)"""
    cfg_beta: float = 1.0
    """p(w) ~ w^-cfg_beta on [1, cfg_max] (official 1.0: w = cfg_max^a, a ~ U(0, 1))"""
    interval_mid: float = 0.5
    """training guidance intervals: t_min ~ U(0, mid), t_max ~ U(mid, 1) (official 0.5)"""
    v_head: bool = False
    """a second output branch for v, trained by the v-loss, dropped at sampling (official layout)"""
    sample_cfg: tuple[float, ...] = (1.0, 2.0)
    """guidance scales w evaluated when sampling; the first draws the grids (official eval: 8)"""
    sample_interval: tuple[float, float] = (0.0, 1.0)
    """guidance interval [t_min, t_max] when sampling (official eval B/2: 0.4 0.65)"""
    label_dropout_rows: str = "first"
    """first: Bin(B, p) dropped labels on the first rows, which are s = t rows (official cond_drop), so the null
    class learns only velocities; random: each row with probability p, dropped s != t rows take the unconditional tangent"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    for name in ("ratio", "interval_mid"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if args.norm_eps <= 0 or args.norm_p < 0:
        raise SystemExit(f"--norm-eps {args.norm_eps} > 0, --norm-p {args.norm_p} >= 0 expected")
    if args.label_dropout_rows not in ("first", "random"):
        raise SystemExit(f"--label-dropout-rows {args.label_dropout_rows}: expected first or random")
    if args.cfg_max < 1 or not args.sample_cfg or min(args.sample_cfg) < 1:
        raise SystemExit(f"--cfg-max {args.cfg_max} / --sample-cfg {' '.join(map(str, args.sample_cfg))}: guidance scales must be >= 1")
    if not 0 <= args.sample_interval[0] <= args.sample_interval[1] <= 1:
        raise SystemExit(f"--sample-interval {' '.join(map(str, args.sample_interval))}: expected 0 <= t_min <= t_max <= 1")


# ---------------------------------------------------------------- ALGO LOGIC
def sample_ts(n, n_jvp, args, device):
    """t = max, s = min of two LN(time_mu, time_sigma) draws; s = t on the first n - n_jvp rows."""
    a, b = torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(2, n, device=device))
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    return t, torch.where(torch.arange(n, device=device) < n - n_jvp, t, s)


def sample_guidance(n, m, args, device):
    """Per-row (w, t_min, t_max): w = cfg_max^a, a ~ U(0, 1) (the inverse CDF of p(w) ~ w^-cfg_beta),
    t_min ~ U(0, mid), t_max ~ U(mid, 1); the interval is [0, 1] on the s = t rows 0..m-1."""
    a, lo, hi = torch.rand(3, n, device=device)
    b = args.cfg_beta
    w = args.cfg_max**a if b == 1 else (1 + a * (args.cfg_max ** (1 - b) - 1)) ** (1 / (1 - b))
    first = torch.arange(n, device=device) < m
    return w, torch.where(first, 0.0, args.interval_mid * lo), torch.where(first, 1.0, args.interval_mid + (1 - args.interval_mid) * hi)


def heads(out):
    """(u, v) of a two-headed network (--v-head), (u, None) of a single head."""
    return out if isinstance(out, tuple) else (out, None)


def velocity(net, x_t, t, y, c):
    """The instantaneous velocity v(x_t, t): the v-head, or the u output at h = 0 (single head)."""
    u, v = heads(net(x_t, t, t, y, c))
    return u if v is None else v


@torch.no_grad()
def guided_target(net, x_t, t, v, y, w, t_min, t_max, null):
    """The target v_g = v + (1 - 1/w_eff)(v_c - v_u) (v on dropped-label rows) and the x-tangent v_c, the model's
    guided velocity at w_eff, h = 0, interval [0, 1] (v_u on dropped-label rows); w_eff = w inside [t_min, t_max],
    else 1. Current weights, in eval mode (the official net has no dropout, so the mode changes nothing there)."""
    was_training = getattr(net, "training", False)  # net may be a plain callable (tests: the oracle)
    if was_training:
        net.eval()
    if null == 0:  # unconditional data: no guidance; the tangent is the model's own velocity
        v_c = velocity(net, x_t, t, y, None)
    else:
        k = torch.where((t >= t_min) & (t <= t_max), 1 - 1 / w, 0.0)  # 1 - 1/w_eff
        c = torch.cat([t.new_zeros(2 * len(t), 2), t.new_ones(2 * len(t), 1)], 1)  # dummy interval [0, 1]
        c[: len(t), 0] = k
        v_c, v_u = velocity(net, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]), c).chunk(2)
    if was_training:
        net.train()
    if null == 0:
        return v, v_c
    dropped = (y == null).view(-1, *[1] * (x_t.dim() - 1))
    return torch.where(dropped, v, v + k.view(-1, *[1] * (x_t.dim() - 1)) * (v_c - v_u)), torch.where(dropped, v_u, v_c)


def compound_velocity(net, x_t, t, s, y, c, v_c, m, dropout):
    """V = u + (t - s) sg(du/dt) with u = net(x_t, t, s, y, c) (one forward, with grad), and the
    v-head output (None for a single head). du/dt: one JVP with tangent (v_c, 1) without grad (it is stopped
    anyway), in a forked RNG so the forward draws the same dropout masks; only rows m.. (s != t) need it
    (rows 0..m-1 have s = t: the term vanishes), unless dropout asks for the whole batch's masks."""
    j = 0 if dropout > 0 else m
    du_dt = torch.zeros_like(x_t)
    if j < len(x_t):
        c_ = None if c is None else c[j:]
        with torch.no_grad(), torch.random.fork_rng(devices=[x_t.device] if x_t.is_cuda else []):
            _, du_dt[j:] = torch.func.jvp(lambda z, t_: heads(net(z, t_, s[j:], y[j:], c_))[0], (x_t[j:], t[j:]), (v_c[j:].to(x_t.dtype), torch.ones_like(t[j:])))
    u, v_aux = heads(net(x_t, t, s, y, c))
    return u + (t - s).view(-1, *[1] * (x_t.dim() - 1)) * du_dt, v_aux


def imf_loss(net, x, y, args, null):
    """iMF loss with the adaptive weight per term, and the v-loss with --v-head. Returns (loss, terms)."""
    n, dims = x.shape[0], [1] * (x.dim() - 1)
    n_jvp = round(args.ratio * n)
    e = torch.randn_like(x)
    t, s = sample_ts(n, n_jvp, args, x.device)
    x_t = (1 - t.view(-1, *dims)) * x + t.view(-1, *dims) * e
    w, t_min, t_max = sample_guidance(n, n - n_jvp, args, x.device)
    v_g, v_c = guided_target(net, x_t, t, e - x, y, w, t_min, t_max, null)
    c = torch.stack([1 - 1 / w, t_min, t_max], 1) if null else None
    V, v_aux = compound_velocity(net, x_t, t, s, y, c, v_c, n - n_jvp, args.dropout)
    l = ((V - v_g) ** 2).flatten(1).sum(1)
    loss = l / (l.detach() + args.norm_eps) ** args.norm_p
    m, zero, D = n - n_jvp, l.new_zeros(()), x[0].numel()  # the weight acts on the SUM over dims (official); logged: per-dim means
    terms = {"mse": l.detach().mean() / D, "mse_fm": l[:m].detach().mean() / D if m else zero, "mse_mf": l[m:].detach().mean() / D if n_jvp else zero}
    if v_aux is not None:  # --v-head: l_v from the same forward, weighted the same way
        l_v = ((v_aux - v_g) ** 2).flatten(1).sum(1)
        loss, terms["mse_v"] = loss + l_v / (l_v.detach() + args.norm_eps) ** args.norm_p, l_v.detach().mean() / D
    loss = loss.mean()
    return loss, {"loss": loss.detach(), **terms}


def drop_labels(y, null, args):
    """Label dropout to the null class (see --label-dropout-rows)."""
    if args.label_dropout_rows == "first":
        k = int(torch.binomial(torch.tensor(float(len(y))), torch.tensor(args.label_dropout)))
        return torch.where(torch.arange(len(y), device=y.device) < k, null, y)
    return torch.where(torch.rand(len(y), device=y.device) < args.label_dropout, null, y)


@torch.no_grad()
def sample(net, e, y, steps, c=None):
    """K-step flow-map sampler x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1}, y, c), c = (1 - 1/w, t_min, t_max)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    c = None if c is None else torch.tensor(c, device=e.device).float().expand(len(x), 3)
    for k in range(steps):
        x = x - (ts[k] - ts[k + 1]) * heads(net(x, ts[k].expand(len(x)), ts[k + 1].expand(len(x)), y, c))[0]
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
            return MLP(info["shape"][0], args.hidden, args.depth, info["num_classes"], n_cond, args.dropout, v_head=args.v_head)
        return DiT(info["shape"][1], args.patch_size, info["shape"][0], args.hidden, args.depth, args.heads, 4.0,
                   info["num_classes"], n_cond, args.qk_norm, args.dropout, v_head=args.v_head)

    net = make_net(n_cond=3 if null else 0).to(device)  # c = (1 - 1/w, t_min, t_max) on class-conditional data
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_at = lambda w: (lambda e, y, k: sample(ema, e.to(device), y.to(device), k, (1 - 1 / w, *args.sample_interval) if null else None))
    sample_fn = sample_at(args.sample_cfg[0])
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    imf_loss = compiled(imf_loss, args)  # --compile (common/run.py)

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
                    loss, t_i = imf_loss(ddp_net, x, y, args, null)
                (loss / args.grad_accum).backward()
            terms.append(t_i)
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), "grad_norm": gnorm}
        stop_if_nonfinite(terms, step, run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the EMA records no autograd history
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - args.ema_decay)
        if null and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):  # the other --sample-cfg scales
            log({"step": step + 1, **{f"{k}_w{w:g}": v for w in args.sample_cfg[1:] for k, v in evaluator(sample_at(w), args.eval_steps).items() if "@" in k}})

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
