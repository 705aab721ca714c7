"""DMD2: one- and few-step generators by distribution matching with a learned fake velocity.

Paper: Yin, Gharbi, Park, Richard, Shechtman, Durand, Freeman, "Improved Distribution Matching
Distillation for Fast Image Synthesis", NeurIPS 2024 (arXiv 2405.14867). Official code:
github.com/tianweiy/DMD2 (main/edm/edm_guidance.py read to check the loss normalization, the time
ranges, the TTUR and the GAN weights; nothing copied).

Idea: a generator G is trained so that its samples, noised to x_t, see the same velocity under the
frozen teacher ("real") as under a "fake" velocity net trained on the generator's own samples; the
difference is the gradient of KL(p_fake,t || p_real,t) (DMD eq. 7, DMD2 eq. 2). Notation of
cleanflow (README, notation): denoiser-style generator G(x_t, t) = x_t - t net(x_t, t, t, y), one step G(e, 1),
initialized from the flow-matching teacher, as is the fake velocity net.

    x0 = G(e, 1);  t ~ p_DM(t);  x_t = (1 - t) x0 + t n;  v_real = v_T^cfg(x_t, t),
    v_fake = fake(x_t, t);  x0_real = x_t - t v_real;  w = mean_dims |x0 - x0_real|  (per sample)
    grad = t (v_real - v_fake) / w  (= (x0_fake - x0_real) / w);   L_G = 0.5 mean((x0 - sg(x0 - grad))^2)

so gradient descent moves x0 along -grad, toward x0_real (the sign rule: a sample moves along v_fake - v_real). The fake net
regresses the conditional velocity of sg(x0): L_fake = ||fake(x_t, t) - (n - sg(x0))||^2,
t ~ U(0, 1) (official compute_loss_fake: all noise levels). Two time-scale update rule (DMD2 sec.
4.2): the fake net (and discriminator) update every step, the generator every `ttur` steps (the
last step of each block, so that `log_every` multiples of `ttur` always log a fresh generator
update). GAN (DMD2 sec. 4.3, optional): a small head on the fake net's middle features (a
forward hook on blocks[depth // 2], mean over tokens) gives a logit D on samples noised at
t ~ U(0, gan_t_max); the fake side adds gan_d_weight (softplus(D(sg x0)) + softplus(-D(x)))
and the generator gan_weight softplus(-D(x0)), through the fake net and the head, both frozen for
that turn (as the official code freezes its whole guidance model): no generator gradient reaches them.
Backward simulation (DMD2 sec. 4.5): with backsim_steps K > 1 the generator runs k ~ U{0..K-1}
steps on t_j = linspace(1, 0, K + 1) without grad (x0 = G(x, t_j), re-noised to t_{j+1} with fresh
noise) and is trained on G(x, t_k); sampling with K steps is the same chain. Its fresh noise makes
fm_err@K (distance to the exact ODE endpoint of the same noise) meaningless for K > 1: read ed@K.

As the official code (defaults): the DM time is an index uniform in [20, 980) of a 1000-level
Karras grid (sigma 0.002..80, rho 7), t = sigma / (1 + sigma) on our path (--t-dist uniform: the
earlier U(0.02, 0.98)); generator labels are uniform random classes, no null class, no dropout
(--gen-labels data: loader labels with 10% dropout); the raw generator is evaluated and saved
(--eval-ema: its EMA). The official clips gradients at 10: pass --grad-clip 10 (the shared
default is 1; the reference runs pass 10). Deviations, all stated: the official EDM code trains
the fake net by x0-regression with Karras weights; here flow matching on the linear path. One
backward-simulation k per micro-batch. The discriminator head is an MLP on pooled DiT tokens
(the official one is a conv head on the U-Net bottleneck). Official ImageNet-64 values: ttur 5,
gan_weight 3e-3, gan_d_weight 1e-2, same lr for both optimizers; we keep ttur 5 and default the
GAN off on CPU. Under torchrun the generator, the fake net and the discriminator are all in DDP.

Run:        python methods/dmd2.py                      (gmm, teacher results/fm/gmm/model.safetensors)
            python methods/dmd2.py --dataset mnist --steps 6000 --batch-size 64 --lr 1e-4 --ema-decay 0.99   (the reference run)
            python methods/dmd2.py --teacher oracle     (gmm with the exact velocity as teacher)
Reference:  results/dmd2/<dataset>/ (teacher: results/fm/<dataset>/model.safetensors), curves in results/curves_mnist.png
"""
import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
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
    ttur: int = 5
    """two time-scale update rule: fake-net updates per generator update (DMD2 ImageNet: 5)"""
    t_dist: str = "karras"
    """distribution-matching time: karras (official: an index uniform in [t_min, t_max) x 1000 of a 1000-level
    Karras grid, sigma 0.002..80, rho 7, mapped to t = sigma / (1 + sigma)) or uniform (t ~ U(t_min, t_max))"""
    t_min: float = 0.02
    """lower end of the distribution-matching time or grid fraction (official min_step_percent)"""
    t_max: float = 0.98
    """upper end of the distribution-matching time or grid fraction (official max_step_percent)"""
    gen_labels: str = "random"
    """generator labels: random (official: uniform classes, no null, no dropout) or data (loader labels with
    --label-dropout)"""
    eval_ema: bool = False
    """evaluate and save the EMA generator (official: the raw generator; then --ema-decay is unused)"""
    backsim_steps: int = 1
    """generator steps K of backward simulation (1: a one-step generator; DMD2 SDXL: 4)"""
    gan_weight: float = 0.0
    """generator GAN weight; 0 turns the GAN branch off (DMD2 ImageNet: 3e-3)"""
    gan_d_weight: float = 1e-2
    """discriminator loss weight, added to the fake loss (DMD2 ImageNet: 1e-2)"""
    gan_t_max: float = 1.0
    """the discriminator sees real and generated samples noised at t ~ U(0, gan_t_max)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    for name in ("ttur", "backsim_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an update ratio / step count >= 1")
    if not 0 <= args.t_min < args.t_max <= 1 or not 0 <= args.gan_t_max <= 1:
        raise SystemExit(f"--t-min {args.t_min} / --t-max {args.t_max} / --gan-t-max {args.gan_t_max}: expected 0 <= t-min < t-max <= 1, gan-t-max in [0, 1]")
    if args.gan_weight < 0 or args.gan_d_weight < 0:
        raise SystemExit(f"--gan-weight {args.gan_weight} / --gan-d-weight {args.gan_d_weight}: expected values >= 0")
    if args.t_dist not in ("karras", "uniform") or args.gen_labels not in ("random", "data"):
        raise SystemExit(f"--t-dist {args.t_dist} / --gen-labels {args.gen_labels}: expected karras|uniform / random|data")


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
    """K-step DMD2 sampler: the backward-simulation chain run to the end (in eval mode)."""
    was_training = net.training
    x0 = generate(net.eval(), e, y, steps - 1, steps)
    net.train(was_training)
    return x0


def sample_dm_t(n, args, device):
    """The distribution-matching time (--t-dist). karras: the official index i ~ U{20, ..., 979} of the
    ascending Karras grid sigma_i = (a + i / 999 (b - a))^7, a = 0.002^(1/7), b = 80^(1/7), on our path
    t = sigma / (1 + sigma): quantiles 10/50/90% at t = .022/.716/.976 (34% of the draws above 0.9)."""
    if args.t_dist == "uniform":
        return args.t_min + (args.t_max - args.t_min) * torch.rand(n, device=device)
    i = torch.randint(round(1000 * args.t_min), round(1000 * args.t_max), (n,), device=device)
    a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    sigma = (a + i / 999 * (b - a)) ** 7
    return sigma / (1 + sigma)


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
    return loss, {"loss": loss.detach(), "dm_w": w.mean()}


def fake_loss(fake, x0, y):
    """Flow matching of the fake velocity on sg(x0), t ~ U(0, 1)."""
    x0, n, t = x0.detach(), torch.randn_like(x0), torch.rand(len(x0), device=x0.device)
    x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * n
    loss = ((fake(x_t, t, t, y) - (n - x0)) ** 2).flatten(1).sum(1).mean()
    return loss, {"fake_loss": loss.detach()}


def gan_logit(fake, head, feats, x, y, args):
    """Discriminator logit: the head on the fake net's middle features of x noised to t ~ U(0, gan_t_max)."""
    t = args.gan_t_max * torch.rand(len(x), device=x.device)
    fake((1 - bc(t, x)) * x + bc(t, x) * torch.randn_like(x), t, t, y)
    h = feats["h"]
    return head(h.mean(1) if h.dim() == 3 else h)[:, 0]


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
    ema = copy.deepcopy(net).requires_grad_(False).eval() if args.eval_ema else net  # official: the raw generator
    fake = copy.deepcopy(net).requires_grad_(True)  # the fake velocity also starts as the teacher
    hidden = fake.config["hidden"]
    disc = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1)).to(device)
    feats = {}  # the fake net's middle features, for the discriminator head
    fake.blocks[len(fake.blocks) // 2].register_forward_hook(lambda mod, inp, out: feats.update(h=out))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    opt_fake = torch.optim.AdamW([*fake.parameters(), *disc.parameters()], lr=args.lr, betas=args.adam_betas,
                                 weight_decay=args.weight_decay, fused=device.type == "cuda")
    gen_log = torch.nn.Module()  # the last generator-turn terms, checkpointed so a resumed run logs the same rows
    gen_log.register_buffer("v", torch.zeros(4, device=device))
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt, "fake": fake, "disc": disc, "opt_fake": opt_fake, "gen_log": gen_log}
    ddp_net, ddp_fake = ddp(net, world), ddp(fake, world)
    dm_loss, fake_loss = compiled(dm_loss, args), compiled(fake_loss, args)  # --compile (common/run.py)
    ddp_disc = ddp(disc, world) if args.gan_weight > 0 else disc  # an unused DDP module would stall the reducer

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
        net.train()
        fake.train()
        gen_turn = (step + 1) % args.ttur == 0  # two time-scale update rule
        x, y = next(loader)  # this rank's share of the global batch
        terms, gen_terms = [], []
        for i, (x, y) in enumerate(zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum))):
            torch.manual_seed(micro_seed(args.seed, step, rank * args.grad_accum + i))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
            y_g = torch.randint(0, max(null, 1), y.shape, device=device) if args.gen_labels == "random" else y
            k = int(torch.randint(args.backsim_steps, ()))
            with no_sync([ddp_net, ddp_fake, ddp_disc], i < args.grad_accum - 1):
                with amp, torch.set_grad_enabled(gen_turn):
                    x0 = generate(ddp_net, torch.randn_like(x), y_g, k, args.backsim_steps)
                if gen_turn:  # generator: distribution matching (+ GAN through the fake net and the head, both frozen for this turn)
                    fake.requires_grad_(False), disc.requires_grad_(False)
                    with amp:
                        loss, t_g = dm_loss(x0, y_g, teacher, fake, null, args)
                        gan_g = F.softplus(-gan_logit(fake, disc, feats, x0, y_g, args)).mean() if args.gan_weight > 0 else loss.new_zeros(())
                    fake.requires_grad_(True), disc.requires_grad_(True)
                    ((loss + args.gan_weight * gan_g) / args.grad_accum).backward()
                    gen_terms.append({**t_g, "gan_g": gan_g.detach()})
                with amp:  # fake velocity (+ discriminator): every step, on the same sg(x0)
                    loss_fake, t_f = fake_loss(ddp_fake, x0, y_g)
                    if args.gan_weight > 0:
                        d = F.softplus(gan_logit(ddp_fake, ddp_disc, feats, x0.detach(), y_g, args)) + F.softplus(-gan_logit(ddp_fake, ddp_disc, feats, x, y, args))
                        loss_fake, t_f["gan_d"] = loss_fake + args.gan_d_weight * d.mean(), d.mean().detach()
                (loss_fake / args.grad_accum).backward()
            terms.append(t_f)
        if gen_turn:
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            gen_log.v.copy_(torch.stack([*mean_terms(gen_terms).values(), gnorm]))
        fnorm = torch.nn.utils.clip_grad_norm_([*fake.parameters(), *disc.parameters()], args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), **dict(zip(["loss", "dm_w", "gan_g", "grad_norm"], gen_log.v.clone())), "fake_grad_norm": fnorm}
        stop_if_nonfinite(terms, step, run_dir)
        opt_fake.step()
        opt_fake.zero_grad(set_to_none=True)
        if gen_turn:
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.eval_ema:
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
