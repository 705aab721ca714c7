"""Drifting: a one-step generator trained by a drifting field between its samples and the data.

Paper: Deng, Li, Li, Du, He, "Generative Modeling via Drifting", 2026 (arXiv 2602.04770). Official
code (JAX): github.com/lambertae/drifting (drift_loss.py, train.py, configs/gen/latent_sota_B.yaml read
to check the kernel, the normalizations and the groups; nothing copied).

Idea: no time variable, no teacher. A generator x = G(e, y) maps noise to samples in one step; in a
feature space phi, each generated sample feels a field V that attracts it toward the data and repels it
from the other generated samples, and the generator regresses onto its own features moved along V,
under stop-gradient. At q = p the attraction and the repulsion cancel (up to the finite-group noise),
so the data law is a fixed point. In cleanflow notation (G(e, y) = e - net(e, 1, 0, y): the flow map
from t = 1 to s = 0, as every one-step file here):

    groups: rows of a micro-batch sharing a label (dropped labels: one unconditional group); per group,
            generated x_i = G(e_i, y), positives p_j = its data rows, negatives n_j = sg(x_j), j != i
    per feature map phi and location: d_ij = |phi(x_i) - phi(z_j)| (L2, not squared), z = [n; p];
            s = mean d (over every pair of every group and location), r = max(s / sqrt(D), 1e-3)
    per R in temps: k = -d / (s R) (self + 100 / R); A = sqrt(softmax_j(k) softmax_i(k)) (>= 1e-3)
            V_R(i) = sum_p A_ip (sum_n A_in) (z_p - x_i) - sum_n A_in (sum_p A_ip) (z_n - x_i)   (drift_loss.py:90-119)
    goal = sg(phi(x) / r + sum_R V_R / rms(V_R));   loss = sum_phi mean (phi(x) / r - goal)^2      (:120-131)

so a gradient step moves phi(x) / r by the normalized field: toward the positives, away from the other
samples. Features (--features): the raw sample flattened is always one map ("global", as the official
activation_fn); `classifier` adds the conv maps of the project's digit classifier (common/eval.py,
DigitCNN: both conv stages after pooling, per location [N, HW, C], plus their spatial mean and std, the
official per-layer set without its patch pooling) on mnist. The classifier's 128-d layer, the FID's
feature space, is not used; its conv layers feed it, so mnist FIDs of `classifier` runs favour this file
against the others (read acc too). Other image data (cifar10, latents) and vector data use raw features
only (a start-up line says so): the project has no encoder for them.

Deviations, all stated: the official draws per class G = 64 generated samples against P = 64 positives
from a per-class memory bank of 128 and N = 32 unconditional negatives (the CFG: weight (cfg - 1)(G - 1)
/ N, the generator conditioned on cfg ~ [1, 4]); here a group is the micro-batch rows of one label, its
data rows are its positives (G = P), no memory bank and no CFG (the official cfg = 1; label dropout gives
the unconditional group instead). Groups of unequal size share the scale s and rms(V_R) (official: equal
groups, the same global means) and the loss is a mean over rows. The feature space on images is a
digit classifier, not the paper's MAE (seed 002: Drifting "relies heavily on a good pre-trained feature
space"). Sampling: one generator step; `--eval-steps K` returns the same one-step sample for every K
(the generator has no time to step through; pass --eval-steps 1 to skip the duplicates).

Run:        python methods/drifting.py                  (2-D gmm, raw coordinates)
            python methods/drifting.py --dataset mnist --steps 5000 --batch-size 64 --hidden 128 --depth 4 --heads 4
                --patch-size 4 --eval-steps 1           (--features classifier, the default)
Paper defaults (ImageNet 256 latent, DiT-B/2): Adam lr 4e-4, betas (0.9, 0.95), 10k warm-up, grad clip
2.0, EMA 0.999, temps (0.02, 0.05, 0.2), 128 classes x 64 samples per step. Reference: results/drifting/<dataset>/
"""
import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from common.data import make_loader
from common.dit import DiT, MLP, save
from common.eval import Evaluator, mnist_classifier, save_grid, time_forward
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
    features: str = "classifier"
    """feature space of the field on images: classifier (the raw sample plus the digit classifier's conv maps,
    mnist only; other data fall back to raw) or pixels (the raw sample only); vector data: raw coordinates"""
    temps: tuple[float, ...] = (0.02, 0.05, 0.2)
    """kernel temperatures R, relative to the mean distance (official R_list)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.features not in ("classifier", "pixels"):
        raise SystemExit(f"--features {args.features}: expected classifier or pixels")
    if not args.temps or not all(r > 0 for r in args.temps):
        raise SystemExit(f"--temps {args.temps}: expected one or more temperatures > 0")


# ---------------------------------------------------------------- ALGO LOGIC
def fp32(x):
    """At least float32 (bf16 features are cast up as the official casts to float32; float64 stays, for tests)."""
    return x if x.dtype == torch.float64 else x.float()


def cdist(a, b):
    """[L, N, D] x [L, M, D] -> [L, N, M] L2 distances, the squared distance clipped at 1e-8 (official)."""
    sq = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)
    return sq.clamp_min(1e-8).sqrt()


@torch.no_grad()
def drift_forces(f, f_pos, y, y_pos, temps):
    """The raw field per temperature on features f [N, L, D] (generated) against f_pos [M, L, D] (data),
    groups by label: ([V_R, each [N, L, D] in scaled units], r). Targets: the generated samples
    themselves (negatives, self masked by +100 / R) then the positives (drift_loss.py:65-119)."""
    f, f_pos = fp32(f.transpose(0, 1)), fp32(f_pos.transpose(0, 1))  # locations first: [L, N, D]
    n, dim = f.shape[1], f.shape[2]
    z = torch.cat([f, f_pos], 1)
    same = (y[:, None] == torch.cat([y, y_pos])[None, :]).float()  # [N, N + M]: pairs inside a group
    d = cdist(f, z)
    s = (d * same).sum() / (same.sum() * d.shape[0])  # the mean distance over every group's pairs
    r = (s / dim ** 0.5).clamp_min(1e-3)  # coordinates scaled to order 1 per dimension
    dn = d / s.clamp_min(1e-3) + 100.0 * torch.eye(n, same.shape[1], device=f.device)  # no self-interaction
    forces = []
    for R in temps:
        k = (-dn / R).masked_fill(same == 0, float("-inf"))
        a = (k.softmax(-1) * k.softmax(-2)).clamp_min(1e-6).sqrt() * same  # over targets x over generated
        a_neg, a_pos = a[..., :n], a[..., n:]
        coef = torch.cat([-a_neg * a_pos.sum(-1, keepdim=True), a_pos * a_neg.sum(-1, keepdim=True)], -1)
        v = (coef @ z - coef.sum(-1, keepdim=True) * f) / r  # sum_j coef_ij (z_j - x_i)
        forces.append(v.transpose(0, 1))
    return forces, r


def drift_goal(f, f_pos, y, y_pos, temps):
    """(goal, r): goal = sg(f / r + sum_R V_R / rms(V_R)), each field scaled to unit RMS (official)."""
    forces, r = drift_forces(f, f_pos, y, y_pos, temps)
    return (fp32(f.detach()) / r + sum(v / v.pow(2).mean().clamp_min(1e-8).sqrt() for v in forces)).detach(), r


def feature_maps(x, encoder):
    """{name: [N, L, D]}: the raw sample as one vector (official "global"), then per encoder stage its
    map per location and its spatial mean and std (official use_mean / use_std, safe_std's eps 1e-6)."""
    out = {"global": x.flatten(1)[:, None]}
    h = x
    for i, stage in enumerate(encoder or []):
        h = stage(h)
        m = fp32(h.flatten(2).transpose(1, 2))  # [N, HW, C]
        out[f"conv{i}"], out[f"conv{i}_mean"] = m, m.mean(1, keepdim=True)
        out[f"conv{i}_std"] = (m.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    return out


def generate(net, e, y):
    """One step: x = G(e, y) = e - net(e, 1, 0, y), the flow map from t = 1 to s = 0."""
    return e - net(e, torch.ones(len(e), device=e.device), torch.zeros(len(e), device=e.device), y)


def drifting_loss(net, encoder, x, y, args):
    """Sum over feature maps of mean (phi(G(e)) / r - sg(goal))^2. Returns (loss, terms)."""
    x_gen = generate(net, torch.randn_like(x), y)
    with torch.no_grad():
        pos = feature_maps(x, encoder)
    gen = feature_maps(x_gen, encoder)
    loss, terms = 0.0, {}
    with torch.autocast(x.device.type, enabled=False):  # the field in fp32 (official casts to float32)
        for name, f in gen.items():
            goal, r = drift_goal(f, pos[name], y, y, args.temps)
            l_f = ((fp32(f) / r - goal) ** 2).mean()
            loss, terms[f"loss_{name}"] = loss + l_f, l_f.detach()
    return loss, {"loss": loss.detach(), **terms}


def drop_labels(y, null, args):
    """Label dropout to the null class, each row with probability --label-dropout (dropped: the unconditional group)."""
    return torch.where(torch.rand(len(y), device=y.device) < args.label_dropout, null, y)


@torch.no_grad()
def sample(net, e, y, steps):
    """The one-step sampler, x = G(e, y), for every step count (the generator has no time input to step)."""
    return generate(net, e, y)


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
    encoder = None  # the field on raw features; mnist with --features classifier: the digit classifier's conv stages
    if args.features == "classifier" and args.dataset == "mnist":
        clf = mnist_classifier()[0].to(device).requires_grad_(False).eval()
        encoder = [clf.conv[:3], clf.conv[3:6]]
    elif args.features == "classifier" and info["kind"] == "image" and rank == 0:
        print(f"drifting: --features classifier has no encoder for --dataset {args.dataset} (the digit classifier is mnist's): raw features")
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    drifting_loss = compiled(drifting_loss, args)  # --compile (common/run.py)

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
                    loss, t_i = drifting_loss(ddp_net, encoder, x, y, args)
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
