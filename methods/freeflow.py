"""FreeFlow: flow-map distillation without data (noise in, the teacher's field, nothing else).

Paper: Tong, Ma, Xie, Jaakkola, "Flow Map Distillation Without Data", 2025 (arXiv 2511.19428;
project page data-free-flow-distill.github.io). The official repository
(github.com/ShangyuanTong/FreeFlow) releases sampling code only: THIS FILE IS A RECONSTRUCTION
of the training from the paper's prose, and every constant the paper leaves out is a flag whose
docstring says "choice".

Idea: a data set may not represent what the (guided) teacher generates ("teacher-data mismatch"),
so the student sees only noise z ~ N(0, I), anchored at t = 1. Paper notation (delta = 1 - s, the
velocity pointing noise -> data) converts to ours as F_paper = -net(z, 1, 1 - delta):

    F(z, d) = net(z, 1, 1 - d, y),   f(z, d) = z - d F(z, d),   x0 = z - F(z, 1)
    prediction (a pred_frac share of the rows, d ~ `--d-dist`): the student's generating velocity
      must ride the teacher field, -df/dd = v_T(f, 1 - d):
      Delta_G = F + d dF_dd - v_T(sg f, 1 - d)     (dF_dd no grad: JVP in s with tangent -1, or a central difference)
      L_pred = w ||F - sg(F - Delta_G)||^2,  w = sg(1 / (||Delta_G||^2 / D + weight_eps)^k),  k = 1
    correction (the other rows, d = 1): the noised marginals of the student's samples must match
      the teacher's: x_r = (1 - r) sg(x0) + r n, r ~ LN(corr_mu, corr_sigma) on [corr_r_min, corr_r_max];
      Delta_N = v_N(x_r, r) - v_T(x_r, r)   (v_T guided only for r <= corr_cfg_t_max)
      L_corr = mean(F(z, 1) . sg(Delta_N))   (x0 moves along v_N - v_T = v_fake - v_real)
    loss = L_pred + lambda L_corr,  lambda = alpha E||Delta_G|| / (E||Delta_N|| + eps)   (sg, per micro-batch)
    auxiliary v_N (a copy of the teacher, trained online):  ||v_N(x_t, t) - (n - sg(x0))||^2,  t ~ U(0, 1)

Paper facts used: the adaptive weight with k = 1 (ablation: prediction alone k 0 / .5 / 1 -> FID 11.9 / 11.7 /
12.4, with correction 43.5 / 10.6 / 5.6); the derivative by a finite difference under stop-grad (the JVP of
`--deriv jvp` is an exact alternative); the correction r biased to high noise ("logit-normal 0.8") over a range
reaching r = 1 ([0, 0.6] gives FID 91.8); lambda from the ratio of the two gradient norms with alpha robust in
[0.3, 3]; guidance truncated at t <= 0.7 for the correction target; the 75 / 25 split. Choices (not in the
paper): the law of d, the FD step, weight_eps, corr_sigma, alpha = 1, whether E||Delta_G|| is taken before or
after the weight w (`--lambda-ref`), the auxiliary net's time law (uniform), lr and one update per step, and
that it learns from the correction rows' x0 only. Labels: only those of the data batch are used (x is
discarded): the data set's class frequencies, as the evaluation uses. Where: sample_d / sample_r (times), guided
(teacher), deriv (dF_dd), freeflow_loss (both terms in ONE student forward with grad: prediction rows then
correction rows, DDP-safe), aux_loss, sample. The no-grad derivative pass runs on the whole batch inside
fork_rng (fp32 under bf16): the grad forward reuses its dropout masks. The student and v_N start as copies of
the teacher checkpoint (--hidden, --depth ... ignored; fresh nets with `--teacher oracle`). Only maps from t = 1
are trained: 1 step is the paper's use. A K-step sample's first jump leaves t = 1, every later one starts below
t = 1, a map this loss never trains: the 2- and 4-step numbers of results/freeflow/ are NOT FreeFlow's numbers.

Run:        python methods/freeflow.py --eval-every 500   (gmm; the reference run took 52 min on 1 CPU thread; --deriv fd: the paper's)
            python methods/freeflow.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99
                --eval-every 250 --ckpt-every 250 --aux-lr 1e-4   (the reference run: 40 min on 1 CPU thread, shared)
Paper (SiT-XL/2 + REPA teacher): ImageNet 256 1-NFE FID 1.45 (teacher 1.37 at 434 NFE); 512: 1.49. Runs: results/freeflow/
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
    cfg_t_min: float = 0.0
    """teacher guidance applies for t in [cfg_t_min, cfg_t_max] (prediction target)"""
    cfg_t_max: float = 1.0
    """upper end of the guidance interval of the prediction target (choice: the paper states only the correction's)"""
    corr_cfg_t_max: float = 0.7
    """the correction target is guided only for r <= this (paper: 0.7)"""
    pred_frac: float = 0.75
    """share of the rows in the prediction loss, the rest in the correction loss (paper: 75 / 25)"""
    d_dist: str = "uniform"
    """law of the prediction step d = 1 - s: uniform | logit-normal LN(d_mu, d_sigma) (choice: not published)"""
    d_mu: float = 0.0
    """mean of the logit-normal d (choice)"""
    d_sigma: float = 1.0
    """std of the logit-normal d (choice)"""
    deriv: str = "jvp"
    """dF/dd: jvp (exact, forward mode) | fd (central finite difference, the paper's; one-sided at d = 0 or 1)"""
    fd_step: float = 1e-3
    """finite-difference step h of --deriv fd (choice)"""
    weight_k: float = 1.0
    """power k of the adaptive weight 1 / (||Delta_G||^2 / D + weight_eps)^k (paper: 1)"""
    weight_eps: float = 0.01
    """constant of the adaptive weight (choice)"""
    corr_mu: float = 0.8
    """mean of the logit-normal correction time r (paper: "logit-normal 0.8")"""
    corr_sigma: float = 1.0
    """std of the logit-normal correction time r (choice)"""
    corr_r_min: float = 0.0
    """the correction time is corr_r_min + (corr_r_max - corr_r_min) * LN draw (paper: a range reaching 1)"""
    corr_r_max: float = 1.0
    """upper end of the correction range (paper ablation: 0.6 -> FID 91.8)"""
    alpha: float = 1.0
    """lambda = alpha E||Delta_G|| / (E||Delta_N|| + eps) (paper: robust in [0.3, 3]; 1 is a choice)"""
    lambda_ref: str = "pre"
    """E||Delta_G|| before (pre) or after (post) the adaptive weight w (choice: not stated)"""
    lambda_eps: float = 1e-8
    """eps of the lambda ratio (choice)"""
    aux_lr: float = 1e-3
    """AdamW learning rate of the auxiliary velocity net v_N (choice)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.deriv not in ("jvp", "fd") or args.d_dist not in ("uniform", "logit-normal") or args.lambda_ref not in ("pre", "post"):
        raise SystemExit(f"--deriv {args.deriv} / --d-dist {args.d_dist} / --lambda-ref {args.lambda_ref}: "
                         "expected jvp or fd / uniform or logit-normal / pre or post")
    if not args.fd_step > 0:
        raise SystemExit(f"--fd-step {args.fd_step}: expected a positive finite-difference step")
    if not 0 < args.pred_frac < 1:
        raise SystemExit(f"--pred-frac {args.pred_frac}: expected a value in (0, 1) (both losses need rows)")
    if not 0 <= args.corr_r_min < args.corr_r_max <= 1 or not 0 <= args.cfg_t_min <= min(args.cfg_t_max, args.corr_cfg_t_max) <= 1:
        raise SystemExit(f"--corr-r-min {args.corr_r_min} / --corr-r-max {args.corr_r_max} / --cfg-t-min {args.cfg_t_min} / "
                         f"--cfg-t-max {args.cfg_t_max} / --corr-cfg-t-max {args.corr_cfg_t_max}: expected ranges inside [0, 1]")
    for name in ("weight_eps", "d_sigma", "corr_sigma", "alpha", "lambda_eps", "aux_lr"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive value")
    if args.weight_k < 0:
        raise SystemExit(f"--weight-k {args.weight_k}: expected a value >= 0")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def sample_d(n, args, like):
    kw = dict(device=like.device, dtype=like.dtype)
    if args.d_dist == "uniform":
        return torch.rand(n, **kw)
    return torch.sigmoid(args.d_mu + args.d_sigma * torch.randn(n, **kw))


def sample_r(n, args, like):
    r = torch.sigmoid(args.corr_mu + args.corr_sigma * torch.randn(n, device=like.device, dtype=like.dtype))
    return args.corr_r_min + (args.corr_r_max - args.corr_r_min) * r


def guided(teacher, x_t, t, y, null, w, t_min, t_max):
    """Teacher velocity v_u + w (v_c - v_u) for t in [t_min, t_max], plain v_c outside."""
    if w == 1.0:
        return teacher(x_t, t, t, y)
    v_c, v_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).chunk(2)
    return v_u + bc(torch.where((t >= t_min) & (t <= t_max), w, 1.0), x_t).to(v_c.dtype) * (v_c - v_u)


@torch.no_grad()
def deriv(net, z, d, y, args):
    """dF/dd of F(z, d) = net(z, 1, 1 - d, y) on every row, fp32, inside fork_rng (the grad forward
    that follows reuses the dropout masks). jvp: tangent -1 on s; fd: central difference with step
    h, one-sided where d +- h leaves [0, 1] (O(h) there)."""
    one = torch.ones_like(d)
    with torch.autocast(z.device.type, enabled=False):
        if args.deriv == "jvp":
            with torch.random.fork_rng(devices=[z.device] if z.is_cuda else []):
                return torch.func.jvp(lambda s_: net(z, one, s_, y), (1 - d,), (-one,))[1].to(z.dtype)
        hi, lo = (d + args.fd_step).clamp(max=1), (d - args.fd_step).clamp(min=0)
        F = []
        for dd in (hi, lo):
            with torch.random.fork_rng(devices=[z.device] if z.is_cuda else []):
                F.append(net(z, one, 1 - dd, y).to(z.dtype))
        return (F[0] - F[1]) / bc(hi - lo, z)


def freeflow_loss(net, aux, teacher_v, teacher_vc, z, y, args):
    """Prediction + lambda * correction on noise z (no data). `teacher_v(x, t, y)` is the guided
    teacher of the prediction target, `teacher_vc` the one of the correction (guidance truncated),
    `aux(x, t, s, y)` the auxiliary velocity net v_N (called without grad). The first n_p rows are
    prediction rows, the others correction rows (d = 1). Returns (loss, terms, sg(x0) of the
    correction rows, their labels) for the auxiliary update."""
    n = len(z)
    n_p = min(max(round(args.pred_frac * n), 1), n - 1)
    d = torch.cat([sample_d(n_p, args, z), torch.ones(n - n_p, device=z.device, dtype=z.dtype)])
    dF = deriv(net, z, d, y, args)[:n_p]
    F = net(z, torch.ones_like(d), 1 - d, y).to(z.dtype)  # the one student forward WITH grad
    with torch.no_grad():
        Fs, zp, yp, dp = F.detach()[:n_p], z[:n_p], y[:n_p], d[:n_p]
        f = zp - bc(dp, zp) * Fs
        dG = Fs + bc(dp, zp) * dF - teacher_v(f, 1 - dp, yp).to(z.dtype)
        w = (dG.flatten(1).pow(2).mean(1) + args.weight_eps) ** -args.weight_k
        x0, yc = z[n_p:] - F.detach()[n_p:], y[n_p:]
        r = sample_r(n - n_p, args, z)
        x_r = (1 - bc(r, x0)) * x0 + bc(r, x0) * torch.randn_like(x0)
        dN = aux(x_r, r, r, yc).to(z.dtype) - teacher_vc(x_r, r, yc).to(z.dtype)
        g_norm = dG.flatten(1).norm(dim=1)
        ref = g_norm if args.lambda_ref == "pre" else w * g_norm
        lam = args.alpha * ref.mean() / (dN.flatten(1).norm(dim=1).mean() + args.lambda_eps)
    loss_pred = (bc(w, zp) * (F[:n_p] - (Fs - dG)) ** 2).flatten(1).sum(1).mean()
    loss_corr = (F[n_p:] * dN).flatten(1).sum(1).mean()
    loss = loss_pred + lam * loss_corr
    terms = {"loss": loss.detach(), "loss_pred": loss_pred.detach(), "loss_corr": loss_corr.detach(), "lambda": lam,
             "dg_norm": g_norm.mean(), "dn_norm": dN.flatten(1).norm(dim=1).mean(), "w": w.mean()}
    return loss, terms, x0, yc


def aux_loss(aux, x0, y):
    """Flow matching of v_N on sg(x0): ||v_N(x_t, t) - (n - x0)||^2, t ~ U(0, 1) (choice)."""
    x0 = x0.detach()
    t = torch.rand(len(x0), device=x0.device, dtype=x0.dtype)
    n = torch.randn_like(x0)
    x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * n
    return ((aux(x_t, t, t, y).to(x0.dtype) - (n - x0)) ** 2).flatten(1).sum(1).mean()


@torch.no_grad()
def sample(net, e, y, steps):
    """K flow-map steps: x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
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

    teacher, teacher_net = load_teacher(args.teacher, args.dataset, info, device, loader.gmm)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    aux = copy.deepcopy(net)  # v_N, the velocity of the student's samples; starts at the teacher (or a fresh net)
    net.grad_ckpt = aux.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    opt_aux = torch.optim.AdamW(aux.parameters(), lr=args.aux_lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    teacher_v = lambda x, t, y: guided(teacher, x, t, y, null, args.teacher_cfg, args.cfg_t_min, args.cfg_t_max)
    teacher_vc = lambda x, t, y: guided(teacher, x, t, y, null, args.teacher_cfg, args.cfg_t_min, min(args.cfg_t_max, args.corr_cfg_t_max))
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt, "aux": aux, "opt_aux": opt_aux}  # what a checkpoint holds besides the data stream
    ddp_net, ddp_aux = ddp(net, world), ddp(aux, world)
    freeflow_loss, aux_loss = compiled(freeflow_loss, args), compiled(aux_loss, args)  # --compile (common/run.py)

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
        warm = min(1.0, (step + 1) / max(args.warmup, 1))
        for o, lr in ((opt, args.lr), (opt_aux, args.aux_lr)):
            for g in o.param_groups:
                g["lr"] = lr * warm
        net.train()
        aux.train()
        _, y = next(loader)  # this rank's share of the global batch: only its labels are used (no data)
        terms = []
        for i, y in enumerate(y.chunk(args.grad_accum)):
            torch.manual_seed(micro_seed(args.seed, step, rank * args.grad_accum + i))
            y = y.to(device, non_blocking=True)
            y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
            z = torch.randn(len(y), *info["shape"], device=device)  # the only input: noise
            with no_sync([ddp_net, ddp_aux], i < args.grad_accum - 1):
                with amp:  # v_N is called without grad inside (unwrapped), with grad once in aux_loss
                    loss, t_i, x0, y_c = freeflow_loss(ddp_net, aux, teacher_v, teacher_vc, z, y, args)
                    loss_aux = aux_loss(ddp_aux, x0, y_c)
                ((loss + loss_aux) / args.grad_accum).backward()
            terms.append({**t_i, "aux_loss": loss_aux.detach()})
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        gnorm_aux = torch.nn.utils.clip_grad_norm_(aux.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), "grad_norm": gnorm, "aux_grad_norm": gnorm_aux}
        stop_if_nonfinite(terms, step, run_dir)
        for o in (opt, opt_aux):
            o.step()
            o.zero_grad(set_to_none=True)
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
