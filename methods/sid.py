"""SiD: Score identity Distillation, a one-step generator from a flow teacher by the score identities.

Paper: Zhou, Zheng, Wang, Yin, Huang, "Score identity Distillation: Exponentially Fast Distillation of
Pretrained Diffusion Models for One-Step Generation", ICML 2024 (arXiv 2404.04057). Official code:
github.com/mingyuanzhou/SiD (training/sid_loss.py, training/sid_training_loop.py, sid_train.py read to check
the loss, its normalization, the time law, the update order and the optimizer; nothing copied).

Idea: as DMD2 (methods/dmd2.py in the same repository), a generator G is trained against a frozen teacher
("real") and a "fake" net fitted to the generator's own samples; SiD differentiates its loss through x_t into
BOTH nets' inputs (their weights frozen for the generator's turn), which the score identities turn into a
model-based estimate of the Fisher divergence E ||D_real - D_fake||^2 between the noised laws. Notation of
cleanflow (README, notation): denoiser D(x_t, t) = x_t - t v, generator G(x_t, t) = x_t - t net(x_t, t, t, y),
one step G(t_g e, t_g) (--gen-t; t_g = 1: G(e, 1)), initialized from the flow-matching teacher, as is the fake net.

    x0 = G(t_g e, t_g);  t ~ p_SiD(t);  x_t = (1 - t) x0 + t n    (grad through x0)
    v_real = v_T(x_t, t),  v_fake = fake(x_t, t)                    (grad through x_t; weights frozen)
    D_real - D_fake = t (v_fake - v_real),   D_real - x0 = t (n - x0 - v_real)
    w = sg(mean_dims |D_real - x0|) (clipped >= 1e-5; --sid-norm none: w = 1)
    L_G = mean_dims[(D_real - D_fake) . ((D_real - x0) - alpha (D_real - D_fake))] / w,   alpha = 1.2 (official)

At q = p the two nets are one function and the gradient vanishes on every sample. With the fake frozen at
the exact velocity of the generator's law and w = 1, grad L_G = 1/2 grad F + (1/2 - alpha) grad L1
(F = E ||D_real - D_q||^2 the Fisher divergence, L1 = E ||D_real - D_fake||^2 at fixed fake): alpha = 1/2
is half the Fisher gradient; the official 1.2 adds -0.7 grad L1 (tests/test_sid.py measures it). The fake
net regresses the conditional velocity of sg(x0) with EDM's loss (official SID_EDMLoss): t = sigmoid(N(-1.2,
1.2)) (EDM sigma ~ LN(P_mean, P_std) on our path), weight (1 - t)^2 + t^2 / sigma_data^2 (EDM's lambda(sigma)
in velocity units). SiD time (official generator_loss, tmax 800): the ascending Karras grid (sigma 0.002..80,
rho 7) at a fraction U(0, 0.8), t = sigma / (1 + sigma): dmd2's --t-dist karras with --t-min 0 --t-max 0.8
(an index of the 1000-level grid, the official a continuous fraction: 0.1% apart). Loop as the official:
each step first the fake net (every step, on G's samples without grad, G in eval mode), its optimizer steps,
then the generator on fresh noise against the updated fake (in eval mode), every `ttur` steps (official 1:1).

Official values not defaulted here (the shared flags keep the project's CPU defaults): Adam betas (0, 0.999)
for both nets, lr 1e-5 (CIFAR-10, batch 256; ImageNet-64 4e-6, batch 8192), no gradient clipping
(--adam-betas 0 0.999 --lr 1e-5 --grad-clip 0), init_sigma 2.5 (--gen-t 0.714), EMA half-life 0.5 Mimg
(decay 0.99965 at batch 256); the EMA generator is evaluated and saved, as the official. Deviations, stated:
the official sums both losses over dimensions (batch means; the generator's x 100, loss_scaling_G); here per-dimension
means (constant factors: Adam ignores them, --grad-clip does not). The official drops NaN rows; here the NaN guard stops
the run. The generator's labels are the data's (official; --gen-labels random: DMD2's uniform classes);
--label-dropout is unused. No CFG (official; --teacher-cfg as dmd2). The multi-step sampler is dmd2's chain
(x0 = G, re-noised with fresh noise), which SiD does not train: read ed@K for K > 1.

Run:        python methods/sid.py                      (gmm, teacher results/fm/gmm/model.safetensors)
            python methods/sid.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --adam-betas 0 0.999 --grad-clip 0   (the reference run)
            python methods/sid.py --teacher oracle     (gmm with the exact velocity as teacher)
Reference:  results/sid/<dataset>/ (teacher: results/fm/<dataset>/model.safetensors), curves in results/curves_mnist.png
"""
import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from common.data import make_loader
from common.dit import DiT, MLP, load_teacher, save
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
    """fm checkpoint of the teacher ({dataset} is replaced), or `oracle` for the exact gmm velocity"""
    teacher_cfg: float = 1.0
    """guidance w of the teacher, v_cfg = v_u + w (v_c - v_u) (1: none, so the target is the data law)"""
    ttur: int = 1
    """two time-scale update rule: fake-net updates per generator update (official SiD: 1, fake first)"""
    alpha: float = 1.2
    """alpha of the SiD loss (official 1.2; 0.5: half the Fisher-divergence gradient; Self-Forcing's SiD: 1.0)"""
    sid_norm: str = "official"
    """official: divide each sample's loss by sg(mean_dims |D_real - x0|) (clipped >= 1e-5); none: w = 1 (the
    identity test)"""
    t_dist: str = "karras"
    """SiD time: karras (an index uniform in [t_min, t_max) x 1000 of a 1000-level Karras grid, sigma 0.002..80,
    rho 7, mapped to t = sigma / (1 + sigma); official tmax 800) or uniform (t ~ U(t_min, t_max))"""
    t_min: float = 0.0
    """lower end of the SiD time or grid fraction (official 0)"""
    t_max: float = 0.8
    """upper end of the SiD time or grid fraction (official tmax / 1000 = 0.8)"""
    fake_t_mu: float = -1.2
    """the fake net's time t = sigmoid(N(fake_t_mu, fake_t_sigma)) (EDM P_mean, official -1.2)"""
    fake_t_sigma: float = 1.2
    """std of the fake net's time logit (EDM P_std, official 1.2)"""
    sigma_data: float = 0.5
    """EDM sigma_data of the fake loss weight (1 - t)^2 + t^2 / sigma_data^2 (official 0.5)"""
    gen_t: float = 1.0
    """generator input time t_g: x0 = G(t_g e, t_g) (official init_sigma 2.5: t_g = 2.5 / 3.5 = 0.714)"""
    gen_labels: str = "data"
    """generator labels: data (official: the loader's labels, no dropout) or random (DMD2: uniform classes)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.ttur < 1:
        raise SystemExit(f"--ttur {args.ttur}: expected an update ratio >= 1")
    if not 0 <= args.t_min < args.t_max <= 1 or not 0 < args.gen_t <= 1:
        raise SystemExit(f"--t-min {args.t_min} / --t-max {args.t_max} / --gen-t {args.gen_t}: expected 0 <= t-min < t-max <= 1, gen-t in (0, 1]")
    if args.fake_t_sigma <= 0 or args.sigma_data <= 0:
        raise SystemExit(f"--fake-t-sigma {args.fake_t_sigma} / --sigma-data {args.sigma_data}: expected values > 0")
    if args.t_dist not in ("karras", "uniform") or args.gen_labels not in ("random", "data") or args.sid_norm not in ("official", "none"):
        raise SystemExit(f"--t-dist {args.t_dist} / --gen-labels {args.gen_labels} / --sid-norm {args.sid_norm}: "
                         "expected karras|uniform / random|data / official|none")


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


def generate(net, e, y, k, steps, t_g=1.0):
    """k generator steps on linspace(t_g, 0, steps + 1) from x = t_g e without grad (x0 = G(x, t_j), re-noised
    to t_{j+1} with fresh noise), then x0 = G(x, t_k) with grad. Training: k = 0, steps = 1, x0 = G(t_g e, t_g)."""
    ts = torch.linspace(t_g, 0, steps + 1, device=e.device)
    x = t_g * e
    with torch.no_grad():
        for j in range(k):
            x = (1 - ts[j + 1]) * denoise(net, x, ts[j].expand(len(x)), y) + ts[j + 1] * torch.randn_like(x)
    return denoise(net, x, ts[k].expand(len(x)), y)


@torch.no_grad()
def sample(net, e, y, steps, t_g=1.0):
    """K-step sampler: G(t_g e, t_g), then dmd2's chain (re-noise, G) for K > 1 (in eval mode)."""
    was_training = net.training
    x0 = generate(net.eval(), e, y, steps - 1, steps, t_g)
    net.train(was_training)
    return x0


def sample_dm_t(n, args, device):
    """The SiD time (--t-dist). karras: an index i ~ U{t_min 1000, ..., t_max 1000 - 1} of the ascending Karras
    grid sigma_i = (a + i / 999 (b - a))^7, a = 0.002^(1/7), b = 80^(1/7), on our path t = sigma / (1 + sigma):
    at the defaults (official tmax 800) quantiles 10/25/50/75/90% at t = .011/.078/.49/.85/.93 (18% above 0.9)."""
    if args.t_dist == "uniform":
        return args.t_min + (args.t_max - args.t_min) * torch.rand(n, device=device)
    i = torch.randint(round(1000 * args.t_min), round(1000 * args.t_max), (n,), device=device)
    a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    sigma = (a + i / 999 * (b - a)) ** 7
    return sigma / (1 + sigma)


def sid_loss(x0, y, teacher, fake, null, args):
    """SiD generator loss (official generator_loss), its gradient through x0 and through the inputs
    x_t of both nets (the caller freezes the fake net's weights; the teacher's are frozen); only w is detached.
    `fake(x_t, t, s, y)` is the fake velocity at s = t."""
    t = sample_dm_t(len(x0), args, x0.device)
    tb, n = bc(t, x0), torch.randn_like(x0)
    x_t = (1 - tb) * x0 + tb * n
    v_real = guided(teacher, x_t, t, y, null, args.teacher_cfg)
    v_fake = fake(x_t, t, t, y)
    d = tb * (v_fake - v_real)  # D_real - D_fake
    r = tb * (n - x0 - v_real)  # D_real - x0
    w = r.detach().abs().flatten(1).mean(1).clamp(min=1e-5) if args.sid_norm == "official" else torch.ones_like(t)
    loss = ((d * (r - args.alpha * d)).flatten(1).mean(1) / w).mean()
    return loss, {"loss": loss.detach(), "sid_w": w.mean()}


def fake_loss(fake, x0, y, args):
    """The fake net's EDM denoising loss on sg(x0) (official SID_EDMLoss) in velocities: t = sigmoid(N(mu, sigma))
    (EDM's sigma ~ LN(P_mean, P_std)), weight (1 - t)^2 + t^2 / sigma_data^2 (t^2 times EDM's lambda(sigma))."""
    x0, n = x0.detach(), torch.randn_like(x0)
    t = torch.sigmoid(args.fake_t_mu + args.fake_t_sigma * torch.randn(len(x0), device=x0.device))
    x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * n
    weight = (1 - t) ** 2 + t**2 / args.sigma_data**2
    loss = (weight * ((fake(x_t, t, t, y) - (n - x0)) ** 2).flatten(1).mean(1)).mean()
    return loss, {"fake_loss": loss.detach()}


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

    teacher, teacher_net = load_teacher(args.teacher, args.dataset, info, device, loader.gmm)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()  # official: the EMA generator is evaluated
    fake = copy.deepcopy(net).requires_grad_(True)  # the fake velocity also starts as the teacher
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    gen_log = torch.nn.Module()  # the last generator-turn terms, checkpointed so a resumed run logs the same rows
    gen_log.register_buffer("v", torch.zeros(3, device=device))
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, args.gen_t)
    saved = {"net": net, "ema": ema, "opt": opt, "fake": fake, "opt_fake": opt_fake, "gen_log": gen_log}
    ddp_net, ddp_fake = ddp(net, world), ddp(fake, world)
    sid_loss, fake_loss = compiled(sid_loss, args), compiled(fake_loss, args)  # --compile (common/run.py)

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
        for g in [*opt.param_groups, *opt_fake.param_groups]:
            g["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        gen_turn = (step + 1) % args.ttur == 0  # two time-scale update rule
        x, y = next(loader)  # this rank's share of the global batch
        micro = list(zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum)))
        terms, gen_terms = [], []
        net.eval(), fake.train()  # fake score first (official order): every step, on G's samples without grad
        for i, (x, y) in enumerate(micro):
            torch.manual_seed(micro_seed(args.seed, step, rank * args.grad_accum + i))
            y = y.to(device, non_blocking=True)
            y_g = torch.randint(0, max(null, 1), y.shape, device=device) if args.gen_labels == "random" else y
            with no_sync([ddp_fake], i < args.grad_accum - 1):
                with amp:
                    with torch.no_grad():
                        x0 = generate(ddp_net, torch.randn(x.shape, device=device), y_g, 0, 1, args.gen_t)
                    loss_fake, t_f = fake_loss(ddp_fake, x0, y_g, args)
                (loss_fake / args.grad_accum).backward()
            terms.append(t_f)
        fnorm = torch.nn.utils.clip_grad_norm_(fake.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        opt_fake.step()
        opt_fake.zero_grad(set_to_none=True)
        if gen_turn:  # generator: fresh noise, against the updated fake net, frozen (and in eval mode) for this turn
            net.train(), fake.eval().requires_grad_(False)
            for i, (x, y) in enumerate(micro):
                torch.manual_seed(micro_seed(args.seed, step, (world + rank) * args.grad_accum + i))
                y = y.to(device, non_blocking=True)
                y_g = torch.randint(0, max(null, 1), y.shape, device=device) if args.gen_labels == "random" else y
                with no_sync([ddp_net], i < args.grad_accum - 1):
                    with amp:
                        x0 = generate(ddp_net, torch.randn(x.shape, device=device), y_g, 0, 1, args.gen_t)
                        loss, t_g = sid_loss(x0, y_g, teacher, fake, null, args)
                    (loss / args.grad_accum).backward()
                gen_terms.append(t_g)
            fake.requires_grad_(True)
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            gen_log.v.copy_(torch.stack([*mean_terms(gen_terms).values(), gnorm]))
        terms = {**mean_terms(terms), **dict(zip(["loss", "sid_w", "grad_norm"], gen_log.v.clone())), "fake_grad_norm": fnorm}
        stop_if_nonfinite(terms, step, run_dir)  # one sync, after both turns: a bad fake step stops the run before any checkpoint
        if gen_turn:
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
