"""DMD2: one- and few-step generators by distribution matching with a learned fake velocity.

Paper: Yin, Gharbi, Park, Richard, Shechtman, Durand, Freeman, "Improved Distribution Matching
Distillation for Fast Image Synthesis", NeurIPS 2024 (arXiv 2405.14867). Official code:
github.com/tianweiy/DMD2 (main/edm/edm_guidance.py read to check the loss normalization, the time
ranges, the TTUR and the GAN weights; nothing copied).

Idea: a generator G is trained so that its samples, noised to x_t, see the same velocity under the
frozen teacher ("real") as under a "fake" velocity net trained on the generator's own samples; the
difference is the gradient of KL(p_fake,t || p_real,t) (DMD eq. 7, DMD2 eq. 2). Notation of
METHODS.md: denoiser-style generator G(x_t, t) = x_t - t net(x_t, t, t, y), one step G(e, 1),
initialized from the flow-matching teacher, as is the fake velocity net.

    x0 = G(e, 1);  t ~ U(t_min, t_max);  x_t = (1 - t) x0 + t n;  v_real = v_T^cfg(x_t, t),
    v_fake = fake(x_t, t);  x0_real = x_t - t v_real;  w = mean_dims |x0 - x0_real|  (per sample)
    grad = t (v_real - v_fake) / w  (= (x0_fake - x0_real) / w);   L_G = 0.5 mean((x0 - sg(x0 - grad))^2)

so gradient descent moves x0 along -grad, toward x0_real (METHODS.md sign check). The fake net
regresses the conditional velocity of sg(x0): L_fake = ||fake(x_t, t) - (n - sg(x0))||^2,
t ~ U(0, 1) (official compute_loss_fake: all noise levels). Two time-scale update rule (DMD2 sec.
4.2): the fake net (and discriminator) update every step, the generator every `ttur` steps (the
last step of each block, so that `log_every` multiples of `ttur` always log a fresh generator
update). GAN (DMD2 sec. 4.3, optional): a small head on the fake net's middle features (a
forward hook on blocks[depth // 2], mean over tokens) gives a logit D on samples noised at
t ~ U(0, gan_t_max); the fake side adds gan_d_weight (softplus(D(sg x0)) + softplus(-D(x)))
and the generator gan_weight softplus(-D(x0)), through the frozen-for-that-turn fake net.
Backward simulation (DMD2 sec. 4.5): with backsim_steps K > 1 the generator runs k ~ U{0..K-1}
steps on t_j = linspace(1, 0, K + 1) without grad (x0 = G(x, t_j), re-noised to t_{j+1} with fresh
noise) and is trained on G(x, t_k); sampling with K steps is the same chain. Its fresh noise makes
fm_err@K (distance to the exact ODE endpoint of the same noise) meaningless for K > 1: read ed@K.

Deviations, all stated: the official EDM code samples noise levels uniformly over a Karras grid
index in [2%, 98%] and trains the fake net by x0-regression with Karras weights; here the linear
path with t ~ U(t_min, t_max) and flow matching (METHODS.md). One backward-simulation k per
batch. The discriminator head is an MLP on pooled DiT tokens (the official one is a conv head on
the U-Net bottleneck). Official ImageNet-64 values: ttur 5, gan_weight 3e-3, gan_d_weight 1e-2,
same lr for both optimizers; we keep ttur 5 and default the GAN off on CPU.

Run:        python methods/dmd2.py                      (gmm, teacher results/fm/gmm/model.safetensors)
            python methods/dmd2.py --dataset mnist --steps 6000 --batch-size 64 --lr 1e-4 --ema-decay 0.99   (the reference run)
            python methods/dmd2.py --teacher oracle     (gmm with the exact velocity as teacher)
Reference:  results/dmd2/<dataset>/ (teacher: results/fm/<dataset>/model.safetensors), curves in results/curves_mnist.png
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
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common.data import make_loader
from common.dit import DiT, MLP, load_state, load_teacher, save, save_state
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
    teacher: str = "results/fm/{dataset}/model.safetensors"
    """fm checkpoint of the teacher ({dataset} is replaced), or `oracle` for the exact gmm velocity"""
    teacher_cfg: float = 1.0
    """guidance w of the teacher, v_cfg = v_u + w (v_c - v_u) (1: none, so the target is the data law)"""
    ttur: int = 5
    """two time-scale update rule: fake-net updates per generator update (DMD2 ImageNet: 5)"""
    t_min: float = 0.02
    """lower end of the distribution-matching time t ~ U(t_min, t_max) (official min_step_percent)"""
    t_max: float = 0.98
    """upper end of the distribution-matching time (official max_step_percent)"""
    backsim_steps: int = 1
    """generator steps K of backward simulation (1: a one-step generator; DMD2 SDXL: 4)"""
    gan_weight: float = 0.0
    """generator GAN weight; 0 turns the GAN branch off (DMD2 ImageNet: 3e-3)"""
    gan_d_weight: float = 1e-2
    """discriminator loss weight, added to the fake loss (DMD2 ImageNet: 1e-2)"""
    gan_t_max: float = 1.0
    """the discriminator sees real and generated samples noised at t ~ U(0, gan_t_max)"""


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
    for name in ("ttur", "backsim_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an update ratio / step count >= 1")
    if not 0 <= args.t_min < args.t_max <= 1 or not 0 <= args.gan_t_max <= 1:
        raise SystemExit(f"--t-min {args.t_min} / --t-max {args.t_max} / --gan-t-max {args.gan_t_max}: expected 0 <= t-min < t-max <= 1, gan-t-max in [0, 1]")
    if args.gan_weight < 0 or args.gan_d_weight < 0:
        raise SystemExit(f"--gan-weight {args.gan_weight} / --gan-d-weight {args.gan_d_weight}: expected values >= 0")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def guided(teacher, x_t, t, y, null, w):
    """Teacher velocity with classifier-free guidance v_u + w (v_c - v_u) (one batched call)."""
    if w == 1.0:
        return teacher(x_t, t, t, y)
    v = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    v_c, v_u = v.chunk(2)
    return v_u + w * (v_c - v_u)


def denoise(net, x_t, t, y):
    """Denoiser-style generator G(x_t, t) = x_t - t net(x_t, t, t, y)."""
    return x_t - bc(t, x_t) * net(x_t, t, t, y)


def generate(net, e, y, k, steps):
    """Backward simulation: k generator steps on linspace(1, 0, steps + 1) without grad (x0 = G(x, t_j),
    re-noised to t_{j+1} with fresh noise), then x0 = G(x, t_k) with grad (DMD2 sec. 4.5)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    with torch.no_grad():
        for j in range(k):
            x = (1 - ts[j + 1]) * denoise(net, x, ts[j].expand(len(x)), y) + ts[j + 1] * torch.randn_like(x)
    return denoise(net, x, ts[k].expand(len(x)), y)


@torch.no_grad()
def sample(net, e, y, steps):
    """K-step DMD2 sampler: the backward-simulation chain run to the end."""
    return generate(net, e, y, steps - 1, steps)


def sample_dm_t(n, args, device):
    return args.t_min + (args.t_max - args.t_min) * torch.rand(n, device=device)


def dm_loss(x0, y, teacher, fake, null, args):
    """Normalized distribution-matching loss (DMD2 eq. 2, official compute_distribution_matching_loss);
    its gradient on x0 is grad / numel. `fake(x_t, t, s, y)` is the fake velocity at s = t."""
    t = sample_dm_t(len(x0), args, x0.device)
    with torch.no_grad():
        x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * torch.randn_like(x0)
        v_real = guided(teacher, x_t, t, y, null, args.teacher_cfg)
        v_fake = fake(x_t, t, t, y)
        w = (x0 - (x_t - bc(t, x0) * v_real)).abs().flatten(1).mean(1)
        grad = torch.nan_to_num(bc(t, x0) * (v_real - v_fake) / bc(w, x0))
    loss = 0.5 * ((x0 - (x0 - grad).detach()) ** 2).mean()
    return loss, {"loss": loss.item(), "dm_w": w.mean().item()}


def fake_loss(fake, x0, y):
    """Flow matching of the fake velocity on sg(x0), t ~ U(0, 1)."""
    x0, n, t = x0.detach(), torch.randn_like(x0), torch.rand(len(x0), device=x0.device)
    x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * n
    loss = ((fake(x_t, t, t, y) - (n - x0)) ** 2).flatten(1).sum(1).mean()
    return loss, {"fake_loss": loss.item()}


def gan_logit(fake, head, feats, x, y, args):
    """Discriminator logit: the head on the fake net's middle features of x noised to t ~ U(0, gan_t_max)."""
    t = args.gan_t_max * torch.rand(len(x), device=x.device)
    fake((1 - bc(t, x)) * x + bc(t, x) * torch.randn_like(x), t, t, y)
    h = feats["h"]
    return head(h.mean(1) if h.dim() == 3 else h)[:, 0]


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

    teacher, teacher_net = load_teacher(args.teacher, args.dataset, info, device, loader.gmm)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    fake = copy.deepcopy(net)  # the fake velocity also starts as the teacher
    hidden = fake.config["hidden"]
    disc = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1)).to(device)
    feats = {}  # the fake net's middle features, for the discriminator head
    fake.blocks[len(fake.blocks) // 2].register_forward_hook(lambda mod, inp, out: feats.update(h=out))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay)
    opt_fake = torch.optim.AdamW([*fake.parameters(), *disc.parameters()], lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay)
    gen_log = torch.nn.Module()  # the last generator-turn terms, checkpointed so a resumed run logs the same rows
    gen_log.register_buffer("v", torch.zeros(4))
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt, "fake": fake, "disc": disc, "opt_fake": opt_fake, "gen_log": gen_log}
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
        for g in [*opt.param_groups, *opt_fake.param_groups]:
            g["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        net.train()
        fake.train()
        k = int(torch.randint(args.backsim_steps, ()))
        gen_turn = (step + 1) % args.ttur == 0  # two time-scale update rule
        with torch.set_grad_enabled(gen_turn):
            x0 = generate(ddp_net, torch.randn_like(x), y, k, args.backsim_steps)
        if gen_turn:  # generator: distribution matching (+ GAN through the fake net, whose weights stay put)
            fake.requires_grad_(False)
            loss, terms = dm_loss(x0, y, teacher, fake, null, args)
            gan_g = F.softplus(-gan_logit(fake, disc, feats, x0, y, args)).mean() if args.gan_weight > 0 else torch.zeros(())
            fake.requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            (loss + args.gan_weight * gan_g).backward()
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            gen_log.v.copy_(torch.tensor([terms["loss"], gnorm.item(), terms["dm_w"], gan_g.item()]))
        # fake velocity (+ discriminator): every step, on the same sg(x0)
        loss_fake, terms = fake_loss(fake, x0, y)
        if args.gan_weight > 0:
            d = F.softplus(gan_logit(fake, disc, feats, x0.detach(), y, args)) + F.softplus(-gan_logit(fake, disc, feats, x, y, args))
            loss_fake = loss_fake + args.gan_d_weight * d.mean()
            terms["gan_d"] = d.mean().item()
        opt_fake.zero_grad(set_to_none=True)
        loss_fake.backward()
        fnorm = torch.nn.utils.clip_grad_norm_([*fake.parameters(), *disc.parameters()], args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms.update(dict(zip(["loss", "grad_norm", "dm_w", "gan_g"], gen_log.v.tolist())), fake_grad_norm=fnorm.item(), lr=opt.param_groups[0]["lr"])
        if not all(np.isfinite(v) for v in terms.values()):  # stop before a bad update reaches the weights
            raise SystemExit(f"step {step}: non-finite loss or gradient {terms}; last good checkpoint kept in {run_dir}")
        opt_fake.step()
        if gen_turn:
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
