"""Flow matching / rectified flow: the teacher of every distillation method in cleanflow.

Paper: Lipman, Chen, Ben-Hamu, Nickel, Le, "Flow Matching for Generative Modeling", ICLR 2023
(arXiv 2210.02747); Liu, Gong, Liu, "Flow Straight and Fast", ICLR 2023 (arXiv 2209.03003).

Idea: regress the conditional velocity v = e - x of the linear path x_t = (1 - t) x + t e; the
minimizer is the marginal velocity v*(x_t, t) = E[e - x | x_t], whose ODE carries noise (t = 1)
to data (t = 0). In cleanflow's notation the velocity is the flow-map network at s = t:

    L = E_{x, e, t} || net(x_t, t, t, y) - (e - x) ||^2          (Lipman et al. eq. 23)

t ~ LN(0, 1) (logit-normal, SD3) or U(0, 1) (`--time-dist`). Labels are dropped to the null
class with probability `label_dropout`, so the same network gives the unconditional velocity
for classifier-free guidance v_cfg = v_u + w (v_c - v_u) at sampling time. Sampling: Euler or
Heun over t_k = linspace(1, 0, K + 1).

Run:        python methods/fm.py                       (2-D gmm, a few minutes on a CPU)
            python methods/fm.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --lr 5e-4 --warmup 200 --ema-decay 0.999   (the reference run)
Paper-scale defaults (SiT/DiT on ImageNet latents): lr 1e-4, batch 256, EMA 0.9999, label dropout
0.1, t uniform (SiT) or LN(0, 1) (SD3), 50-250 sampling steps with CFG 1.5-4.
Reference:  results/fm/<dataset>/ (its model.safetensors is the default teacher of dmd2, fsf_dmd, mfd)
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
    time_dist: str = "logit-normal"
    """training t: logit-normal LN(time_mu, time_sigma) or uniform"""
    time_mu: float = 0.0
    """mean of the logit-normal"""
    time_sigma: float = 1.0
    """std of the logit-normal"""
    sampler: str = "euler"
    """euler | heun"""
    cfg_scale: float = 1.0
    """classifier-free guidance scale w used when sampling (1: none)"""


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
    if args.time_dist not in ("logit-normal", "uniform") or args.sampler not in ("euler", "heun"):
        raise SystemExit(f"--time-dist {args.time_dist} / --sampler {args.sampler}: expected logit-normal|uniform / euler|heun")


# ---------------------------------------------------------------- ALGO LOGIC
def sample_t(n, args, device):
    if args.time_dist == "uniform":
        return torch.rand(n, device=device)
    return torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(n, device=device))


def fm_loss(net, x, y, args):
    """Flow-matching loss; returns (loss, terms for logging)."""
    e = torch.randn_like(x)
    t = sample_t(x.shape[0], args, x.device)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    x_t = (1 - tb) * x + tb * e
    v = e - x
    v_pred = net(x_t, t, t, y)
    loss = ((v_pred - v) ** 2).flatten(1).sum(1).mean()
    return loss, {"loss": loss.item()}


def velocity(net, x, t, y, null, w):
    """Guided velocity v_u + w (v_c - v_u) (one batched call)."""
    if w == 1.0:
        return net(x, t, t, y)
    v = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    v_c, v_u = v.chunk(2)
    return v_u + w * (v_c - v_u)


@torch.no_grad()
def sample(net, e, y, steps, null, w=1.0, sampler="euler"):
    """K-step Euler or Heun ODE sampler from t = 1 to t = 0."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    for k in range(steps):
        t, s = ts[k].expand(len(x)), ts[k + 1].expand(len(x))
        v = velocity(net, x, t, y, null, w)
        if sampler == "heun" and k < steps - 1:
            x_s = x - (ts[k] - ts[k + 1]) * v
            v = 0.5 * (v + velocity(net, x_s, s, y, null, w))
        x = x - (ts[k] - ts[k + 1]) * v
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
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, null, args.cfg_scale, args.sampler)
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
        loss, terms = fm_loss(ddp_net, x, y, args)
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
