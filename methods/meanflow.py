"""MeanFlow: one-step generation by learning the average velocity, trained from data.

Paper: Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling", NeurIPS 2025
(arXiv 2505.13447). Official code (JAX): github.com/Gsunshine/meanflow (read to check every
constant and the guidance rule below; nothing copied).

Idea: the network predicts the average velocity u(x_t, t, s) = 1/(t - s) int_s^t v*(x_tau) dtau.
Differentiating (t - s) u = int_s^t v* in t gives the MeanFlow identity (paper eq. 6)

    u(x_t, t, s) = v*(x_t, t) - (t - s) d/dt u(x_t, t, s),   d/dt = v* . d/dx + d/dt (s fixed),

which becomes a regression with a stop-gradient target (eq. 10), the total derivative obtained
by one JVP with tangent (v_g, 1, 0) on (x_t, t, s) (eq. 8, Alg. 1):

    (u, du_dt) = jvp(net(., ., s, y), (x_t, t), (v_g, 1))      (s is closed over: tangent 0)
    u_tgt = v_g - (t - s) du_dt,   l = || u - sg(u_tgt) ||^2,   loss = mean( l / sg((l + c)^p) )

with the adaptive weight of eq. 22 (c = 0.01, p = 1; the raw l, divided by the number of dimensions as
every file logs its loss terms, is logged as `mse`). A property of the method, not a bug: the weight is a
per-sample nonlinearity on a residual that holds e - x, so from data the exact map is NOT its stationary
point. Measured on the mixture with e - x drawn from p(x | x_t) (tests/test_meanflow.py, CPU): the expected
gradient at the exact map, as a weighted-mean target offset per point, has RMS 0.23-0.40 at p = 1 and
0.24-0.41 at p = 0.75, against Monte Carlo noise 0.04-0.05 at p = 0 (plain L2: zero in expectation). Times: two
draws from LN(-0.4, 1), t = max, s = min, and s = t on a fraction 1 - ratio of the batch (the
first rows, as the official `data_proportion`). Training-time guidance (eq. 13-21), on labeled
rows only, no grad, current weights in eval mode (as the official `guidance_fn`):
v_g = w v + k net(x_t, t, t, y) + (1 - w - k) net(x_t, t, t, null) inside [t_min, t_max],
v_g = v outside and for dropped labels; effective scale w / (1 - k). Sampling: K flow-map
steps x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y), no guidance (it is baked in).

Cost: where s = t the target is v_g exactly (the JVP term is multiplied by t - s = 0), so only
the `ratio` rows pay for a JVP. The tangent du/dt is detached, so it is computed by one JVP
without grad (autograd never stores it), then u by one forward with grad on the whole batch:
same loss, fewer FLOPs and less activation memory than a JVP recorded for autograd.
Label dropout (--label-dropout-rows): the official code drops the labels of the first Bin(B, 0.1)
rows, which are s = t rows, so the null class is trained on instantaneous velocities only; per-row
random dropout (the old behaviour here) also trains unconditional average velocities. Default:
the official. Deviations: none in the loss; our DiT embeds (t, h = t - s) by adaLN like the
paper's. With --dropout > 0 the JVP runs on the whole batch in a forked RNG, so its masks are
the forward's.

Run:        python methods/meanflow.py                  (2-D gmm; the reference run took 4 min on 1 CPU thread)
            python methods/meanflow.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999   (the reference run)
Paper defaults (ImageNet 256, DiT-XL/2): lr 1e-4, batch 256, betas (0.9, 0.95), EMA 0.9999,
ratio 0.25, w 1.0, k 0.5, c 0.01, p 1.0. Our default k is 0 (no guidance), so that the samples
are comparable with the exact (unguided) oracle and with the unguided fm teacher; pass
--cfg-kappa 0.5 for the paper's effective scale 2. Reference: results/meanflow/<dataset>/
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
    """fraction of the batch with s != t (official data_proportion = 1 - ratio = 0.75)"""
    time_mu: float = -0.4
    """mean of the logit-normal time draws"""
    time_sigma: float = 1.0
    """std of the logit-normal time draws"""
    norm_p: float = 1.0
    """adaptive-weight power p (paper: 1.0 ImageNet, 0.75 CIFAR-10)"""
    norm_eps: float = 0.01
    """adaptive-weight constant c"""
    cfg_omega: float = 1.0
    """training guidance w (class-conditional data only; w 1 with k 0: no guidance, as here)"""
    cfg_kappa: float = 0.0
    """training guidance k, mixing in the model's conditional velocity (paper: 0.5 with w 1, scale 2)"""
    cfg_t_min: float = 0.0
    """guidance applies for t in [cfg_t_min, cfg_t_max]"""
    cfg_t_max: float = 1.0
    """upper end of the guidance interval"""
    label_dropout_rows: str = "first"
    """first: Bin(B, p) dropped labels on the first rows, which are s = t rows (official cond_drop), so the null
    class learns only velocities; random: each row with probability p (also unconditional average velocities)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    for name in ("ratio", "cfg_t_min", "cfg_t_max"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if args.norm_eps <= 0 or args.norm_p < 0 or args.cfg_kappa >= 1:
        raise SystemExit(f"--norm-eps {args.norm_eps} > 0, --norm-p {args.norm_p} >= 0, --cfg-kappa {args.cfg_kappa} < 1 expected")
    if args.label_dropout_rows not in ("first", "random"):
        raise SystemExit(f"--label-dropout-rows {args.label_dropout_rows}: expected first or random")


# ---------------------------------------------------------------- ALGO LOGIC
def sample_ts(n, n_jvp, args, device):
    """t = max, s = min of two LN(time_mu, time_sigma) draws; s = t on the first n - n_jvp rows."""
    a, b = torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(2, n, device=device))
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    return t, torch.where(torch.arange(n, device=device) < n - n_jvp, t, s)


@torch.no_grad()
def guided_velocity(net, x_t, t, v, y, null, args):
    """Training-time CFG target v_g (paper eq. 21 with the official t-interval), labeled rows only."""
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
    inside = ((t >= args.cfg_t_min) & (t <= args.cfg_t_max)).view(-1, *[1] * (x_t.dim() - 1))
    w = torch.where(inside, args.cfg_omega, 1.0)
    k = torch.where(inside, args.cfg_kappa, 0.0)
    v_g = w * v + k * v_c + (1 - w - k) * v_u
    return torch.where((y != null).view(-1, *[1] * (x_t.dim() - 1)), v_g, v)


def mean_velocity_and_target(net, x_t, t, s, y, v_g, m, dropout):
    """u = net(x_t, t, s, y) (one forward, with grad) and the target u_tgt = v_g - (t - s) du/dt
    (eq. 10, no grad). du/dt: one JVP without grad (autograd never records the tangent), in a
    forked RNG so the forward draws the same dropout masks; only rows m.. (s != t) need it (rows
    0..m-1 have s = t: their target is v_g), unless dropout asks for the whole batch's masks."""
    j = 0 if dropout > 0 else m
    u_tgt = v_g.clone()
    if j < len(x_t):
        with torch.no_grad(), (torch.random.fork_rng([x_t.device] if x_t.is_cuda else []) if dropout > 0 else contextlib.nullcontext()):
            _, du_dt = torch.func.jvp(lambda z, t_: net(z, t_, s[j:], y[j:]), (x_t[j:], t[j:]), (v_g[j:], torch.ones_like(t[j:])))
        u_tgt[j:] = v_g[j:] - (t[j:] - s[j:]).view(-1, *[1] * (x_t.dim() - 1)) * du_dt
    return net(x_t, t, s, y), u_tgt


def meanflow_loss(net, x, y, args, null):
    """MeanFlow loss (Alg. 1) with the adaptive weight. Returns (loss, terms)."""
    n, dims = x.shape[0], [1] * (x.dim() - 1)
    n_jvp = round(args.ratio * n)
    e = torch.randn_like(x)
    t, s = sample_ts(n, n_jvp, args, x.device)
    x_t = (1 - t.view(-1, *dims)) * x + t.view(-1, *dims) * e
    v_g = guided_velocity(net, x_t, t, e - x, y, null, args)
    u, u_tgt = mean_velocity_and_target(net, x_t, t, s, y, v_g, n - n_jvp, args.dropout)
    l = ((u - u_tgt.detach()) ** 2).flatten(1).sum(1)
    loss = (l / (l.detach() + args.norm_eps) ** args.norm_p).mean()
    m, zero, D = n - n_jvp, l.new_zeros(()), x[0].numel()  # the weight acts on the SUM over dims (official); logged: per-dim means
    return loss, {"loss": loss.detach(), "mse": l.detach().mean() / D, "mse_fm": l[:m].detach().mean() / D if m else zero,
                  "mse_mf": l[m:].detach().mean() / D if n_jvp else zero}


def drop_labels(y, null, args):
    """Label dropout to the null class (see --label-dropout-rows)."""
    if args.label_dropout_rows == "first":
        k = int(torch.binomial(torch.tensor(float(len(y))), torch.tensor(args.label_dropout)))
        return torch.where(torch.arange(len(y), device=y.device) < k, null, y)
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
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    meanflow_loss = compiled(meanflow_loss, args)  # --compile (common/run.py)

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
                    loss, t_i = meanflow_loss(ddp_net, x, y, args, null)
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
