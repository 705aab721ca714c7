"""Align Your Flow (AYF): flow maps distilled from a flow-matching teacher, Eulerian (EMD) or Lagrangian (LMD).

Paper: Sabour, Fidler, Kreis, "Align Your Flow: Scaling Continuous-Time Flow Map Distillation",
NeurIPS 2025 (arXiv 2506.14603). No standalone release; the official implementation of the EMD
loss is NVIDIA's FastGen (github.com/NVlabs/FastGen, fastgen/methods/consistency_model/mean_flow.py,
MeanFlowModel with loss_config.use_cd = True, loss_type "opt_grad"); a third-party version is
revsic/torch-flow-models (src/flowmodels/alignyourflow.py). Both were read to check the loss, the
normalization, the warm-up, the times and the samplers; nothing copied.

Idea: the network gives the average velocity u = net(x_t, t, s, y) of the flow map
f(x_t, t, s) = x_t - (t - s) u (AYF's c_skip = 1, c_out = s - t; same time direction as ours:
data at t = 0). The teacher velocity v_T (the fm checkpoint, guided) defines the ODE; the map is
consistent with it when (Eulerian) d/dt f(x_t, t, s) = 0 along the teacher's flow, or (Lagrangian)
d/ds f(x_t, t, s) = v_T(f, s). Each gives a gradient direction g and a stop-gradient regression
with a normalized step (the paper's tangent normalization):

    EMD  du_dt = jvp(net(., ., s, y), (x_t, t), (v_T, 1))              (no grad, fp32, same dropout masks)
         g = (sg(u) - v_T(x_t, t)) + r (t - s) du_dt                       (r: tangent warm-up 0 -> r_max)
    LMD  du_ds = jvp(net(x_t, t, ., y), (s,), (1,))
         g = (sg(u) - (t - s) du_ds) - v_T(x_t - (t - s) sg(u), s)
    g <- g / sqrt(D) (`--norm-dim`),  w = 1 / (||g|| + c),  c = 0.1
    loss = sum_dims (u - sg(u - w g))^2   (`--space u`, FastGen)   or   sum_dims (f - sg(f + w g))^2   (`--space f`, revsic)

The f-space form weights the u-gradient by an extra (t - s). At r = 1 and the exact flow map of
v_T, g = 0 for both objectives; at r < 1 the EMD fixed point is biased by (1 - r)(t - s) du_dt
(tests/test_ayf.py checks both).
AYF = map distillation + stop-gradient + tangent normalization: EMD and LMD are Boffi, Albergo, Vanden-Eijnden's
Eulerian / Lagrangian map distillation (arXiv 2406.07507; 2505.18825 App. B), loss ||g||^2 differentiated through
u, its JVP and (LMD) the teacher's input f. AYF keeps the gradient through u alone: 2 w g du/dtheta, the stop-gradient
version of sg(w) ||g||^2. `--tangent-grad` removes that stop-gradient (one JVP WITH grad, forward-AD dual numbers in
fp32): 2 w g dg/dtheta, Boffi's loss under AYF's weight w (||g|| << c: Boffi's plain loss / c; >> c: the norm
2 ||g||); the logged loss is ||w g||^2 either way. (The 2024 code's `lagrangian_distill` differentiates the map at
its output instead of at x_t, and does not import: not followed.) Times (`--time-dist pair`, FastGen): two draws of LN(-0.8, 1.6)
clamped to [t_eps, 1 - t_eps], t = max, s = min, and s = t on a fraction 1 - ratio of the rows
(FastGen r_sample_ratio); `--time-dist gap`: d = sigmoid(N(gap_mu, gap_sigma)), s ~ U(0, 1 - d),
t = s + d (an unverified re-implementation's law, also used by fsf_dmd.py). Guidance: classifier-
free on the teacher inside [cfg_t_min, cfg_t_max] (FastGen guidance_t_start/end); the paper uses
autoguidance (a weaker teacher: pass --weak-teacher, then v = v_weak + w (v_T - v_weak)).
Sampling: K flow-map steps; gamma-sampling (`--sample-gamma`) jumps from t_k to (1 - gamma) t_{k+1}
and re-noises to t_{k+1}: gamma 0 is deterministic (FastGen "ode"), gamma 1 jumps to 0 and
re-noises (FastGen "sde", consistency-model sampling).
Where: sample_ts (times), guided (teacher), ayf_g (EMD / LMD directions, with or without the stop-gradient),
ayf_loss (normalized regression), sample (deterministic and gamma sampler).

Official code over the paper: r_max defaults to 1.0 (FastGen ramps its warmup weight to 1; the
paper and revsic use 0.99, which biases the fixed point); the times are FastGen's. Deviations: no
adversarial fine-tuning and no linearity-regularized warm-up phase (paper); the JVP is exact
(FastGen's Wan config uses a finite difference); FastGen clips t - s below at min_t (so s = t rows
keep a 0.001 tangent term), here t - s is used as is; the sums and the batch mean as FastGen's
(revsic takes a mean over all elements). LMD uses no warm-up (the paper describes it for EMD; a
choice). The JVP runs in fp32 under --precision bf16, inside fork_rng so that the one forward
WITH grad that follows draws the same dropout masks (one grad call per micro-batch, DDP-safe).
With a teacher checkpoint the student starts as a copy of it (--hidden, --depth ... are ignored).
Labels: 10% become the null label (--label-dropout 0.1, as in every file); FastGen's consistency-
distillation branch (use_cd) drops none: --label-dropout 0 follows it.

Run:        python methods/ayf.py --eval-every 500   (gmm, teacher results/fm/gmm/model.safetensors; the reference
                run took 49 min on 1 CPU thread); --objective lmd: Lagrangian; --teacher oracle: the exact gmm velocity
            python methods/ayf.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --eval-every 250
                --ckpt-every 250 --tangent-warmup 200   (the reference run: 38 min on 1 CPU thread, shared)
Paper / code values: c = 0.1 (FastGen norm_const; 10.0 with --norm-dim on Wan), r_max 0.99 paper,
warm-up 2000 steps (FastGen Wan), LN(-0.8, 1.6) (FastGen Wan), AdamW lr 1e-5 (Wan), guidance
autoguidance (paper), 3.0 CFG (FastGen Wan). Reference: results/ayf/<dataset>/
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
    weak_teacher: Optional[str] = None
    """autoguidance (paper): a weaker fm checkpoint, v = v_weak + w (v_T - v_weak); default CFG with the null label"""
    teacher_cfg: float = 1.0
    """guidance w of the teacher (1: none, so the target is the data law; FastGen Wan: 3.0)"""
    cfg_t_min: float = 0.0
    """guidance applies for t in [cfg_t_min, cfg_t_max] (FastGen guidance_t_start)"""
    cfg_t_max: float = 1.0
    """upper end of the guidance interval (FastGen guidance_t_end)"""
    objective: str = "emd"
    """emd (Eulerian, default, the paper's main objective) | lmd (Lagrangian)"""
    tangent_grad: bool = False
    """differentiate through the tangent g (its JVP; for lmd also v_T's input f): Boffi et al.'s EMD / LMD, AYF without its stop-gradient"""
    space: str = "u"
    """u: regression on the average velocity (FastGen) | f: on the flow map (revsic, extra (t - s) weight)"""
    norm_eps: float = 0.1
    """c of the tangent normalization w = 1 / (||g|| + c) (paper and FastGen: 0.1)"""
    norm_dim: bool = False
    """divide g by sqrt(D) before normalizing, so c does not depend on the dimension (FastGen tangent_spatial_invariance)"""
    r_max: float = 1.0
    """final tangent weight r of EMD (FastGen: 1.0; paper and revsic: 0.99, a biased fixed point)"""
    tangent_warmup: int = 500
    """steps over which r ramps linearly from 0 to r_max (0: r_max from the start; not in the paper; FastGen Wan 2000)"""
    time_dist: str = "pair"
    """pair: t, s = max, min of two LN(time_mu, time_sigma) draws (FastGen) | gap: d = sigmoid(N(gap_mu, gap_sigma)), s ~ U(0, 1 - d)"""
    time_mu: float = -0.8
    """mean of the logit-normal time draws (FastGen Wan -0.8; revsic -0.8)"""
    time_sigma: float = 1.6
    """std of the logit-normal time draws (FastGen Wan 1.6; revsic 1.0)"""
    t_eps: float = 0.001
    """pair draws are clamped to [t_eps, 1 - t_eps] (FastGen Wan min_t / max_t)"""
    gap_mu: float = -0.6
    """mean of the gap logit of --time-dist gap"""
    gap_sigma: float = 1.6
    """std of the gap logit of --time-dist gap"""
    ratio: float = 1.0
    """fraction of the rows with s != t, the others s = t (FastGen r_sample_ratio; its Wan config 1.0)"""
    sample_gamma: float = 0.0
    """gamma-sampling: 0 deterministic flow-map steps, 1 jump to 0 and re-noise (consistency sampling)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.objective not in ("emd", "lmd"):
        raise SystemExit(f"--objective {args.objective}: expected emd or lmd")
    if args.space not in ("u", "f") or args.time_dist not in ("pair", "gap"):
        raise SystemExit(f"--space {args.space} / --time-dist {args.time_dist}: expected u or f / pair or gap")
    for name in ("r_max", "ratio", "sample_gamma"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if args.tangent_warmup < 0:
        raise SystemExit(f"--tangent-warmup {args.tangent_warmup}: expected an integer >= 0")
    if not args.norm_eps > 0 or not args.time_sigma > 0 or not args.gap_sigma > 0 or not 0 <= args.t_eps < 0.5:
        raise SystemExit(f"--norm-eps {args.norm_eps} / --time-sigma {args.time_sigma} / --gap-sigma {args.gap_sigma} / --t-eps {args.t_eps}: "
                         "expected positive values and t_eps in [0, 0.5)")
    if not 0 <= args.cfg_t_min <= args.cfg_t_max <= 1:
        raise SystemExit(f"--cfg-t-min {args.cfg_t_min} / --cfg-t-max {args.cfg_t_max}: expected 0 <= min <= max <= 1")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def sample_ts(n, args, like):
    """(t, s), s <= t, in the dtype of `like`; s = t on the first n - round(ratio n) rows."""
    kw = dict(device=like.device, dtype=like.dtype)
    if args.time_dist == "pair":  # FastGen: two logit-normal draws, reordered
        a, b = torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(2, n, **kw)).clamp(args.t_eps, 1 - args.t_eps)
        t, s = torch.maximum(a, b), torch.minimum(a, b)
    else:
        d = torch.sigmoid(args.gap_mu + args.gap_sigma * torch.randn(n, **kw))
        s = (1 - d) * torch.rand(n, **kw)
        t = s + d
    return t, torch.where(torch.arange(n, device=like.device) < n - round(args.ratio * n), t, s)


def guided(teacher, x_t, t, y, null, args, weak=None):
    """Teacher velocity v_u + w (v_c - v_u) inside [cfg_t_min, cfg_t_max]; with a weak teacher
    (autoguidance) v_weak(x_t, t, y) takes the place of the unconditional v_u."""
    if args.teacher_cfg == 1.0:
        return teacher(x_t, t, t, y)
    if weak is not None:
        v_c, v_u = teacher(x_t, t, t, y), weak(x_t, t, t, y)
    else:
        v_c, v_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).chunk(2)
    w = torch.where((t >= args.cfg_t_min) & (t <= args.cfg_t_max), args.teacher_cfg, 1.0)
    return v_u + bc(w, x_t).to(v_c.dtype) * (v_c - v_u)


def ayf_g(net, teacher_v, x_t, t, s, y, r, objective, tangent_grad=False):
    """One forward WITH grad u = net(x_t, t, s, y) and the no-grad direction g (EMD or LMD).
    `teacher_v(x, t, y)` is the guided teacher velocity. The tangent is one torch.func.jvp under
    no_grad in fp32; fork_rng makes the grad forward reuse its dropout masks. tangent_grad: one JVP
    WITH grad in fp32 instead (forward-AD dual numbers: a plain module call, DDP-safe, one set of
    dropout masks), and g itself carries the gradient, for LMD also through the teacher's input f."""
    h = bc(t - s, x_t)
    if tangent_grad:
        fwAD = torch.autograd.forward_ad
        with torch.no_grad():
            v = teacher_v(x_t, t, y).to(x_t.dtype) if objective == "emd" else None
        with fwAD.dual_level(), torch.autocast(x_t.device.type, enabled=False):
            if objective == "emd":  # the same tangent (v_T, 1) on (x_t, t) as below, now differentiable
                u, du = fwAD.unpack_dual(net(fwAD.make_dual(x_t, v), fwAD.make_dual(t, torch.ones_like(t)), s, y))[:2]
            else:
                u, du = fwAD.unpack_dual(net(x_t, t, fwAD.make_dual(s, torch.ones_like(s)), y))[:2]
        du, u_ = torch.zeros_like(x_t) if du is None else du.to(x_t.dtype), u.to(x_t.dtype)  # None: a net that ignores s
        if objective == "emd":  # Boffi's EMD: the residual's full gradient, through u and du_dt (spatial and time)
            return u, (u_ - v) + r * h * du
        return u, (u_ - h * du) - teacher_v(x_t - h * u_, s, y).to(x_t.dtype)  # Boffi's LMD: and through v_T at f
    with torch.no_grad():
        if objective == "emd":
            v = teacher_v(x_t, t, y).to(x_t.dtype)
        devices = [x_t.device] if x_t.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.autocast(x_t.device.type, enabled=False):
            if objective == "emd":  # total derivative along the teacher flow, s fixed
                du = torch.func.jvp(lambda z, t_: net(z, t_, s, y), (x_t, t), (v, torch.ones_like(t)))[1]
            else:  # derivative in the target time s
                du = torch.func.jvp(lambda s_: net(x_t, t, s_, y), (s,), (torch.ones_like(s),))[1]
    u = net(x_t, t, s, y)
    with torch.no_grad():
        u_sg = u.detach().to(x_t.dtype)
        if objective == "emd":  # d/dt [(t - s) u] - v_T: zero on the exact map when r = 1
            g = (u_sg - v) + r * h * du
        else:  # d/ds f - v_T(f, s), f = x_t - (t - s) u
            g = (u_sg - h * du) - teacher_v(x_t - h * u_sg, s, y).to(x_t.dtype)
    return u, g


def ayf_loss(net, teacher_v, x, y, r, args):
    """AYF loss on a data batch x: x_t = (1 - t) x + t e, then the normalized regression on g."""
    e = torch.randn_like(x)
    t, s = sample_ts(len(x), args, x)
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    u, g = ayf_g(net, teacher_v, x_t, t, s, y, r, args.objective, args.tangent_grad)
    live = g  # --tangent-grad: g carries the gradient (the block below rebinds g under no_grad)
    with torch.no_grad():
        g_norm = g.flatten(1).norm(dim=1)
        if args.norm_dim:  # FastGen: tangent * sqrt(B / numel)
            g = g / g[0].numel() ** 0.5
        w = 1 / (g.flatten(1).norm(dim=1) + args.norm_eps)
        step = bc(w, g) * g
    u = u.to(x.dtype)  # fp32 in training (the DiT returns fp32 under autocast), float64 in the oracle tests
    if args.tangent_grad:  # gradient 2 w g dg, of sg(w) ||g||^2 (the default: dg -> du); times (t - s) in f-space
        a = live if args.space == "u" else bc(t - s, x) * live
        loss = ((a - (a.detach() - step)) ** 2).flatten(1).sum(1).mean()
    elif args.space == "u":
        loss = ((u - (u.detach() - step)) ** 2).flatten(1).sum(1).mean()
    else:
        f = x_t - bc(t - s, x) * u
        loss = ((f - (f.detach() + step)) ** 2).flatten(1).sum(1).mean()
    return loss, {"loss": loss.detach(), "g_norm": g_norm.mean(), "w": w.mean(), "r": torch.tensor(float(r))}


@torch.no_grad()
def sample(net, e, y, steps, gamma=0.0):
    """K flow-map steps on linspace(1, 0, K + 1); gamma-sampling: jump from t_k to
    s = (1 - gamma) t_{k+1}, then re-noise to t_{k+1}: x <- a x + sqrt(t_{k+1}^2 - a^2 s^2) n,
    a = (1 - t_{k+1}) / (1 - s) (the forward process of x_t = (1 - t) x + t e from s to t_{k+1})."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    for k in range(steps):
        t, t_next = ts[k], ts[k + 1]
        s = (1 - gamma) * t_next
        x = x - (t - s) * net(x, t.expand(len(x)), s.expand(len(x)), y)
        if gamma > 0 and t_next > 0:
            a = (1 - t_next) / (1 - s)
            x = a * x + (t_next**2 - a**2 * s**2).clamp(min=0).sqrt() * torch.randn_like(x)
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

    teacher, teacher_net = load_teacher(args.teacher, args.dataset, info, device, loader.gmm)
    weak = load_teacher(args.weak_teacher, args.dataset, info, device, loader.gmm)[0] if args.weak_teacher else None
    teacher_v = lambda x_t, t, y: guided(teacher, x_t, t, y, null, args, weak)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, args.sample_gamma)
    saved = {"net": net, "ema": ema, "opt": opt}
    ddp_net = ddp(net, world)
    ayf_loss = compiled(ayf_loss, args)  # --compile (common/run.py)

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
            y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
            r = args.r_max * min(1.0, (step + 1) / args.tangent_warmup) if args.tangent_warmup else args.r_max
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = ayf_loss(ddp_net, teacher_v, x, y, r, args)
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
