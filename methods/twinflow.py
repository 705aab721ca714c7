"""TwinFlow: one-step generation with self-adversarial flows, one network, no teacher, trained from data.

Paper: Cheng, Sun, Li, Lin, "TwinFlow: Realizing One-step Generation on Large Models with Self-adversarial
Flows", ICLR 2026 (arXiv 2512.05150). Official code: github.com/inclusionAI/TwinFlow (src/methodes/twinflow/
twinflow.py, the large-model trainer, and tutorials/mnist; read to check every constant below, nothing copied).
The official notation is ours (x_t = t e + (1 - t) x, target e - x, model(x_t, t, tt) = our net(x_t, t, s = tt, y)).

Idea: one network u(x_t, t, s) is a flow map at t >= 0 (trained from data, RCGM's consistency target) and, at
NEGATIVE times, the flow of its own one-step samples (the "fake" twin). The real and the fake velocity are the same
network at +t and -t, so the distribution-matching (VSD) gradient needs no teacher and no second network:

    x_fake = e - u(e, 1, 0),  x_t = (1 - t) sg(x_fake) + t e',  t ~ U(0, 1)
    F_grad = clamp(u(x_t, -t, -t) - u(x_t, t, t), -1, 1)                       (no grad, current weights)
    L_rectify = l(u(e, 1, 0), sg(u(e, 1, 0) - F_grad))      =>  dL/dx_fake = -2 F_grad / numel  (l = L2)

so descent moves each sample along v_fake - v_real (the sign rule), with weight 1 at every t (clamped per
element). The batch is cut in four equal parts [twinflow.py:124-183]: "e2e" rows (t = 1, s = 0: the one-step
generator, which also carries L_rectify), "mul" (s = t - 0.05 U t), "any" (s = t - U t), t ~ U(0, 1), and "adv"
rows: x := sg(one-step sample), times (-t, -t), target e - x (flow matching of the fake flow). Targets of the
non-adv rows [236-259, 310-341]: e - x, plus (0 < t < 1) cfg_ratio (v_c - v_u) of the target net at (t, t), then
RCGM's: x' = x_t - D target, N flow-map steps of the target net from t - D to s (disp = their displacement),
R = ((t - s) u - D target - disp) / D, target = sg(u) - clamp(R, +-1) (rows with t - s < D: R = u - target).
Weights [345]: tan((1 - (|t| - |s|)) pi / 2.5) + 1 (4.08 at s = t, 1 at (1, 0)), 1 on adv rows. Per-row loss
l: the row's mse (--loss l2, the MNIST tutorial's loss, our default) or, as the large-model trainer [90-104], the
Barron (alpha 1) reweighted mse, mse sg((mse / c^2 + 1)^-1/2) / c, c = 1e-3, about the row's RMS error (--loss
barron); batch mean, plus dm_weight x the e2e rows' mean L_rectify [357-365].
Default loss l2, not the trainer's Barron: measured on gmm (CPU, 600 steps, seeds 0 and 1, online net), Barron with
the adv and dm terms both on wrecks the positive-time flow (RMS error of u against the exact field 1.6-2.6 at every
(t, s) tried, of a field of RMS 2.0-2.3), while either term alone (0.16-0.68) and l2 with both (0.15-0.40) train it.
Barron sets every row's gradient to about unit size, so L_rectify pushes with full force even where F_grad is only
the two branches' noise. (The MNIST tutorial also leaves F_grad unclamped; we clamp, as the trainer.)
Deviations: the official decay of the target EMA ramps up (cmd += (1 - cmd)(decay - cmd) / 2 each step); ours is
constant. Barron's c^2 + 1e-8 is c^2 here. The batch parts are cut at rounded cumulative boundaries (the official
rounds each part: 6 rows give it 2, 2, 2, 0). Labels: dropout to the null class (10%), v_u = the null class (the
MNIST tutorial uses a permuted label). Target net without dropout (the official replays the online masks). Not
implemented: the image-free mode (all rows from generated samples).
Time embedding: our sinusoidal t embedding tells t from -t only through its sine half (cos is even); --linear-t
(default on) uses the official MNIST net's Linear(1, hidden) t embedder (common/dit.py). Sampler: K flow-map steps
x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1}) (the official sampling_loop with style "any", stochast_ratio 0).
Known properties: with --loss barron each row's gradient is normalized to about unit RMS (DMD-like), so
L_rectify's weight is 1 / sqrt(mean(F_grad^2) + c^2), not 1; and the fake branch's per-row nonlinearity makes its
minimizer the row-wise geometric median of e - x, v_q only for a symmetric posterior (l2: v_q exactly).
With targets e - x from the posterior the exact map is a fixed point only unclamped: the per-element clamp of R
(and Barron) is nonlinear in e - x and shifts the expected gradient (measured: tests/test_twinflow.py, the page).

Run:        python methods/twinflow.py                  (2-D gmm)
            python methods/twinflow.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999   (the reference run)
Official MNIST tutorial: Adam lr 2e-4, batch 128, 20 epochs, target EMA 0.99, N = 2, cfg ratio 0.5 (defaults of
its trainer: dist_match_cof 0.5; the OpenUni configs 0.75, cfg 0.8, EMA 0.999). Our default cfg ratio is 0 (no
guidance), so that the samples are comparable with the exact (unguided) oracle. Reference: results/twinflow/<dataset>/
"""
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
    linear_t: bool = True
    """embed t by Linear(1, hidden) -> SiLU -> Linear (official MNIST net) so the net tells t from -t; off: the sinusoid"""
    parts: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    """relative sizes of the e2e / mul / any / adv parts of the batch (official: equal)"""
    mul_gap: float = 0.05
    """mul rows: s = t - mul_gap U t (official min(0.05, consistc_ratio))"""
    cfg_ratio: float = 0.0
    """training guidance: target + cfg_ratio (v_c - v_u) of the target net for 0 < t < 1 (official 0.5; OpenUni 0.8)"""
    ema_target_decay: float = 0.99
    """decay of the target EMA net of the guidance and RCGM targets (MNIST tutorial 0.99; OpenUni 0.999; 0: the net)"""
    rcgm_steps: int = 2
    """N: flow-map steps of the target net in the RCGM target (official estimate_order 2)"""
    rcgm_delta: float = 0.01
    """D: the Euler step of the RCGM target along the target velocity (official 0.01)"""
    rcgm_clamp: float = 1.0
    """clamp of the RCGM residual / D (official 1)"""
    weight_div: float = 2.5
    """row weight tan((1 - (|t| - |s|)) pi / weight_div) + 1 on non-adv rows (official 2.5)"""
    loss: str = "l2"
    """per-row loss: l2 (the row's mse; MNIST tutorial) | barron (large-model trainer: Barron alpha 1, about the row's RMS error)"""
    barron_c: float = 1e-3
    """Barron scale c (official 1e-3)"""
    dm_weight: float = 0.5
    """weight of L_rectify, the distribution-matching term (official dist_match_cof 0.5; OpenUni 0.75)"""
    dm_clamp: float = 1.0
    """per-element clamp of F_grad = v_fake - v_real (official 1)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if any(p < 0 for p in args.parts) or sum(args.parts) <= 0:
        raise SystemExit(f"--parts {args.parts}: expected four sizes >= 0, not all 0")
    for name in ("mul_gap", "ema_target_decay"):
        if not 0 <= getattr(args, name) <= (1 if name == "mul_gap" else 0.999999):
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1{']' if name == 'mul_gap' else ')'}")
    if args.rcgm_steps < 1:
        raise SystemExit(f"--rcgm-steps {args.rcgm_steps}: expected an integer >= 1")
    for name in ("rcgm_delta", "rcgm_clamp", "weight_div", "barron_c", "dm_clamp"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value > 0")
    if args.weight_div <= 2:
        raise SystemExit(f"--weight-div {args.weight_div}: expected a value > 2 (tan must stay finite on [0, pi / 2))")
    if args.cfg_ratio < 0 or args.dm_weight < 0:
        raise SystemExit(f"--cfg-ratio {args.cfg_ratio} / --dm-weight {args.dm_weight}: expected values >= 0")
    if args.loss not in ("barron", "l2"):
        raise SystemExit(f"--loss {args.loss}: expected barron or l2")


# ---------------------------------------------------------------- ALGO LOGIC
def part_bounds(n, parts):
    """Row boundaries [0, b1, b2, b3, n] of the consecutive e2e / mul / any / adv parts: rounded cumulative sizes,
    on the host (slices, not masks: no host-device sync)."""
    return [0] + [round(n * sum(parts[: i + 1]) / sum(parts)) for i in range(4)]


def sample_times(n, args, device):
    """(t, s, part): part 0 e2e (t = 1, s = 0), 1 mul (s = t - mul_gap U t), 2 any (s = t - U t), 3 adv
    (t = s = -U), t, U ~ U(0, 1); parts are consecutive rows, sized by args.parts."""
    rows = torch.arange(n, device=device)
    part = sum((rows >= b).long() for b in part_bounds(n, args.parts)[1:4])
    t, a, b = torch.rand(3, n, device=device)
    s = torch.where(part == 1, t - args.mul_gap * b * t, t - a * t)
    t, s = torch.where(part == 0, 1.0, t), torch.where(part == 0, 0.0, s)
    return torch.where(part == 3, -t, t), torch.where(part == 3, -t, s), part


def row_loss(pred, target, args):
    """Per-row loss: the mse over the row's elements, Barron-reweighted (alpha 1) by sg((mse / c^2 + 1)^-1/2) / c."""
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    return mse if args.loss == "l2" else mse * (mse.detach() / args.barron_c**2 + 1) ** -0.5 / args.barron_c


def row_weight(t, s, part, args):
    """tan((1 - (|t| - |s|)) pi / weight_div) + 1 (4.08 at s = t, 1 at (1, 0)); 1 on the adv rows."""
    return torch.where(part == 3, 1.0, torch.tan((1 - (t.abs() - s.abs())) * math.pi / args.weight_div) + 1)


@torch.no_grad()
def dm_direction(net, x_fake, y, args):
    """F_grad = clamp(v_fake - v_real, +-dm_clamp) at x_t = (1 - t) x_fake + t e, t ~ U(0, 1): v_fake the net at
    (-t, -t), v_real at (t, t), current weights (one call on the doubled batch)."""
    t = torch.rand(len(x_fake), device=x_fake.device, dtype=x_fake.dtype)
    x_t = (1 - t.view(-1, *[1] * (x_fake.dim() - 1))) * x_fake + t.view(-1, *[1] * (x_fake.dim() - 1)) * torch.randn_like(x_fake)
    v_fake, v_real = net(torch.cat([x_t, x_t]), torch.cat([-t, t]), torch.cat([-t, t]), torch.cat([y, y])).chunk(2)
    return (v_fake - v_real).clamp(-args.dm_clamp, args.dm_clamp)


@torch.no_grad()
def guided_target(target_net, x_t, t, y, target, null, args):
    """target + cfg_ratio (v_c - v_u), v_c, v_u from the target net at (t, t), on rows 0 < t < 1 (the official
    enhanced_range, open: not the e2e rows at t = 1, not the adv rows at t < 0)."""
    if null == 0 or args.cfg_ratio == 0 or len(t) == 0:
        return target
    v_c, v_u = target_net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).chunk(2)
    inside = ((t > 0) & (t < 1)).view(-1, *[1] * (x_t.dim() - 1))
    return torch.where(inside, target + args.cfg_ratio * (v_c - v_u), target)


@torch.no_grad()
def rcgm_target(target_net, u, target, x_t, t, s, y, args):
    """RCGM's target: an Euler step of D along `target`, then N flow-map steps of the target net from t - D to s;
    the residual R of (t - s) u against that path, over D, clamped: sg(u) - clamp(R, +-rcgm_clamp).
    Rows with t - s < D: R = u - target (the official's limit)."""
    view = lambda a: a.view(-1, *[1] * (x_t.dim() - 1))
    d, N = args.rcgm_delta, args.rcgm_steps
    close = t - s < d
    t_m = torch.maximum(t - d, s)
    x, disp = x_t - d * target, torch.zeros_like(x_t)
    for k in range(N):
        t_c, t_n = t_m + (s - t_m) * k / N, t_m + (s - t_m) * (k + 1) / N
        step = view(t_c - t_n) * target_net(x, t_c, t_n, y)
        x, disp = x - step, disp + step
    R = torch.where(view(close), u - target, (view(t - s) * u - d * target - disp) / d)
    return u.detach() - R.clamp(-args.rcgm_clamp, args.rcgm_clamp)


def twinflow_loss(net, target_net, x, y, args, null):
    """TwinFlow's loss on one micro-batch (base loss on every row + dm_weight x L_rectify on the e2e rows).
    Returns (loss, terms)."""
    n, view = len(x), lambda a: a.view(-1, *[1] * (x.dim() - 1))
    _, b1, b2, b3, _ = part_bounds(n, args.parts)  # rows [0, b1) e2e, [b1, b2) mul, [b2, b3) any, [b3, n) adv
    t, s, part = sample_times(n, args, x.device)
    if b3 < n:  # the fake flow's data: the current one-step samples (no grad)
        with torch.no_grad():
            e1 = torch.randn_like(x[b3:])
            one = torch.ones(len(e1), device=x.device)
            x = torch.cat([x[:b3], e1 - net(e1, one, 0 * one, y[b3:]).to(x.dtype)])
    e = torch.randn_like(x)
    x_t = (1 - view(t.abs())) * x + view(t.abs()) * e
    u = net(x_t, t, s, y)
    target = e - x
    if b3 > 0:  # the non-adv rows: guidance (mul and any rows), then RCGM
        g = guided_target(target_net, x_t[b1:b3], t[b1:b3], y[b1:b3], target[b1:b3], null, args)
        target = torch.cat([target[:b1], g, target[b3:]])
        target = torch.cat([rcgm_target(target_net, u[:b3], target[:b3], x_t[:b3], t[:b3], s[:b3], y[:b3], args), target[b3:]])
    base = (row_loss(u, target.detach(), args) * row_weight(t, s, part, args)).mean()
    loss, dm, f_rms = base, base.new_zeros(()), base.new_zeros(())
    if b1 > 0 and args.dm_weight > 0:
        x_fake = (x_t - view(t) * u)[:b1].detach()  # e - u(e, 1, 0): the one-step samples
        F_grad = dm_direction(net, x_fake, y[:b1], args)
        dm = row_loss(u[:b1], (u[:b1] - F_grad).detach(), args).mean()
        loss, f_rms = base + args.dm_weight * dm, F_grad.pow(2).mean().sqrt()
    mse = ((u - target) ** 2).flatten(1).mean(1).detach()
    zero = base.new_zeros(())
    return loss, {"loss": loss.detach(), "base": base.detach(), "dm": dm.detach(), "f_grad_rms": f_rms,
                  "mse": mse[:b3].mean() if b3 > 0 else zero, "mse_adv": mse[b3:].mean() if b3 < n else zero}


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
            return MLP(info["shape"][0], args.hidden, args.depth, info["num_classes"], n_cond, args.dropout, linear_t=args.linear_t)
        return DiT(info["shape"][1], args.patch_size, info["shape"][0], args.hidden, args.depth, args.heads, 4.0,
                   info["num_classes"], n_cond, args.qk_norm, args.dropout, linear_t=args.linear_t)

    net = make_net().to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    ema_target = copy.deepcopy(net).requires_grad_(False).eval()  # the guidance and RCGM targets' net (no dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "ema_target": ema_target, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    twinflow_loss = compiled(twinflow_loss, args)  # --compile (common/run.py)

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
                    loss, t_i = twinflow_loss(ddp_net, ema_target, x, y, args, null)
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
