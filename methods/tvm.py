"""TVM: Terminal Velocity Matching, a flow map trained from scratch through its own JVP.

Paper: Zhou, Parger, Haque, Song, "Terminal Velocity Matching", 2025 (arXiv 2511.19797). Official
code (PyTorch): github.com/lumalabs/tvm at 82e8e5d (read to check every constant below; nothing
copied): training/loss.py (times, guidance), training/wrapper.py (the loss), training/dit.py.

Idea: the flow map f(x_t, t, s) = x_t - (t - s) u(x_t, t, s) satisfies, at its terminal time s,
d/ds f(x_t, t, s) = v*(f(x_t, t, s), s): the map's endpoint moves with the velocity found there
(the Lagrangian condition). TVM regresses d/ds f onto the velocity the model itself predicts at
the endpoint, u(f, s, s) (a target EMA), plus flow matching, which pins that velocity to data:

    (u, du_ds) = jvp(s -> u(x_t, t, s, y, beta), s, 1)          tangent on s only  (wrapper.py:93-102)
    f = x_t - (t - s) u,   df_ds = u - (t - s) du_ds                                  (wrapper.py:112-113)
    L_term = mean_dims (beta (df_ds - sg u_tgt(f, s, s, y, beta)))^2,   0 where s ~ t (wrapper.py:177,182)
    L_fm   = mean_dims (beta (u(x_s', s', s', y, beta) - v_tgt))^2                    (wrapper.py:179-180)
    v_tgt  = w (e - x) + (1 - w) sg u_tgt(x_s', s', s', null, 1),   loss = mean_rows (L_term + L_fm)

df_ds is NOT detached: the gradient flows through the tangent (wrapper.py:105-106, detach_jvp
false in every released config), i.e. reverse mode over forward mode, which is what the backward
of kernels.attention_jvp through both attention outputs is for. u_tgt is a second EMA of the
weights (decay 0.99, --ema-target-decay), under no_grad; the sampling EMA (--ema-decay, paper
0.9999) is separate. Times (loss.py:39-64): gap ~ LN(-0.8, 1); logit(s) ~ N(-0.4, 1) truncated
above at logit(1 - gap) by inverse CDF; t = min(s + gap, 1); an independent s' ~ LN(-0.4, 1)
for the FM term, x_t and x_s' share one image and one noise. Guidance is an input: beta = 1/w is
the network's extra scalar condition c (dit.py:469-474); dropped labels (10%) get the null class
AND beta = 1 (loss.py:83-86). w is fixed per run in the released configs (--cfg-w), or
w ~ U(lo, hi) per row (--cfg-w-range; the official third option beta ~ U(0, 1) is not exposed).
--scale-param: u = w F with F the network output (wrapper.py:108-113; on in the 256 px configs and im512_w2p25).
Sampler (generate_images.py): x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1}, y, 1/w) with the
sampling EMA and the training w (the official samples in float64; here in the net's dtype).

The JVP is taken with torch.autograd.forward_ad dual numbers: an ordinary module call, so it goes
through DDP (torch.func.jvp through a DDP module fails). The trained net is called twice with grad
per micro-batch, the JVP on the terminal rows and a plain forward on the FM rows (the official
code makes the same two calls inside one DDP forward); DDP accepts it, as both calls sit in one
graph with one backward. One call on the concatenated rows with tangent 0 on the FM rows would
also do, at about 1.5x the cost (measured on CPU: the FM rows would carry a tangent and its backward).

Deviations: the official replaces NaN rows by 0 (wrapper.py:188-190); here a non-finite row makes
the loss non-finite and the loop's NaN guard stops the run (`nonfinite` counts such rows). The
DiT tweaks of the paper are flags: --norm rms (RMSNorm without affine for the LayerNorms),
--modnorm (each adaLN chunk RMS-normalized; with adaLN-zero init the modulations jump to unit RMS
after the first update, as in the official code), --qk-norm; not reproduced: the spectral init
(xavier normal divided by the top singular value) and 18 heads. The MLP of the 2-D data sets has
none of them. Loss: mean over dimensions as the official (MeanFlow's file sums). PyTorch note: a
backward through a forward-AD tangent of torch.softmax fails (its JVP rule works in place), so
plain-math attention can only be differentiated through its JVP under torch.func.jvp.

Cost: seed 002 counts 10 forward-pass equivalents (JVP forward 2 + backward through both outputs 4
+ target 1 + FM 3). Measured on a loaded 2-core CPU (median s/step over a no-grad forward of the
micro-batch): 13.4 on gmm (results/tvm/gmm/summary.json), 17.7 on mnist (15 steps of the command
below); the CPU attention path materializes P and forward-AD runs op by op, so a GPU ratio will differ.

Run:        python methods/tvm.py                       (2-D gmm; the reference run took 39 min on 1 CPU thread)
            python methods/tvm.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999   (same DiT and budget as MeanFlow's)
Paper defaults (ImageNet 256, DiT-XL/2 18 heads): lr 1e-4, batch 2048, AdamW betas (0.9, 0.95),
wd 0, bf16, EMA 0.9999 (sampling) and 0.99 (target), w 2.0 (1-NFE) / 1.75 (4-NFE), scale-param on,
norm rms, modnorm, qk-norm. Our default w is 1 (no guidance), so that samples compare with the
exact (unguided) oracle and with the other methods. Reference: results/tvm/<dataset>/
"""
import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
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
    gap_mu: float = -0.8
    """mean of the logit of the gap t - s (official gap_P_mean)"""
    gap_sigma: float = 1.0
    """std of the logit of the gap (official gap_P_std)"""
    s_mu: float = -0.4
    """mean of the logit of s (truncated at logit(1 - gap)) and of s' (official s_P_mean)"""
    s_sigma: float = 1.0
    """std of the logit of s and of s' (official s_P_std)"""
    cfg_w: float = 1.0
    """guidance scale w >= 1, fixed in training and used for sampling (paper: 2.0 1-NFE, 1.75 4-NFE; 1: none)"""
    cfg_w_range: Optional[tuple[float, float]] = None
    """draw w ~ U(lo, hi) per row in training instead (official min_cfg/max_cfg); sampling uses --cfg-w"""
    scale_param: bool = False
    """u = w * F with F the network output (official do_scale_param: on in the 256 px configs and im512_w2p25)"""
    ema_target_decay: float = 0.99
    """decay of the target EMA that gives the terminal velocity and the unconditional velocity (official ema_target_beta)"""
    norm: str = "rms"
    """DiT normalization before attention, MLP and output: layer | rms (paper: RMSNorm without affine)"""
    modnorm: bool = True
    """DiT modulation norm: RMS-normalize each adaLN chunk (paper: on)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.compile:  # torch 2.14: layer_norm's forward AD fails on Dynamo's fake tensors (an internal assert)
        raise SystemExit("--compile: TVM's dual-number JVP (torch.autograd.forward_ad) does not compile yet; run without --compile")
    if args.gap_sigma <= 0 or args.s_sigma <= 0:
        raise SystemExit(f"--gap-sigma {args.gap_sigma} / --s-sigma {args.s_sigma}: expected positive values")
    # s is drawn below logit(1 - gap) by inverse CDF: at the gap's +3 sigma quantile the s law must keep mass there
    gap_hi = 1 / (1 + math.exp(-(args.gap_mu + 3 * args.gap_sigma)))
    z = (math.log((1 - gap_hi) / gap_hi) - args.s_mu) / args.s_sigma if gap_hi < 1 - 1e-7 else -math.inf
    if z < -5:
        raise SystemExit(f"--gap-mu {args.gap_mu} --gap-sigma {args.gap_sigma} (with --s-mu {args.s_mu} --s-sigma {args.s_sigma}): "
                         f"the gap leaves no room for s (at the gap's +3 sigma value {gap_hi:.4g}, P(s <= 1 - gap) < 3e-7)")
    if not args.cfg_w >= 1:
        raise SystemExit(f"--cfg-w {args.cfg_w}: expected a guidance scale w >= 1")
    if args.cfg_w_range is not None and not 1 <= args.cfg_w_range[0] <= args.cfg_w_range[1]:
        raise SystemExit(f"--cfg-w-range {args.cfg_w_range}: expected 1 <= lo <= hi")
    for name in ("ema_decay", "ema_target_decay"):
        if not 0 <= getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a decay in [0, 1)")
    if args.norm not in ("layer", "rms"):
        raise SystemExit(f"--norm {args.norm}: expected layer or rms")


# ---------------------------------------------------------------- ALGO LOGIC
def sample_times(n, args, device, dtype=torch.float32):
    """(t, s, s'): gap ~ LN(gap_mu, gap_sigma), logit(s) ~ N(s_mu, s_sigma) truncated above at
    logit(1 - gap) (inverse CDF), t = min(s + gap, 1); s' ~ LN(s_mu, s_sigma) on its own (loss.py:39-64)."""
    kw = dict(device=device, dtype=dtype)
    gap = torch.sigmoid(args.gap_mu + args.gap_sigma * torch.randn(n, **kw))
    # N(s_mu, s_sigma)'s cdf and icdf written out as torch.distributions.Normal computes them, with
    # host scalars for mu and sigma: no device tensors built from Python numbers, no validation sync
    mu, sigma = torch.tensor(args.s_mu, dtype=dtype), torch.tensor(args.s_sigma, dtype=dtype)
    u = torch.rand(n, **kw) * (0.5 * (1 + torch.erf((torch.logit(1 - gap) - mu) * sigma.reciprocal() / math.sqrt(2))))
    s = torch.sigmoid(mu + sigma * torch.erfinv(2 * u - 1) * math.sqrt(2))
    t = (s + gap).clamp(max=1)
    return t, s, torch.sigmoid(args.s_mu + args.s_sigma * torch.randn(n, **kw))


def guidance_scale(y, null, args, dtype=torch.float32):
    """w per row: --cfg-w, or U(--cfg-w-range); 1 on rows with the null label (loss.py:72-86)."""
    if args.cfg_w_range is None:
        w = torch.full(y.shape, args.cfg_w, device=y.device, dtype=dtype)
    else:
        lo, hi = args.cfg_w_range
        w = lo + (hi - lo) * torch.rand(y.shape, device=y.device, dtype=dtype)
    return torch.where(y == null, 1.0, w)


def velocity(net, x, t, s, y, w, args):
    """u(x, t, s, y, beta = 1/w): the network with beta as its scalar condition, times w under
    --scale-param (wrapper.py:108-113)."""
    u = net(x, t, s, y, (1 / w)[:, None])
    return u * w.view(-1, *[1] * (x.dim() - 1)) if args.scale_param else u


def map_and_ds(net, x, t, s, y, w, args):
    """u(x, t, s), f = x - (t - s) u and df_ds = u - (t - s) du_ds, du_ds by forward-mode AD (dual
    numbers, tangent 1 on s only) in one ordinary call of `net` (a DDP module accepts it; torch.func.jvp
    through DDP fails). Differentiable in the weights through the tangent: the backward through the JVP."""
    col = lambda a: a.view(-1, *[1] * (x.dim() - 1))  # noqa: E731
    with fwAD.dual_level():
        u, du_ds = fwAD.unpack_dual(velocity(net, x, t, fwAD.make_dual(s, torch.ones_like(s)), y, w, args))
    du_ds = torch.zeros_like(u) if du_ds is None else du_ds  # a field that ignores s
    return u, x - col(t - s) * u, u - col(t - s) * du_ds


def tvm_loss(net, target, x, y, args, null):
    """TVM loss (wrapper.py:144-186). `net`: the trained network, called twice with grad (the JVP on
    the terminal rows, a plain forward on the FM rows: cheaper than one call with a wasted tangent);
    `target`: the target EMA (no grad). Returns (loss, terms)."""
    n, col = len(x), lambda a: a.view(-1, *[1] * (x.dim() - 1))  # noqa: E731
    t, s, s2 = sample_times(n, args, x.device, x.dtype)
    w = guidance_scale(y, null, args, x.dtype)
    e = torch.randn_like(x)
    x_t, x_s2 = (1 - col(t)) * x + col(t) * e, (1 - col(s2)) * x + col(s2) * e
    _, f, df_ds = map_and_ds(net, x_t, t, s, y, w, args)
    u_fm = velocity(net, x_s2, s2, s2, y, w, args)
    with torch.no_grad():  # the terminal velocity at the endpoint, and the unconditional velocity for guidance
        if null > 0 and (args.cfg_w != 1 or args.cfg_w_range is not None):  # else w = 1 on every row
            v_end, v_unc = velocity(target, torch.cat([f, x_s2]), torch.cat([s, s2]), torch.cat([s, s2]), torch.cat([y, torch.full_like(y, null)]),
                                    torch.cat([w, torch.ones_like(w)]), args).chunk(2)
        else:
            v_end, v_unc = velocity(target, f, s, s, y, w, args), 0.0
        v_tgt = col(w) * (e - x) + (1 - col(w)) * v_unc
    beta = col(1 / w)
    l_term = (beta * (df_ds - v_end)).pow(2).flatten(1).mean(1) * (~torch.isclose(s, t)).float()  # 0 * NaN stays NaN
    l_fm = (beta * (u_fm - v_tgt)).pow(2).flatten(1).mean(1)
    rows = l_term + l_fm
    loss = rows.mean()
    return loss, {"loss": loss.detach(), "term": l_term.detach().mean(), "fm": l_fm.detach().mean(),
                  "nonfinite": (~torch.isfinite(rows.detach())).sum().float()}


@torch.no_grad()
def sample(net, e, y, steps, null, args):
    """K-step flow-map sampler with guidance w as an input: x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1}, y, 1/w)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    w = torch.where(y == null, 1.0, torch.full(y.shape, args.cfg_w, device=e.device, dtype=e.dtype))
    x = e
    for k in range(steps):
        x = x - (ts[k] - ts[k + 1]) * velocity(net, x, ts[k].expand(len(x)), ts[k + 1].expand(len(x)), y, w, args)
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
                   info["num_classes"], n_cond, args.qk_norm, args.dropout, norm=args.norm, modnorm=args.modnorm)

    net = make_net(n_cond=1).to(device)  # c = beta = 1/w
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()  # sampling EMA
    ema_target = copy.deepcopy(net).requires_grad_(False).eval()  # target EMA (terminal and unconditional velocities)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, null, args)
    saved = {"net": net, "ema": ema, "ema_target": ema_target, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    tvm_loss = compiled(tvm_loss, args)  # --compile (common/run.py)

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
                    loss, t_i = tvm_loss(ddp_net, ema_target, x, y, args, null)
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
