"""Decoupled MeanFlow (DMF): a flow model fine-tuned into a flow map, with the time t fed to the first
blocks of the network and the target time s to the last ones.

Paper: Lee, Yu, Shin, "Decoupled MeanFlow: Turning Flow Models into Flow Maps for Accelerated Sampling",
ICLR 2026. Official code (PyTorch): github.com/kyungmnlee/dmf (loss.py, models/dmft.py, train_dmf.py,
samplers.py, scripts/; read to check every constant below; nothing copied).

Idea: MeanFlow (Geng et al. 2025) with three changes. (1) The network is decoupled: blocks[:N] (the
"encoder") are conditioned on (t, y), blocks[N:] and the output layer (the "decoder") on (s, y), with
the same time embedder (common/dit.py, `decouple=N`). At s = t it is exactly the flow model it starts
from, so (2) training starts from a flow-matching checkpoint (`--teacher`, our fm reference run; the
official scripts fine-tune SiT-XL/2 + REPA). (3) Every row carries both terms, each with its own time
and noise: flow matching at t_fm (s = t) and the MeanFlow term at (t, s) = (max, min) of two logit-normal
draws, with MeanFlow's target (eq. 10 of MeanFlow, official loss.py):

    FM:  u = net(x_t, t, t, y),  u_tgt = v_g                                 t ~ LN(0, 1)
    MF:  (u, du_dt) = jvp(net(., ., s, y), (x_t, t), (v_g, 1)),  u_tgt = v_g - (t - s) du_dt
         t, s = max, min of LN(0.4, 1) and LN(-1.2, 1)
    mse = mean_dims (u - sg(u_tgt))^2,   lv = logvar(t, s)
    l = log(mse e^-lv + 0.01) + lv = log(mse + 0.01 e^lv)   (official log_lv_loss; computed in the second,
        overflow-free form),   loss = 0.5 (mean_FM l + mean_MF l)

Both terms run as one batch of 2B rows (rows 0..B-1 FM, B.. MF; mean_velocity_and_target is
meanflow.py's: the JVP without grad on the MF rows only, then one forward with grad). logvar is the
official head: one zero-initialized linear layer on [emb_128(t), emb_128(s)] (LogVar below; the official
net carries it, here it is a separate module, trained with the net, not part of model.safetensors).
Training guidance (official "mg", current weights, both terms at their own x_t): meanflow.py's
guided_velocity with w = 1, k = omega: v_g = (e - x) + k (v_c - v_u) on labeled rows with t in
[cfg_t_min, cfg_t_max]. Labels: 10% dropped on random rows, the same label for both terms.
Sampling: K flow-map steps on linspace(1, 0, K + 1), optionally shifted t' = a t / (1 + (a - 1) t).

A property of the official weight, measured (tests/test_dmf.py): it has NO finite optimum in lv. Its
lv-derivative is 0.01 / (mse e^-lv + 0.01) > 0 for every mse, so lv drifts down for ever and the loss
tends to log(mse): the gradient on the net is grad(mse) / (mse + 0.01 e^lv), MeanFlow's adaptive weight
(p = 1) on the per-dimension mse with an epsilon 0.01 e^lv that anneals to 0. An annealed epsilon, not an
uncertainty weight; `--weight edm2` (e^-lv mse + lv, minimum at lv = log mse) is the uncertainty weight.
The run logs lv per term. From data (e - x drawn from p(x | x_t)) the log weight moves the expected
fixed point off the exact map, as meanflow.py's adaptive weight does: the weighted-mean target minus u* per
point has RMS 0.23-0.32 at lv = 0 and 0.18-0.30 at lv = -20, against Monte Carlo noise 0.065-0.10; the EDM2
weight (constant per row) leaves noise only (tests/test_dmf.py, CPU).

Official code over the paper / spec: none found in conflict. Deviations: our DiT/MLP (adaLN, unscaled
time embedding) in place of SiT-XL/2; the decoder's embedding is our (s, h = 0) pair (h = t - s is the
fm net's second embedder, constant 0 in fm training, so the net at s = t is the fm net exactly); the JVP
is computed without grad and u by a separate forward (same gradient as the official JVP with grad);
no REPA, no restart sampler, no frozen-teacher guidance (`g_type distill`); our default guidance is off
(k = 0), so samples are comparable with the unguided oracle and teacher; the guidance forwards run in eval
mode (meanflow.py's; official: train mode, the same without dropout); sampler state in the data dtype
(official float64).

Cost: per row, FM fwd/bwd 3 + MF (JVP 2 + bwd 2) 4 = 7 FPE by seed 002's rules (not in its table),
+ 2 per term with guidance (k > 0): 11.

Run:        python methods/dmf.py                    (2-D gmm, from results/fm/gmm/model.safetensors)
            python methods/dmf.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99
                --eval-every 250 --ckpt-every 250   (the leaderboard's standard budget, from results/fm/mnist)
Paper / code values (ImageNet 256, DMFT-XL/2): N = 20 of 28 blocks, LN means 0 (FM), 0.4 / -1.2 (MF),
std 1; omega (our k) 0.6 inside t in [0, 0.7] (512: [0, 0.8]); AdamW lr 1e-4, betas (0.9, 0.95), clip 1,
EMA 0.9999, batch 256, 400k steps; eps 0.01; shift 1 (512: 1.5). Reference: results/dmf/<dataset>/
"""
import contextlib
import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from common.data import make_loader
from common.dit import DiT, MLP, build, load_teacher, save, timestep_embedding
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
    """fm checkpoint the net starts from ({dataset} is replaced; no teacher in the loss); `oracle`: from scratch (the exact velocity has no weights)"""
    decouple_depth: int = -1
    """blocks that see t (the encoder, blocks[:N]; negative counts from the end, -1: all but the last); the rest and the output layer see s; 0: off, the (t, t - s) embedding of meanflow.py (paper: 20 of 28)"""
    weight: str = "log"
    """log: the official log(mse e^-lv + log_eps) + lv (no finite optimum in lv: an annealed epsilon) | edm2: e^-lv mse + lv (minimum at lv = log mse)"""
    log_eps: float = 0.01
    """epsilon of the log weight (official 0.01)"""
    time_mu_fm: float = 0.0
    """mean of the logit-normal time of the flow-matching term (official P_mean 0.0)"""
    time_mu_t: float = 0.4
    """mean of the first logit-normal draw of the MeanFlow term (official P_mean_t 0.4); t = max, s = min of the two"""
    time_mu_s: float = -1.2
    """mean of the second logit-normal draw of the MeanFlow term (official P_mean_r -1.2)"""
    time_sigma: float = 1.0
    """std of the three logit-normal time draws (official 1.0 each)"""
    cfg_omega: float = 1.0
    """training guidance w (class-conditional data only; w 1 with k 0: no guidance, as here; official: 1)"""
    cfg_kappa: float = 0.0
    """training guidance k = the official omega (paper: 0.6), v_g = (e - x) + k (v_c - v_u), effective scale 1 / (1 - k)"""
    cfg_t_min: float = 0.0
    """guidance applies for t in [cfg_t_min, cfg_t_max]"""
    cfg_t_max: float = 1.0
    """upper end of the guidance interval (paper: 0.7 at 256, 0.8 at 512)"""
    sample_shift: float = 1.0
    """sampler time shift a: t' = a t / (1 + (a - 1) t) on linspace(1, 0, K + 1) (official: 1, 1.5 at 512)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    for name in ("cfg_t_min", "cfg_t_max"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if args.weight not in ("log", "edm2"):
        raise SystemExit(f"--weight {args.weight}: expected log or edm2")
    if args.log_eps <= 0 or args.time_sigma <= 0 or args.sample_shift <= 0 or args.cfg_kappa >= 1:
        raise SystemExit(f"--log-eps {args.log_eps} > 0, --time-sigma {args.time_sigma} > 0, --sample-shift {args.sample_shift} > 0, "
                         f"--cfg-kappa {args.cfg_kappa} < 1 expected")


# ---------------------------------------------------------------- ALGO LOGIC
def sample_ts(n, args, device):
    """(t, s) for 2n rows: rows 0..n-1 the FM term, t = s ~ LN(time_mu_fm, time_sigma); rows n..2n-1 the
    MeanFlow term, t = max, s = min of LN(time_mu_t, time_sigma) and LN(time_mu_s, time_sigma)."""
    mu = torch.stack([torch.full((1,), m, device=device) for m in (args.time_mu_fm, args.time_mu_t, args.time_mu_s)])  # no copy
    fm, a, b = torch.sigmoid(mu + args.time_sigma * torch.randn(3, n, device=device))
    return torch.cat([fm, torch.maximum(a, b)]), torch.cat([fm, torch.minimum(a, b)])


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


class LogVar(nn.Module):
    """The official log-variance head lv(t, s): one zero-initialized linear layer on the sinusoidal
    embeddings [emb_128(t), emb_128(s)] (unscaled, as the net's; official DMFT.logvar_linear)."""

    def __init__(self, dim=128):
        super().__init__()
        self.dim, self.linear = dim, nn.Linear(2 * dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t, s):
        with torch.autocast(t.device.type, enabled=False):
            dt = self.linear.weight.dtype
            return self.linear(torch.cat([timestep_embedding(t, self.dim, dtype=dt), timestep_embedding(s, self.dim, dtype=dt)], 1))[:, 0]


def weighted(mse, lv, args):
    """Per-row loss on the per-dimension mse. log (official): log(mse e^-lv + eps) + lv, computed as the
    identical log(mse + eps e^lv) (no overflow of e^-lv as lv drifts down): its lv-derivative
    eps e^lv / (mse + eps e^lv) is positive for every mse, so there is no finite optimum, lv drifts down and
    the loss tends to log mse (an epsilon eps e^lv annealed to 0). edm2: e^-lv mse + lv, minimum at lv = log mse."""
    if args.weight == "log":
        return torch.log(mse + args.log_eps * torch.exp(lv))
    return mse * torch.exp(-lv) + lv


def dmf_loss(net, logvar, x, y, args, null):
    """DMF loss: the FM and the MeanFlow term on every row of x (each with its own time and noise), as one
    batch of 2B rows, each weighted by the learned lv(t, s). Returns (loss, terms)."""
    n, dims = x.shape[0], [1] * (x.dim() - 1)
    x, y = torch.cat([x, x]), torch.cat([y, y])
    e = torch.randn_like(x)
    t, s = sample_ts(n, args, x.device)
    x_t = (1 - t.view(-1, *dims)) * x + t.view(-1, *dims) * e
    v_g = guided_velocity(net, x_t, t, e - x, y, null, args)
    u, u_tgt = mean_velocity_and_target(net, x_t, t, s, y, v_g, n, args.dropout)
    mse = ((u - u_tgt.detach()) ** 2).flatten(1).mean(1)  # per dimension (official mean_flat)
    lv = logvar(t, s).to(mse.dtype)
    loss = weighted(mse, lv, args).mean()  # = 0.5 (mean over FM rows + mean over MF rows)
    mse, lv = mse.detach(), lv.detach()
    return loss, {"loss": loss.detach(), "mse": mse.mean(), "mse_fm": mse[:n].mean(), "mse_mf": mse[n:].mean(),
                  "lv_fm": lv[:n].mean(), "lv_mf": lv[n:].mean()}


def drop_labels(y, null, args):
    """Label dropout to the null class, each row with probability --label-dropout (official: random rows)."""
    return torch.where(torch.rand(len(y), device=y.device) < args.label_dropout, null, y)


@torch.no_grad()
def sample(net, e, y, steps, shift=1.0):
    """K-step flow-map sampler: x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y) on linspace(1, 0, K + 1),
    shifted t' = a t / (1 + (a - 1) t) (official get_tsteps)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    ts = shift * ts / (1 + (shift - 1) * ts)
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

    start = load_teacher(args.teacher, args.dataset, info, device, loader.gmm)[1]  # its weights only: no teacher in the loss
    config = (start if start is not None else make_net()).config  # the oracle has no weights: from scratch
    n_enc = args.decouple_depth + (config["depth"] if args.decouple_depth < 0 else 0)
    if not 0 <= n_enc <= config["depth"]:
        raise SystemExit(f"--decouple-depth {args.decouple_depth}: expected a block count in [-{config['depth']}, {config['depth']}] (the net has {config['depth']} blocks)")
    try:
        net = build({**config, "decouple": n_enc})
    except ValueError as err:
        raise SystemExit(f"--decouple-depth {args.decouple_depth}: {err}") from None
    if start is not None:
        net.load_state_dict(start.state_dict())  # strict: the split adds no parameter; at s = t the net IS the fm net
    net = net.to(device).train()
    net.grad_ckpt = args.grad_ckpt
    logvar = LogVar().to(device)  # lv(t, s), trained with the net
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    params = [*net.parameters(), *logvar.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, args.sample_shift)
    saved = {"net": net, "logvar": logvar, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net, ddp_logvar = ddp(net, world), ddp(logvar, world)
    dmf_loss = compiled(dmf_loss, args)  # --compile (common/run.py)

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
            with no_sync([ddp_net, ddp_logvar], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = dmf_loss(ddp_net, ddp_logvar, x, y, args, null)
                (loss / args.grad_accum).backward()
            terms.append(t_i)
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
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
