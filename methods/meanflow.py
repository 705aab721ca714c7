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

with the adaptive weight of eq. 22 (c = 0.01, p = 1; the raw l is logged as `mse`). Times: two
draws from LN(-0.4, 1), t = max, s = min, and s = t on a fraction 1 - ratio of the batch (the
first rows, as the official `data_proportion`). Training-time guidance (eq. 13-21), on labeled
rows only, no grad, current weights in eval mode (as the official `guidance_fn`):
v_g = w v + k net(x_t, t, t, y) + (1 - w - k) net(x_t, t, t, null) inside [t_min, t_max],
v_g = v outside and for dropped labels; effective scale w / (1 - k). Sampling: K flow-map
steps x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y), no guidance (it is baked in).

Cost: where s = t the target is v_g exactly (the JVP term is multiplied by t - s = 0), so only
the `ratio` rows pay for a JVP; the others take a plain forward. Same loss, fewer FLOPs.
Deviations: none in the loss; our DiT embeds (t, h = t - s) by adaLN like the paper's.
Dropout masks are shared between primal and tangent because both come from one jvp call.

Run:        python methods/meanflow.py                  (2-D gmm, a few minutes on a CPU)
            python methods/meanflow.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999   (the reference run)
Paper defaults (ImageNet 256, DiT-XL/2): lr 1e-4, batch 256, betas (0.9, 0.95), EMA 0.9999,
ratio 0.25, w 1.0, k 0.5, c 0.01, p 1.0. Our default k is 0 (no guidance), so that the samples
are comparable with the exact (unguided) oracle and with the unguided fm teacher; pass
--cfg-kappa 0.5 for the paper's effective scale 2. Reference: results/meanflow/<dataset>/
"""
import copy
import json
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import tyro
from tqdm import tqdm

from common.data import make_loader
from common.dit import DiT, MLP, load_state, save, save_state
from common.eval import Evaluator, save_grid, time_forward


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (the method file by default)"""
    seed: int = 0
    """seed of torch, numpy, random and the data stream"""
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
    """batch size per process"""
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
    log_every: int = 50
    """write a metrics row every this many steps"""
    eval_every: int = 1000
    """evaluate and save a sample grid every this many steps (and at the end)"""
    eval_samples: int = 2000
    """samples per evaluation"""
    eval_steps: tuple[int, ...] = (1, 2, 4)
    """sampling step counts to evaluate"""
    ckpt_every: int = 1000
    """write the training checkpoint every this many steps (and at the end)"""
    resume: Optional[str] = None
    """training checkpoint (ckpt.safetensors) or run folder to continue from"""
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


def check_args(args):
    # ---- checks: a clear one-line error naming the flag
    for name in ("steps", "batch_size", "log_every", "eval_every", "eval_samples", "ckpt_every", "hidden", "depth", "heads", "patch_size"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    for name in ("ema_decay", "label_dropout", "dropout"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if args.lr <= 0 or any(k <= 0 for k in args.eval_steps):
        raise SystemExit(f"--lr {args.lr} / --eval-steps {args.eval_steps}: expected positive values")
    for name in ("ratio", "cfg_t_min", "cfg_t_max"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if args.norm_eps <= 0 or args.norm_p < 0 or args.cfg_kappa >= 1:
        raise SystemExit(f"--norm-eps {args.norm_eps} > 0, --norm-p {args.norm_p} >= 0, --cfg-kappa {args.cfg_kappa} < 1 expected")


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


def mean_velocity_and_target(net, x_t, t, s, y, v_g, m):
    """u = net(x_t, t, s, y) and u_tgt = v_g - (t - s) du/dt (eq. 10, not yet stop-gradient);
    rows 0..m-1 have s = t and take a plain forward (their target is v_g), the rest one JVP."""
    dims = [1] * (x_t.dim() - 1)
    u, u_tgt = [], []
    if m > 0:
        u.append(net(x_t[:m], t[:m], t[:m], y[:m]))
        u_tgt.append(v_g[:m])
    if m < len(x_t):
        s_, y_ = s[m:], y[m:]
        u_j, du_dt = torch.func.jvp(lambda z, t_: net(z, t_, s_, y_), (x_t[m:], t[m:]), (v_g[m:], torch.ones_like(t[m:])))
        u.append(u_j)
        u_tgt.append(v_g[m:] - (t[m:] - s_).view(-1, *dims) * du_dt)
    return torch.cat(u), torch.cat(u_tgt)


def meanflow_loss(net, x, y, args, null):
    """MeanFlow loss (Alg. 1) with the adaptive weight. Returns (loss, terms)."""
    n, dims = x.shape[0], [1] * (x.dim() - 1)
    n_jvp = round(args.ratio * n)
    e = torch.randn_like(x)
    t, s = sample_ts(n, n_jvp, args, x.device)
    x_t = (1 - t.view(-1, *dims)) * x + t.view(-1, *dims) * e
    v_g = guided_velocity(net, x_t, t, e - x, y, null, args)
    u, u_tgt = mean_velocity_and_target(net, x_t, t, s, y, v_g, n - n_jvp)
    l = ((u - u_tgt.detach()) ** 2).flatten(1).sum(1)
    loss = (l / (l.detach() + args.norm_eps) ** args.norm_p).mean()
    m = n - n_jvp
    return loss, {"loss": loss.item(), "mse": l.mean().item(), "mse_fm": l[:m].mean().item() if m else 0.0,
                  "mse_mf": l[m:].mean().item() if n_jvp else 0.0}


@torch.no_grad()
def sample(net, e, y, steps):
    """K-step flow-map sampler: x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    for k in range(steps):
        x = x - (ts[k] - ts[k + 1]) * net(x, ts[k].expand(len(x)), ts[k + 1].expand(len(x)), y)
    return x


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)

    # ---- seeding, device, distributed
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    run_dir = os.path.join(args.out_dir, args.exp_name, args.dataset)
    if args.resume:
        ckpt_path = os.path.join(args.resume, "ckpt.safetensors") if os.path.isdir(args.resume) else args.resume
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"--resume {args.resume}: no training checkpoint there (expected a ckpt.safetensors file or a run folder holding one)")
        run_dir = os.path.dirname(ckpt_path)
    elif os.path.exists(os.path.join(run_dir, "ckpt.safetensors")):  # never overwrite a run
        raise SystemExit(f"--out-dir {args.out_dir}: {run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another --out-dir / --exp-name")

    # ---- data
    loader = make_loader(args.dataset, args.batch_size, args.seed, args.data_root, args.download)
    info = loader.info
    null = info["num_classes"]  # the null label id; unconditional data only ever uses it

    # ---- model
    def make_net(n_cond=0):
        if info["kind"] == "vector":
            return MLP(info["shape"][0], args.hidden, args.depth, info["num_classes"], n_cond, args.dropout)
        return DiT(info["shape"][1], args.patch_size, info["shape"][0], args.hidden, args.depth, args.heads, 4.0,
                   info["num_classes"], n_cond, args.qk_norm, args.dropout)

    net = make_net().to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay)
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides data/RNG state
    step = 0

    # ---- resume
    if args.resume:
        state = load_state(ckpt_path)
        if state["config"] != net.config:
            raise SystemExit(f"--resume {ckpt_path}: checkpoint network {state['config']} does not match the requested {net.config}")
        for k, m in saved.items():
            m.load_state_dict(state[k])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"])
        step = state["step"]
    wall0 = state.get("wall_time_s", 0.0) if args.resume else 0.0  # wall time of earlier segments
    ddp_net = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net

    # ---- logging
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "metrics.jsonl")
    if rank == 0:
        rows = [json.loads(r) for r in open(log_path)] if args.resume and os.path.exists(log_path) else []
        with open(log_path, "w") as f:  # on resume keep only the rows up to the checkpoint
            f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)
        writer = None
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(run_dir)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project, name=f"{args.exp_name}-{args.dataset}-{args.seed}", config=asdict(args))

    def log(row):
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if writer is not None and k != "step":
                writer.add_scalar(k, v, row["step"])
        if args.track:
            wandb.log(row, step=row["step"])

    # ---- evaluation
    evaluator = Evaluator(loader, args.eval_samples, args.seed) if rank == 0 else None

    def evaluate(final=False):
        metrics = evaluator(sample_fn, args.eval_steps)
        path = os.path.join(run_dir, f"samples_{step:07d}.png")  # kept, also when a resumed run goes on
        save_grid(sample_fn, loader, args.eval_steps, path, args.seed)
        if final:
            shutil.copyfile(path, os.path.join(run_dir, "samples.png"))
        return metrics

    # ---- checkpoint
    def checkpoint():
        save_state({"config": net.config, **{k: m.state_dict() for k, m in saved.items()},
                    "loader": loader.state_dict(), "rng": torch.get_rng_state(), "step": step,
                    "wall_time_s": wall0 + time.time() - start,
                    "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)},
                   os.path.join(run_dir, "ckpt.safetensors"))
        save(ema, os.path.join(run_dir, "model.safetensors"), dataset=args.dataset, method=args.exp_name, step=step)

    # ---- cost: one forward pass of the same network on a training batch
    x0, y0 = loader.sample(args.batch_size, torch.Generator().manual_seed(args.seed))
    fwd_time = time_forward(net, x0.to(device), y0.to(device))

    # ---- training loop
    start, step_times, last = time.time(), [], {}
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < args.steps:
        tic = time.perf_counter()
        x, y = next(loader)
        x, y = x.to(device), y.to(device)
        y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, torch.full_like(y, null), y)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        net.train()
        loss, terms = meanflow_loss(ddp_net, x, y, args, null)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms.update(grad_norm=gnorm.item(), lr=opt.param_groups[0]["lr"])
        if not all(np.isfinite(v) for v in terms.values()):  # stop before a bad update reaches the weights
            raise SystemExit(f"step {step}: non-finite loss or gradient {terms}; last good checkpoint kept in {run_dir}")
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - args.ema_decay)
        if device.type == "cuda":
            torch.cuda.synchronize()

        # ---- log, evaluate, checkpoint (every method file ends its step with this block)
        step_times.append(time.perf_counter() - tic)
        step += 1
        bar.update(1)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            sec = float(np.median(step_times[-args.log_every:]))
            last = {"step": step, **terms, "sec_per_step": sec, "fpe": sec / fwd_time}
            bar.set_postfix(loss=f"{terms['loss']:.4f}", fpe=f"{sec / fwd_time:.1f}")
            log(last)
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                metrics = evaluate(final=step == args.steps)
            log({"step": step, **metrics})
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps):
            checkpoint()
    bar.close()

    # ---- summary
    if rank == 0:
        summary = {"method": args.exp_name, "dataset": args.dataset, "seed": args.seed, "steps": step,
                   "wall_time_s": wall0 + time.time() - start, "sec_per_step": float(np.median(step_times)) if step_times else None,
                   "fwd_time_s": fwd_time, "fpe": float(np.median(step_times)) / fwd_time if step_times else None,
                   "params": sum(p.numel() for p in net.parameters()), "final": {**last, **metrics} if step_times else {},
                   "hardware": {"device": str(device), "cpu": platform.processor() or platform.machine(),
                                "threads": torch.get_num_threads(), "torch": torch.__version__,
                                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
                   "command": " ".join(sys.argv)}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"done: {run_dir}/summary.json, samples.png, metrics.jsonl")
    if world > 1:
        torch.distributed.destroy_process_group()
