"""alpha-Flow: one curriculum from flow matching to MeanFlow, through Euler-step (consistency) targets.

Paper: Zhang, Siarohin, Menapace, Vasilkovsky, Tulyakov, Qu, Skorokhodov, "AlphaFlow: Understanding
and Improving MeanFlow Models", ICLR 2026 (arXiv 2510.20771). Official code (PyTorch):
github.com/snap-research/alphaflow @ b0fef77, src/training/loss.py `AlphaFlowLoss` (read to check
every constant below; nothing copied). Its notation is ours: sigma = t, t_next = s, dt = D.

Idea: the MeanFlow target v - (t - s) du/dt is the a -> 0 limit of a family of targets that
step a fraction a of the way by the velocity and the rest by the network itself, D = a (t - s)
(official _compute_mean_velocity_d; the targets are loss.py:504-543):

    u_tgt = (D v_g + (t - D - s) sg u(x_t - D v_g, t - D, s)) / (t - s) = a v_g + (1 - a) sg u(...)

clipped to +-4. a = 1 is flow matching on every row (the target is v_g), a -> 0 is MeanFlow,
which is used as such once the schedule snaps a to 0: u_tgt = v_g - (t - s) du/dt by one JVP
(official _compute_mean_velocity_c). The schedule over training steps k
(official get_ratio 'sigmoid', loss.py:390-427):
a(k) = 1 - sigmoid(gamma (k - k_mid) / (k_end - k_init)), 1 before k_init, 0 after k_end, snapped
to 0 below 0.005 and to 1 above 0.995. Rows (loss.py:449-464): the first 1 - ratio of the batch
has s = t with t ~ LN(-0.4, 1) (one draw); the others t, s = max, min of two draws, D = a (t - s).
Loss (loss.py:579-593): l = MEAN_dims (u - sg u_tgt)^2, weighted 1 / (sg l + 1e-3) on D = 0 rows
and a / (sg l + 1e-3) on D > 0 rows. Path x_t = (1 - t) x + t e (sigma_noise = 1 in the paper's
runs; the recflow.yaml default 2.0 is not used by them). A property of the method, not a bug: the weight is a
per-sample nonlinearity on a residual that holds e - x, so from data the exact map is NOT its stationary
point. Measured at a = 0 on the mixture with e - x drawn from p(x | x_t) (tests/test_alphaflow.py, CPU): the
expected gradient at the exact map, as a weighted-mean target offset per point, has RMS 0.21-0.39 against
Monte Carlo noise 0.04-0.05 with a constant weight (plain L2: zero in expectation).
Training guidance (official _compute_velocity_cfg, loss.py:467-501), no grad, online weights,
only for t_min < t < t_max: v_g = w v + k u(x_t, t, t, y) + (1 - w - k) u(x_t, t, t, null).
Label dropout happens there, BEFORE the guidance forwards and only inside the interval, so a
dropped row's target is w v + (1 - w) u_null (not v as in meanflow.py).

Cost: no JVP while a > 0 (the Euler-step target is one no-grad forward on the s != t rows, none
at a = 1); at a = 0 only the s != t rows pay for a JVP, without grad, as in meanflow.py. Then
ONE forward with grad. Samplers (--samplers, each evaluated; the first draws the grids): flow map
x <- x - (t_k - t_{k+1}) u(x, t_k, t_{k+1}), and consistency: x0 = x - t_k u(x, t_k, 0), re-noised
to t_{k+1} with fresh noise (the official 2-NFE headline uses it).
Deviations: the Euler-step target is computed as a v_g + (1 - a) u (the same number without the
division by t - s). Our DiT embeds (t, h = t - s) by adaLN. With --dropout > 0 the no-grad
target forwards draw their own masks (the JVP at a = 0 shares the forward's, as in meanflow.py).

Run:        python methods/alphaflow.py                 (2-D gmm; the reference run took 18 min on 1 CPU thread)
            python methods/alphaflow.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999 --alpha-k-end 5000   (the reference run)
Paper defaults (ImageNet 256, DiT-B/2): Adam lr 1e-4, betas (0.9, 0.95), batch 256, bf16, clip 16,
EMA half-life 6931 steps, ratio 0.5 (B/2-cfg 0.25), a: 1 -> 0 over the whole run (XL/2: steps
600k -> 1M of 1.2M), gamma 25, snap 0.005, clip 4, eps 1e-3; guidance B/2-cfg w 1, k 0.5; XL/2
w 0.2, k 0.92, interval (0, 0.75). Our default has no training guidance (k 0), as meanflow.py.
Reference: results/alphaflow/<dataset>/
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
    ratio: float = 0.5
    """fraction of the batch with s != t (official ratio_fm = 1 - ratio: 0.5 B/2, 0.25 B/2-cfg)"""
    time_mu: float = -0.4
    """mean of the logit-normal time draws"""
    time_sigma: float = 1.0
    """std of the logit-normal time draws"""
    norm_eps: float = 1e-3
    """adaptive-weight constant (official adaptive_loss_weight_eps 1e-3, on a mean over dims)"""
    alpha_k_init: int = 0
    """training step where a leaves 1 (official B/2: 0; XL/2: 600k)"""
    alpha_k_end: int = 3000
    """training step where a reaches 0 (official B/2: 400k, the whole run; XL/2: 1M of 1.2M)"""
    alpha_gamma: float = 25.0
    """sharpness of the sigmoid schedule (official 25)"""
    alpha_snap: float = 0.005
    """a snaps to 0 below this and to 1 above 1 - this (official clamp_value 0.005)"""
    clip_target: float = 4.0
    """the Euler-step target (a > 0) is clipped to +-this (official clamp_utgt 4)"""
    cfg_omega: float = 1.0
    """training guidance w (class-conditional data only; w 1 with k 0: no guidance, as here)"""
    cfg_kappa: float = 0.0
    """training guidance k, mixing in the model's conditional velocity (official B/2-cfg: 0.5 with w 1)"""
    cfg_t_min: float = 0.0
    """guidance (and label dropout) applies for t_min < t < t_max"""
    cfg_t_max: float = 1.0
    """upper end of the guidance interval (official XL/2: 0.75)"""
    samplers: tuple[str, ...] = ("flow", "consistency")
    """samplers evaluated (flow: flow-map steps; consistency: denoise to 0 and re-noise); the first draws the grids"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    for name in ("ratio", "cfg_t_min", "cfg_t_max"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if args.norm_eps <= 0 or args.cfg_kappa >= 1 or args.cfg_t_min > args.cfg_t_max:
        raise SystemExit(f"--norm-eps {args.norm_eps} > 0, --cfg-kappa {args.cfg_kappa} < 1, --cfg-t-min {args.cfg_t_min} <= --cfg-t-max {args.cfg_t_max} expected")
    if args.cfg_omega / (1 - args.cfg_kappa) < 1:
        raise SystemExit(f"--cfg-omega {args.cfg_omega} / --cfg-kappa {args.cfg_kappa}: the guidance scale w / (1 - k) must be >= 1")
    if args.alpha_k_end <= args.alpha_k_init:
        raise SystemExit(f"--alpha-k-end {args.alpha_k_end}: expected a step after --alpha-k-init {args.alpha_k_init}")
    if not 0 <= args.alpha_snap < 0.5 or args.clip_target <= 0:
        raise SystemExit(f"--alpha-snap {args.alpha_snap} in [0, 0.5), --clip-target {args.clip_target} > 0 expected")
    if not args.samplers or not set(args.samplers) <= {"flow", "consistency"}:
        raise SystemExit(f"--samplers {' '.join(args.samplers)}: expected flow and/or consistency")


# ---------------------------------------------------------------- ALGO LOGIC
def alpha_schedule(k, args):
    """a(k) = 1 - sigmoid(gamma (k - k_mid) / (k_end - k_init)); 1 before k_init, 0 after k_end; snapped to 0 / 1."""
    if k < args.alpha_k_init or k > args.alpha_k_end:
        return 1.0 if k < args.alpha_k_init else 0.0
    a = 1 - 1 / (1 + math.exp(-args.alpha_gamma * (k - (args.alpha_k_init + args.alpha_k_end) / 2) / (args.alpha_k_end - args.alpha_k_init)))
    return 0.0 if a < args.alpha_snap else 1.0 if a > 1 - args.alpha_snap else a


def sample_ts(n, n_mf, args, device):
    """s = t ~ LN(time_mu, time_sigma) on the first n - n_mf rows; t, s = max, min of two draws on the others."""
    a, b = torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(2, n, device=device))
    fm = torch.arange(n, device=device) < n - n_mf
    return torch.where(fm, a, torch.maximum(a, b)), torch.where(fm, a, torch.minimum(a, b))


@torch.no_grad()
def guided_velocity(net, x_t, t, v, y, null, args):
    """Training-time CFG target v_g inside (t_min, t_max) (dropped labels included), v outside."""
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
    inside = ((t > args.cfg_t_min) & (t < args.cfg_t_max)).view(-1, *[1] * (x_t.dim() - 1))
    return torch.where(inside, args.cfg_omega * v + args.cfg_kappa * v_c + (1 - args.cfg_omega - args.cfg_kappa) * v_u, v)


def mean_velocity_and_target(net, x_t, t, s, y, v_g, m, a, args):
    """u = net(x_t, t, s, y) (one forward, with grad) and the target u_tgt (no grad): v_g on rows 0..m-1
    (s = t); on rows m.. the Euler-step target a v_g + (1 - a) u(x_t - D v_g, t - D, s), D = a (t - s),
    clipped, if a > 0 (no network call at a = 1), else MeanFlow's v_g - (t - s) du/dt by one JVP without
    grad, in a forked RNG so the forward draws the same dropout masks (the whole batch if dropout > 0)."""
    dims = [1] * (x_t.dim() - 1)
    u_tgt = v_g.clone()
    if m < len(x_t) and a > 0:
        D = a * (t[m:] - s[m:])
        with torch.no_grad():
            u_next = net(x_t[m:] - D.view(-1, *dims) * v_g[m:], t[m:] - D, s[m:], y[m:]) if a < 1 else 0.0
        u_tgt[m:] = (a * v_g[m:] + (1 - a) * u_next).clamp(-args.clip_target, args.clip_target)
    j = 0 if args.dropout > 0 else m
    if j < len(x_t) and a == 0:
        with torch.no_grad(), torch.random.fork_rng(devices=[x_t.device] if x_t.is_cuda else []):
            _, du_dt = torch.func.jvp(lambda z, t_: net(z, t_, s[j:], y[j:]), (x_t[j:], t[j:]), (v_g[j:], torch.ones_like(t[j:])))
        u_tgt[j:] = v_g[j:] - (t[j:] - s[j:]).view(-1, *dims) * du_dt
    return net(x_t, t, s, y), u_tgt


def alphaflow_loss(net, x, y, args, null, step):
    """alpha-Flow loss at training step `step` with its adaptive weights. Returns (loss, terms)."""
    n, dims = x.shape[0], [1] * (x.dim() - 1)
    n_mf, a = round(args.ratio * n), alpha_schedule(step, args)
    e = torch.randn_like(x)
    t, s = sample_ts(n, n_mf, args, x.device)
    x_t = (1 - t.view(-1, *dims)) * x + t.view(-1, *dims) * e
    if null:  # label dropout inside the guidance interval only, before the guidance forwards (official order)
        y = torch.where((t > args.cfg_t_min) & (t < args.cfg_t_max) & (torch.rand(n, device=x.device) < args.label_dropout), null, y)
    v_g = guided_velocity(net, x_t, t, e - x, y, null, args)
    u, u_tgt = mean_velocity_and_target(net, x_t, t, s, y, v_g, n - n_mf, a, args)
    l = ((u - u_tgt.detach()) ** 2).flatten(1).mean(1)
    weight = torch.where((torch.arange(n, device=x.device) < n - n_mf) | (a == 0), 1.0, a)  # a on the D > 0 rows
    loss = (weight * l / (l.detach() + args.norm_eps)).mean()
    m, zero = n - n_mf, l.new_zeros(())
    return loss, {"loss": loss.detach(), "mse": l.detach().mean(), "mse_fm": l[:m].detach().mean() if m else zero,
                  "mse_mf": l[m:].detach().mean() if n_mf else zero, "alpha": l.new_tensor(a)}


@torch.no_grad()
def sample(net, e, y, steps, sampler="flow"):
    """K steps on t_k = linspace(1, 0, K + 1): flow map x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y), or
    consistency x0 = x - t_k net(x, t_k, 0, y), x <- (1 - t_{k+1}) x0 + t_{k+1} (fresh noise)."""
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
    alphaflow_loss = compiled(alphaflow_loss, args)  # --compile (common/run.py)

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
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = alphaflow_loss(ddp_net, x, y, args, null, step)
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
