"""Diff-Instruct / VSD: a one-step generator by distribution matching with a learned fake velocity,
without DMD's normalization (DMD2 with Diff-Instruct's time law and weights).

Paper: Luo, Hu, Zhang, Sun, Li, Zhang, "Diff-Instruct: A Universal Approach for Transferring Knowledge
From Pre-trained Diffusion Models", NeurIPS 2023 (arXiv 2305.18455); the same gradient is VSD (Wang et
al., ProlificDreamer, arXiv 2305.16213). Official code: github.com/pkulwj1994/diff_instruct (EDM code;
training/di_loss.py, training/di_training_loop.py, di_train.py read to check the generator loss, the
fake loss, the time law, the update order, the optimizer and the generator input; nothing copied).

Idea: a generator G is trained so that its samples, noised to x_t, see the same velocity under the
frozen teacher ("real") as under a "fake" velocity net trained on the generator's own samples; the
difference is the gradient of the integral KL (Diff-Instruct eq. 3.3). Notation of cleanflow (README,
notation): denoiser-style generator G(x_t, t) = x_t - t net(x_t, t, t, y), one step G(t_g e, t_g),
initialized from the flow-matching teacher, as is the fake velocity net. The official EDM code, converted
(sigma ~ LogNormal(-1.2, 1.2) is t = sigma / (1 + sigma) ~ LN(-1.2, 1.2), a logit-normal: t quantiles
10/25/50/75/90% = .061/.118/.232/.404/.583; D_EDM = x_t - t v):

    x0 = G(t_g e, t_g);  t ~ LN(t_mu, t_sigma);  x_t = (1 - t) x0 + t n;  v_real = v_T^cfg(x_t, t),
    v_fake = fake(x_t, t);  grad = t (v_real - v_fake)  (= x0_fake - x0_real; no normalization)
    L_G = 0.5 mean((x0 - sg(x0 - grad))^2)                      (di_loss.py gloss: sum (D_fake - D_real) x0)
    L_fake = ((1 - t)^2 + 4 t^2) ||fake(x_t, t) - (n - sg(x0))||^2,  t ~ LN(t_mu, t_sigma)   (EDM's loss)

so gradient descent moves x0 along t (v_fake - v_real) (the sign rule). Against methods/dmd2.py, and
nothing else changes: no per-sample normalization w (DMD2 divides by mean_dims |x0 - x0_real|, which
makes the weight t / w), the time law LN(-1.2, 1.2) for both losses (DMD2: a Karras index / U(0, 1)),
the fake loss's EDM weight ((sigma^2 + 0.25) / (0.5 sigma)^2 converted: 4 + (1 - t)^2 / t^2 on the x0
error, ((1 - t)^2 + 4 t^2) on the velocity error), one fake update per generator update (--ttur 1), the
EMA generator evaluated and saved (the official snapshots keep the EMA), and the generator's input time
t_g (--gen-t). Official CIFAR-10 values: Adam betas (0, 0.999) for both nets, lr 1e-5, batch 128, EMA
half-life 0.5 Mimg, init_sigma 1.0 (t_g = 0.5), no gradient clipping (nan_to_num only): pass
`--adam-betas 0 0.999 --grad-clip 0` (the shared defaults are (0.9, 0.999) and 1; the reference runs pass
both). --gen-t defaults to 1 (G(e, 1), the project's one-step generator as in dmd2.py).

Kept from dmd2.py as options, off at the defaults: the GAN head (--gan-weight, DMD2 sec. 4.3; not in
Diff-Instruct), backward simulation (--backsim-steps: the chain runs on linspace(t_g, 0, K + 1)), teacher
guidance (--teacher-cfg; Diff-Instruct uses none), --ttur. Deviations, all stated: the fake and the
generator gradients come from the same generated batch and both nets step together (the official steps
the fake net first, then draws fresh noise for the generator against the updated fake net); the loss is
0.5 x the mean over elements (official: sum over dimensions, batch mean: a constant factor); the
generator's labels are uniform random classes without a null (--gen-labels random; the official uses the
data set's labels, undropped: the same law on balanced classes, `--gen-labels data --label-dropout 0` is
the literal one); the fake net learns by flow matching (velocity form of EDM's loss) on the linear path.
mfd.py with `--ode-step 1` follows the same per-sample direction v_fake - v_real but weighs it (1 - t) at
t = max of two uniforms, where this file weighs t at t ~ LN(-1.2, 1.2) (share of the expected weight on
t > 0.5: 0.500 vs 0.363). Under torchrun the generator, the fake net and the discriminator are all in DDP.

Run:        python methods/vsd.py                      (gmm, teacher results/fm/gmm/model.safetensors)
            python methods/vsd.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --adam-betas 0 0.999 --grad-clip 0   (the reference run)
            python methods/vsd.py --teacher oracle     (gmm with the exact velocity as teacher)
Reference:  results/vsd/<dataset>/ (teacher: results/fm/<dataset>/model.safetensors)
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
    ttur: int = 1
    """two time-scale update rule: fake-net updates per generator update (Diff-Instruct: 1)"""
    t_mu: float = -1.2
    """time law of both losses t ~ LN(t_mu, t_sigma) = sigmoid(N(t_mu, t_sigma^2)) (official: EDM's P_mean -1.2)"""
    t_sigma: float = 1.2
    """std of the logit-normal time law (official: EDM's P_std 1.2)"""
    gen_t: float = 1.0
    """generator input time t_g: x0 = G(t_g e, t_g) (official init_sigma 1.0, i.e. t_g = 0.5)"""
    gen_labels: str = "random"
    """generator labels: random (official: uniform classes, no null, no dropout) or data (loader labels with
    --label-dropout)"""
    eval_ema: bool = True
    """evaluate and save the EMA generator (official: the EMA; --no-eval-ema: the raw generator)"""
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
    if not args.t_sigma > 0 or not 0 < args.gen_t <= 1 or not 0 <= args.gan_t_max <= 1:
        raise SystemExit(f"--t-sigma {args.t_sigma} / --gen-t {args.gen_t} / --gan-t-max {args.gan_t_max}: expected t-sigma > 0, gen-t in (0, 1], gan-t-max in [0, 1]")
    if args.gan_weight < 0 or args.gan_d_weight < 0:
        raise SystemExit(f"--gan-weight {args.gan_weight} / --gan-d-weight {args.gan_d_weight}: expected values >= 0")
    if args.gen_labels not in ("random", "data"):
        raise SystemExit(f"--gen-labels {args.gen_labels}: expected random|data")


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


def generate(net, e, y, k, steps, gen_t):
    """x0 = G(t_g e, t_g) (Diff-Instruct: G(sigma_init z; sigma_init)); backward simulation: k generator steps
    on linspace(t_g, 0, steps + 1) without grad (x0 = G(x, t_j), re-noised to t_{j+1} with fresh noise), then
    x0 = G(x, t_k) with grad (DMD2 sec. 4.5)."""
    ts = torch.linspace(gen_t, 0, steps + 1, device=e.device)
    x = gen_t * e
    with torch.no_grad():
        for j in range(k):
            x = (1 - ts[j + 1]) * denoise(net, x, ts[j].expand(len(x)), y) + ts[j + 1] * torch.randn_like(x)
    return denoise(net, x, ts[k].expand(len(x)), y)


@torch.no_grad()
def sample(net, e, y, steps, gen_t):
    """K-step sampler: the backward-simulation chain run to the end (in eval mode); K = 1: G(t_g e, t_g)."""
    was_training = net.training
    x0 = generate(net.eval(), e, y, steps - 1, steps, gen_t)
    net.train(was_training)
    return x0


def sample_t(n, args, device):
    """t ~ LN(t_mu, t_sigma): EDM's sigma ~ LogNormal(P_mean, P_std) is exactly t = sigma / (1 + sigma) =
    sigmoid(log sigma) on our path; at (-1.2, 1.2) the quantiles 10/50/90% are t = .061/.232/.583."""
    return torch.sigmoid(args.t_mu + args.t_sigma * torch.randn(n, device=device))


def dm_loss(x0, y, teacher, fake, null, args):
    """Diff-Instruct's generator loss (official gloss, weight 1, no normalization); its gradient on x0 is
    t (v_real - v_fake) / numel. `fake(x_t, t, s, y)` is the fake velocity at s = t."""
    t = sample_t(len(x0), args, x0.device)
    with torch.no_grad():
        x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * torch.randn_like(x0)
        v_real = guided(teacher, x_t, t, y, null, args.teacher_cfg)
        v_fake = fake(x_t, t, t, y)
        grad = torch.nan_to_num(bc(t, x0) * (v_real - v_fake))
    loss = 0.5 * ((x0 - (x0 - grad).detach()) ** 2).mean()
    return loss, {"loss": loss.detach(), "dm_grad": grad.abs().mean()}


def fake_loss(fake, x0, y, args):
    """EDM's denoising loss of the fake net on sg(x0) in velocity form: weight (1 - t)^2 + 4 t^2 (EDM's
    (sigma^2 + sd^2) / (sigma sd)^2, sd = 0.5, times the t^2 of x0-error = t (v-error)), t ~ LN(t_mu, t_sigma)."""
    x0, n, t = x0.detach(), torch.randn_like(x0), sample_t(len(x0), args, x0.device)
    x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * n
    loss = (((1 - t) ** 2 + 4 * t ** 2) * ((fake(x_t, t, t, y) - (n - x0)) ** 2).flatten(1).sum(1)).mean()
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
    ema = copy.deepcopy(net).requires_grad_(False).eval() if args.eval_ema else net  # official: the EMA
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
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, args.gen_t)
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
                    x0 = generate(ddp_net, torch.randn_like(x), y_g, k, args.backsim_steps, args.gen_t)
                if gen_turn:  # generator: distribution matching (+ GAN through the fake net and the head, both frozen for this turn)
                    fake.requires_grad_(False), disc.requires_grad_(False)
                    with amp:
                        loss, t_g = dm_loss(x0, y_g, teacher, fake, null, args)
                        gan_g = F.softplus(-gan_logit(fake, disc, feats, x0, y_g, args)).mean() if args.gan_weight > 0 else loss.new_zeros(())
                    fake.requires_grad_(True), disc.requires_grad_(True)
                    ((loss + args.gan_weight * gan_g) / args.grad_accum).backward()
                    gen_terms.append({**t_g, "gan_g": gan_g.detach()})
                with amp:  # fake velocity (+ discriminator): every step, on the same sg(x0)
                    loss_fake, t_f = fake_loss(ddp_fake, x0, y_g, args)
                    if args.gan_weight > 0:
                        d = F.softplus(gan_logit(ddp_fake, ddp_disc, feats, x0.detach(), y_g, args)) + F.softplus(-gan_logit(ddp_fake, ddp_disc, feats, x, y, args))
                        loss_fake, t_f["gan_d"] = loss_fake + args.gan_d_weight * d.mean(), d.mean().detach()
                (loss_fake / args.grad_accum).backward()
            terms.append(t_f)
        if gen_turn:
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            gen_log.v.copy_(torch.stack([*mean_terms(gen_terms).values(), gnorm]))
        fnorm = torch.nn.utils.clip_grad_norm_([*fake.parameters(), *disc.parameters()], args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), **dict(zip(["loss", "dm_grad", "gan_g", "grad_norm"], gen_log.v.clone())), "fake_grad_norm": fnorm}
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
