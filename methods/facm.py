"""FACM: Flow-Anchored Consistency Models, a consistency map kept stable by a flow-matching anchor.

Paper: Peng, Zhu, Liu, Wu, Li, Sun, Wu, "Flow-Anchored Consistency Models", 2025 (arXiv 2507.03738).
Official code: github.com/ali-vilab/FACM (losses.py, train.py, sampler.py; read at 9be03f7 to check
the loss, its weights, the time law, the guidance interval and the sampler; nothing copied).

Idea: one network holds two tasks. The consistency (CM) output is the average velocity to the data
end, u = net(x_t, t, 0, y), so that f(x_t, t) = x_t - t u; the flow-matching (FM) output is the
instantaneous velocity net(x_t, t, t, y). The CM term is continuous-time consistency written as the
MeanFlow identity at s = 0 (u = v - t du/dt on the exact map), the FM term an ordinary flow-matching
loss that anchors the shared weights to the velocity field (the paper's remedy for the instability
of continuous-time consistency training). In the project notation (data at t = 0, x_t = (1 - t) x + t e):

    v      = v_u + w (v_c - v_u)   guided teacher (distillation; w on cfg_t_min <= t <= cfg_t_max)   or e - x (from data)
    (u, du_dt) = jvp(net(., ., 0, y), (x_t, t), (v, 1))          (no grad, fp32, the same dropout masks)
    g      = u - (v - t du_dt)                                     (zero on the exact map: -df/dt along the flow)
    target = sg(u) - a(t) clamp(g, -1, 1),   a(t) = 1 - (1 - t)^p, p = 0.5
    e      = mean_dims (u - target)^2,   l_CM = b(t) e / sg(e + c)^q,   b(t) = sin(pi t / 2), c = 1e-3, q = 0.5
    l_FM   = mean_dims (net(x_t, t, t, y) - v)^2 + mean(1 - cos(net(x_t, t, t, y), v))  (cosine over dim 1: channels; the 2 coordinates of toy data)
    loss   = mean_batch l_CM + mean_batch l_FM

Change of variables from the official code (data at t_F = 1, x = t_F x + (1 - t_F) e, velocity x - e,
losses.py:67-74,93): t = 1 - t_F, v = -v_F, and the official CM output F = -u, FM output = -net(x_t, t, t, y).
The tangent (v_F, 1) on (x, t_F) gives dF/dt_F = du/dt with tangent (v, 1) on (x_t, t) (the two signs cancel),
so the official g_F = F - (v_F + (1 - t_F) dF/dt_F) = -g, and since clamp is odd its target is minus ours:
the same loss. Checked: the official relaxation alpha = 1 - t_F^p (losses.py:135) is a(t) = 1 - (1 - t)^p
(0 at the data, 1 at the noise), and the official weight beta = cos(pi t_F / 2) (losses.py:139) is
b(t) = sin(pi t / 2), also 0 at the data end (NOT sin(pi t_F / 2)). Times (losses.py:21-34):
t = (2/pi) arctan(exp(N(time_mu, time_sigma^2))), the official t_F being one minus it: the normalized TrigFlow
angle used directly as linear time (quantiles 10/25/50/75/90% = .037/.096/.269/.588/.822); `--time-dist log`:
the official 't_type log', logit-normal LN(time_mu, time_sigma) (.055/.132/.310/.569/.777). Guidance
(losses.py:36-53, train.py:356-358): the official glow = 0.125, ghigh = 1 on t_F are cfg_t_max = 0.875,
cfg_t_min = 0; rows with the null label get no guidance. From data with --teacher-cfg > 1 the official
takes v_c = e - x and v_u from the CURRENT network's FM output with the null label (no grad), as here (outside
its interval it mixes in the net's conditional output; here those rows get v = e - x).
Where: sample_t (times), velocity (teacher / data, guidance), cm_parts (JVP, g), facm_loss, sample.

Network: our net embeds t and h = t - s, so CM = net(x_t, t, 0) and FM = net(x_t, t, t) is the official
r_embedder variant (auxiliary_time_cond, losses.py:102-104) without extra parameters. The released default
is the other variant (one time input, FM at the "expanded" time 2 - t_F); it needs a teacher pretrained on
both time intervals (the official one is, ldit/transport.py:189-193), which fm.py is not, so it is not offered.
Distillation (`--teacher`, the default): a frozen fm checkpoint, the student starts as a copy of it; no labels
are dropped (official disable_label_dropout): --label-dropout applies to the from-data mode only (`--teacher none`,
v = e - x, student from scratch). `--teacher oracle`: the exact gmm velocity, student from scratch.
The JVP runs in fp32 under --precision bf16 with no grad, inside fork_rng, so that the CM forward WITH grad
that follows draws the same dropout masks (the official resets the RNG state, losses.py:44-46,110,116); the FM
forward is a second grad call (DDP accepts both, one graph, one backward).
Sampler (sampler.py:179-245): consistency steps on t_k = linspace(1, 0, K + 1): x0 = x - t_k net(x, t_k, 0, y),
re-noise x = (1 - t_{k+1}) x0 + t_{k+1} n, return x0; `--sampler euler`: K Euler steps on the FM output.
No test-time guidance (official test.py: cfg 1).

Properties (tests/test_facm.py): with a teacher g is deterministic given x_t and the exact map is a fixed point
(clip and weight included). From data (v = e - x) it is not: the clip and the per-sample weight e / sg(e + c)^q
act on a residual holding the conditional e - x; at u* the expected CM gradient keeps a drift of 0.13-0.17 of
the per-sample gradient on the gmm (mean over points; up to 0.47), and the cosine part of the anchor pulls the
FM output toward the mean direction of e - x, not toward v* (a shift of 0.04-0.15 in velocity units). On
one-channel images (mnist) the cosine over the channel dim is sign(net) sign(v): a constant with zero gradient.

Deviations: no c_skip/c_out boundary machinery is needed (f(x, 0) = x by construction); post-hoc EMA (EDM2,
sigma_rel 0.2) replaced by the ordinary EMA; no torch.compile; the JVP forward and the grad forward are two
calls (the official takes the grad through the JVP's primal): about one forward pass more.
Cost per iteration (forward-pass equivalents): teacher 1 (2 with guidance), JVP about 2, CM forward + backward
3, FM forward + backward 3: about 9 (seed 002: 8).

Run:        python methods/facm.py --teacher oracle   (gmm, exact teacher, student from scratch)
            python methods/facm.py                    (gmm, teacher results/fm/gmm/model.safetensors)
            python methods/facm.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --eval-every 250
                --ckpt-every 250   (teacher results/fm/mnist/model.safetensors, the student a copy of it)
            python methods/facm.py --teacher none --label-dropout 0.1   (from data, v = e - x)
Paper (ImageNet-256, LightningDiT-XL/1 on VA-VAE f16d32 latents, train.sh; teacher: their 800-epoch FM net):
            --dataset imagenet-latent --teacher <fm checkpoint> --batch-size 1024 --lr 1e-4 --adam-betas 0.9 0.999
            --weight-decay 0 --grad-clip 1.0 --precision bf16 --teacher-cfg 1.75 --cfg-t-max 0.875 --time-mu -0.8
            --time-sigma 1.6 --relax-p 0.5 --steps 125000 (100 epochs: FID 1.32 at 2 NFE; 1.76 at 1 NFE after 250)
            --eval-steps 1 2; their EMA is post-hoc (sigma_rel 0.2), --ema-decay 0.9999 stands in.
Reference:  results/facm/<dataset>/ (teacher: the fm reference run of the same data set)
"""
import copy
import math
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
    """fm checkpoint of the teacher ({dataset} is replaced), `oracle` for the exact gmm velocity, or `none` (from data: v = e - x)"""
    teacher_cfg: float = 1.0
    """guidance w, v = v_u + w (v_c - v_u) (paper: 1.75; 1: none, so the target is the data law)"""
    cfg_t_min: float = 0.0
    """guidance applies for t in [cfg_t_min, cfg_t_max] (official 1 - ghigh = 0)"""
    cfg_t_max: float = 0.875
    """upper end of the guidance interval (official 1 - glow = 0.875)"""
    time_dist: str = "arctan"
    """arctan: t = (2/pi) arctan(exp(N(time_mu, time_sigma^2))) (official default) | log: t = sigmoid(N(time_mu, time_sigma^2))"""
    time_mu: float = -0.8
    """mean of the normal draw of the time law (official --mean 0.8, used as -0.8)"""
    time_sigma: float = 1.6
    """std of the normal draw of the time law (official --std 1.6)"""
    relax_p: float = 0.5
    """p of the relaxation a(t) = 1 - (1 - t)^p of the CM target (official --p 0.5)"""
    clip: float = 1.0
    """the CM direction g is clamped elementwise to [-clip, clip] (official 1)"""
    norm_c: float = 1e-3
    """c of the CM weight e / sg(e + c)^q (official 1e-3)"""
    norm_q: float = 0.5
    """q of the CM weight e / sg(e + c)^q (official 0.5; 0: plain mean squared error)"""
    sampler: str = "consistency"
    """consistency: jump to t = 0 and re-noise (official default) | euler: K Euler steps on the FM output"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.time_dist not in ("arctan", "log"):
        raise SystemExit(f"--time-dist {args.time_dist}: expected arctan or log")
    if args.sampler not in ("consistency", "euler"):
        raise SystemExit(f"--sampler {args.sampler}: expected consistency or euler")
    for name in ("time_sigma", "relax_p", "clip", "norm_c"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive value")
    if not args.norm_q >= 0 or not args.teacher_cfg >= 1:
        raise SystemExit(f"--norm-q {args.norm_q} / --teacher-cfg {args.teacher_cfg}: expected norm_q >= 0 and teacher_cfg >= 1")
    if not 0 <= args.cfg_t_min <= args.cfg_t_max <= 1:
        raise SystemExit(f"--cfg-t-min {args.cfg_t_min} / --cfg-t-max {args.cfg_t_max}: expected 0 <= min <= max <= 1")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def sample_t(n, args, like):
    """t in the dtype of `like` (losses.py:21-34; the official t_F is 1 - t)."""
    z = args.time_mu + args.time_sigma * torch.randn(n, device=like.device, dtype=like.dtype)
    if args.time_dist == "arctan":  # the normalized TrigFlow angle of sigma = exp(z), used as linear time
        return (2 / math.pi) * torch.atan(torch.exp(z))
    return torch.sigmoid(z)


@torch.no_grad()
def velocity(teacher, net, x, e, x_t, t, y, null, args):
    """The velocity v of the loss: the teacher's (distillation) or e - x (from data, `teacher` None), guided as
    v_u + w (v_c - v_u) for cfg_t_min <= t <= cfg_t_max on labelled rows; from data v_u is the current network's
    FM output with the null label (losses.py:36-53)."""
    if teacher is None:
        v_c = e - x
        if args.teacher_cfg == 1.0:
            return v_c
        v_u = net(x_t, t, t, torch.full_like(y, null)).to(x.dtype)
    else:
        if args.teacher_cfg == 1.0:
            return teacher(x_t, t, t, y).to(x.dtype)
        v_c, v_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).to(x.dtype).chunk(2)
    w = torch.where((t >= args.cfg_t_min) & (t <= args.cfg_t_max) & (y != null), args.teacher_cfg, 1.0)
    return v_u + bc(w, x_t).to(x.dtype) * (v_c - v_u)


def cm_parts(net, x_t, t, v, y):
    """One forward WITH grad u = net(x_t, t, 0, y) and the no-grad direction g = u - (v - t du/dt). The tangent
    is one torch.func.jvp under no_grad in fp32 (losses.py:115-132); fork_rng makes the grad forward reuse its
    dropout masks."""
    zero = torch.zeros_like(t)
    with torch.no_grad():
        devices = [x_t.device] if x_t.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.autocast(x_t.device.type, enabled=False):
            du_dt = torch.func.jvp(lambda z, t_: net(z, t_, zero, y), (x_t, t), (v, torch.ones_like(t)))[1]
    u = net(x_t, t, zero, y)
    with torch.no_grad():
        g = u.detach().to(x_t.dtype) - (v - bc(t, x_t) * du_dt)  # MeanFlow's identity at s = 0: zero on the exact map
    return u, g


def facm_loss(net, teacher, x, y, null, args):
    """FACM loss on a data batch x (losses.py:76-145): x_t = (1 - t) x + t e, the CM term on u = net(x_t, t, 0, y)
    and the FM anchor on net(x_t, t, t, y). `teacher(x_t, t, s, y)` or None (from data)."""
    e = torch.randn_like(x)
    t = sample_t(len(x), args, x)
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    v = velocity(teacher, net, x, e, x_t, t, y, null, args)
    u, g = cm_parts(net, x_t, t, v, y)
    u = u.to(x.dtype)  # fp32 in training (the DiT returns fp32 under autocast), float64 in the oracle tests
    a, b = 1 - (1 - t) ** args.relax_p, torch.sin(math.pi * t / 2)  # official 1 - t_F^p and cos(pi t_F / 2)
    target = u.detach() - bc(a, x) * g.clamp(-args.clip, args.clip)
    err = (u - target).pow(2).flatten(1).mean(1)
    l_cm = b * err / (err.detach() + args.norm_c) ** args.norm_q
    v_fm = net(x_t, t, t, y).to(x.dtype)
    cos = F.cosine_similarity(v_fm, v, dim=1).reshape(len(x), -1).mean(1)  # over the channels, per pixel
    l_fm = (v_fm - v).pow(2).flatten(1).mean(1) + (1 - cos)
    loss = l_cm.mean() + l_fm.mean()
    return loss, {"loss": loss.detach(), "cm": l_cm.detach().mean(), "fm": l_fm.detach().mean(), "cm_mse": err.detach().mean(),
                  "g_abs": g.abs().mean(), "clipped": (g.abs() > args.clip).float().mean()}


@torch.no_grad()
def sample(net, e, y, steps, sampler="consistency"):
    """K steps on t_k = linspace(1, 0, K + 1) (sampler.py:179-245): consistency, x0 = x - t_k net(x, t_k, 0, y) then
    x = (1 - t_{k+1}) x0 + t_{k+1} n, returning x0; euler, x <- x - (t_k - t_{k+1}) net(x, t_k, t_k, y)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    for k in range(steps):
        t = ts[k].expand(len(x))
        if sampler == "euler":
            x = x - (ts[k] - ts[k + 1]) * net(x, t, t, y)
            continue
        x0 = x - ts[k] * net(x, t, torch.zeros_like(t), y)
        x = (1 - ts[k + 1]) * x0 + ts[k + 1] * torch.randn_like(x0) if k < steps - 1 else x0
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

    teacher, teacher_net = (None, None) if args.teacher == "none" else load_teacher(args.teacher, args.dataset, info, device, loader.gmm)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, args.sampler)
    saved = {"net": net, "ema": ema, "opt": opt}
    ddp_net = ddp(net, world)
    facm_loss = compiled(facm_loss, args)  # --compile (common/run.py)

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
            if teacher is None:  # from data; the official distillation drops no labels (disable_label_dropout)
                y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = facm_loss(ddp_net, teacher, x, y, null, args)
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
