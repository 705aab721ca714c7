"""Flow Map Matching (FMM): a two-direction flow map trained from data by the derivative of a
composition, and Progressive Flow Map Matching (PFMM, `--progressive`).

Paper: Boffi, Albergo, Vanden-Eijnden, "Flow map matching with stochastic interpolants: A mathematical
framework for consistency models", TMLR 2025 (arXiv 2406.07507). Code: the authors' minimal JAX release
github.com/nmboffi/flow_map_matching_public (its README: "an unofficial implementation [that] does not
recreate the exact experiments of the paper"), read at Boffi's commit 0bfcf39 through the fork
jc-bao/flow_map_matching_public (py/common/losses.py, flow_map.py, launchers/learn.py) to check the loss,
the times and the progressive schedule; nothing copied. The paper text was not at hand: the inverse term
below is from seed 002 (Dieleman's "Learning the integral of a diffusion model"), not from the code.

Conversion: the 2024 code has noise at tau = 0, data at tau = 1 and X_{a,b}(x) = (1 - (b - a)) x +
(b - a) N(a, b, x) (flow_map.py:18-20); with tau = 1 - t that is our f(x, t, s) = x - (t - s) u with
u(x, t, s) = x - N(1 - t, 1 - s, x), and its residuals are minus ours. The map has BOTH directions: s > t
(toward noise) is the same network at h = t - s < 0, f = x - (t - s) u on either side; the networks'
sinusoidal h embedding is odd in h, so they accept h in [-1, 1] as they are.

Idea (FMM, the code's `lagrangian` loss, losses.py:107-130): a flow map is its own inverse,
f(f(x_t, t, s), s, t) = x_t, and moving the target time of the inverse map moves the point with the
velocity there, d/da f(f(x_t, t, s), s, a) at a = t = v*(x_t, t). Both sides are functions of x_t alone,
so the conditional velocity e - x is an unbiased target (marginal from conditional) and the loss is a
plain regression with no stop-gradient anywhere:

    y = f(x_t, t, s)                                        (forward with grad)
    (g, dg_da) = jvp(a -> f(y, s, a), t, 1)                 (forward-mode AD with grad: the derivative
                                                             of the composition in the inverse map's
                                                             target time, a = t)
    loss = mean_rows( sum_dims (dg_da - (e - x))^2 + inverse_weight sum_dims (g - x_t)^2 )

The second term (seed 002's FMM loss; not in the 2024 code: --inverse-weight 0) pins g = x_t, the
invertibility the first term assumes. Times: t, s independent U(t_min, t_max), both orders
(learn.py:556-563); the code's annealed laws are --anneal box (t, s in [t_min, a_k]) and --anneal
diagonal (|t - s| <= a_k), a_k = linspace(0.05, 1, anneal_steps), here a fraction of t_max - t_min (the
code's a_k is absolute: the same on [0, 1]).
Seed 002: FMM "works best when |t - s| is restricted" and is "not suitable for one step".

PFMM (`--progressive`, the code's `distill` mode, losses.py:133-157, learn.py:100-149,525-539): the
first distill_steps steps train FMM itself (so PFMM starts from the FMM net of the same run, as the
code does: no teacher file); then, every distill_steps steps, the teacher <- a frozen copy of the
current weights (not the EMA, as the code), and the student regresses the teacher's two half jumps
in position space, forward direction only (t = max, s = min):

    m = (t + s) / 2,   loss = mean_rows sum_dims ( f(x_t, t, s) - sg f_T(f_T(x_t, t, m), m, s) )^2

with the jump range doubling per phase, |t - s| <= delta_k = 2^k distill_delta, k = step // distill_steps:
t ~ U(t_min, t_max), s = clip(t + U(-delta_k, delta_k), t_min, t_max) (the code's clip, which puts
mass on the ends once delta_k is large). The f-space loss weighs the u error by (t - s)^2.

Where: sample_ts (the time laws), fmm_terms and fmm_loss (FMM), pfmm_loss (PFMM), sample (sampler);
the teacher refresh is in the loop. Sampling: K flow-map steps x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1}).

Not copied from the 2024 code, on purpose: (1) its `diagonal_anneal` and `distill` laws draw t and the
offset s - t from the SAME PRNG key (learn.py:514-522, 530-538), so s - t = delta (2 (t - t_min) /
(t_max - t_min) - 1) is a function of t; here the two draws are independent. (2) Its LMD loss
`lagrangian_distill` differentiates the map at X_{s,t}(I_s) instead of at I_s (and does not import);
this file has no distillation-from-a-velocity loss (ayf.py has LMD). Other choices: the teacher is
refreshed at the start of step k distill_steps and the distillation loss runs from that step on (the
code switches one step later, iteration > distill_steps); the teacher runs in eval mode (the code:
train=False); labels are dropped per row (the code's class_dropout); dropout masks are drawn per
call (as the code's separate dropout keys). The JVP uses torch.autograd.forward_ad dual numbers (an
ordinary module call, so it goes through DDP; gradients flow through the tangent), which does not
compile yet: --compile is refused, as in tvm.py.

Cost: seed 002 counts 9 forward-pass equivalents for FMM (forward 1 + forward-with-JVP 2 + backward
through both 4 + backward of the first forward 2) and 5 for PFMM (fwd/bwd 3 + two teacher forwards).

Run:        python methods/fmm.py                          (2-D gmm; FMM)
            python methods/fmm.py --progressive            (PFMM: FMM for --distill-steps, then progressive)
            python methods/fmm.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999   (the MeanFlow mnist DiT and budget)
Code values (no released configuration reproduces the paper; learn.py:922-964 and jc-bao's run.sh):
t in [0, 1], grad clip 1.0, EMA 0.9999, Adam lr 1e-4, distill_delta 0.01 with 120k distill steps, batch
256. Reference: results/fmm/<dataset>/
"""
import copy
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
    t_min: float = 0.0
    """times t and s are drawn in [t_min, t_max] (the code: from the command line; jc-bao's run.sh 0)"""
    t_max: float = 1.0
    """upper end of the time range (jc-bao's run.sh 1)"""
    inverse_weight: float = 1.0
    """weight of the inverse term sum (f(f(x_t, t, s), s, t) - x_t)^2 (seed 002's FMM loss; 0: the 2024 code's loss)"""
    anneal: str = "none"
    """none: t, s independent U(t_min, t_max) | box: both in [t_min, t_min + a_k (t_max - t_min)] | diagonal: |t - s| <= a_k (t_max - t_min), clipped (the code's box_anneal, diagonal_anneal)"""
    anneal_steps: int = 1000
    """a_k rises linearly from 0.05 to 1 (a fraction of t_max - t_min) over this many steps (the code's anneal_steps)"""
    progressive: bool = False
    """PFMM: FMM for distill_steps steps, then the two-half-jump regression onto a frozen copy refreshed every distill_steps steps"""
    distill_steps: int = 500
    """PFMM phase length: teacher refresh period and jump-range doubling period (jc-bao's run.sh: 120000)"""
    distill_delta: float = 0.0625
    """PFMM jump range of phase 0, |t - s| <= 2^k distill_delta in phase k (jc-bao's run.sh: 0.01)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.compile:  # torch 2.14: layer_norm's forward AD fails on Dynamo's fake tensors (as tvm.py)
        raise SystemExit("--compile: FMM's dual-number JVP (torch.autograd.forward_ad) does not compile yet; run without --compile")
    if not 0 <= args.t_min < args.t_max <= 1:
        raise SystemExit(f"--t-min {args.t_min} / --t-max {args.t_max}: expected 0 <= t_min < t_max <= 1")
    if args.anneal not in ("none", "box", "diagonal"):
        raise SystemExit(f"--anneal {args.anneal}: expected none, box or diagonal")
    if args.progressive and args.anneal != "none":
        raise SystemExit(f"--anneal {args.anneal} with --progressive: PFMM has its own jump range (--distill-delta); expected --anneal none")
    if not args.inverse_weight >= 0:
        raise SystemExit(f"--inverse-weight {args.inverse_weight}: expected a weight >= 0")
    if args.anneal_steps < 1 or args.distill_steps < 1:
        raise SystemExit(f"--anneal-steps {args.anneal_steps} / --distill-steps {args.distill_steps}: expected integers >= 1")
    if not args.distill_delta > 0:
        raise SystemExit(f"--distill-delta {args.distill_delta}: expected a jump range > 0")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def sample_ts(n, step, args, like):
    """(t, s), unordered, in the dtype of `like`, by the law of --anneal / --progressive at this step.
    t and the offset s - t are independent draws (the 2024 code draws both from one key)."""
    kw = dict(device=like.device, dtype=like.dtype)
    lo, hi = args.t_min, args.t_max
    if args.progressive or args.anneal == "diagonal":
        if args.progressive:  # delta_k = 2^k delta_0, k = step // distill_steps (learn.py:525-539)
            delta = 2.0 ** (step // args.distill_steps) * args.distill_delta
        else:  # a_k of linspace(0.05, 1, anneal_steps), then the whole range (learn.py:503-522)
            delta = (hi - lo) * (0.05 + 0.95 * step / max(args.anneal_steps - 1, 1) if step < args.anneal_steps else 1.0)
        t = lo + (hi - lo) * torch.rand(n, **kw)
        return t, (t + delta * (2 * torch.rand(n, **kw) - 1)).clamp(lo, hi)
    if args.anneal == "box":  # both in [t_min, a_k] (learn.py:541-553)
        hi = lo + (hi - lo) * (0.05 + 0.95 * step / max(args.anneal_steps - 1, 1) if step < args.anneal_steps else 1.0)
    return lo + (hi - lo) * torch.rand(n, **kw), lo + (hi - lo) * torch.rand(n, **kw)


def fmm_terms(net, x_t, t, s, y):
    """The composition g = f(f(x_t, t, s), s, a) at a = t and its derivative dg/da, both with grad:
    one forward of f(x_t, t, s), then the inverse map's forward with the tangent 1 on its target time
    a (dual numbers: an ordinary call of `net`, so it goes through DDP). Either order of t, s."""
    y_ = x_t - bc(t - s, x_t) * net(x_t, t, s, y)
    with fwAD.dual_level():
        a = fwAD.make_dual(t, torch.ones_like(t))
        g, dg_da = fwAD.unpack_dual(y_ - bc(s - a, x_t) * net(y_, s, a, y))[:2]
    return g, dg_da


def fmm_loss(net, x, y, step, args):
    """FMM loss on a data batch x (the code's `lagrangian` plus seed 002's inverse term). Returns (loss, terms)."""
    n, dims = x.shape[0], [1] * (x.dim() - 1)
    e = torch.randn_like(x)
    t, s = sample_ts(n, step, args, x)
    x_t = (1 - t.view(-1, *dims)) * x + t.view(-1, *dims) * e
    g, dg_da = fmm_terms(net, x_t, t, s, y)
    l_v = (dg_da - (e - x)).pow(2).flatten(1).sum(1)  # the conditional velocity: unbiased, dg_da depends on x_t only
    l_inv = (g - x_t).pow(2).flatten(1).sum(1)
    loss = (l_v + args.inverse_weight * l_inv).mean()
    D = x[0].numel()
    return loss, {"loss": loss.detach(), "mse_v": l_v.detach().mean() / D, "mse_inv": l_inv.detach().mean() / D}


def pfmm_loss(net, teacher, x, y, step, args):
    """PFMM loss (the code's `distill`): f(x_t, t, s) onto the frozen teacher's two half jumps, t > s."""
    e = torch.randn_like(x)
    a, b = sample_ts(len(x), step, args, x)
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    f = x_t - bc(t - s, x) * net(x_t, t, s, y)
    with torch.no_grad():
        m = (t + s) / 2
        x_m = x_t - bc(t - m, x) * teacher(x_t, t, m, y)
        target = x_m - bc(m - s, x) * teacher(x_m, m, s, y)
    l = (f - target).pow(2).flatten(1).sum(1)
    loss = l.mean()
    return loss, {"loss": loss.detach(), "mse_f": l.detach().mean() / x[0].numel()}


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
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    teacher = copy.deepcopy(net).requires_grad_(False).eval()  # PFMM: refreshed from the net every distill_steps steps
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt, **({"teacher": teacher} if args.progressive else {})}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    fmm_loss = compiled(fmm_loss, args)  # --compile (common/run.py)

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
        distill = args.progressive and step >= args.distill_steps
        if distill and step % args.distill_steps == 0:  # PFMM: a new phase, the teacher <- the current weights
            teacher.load_state_dict(net.state_dict())
        x, y = next(loader)  # this rank's share of the global batch
        terms = []
        for i, (x, y) in enumerate(zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum))):
            torch.manual_seed(micro_seed(args.seed, step, rank * args.grad_accum + i))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            y = drop_labels(y, null, args)
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = pfmm_loss(ddp_net, teacher, x, y, step, args) if distill else fmm_loss(ddp_net, x, y, step, args)
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
