"""Rectified flow's reflow: flow matching on the teacher's ODE pairs (noise, endpoint), not on the data.

Paper: Liu, Gong, Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
Flow", ICLR 2023 (arXiv 2209.03003). Official code: github.com/gnobitab/RectifiedFlow (ImageGeneration/:
losses.py, sde_lib.py, run_lib_reflow.py, configs/rectified_flow/cifar10_rf_gaussian_reflow_*.py), read to
check the pairs, the time law, the initialization and the distillation stage; nothing copied.

Idea: a flow-matching teacher (1-RF, methods/fm.py) couples each noise e with its ODE endpoint
x^ = f_T(e, 1, 0). Flow matching on the pairs (e, x^) instead of independent (e, x) gives the
k+1-RF: its paths x_t = (1 - t) x^ + t e cross less, so its ODE is straighter and few Euler steps
reach the same endpoints (on one Gaussian one Euler step is exact; on the gmm mixture the lines never
cross, so one reflow is already straight: tests/test_reflow.py). The same data law, a new coupling:

    x^ = ODE_T(e, y)   (fixed steps from t = 1 to 0, no grad; `--pair-solver`, `--pair-steps`)
    L = E_{e, t} || net(x_t, t, t, y) - (e - x^) ||^2,   x_t = (1 - t) x^ + t e     (paper eq. 1 on the pairs)

`diff methods/fm.py methods/reflow.py`: the data x replaced by the teacher's ODE endpoint of the noise
(reflow_loss, teacher_pairs, the loop's `pairs`). Times: U(0, 1) (the official reflow
schedule 'uniform'); `--t-fixed 1` trains at t = 1 only, the one-step distillation stage: the loss is
then || x^ - (e - net(e, 1, 1, y)) ||^2, one Euler step onto the pair (paper: LPIPS, here L2). Pairs:
online (`--pairs` unset: each micro-batch draws e and solves the teacher's ODE; the official online
config train_online_reflow) or cached (`--pairs PATH`: a missing file is generated first, by replaying
the online stream of the first num_pairs / batch steps in one process, so that its rows are the online
pairs at the same seed bit for bit, and written atomically; then each micro-batch draws random rows, as
the official randperm per step). Labels: the loop's label dropout happens first, and a pair keeps the
label the teacher was sampled with (null: the unconditional ODE); `--teacher-cfg` guides the teacher.
Sampling: fm's Euler or Heun, plus RK4 (also the teacher's pair solver), over t_k = linspace(1, 0, K + 1).
Where: sample_t (time law, --t-fixed), reflow_loss (the loss on pairs), sample (the ODE of the student
and of the teacher), teacher_pairs (online pairs), replay_pairs / load_pairs / cached_pairs (the cache).

Official code over the spec: the student starts as a copy of the teacher (run_lib_reflow.py loads
reflow.last_flow_ckpt, "the rectified flow model to fine-tune"; it loads the 1-RF's online weights and
restarts the EMA, our teacher file holds only the EMA weights, which the student starts from); with
`--teacher oracle` (the exact gmm velocity) it starts fresh. Deviations: the official pairs use scipy
RK45 (rtol = atol = 1e-5) offline; here a fixed-step solver (default RK4, 8 steps = 32 teacher
forwards per pair), online by default; random cached rows are drawn with replacement; the distillation
loss is L2, not LPIPS; the squared error is summed over dimensions (fm.py's loss; the official reflow
configs set reduce_mean = True: a mean); t ~ U(0, 1) instead of t_RF ~ U(1e-3, 1); k-step distillation
(t on a k-point grid) is not offered. A reflow checkpoint cannot be the next teacher yet (common.dit.load_teacher takes
fm checkpoints only), so 3-RF and distilling a 2-RF need that one-line change.

Run:        python methods/reflow.py                        (gmm, teacher results/fm/gmm/model.safetensors, online pairs)
            python methods/reflow.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --eval-every 250
                --ckpt-every 250 --pairs runs/reflow-pairs-mnist.safetensors --num-pairs 16000   (the DiT is the teacher's;
                cached: 16000 pairs x 32 teacher forwards, reused over the 128000 rows the run draws)
            --t-fixed 1: the one-step distillation stage (of the fm teacher: the paper's 1-RF + distill)
Paper / code values (CIFAR-10): Adam lr 2e-4, warm-up 5000, grad clip 1, batch 128, EMA 0.9999 for reflow
and distillation, t uniform, L2 (reflow) / LPIPS (distillation), >= 1M pairs. Reference: results/reflow/<dataset>/
"""
import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common.data import make_loader
from common.dit import DiT, MLP, load_teacher, save, write_atomic
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
    """fm checkpoint whose ODE endpoints are the pairs ({dataset} is replaced), or `oracle` for the exact gmm velocity"""
    teacher_cfg: float = 1.0
    """guidance w of the teacher's ODE (1: none, so the pairs carry the data law)"""
    pair_solver: str = "rk4"
    """euler | heun | rk4: the teacher's fixed-step ODE solver for the pairs (official: scipy RK45, rtol = atol = 1e-5)"""
    pair_steps: int = 8
    """steps of that solver from t = 1 to 0 (teacher forwards per pair: euler K, heun 2K - 1, rk4 4K)"""
    pairs: Optional[str] = None
    """safetensors file of cached pairs: made (the online pairs of the first steps) and saved if missing, else loaded; unset: online pairs"""
    num_pairs: int = 100000
    """pairs generated into a missing --pairs file (official: at least 1M on CIFAR-10)"""
    t_fixed: Optional[float] = None
    """train at this t only (1: the one-step distillation stage; official t_RF = 1e-3, i.e. t = 0.999); unset: --time-dist"""
    time_dist: str = "uniform"
    """training t: logit-normal LN(time_mu, time_sigma) or uniform"""
    time_mu: float = 0.0
    """mean of the logit-normal"""
    time_sigma: float = 1.0
    """std of the logit-normal"""
    sampler: str = "euler"
    """euler | heun | rk4"""
    cfg_scale: float = 1.0
    """classifier-free guidance scale w used when sampling (1: none)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    solvers = ("euler", "heun", "rk4")
    if args.time_dist not in ("logit-normal", "uniform") or args.sampler not in solvers or args.pair_solver not in solvers:
        raise SystemExit(f"--time-dist {args.time_dist} / --sampler {args.sampler} / --pair-solver {args.pair_solver}: "
                         "expected logit-normal|uniform / euler|heun|rk4 / euler|heun|rk4")
    if args.pair_steps < 1 or args.num_pairs < 1:
        raise SystemExit(f"--pair-steps {args.pair_steps} / --num-pairs {args.num_pairs}: expected integers >= 1")
    if args.t_fixed is not None and not 0 <= args.t_fixed <= 1:
        raise SystemExit(f"--t-fixed {args.t_fixed}: expected a time in [0, 1]")


# ---------------------------------------------------------------- ALGO LOGIC
def sample_t(n, args, device):
    if args.t_fixed is not None:  # one-step distillation: t = 1, x_t = e
        return torch.full((n,), args.t_fixed, device=device)
    if args.time_dist == "uniform":
        return torch.rand(n, device=device)
    return torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(n, device=device))


def reflow_loss(net, e, x, y, args):
    """Flow matching on the pairs (e, x = the teacher's ODE endpoint of e); returns (loss, terms for logging)."""
    t = sample_t(x.shape[0], args, x.device)
    tb = t.view(-1, *[1] * (x.dim() - 1))
    x_t = (1 - tb) * x + tb * e
    v = e - x
    v_pred = net(x_t, t, t, y)
    loss = ((v_pred - v) ** 2).flatten(1).sum(1).mean()
    return loss, {"loss": loss.detach()}


def velocity(net, x, t, y, null, w):
    """Guided velocity v_u + w (v_c - v_u) (one batched call)."""
    if w == 1.0:
        return net(x, t, t, y)
    v = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    v_c, v_u = v.chunk(2)
    return v_u + w * (v_c - v_u)


@torch.no_grad()
def sample(net, e, y, steps, null, w=1.0, sampler="euler"):
    """K-step Euler, Heun or RK4 ODE sampler from t = 1 to t = 0."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    for k in range(steps):
        t, s = ts[k].expand(len(x)), ts[k + 1].expand(len(x))
        v = velocity(net, x, t, y, null, w)
        if sampler == "heun" and k < steps - 1:
            x_s = x - (ts[k] - ts[k + 1]) * v
            v = 0.5 * (v + velocity(net, x_s, s, y, null, w))
        elif sampler == "rk4":
            h, m = ts[k] - ts[k + 1], (t + s) / 2
            v2 = velocity(net, x - h / 2 * v, m, y, null, w)
            v3 = velocity(net, x - h / 2 * v2, m, y, null, w)
            v = (v + 2 * v2 + 2 * v3 + velocity(net, x - h * v3, s, y, null, w)) / 6
        x = x - (ts[k] - ts[k + 1]) * v
    return x


def teacher_pairs(teacher, e, y, null, args):
    """(e, x^, y): x^ the teacher's ODE endpoint from e at t = 1 (fixed steps, label y, its guidance)."""
    return e, sample(teacher, e, y, args.pair_steps, null, args.teacher_cfg, args.pair_solver).to(e.dtype), y


@torch.no_grad()
def replay_pairs(online, loader, n, null, args, device, amp):
    """The online pairs of the first ceil(n / batch) steps, drawn as the loop draws them in one process
    (the loader's labels, label dropout, the noise of each micro-batch's seed, `online`); the loader rewound."""
    state, out = loader.state_dict(), []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for step in range(-(-n // args.batch_size)):
            x, y = next(loader)
            for i, (x, y) in enumerate(zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum))):
                torch.manual_seed(micro_seed(args.seed, step, i))
                x, y = x.to(device), y.to(device)
                y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
                with amp:
                    out.append(online(x, y))
    loader.load_state_dict(state)
    return {k: torch.cat(z)[:n].cpu().contiguous() for k, z in zip("exy", zip(*out))}


def load_pairs(path, make, made_from, shape, null, world):
    """The pairs cached in --pairs: made by make() and written atomically if the file is missing;
    `made_from` (data set, teacher, its guidance and solver) is stored with them and must match."""
    if not os.path.exists(path):
        if world > 1:
            raise SystemExit(f"--pairs {path}: no such file; generate it in one process first (the same flags, one process)")
        pairs = make()
        write_atomic(path, lambda tmp: save_file(pairs, tmp, metadata={"made_from": made_from}))
    try:
        with safe_open(path, framework="pt") as f:
            meta, pairs = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise SystemExit(f"--pairs {path}: not a pairs file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    e, x, y = (pairs.get(k) for k in "exy")
    if (e is None or x is None or y is None or e.shape != x.shape or tuple(e.shape[1:]) != tuple(shape) or y.shape != e.shape[:1]
            or not len(y) or not e.is_floating_point() or y.is_floating_point() or y.min() < 0 or y.max() > null):
        raise SystemExit(f"--pairs {path}: expected tensors e, x of shape [N, {', '.join(map(str, shape))}] and labels y in [0, {null}]")
    if meta.get("made_from", made_from) != made_from:
        raise SystemExit(f"--pairs {path}: made from {meta['made_from']}, not from {made_from}")
    return pairs


def cached_pairs(cache, n, device):
    """n random rows (e, x^, y) of the cached pairs (with replacement; official: randperm per step)."""
    rows = torch.randint(len(cache["e"]), (n,))
    return tuple(cache[k][rows].to(device, non_blocking=True) for k in "exy")


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
    online = lambda x, y: teacher_pairs(teacher, torch.randn_like(x), y, null, args)
    if args.pairs:  # cached: the online pairs of the first steps, made once
        made_from = (f"{args.dataset}, teacher {args.teacher.format(dataset=args.dataset)} (cfg {args.teacher_cfg:g}), "
                     f"{args.pair_solver} x {args.pair_steps}")
        make = lambda: replay_pairs(online, loader, args.num_pairs, null, args, device, amp)
        cache = load_pairs(args.pairs, make, made_from, info["shape"], null, world)
    pairs = (lambda x, y: cached_pairs(cache, len(x), device)) if args.pairs else online
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, null, args.cfg_scale, args.sampler)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    reflow_loss = compiled(reflow_loss, args)  # --compile (common/run.py)

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
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    e, x, y = pairs(x, y)  # the data replaced by (noise, the teacher's ODE endpoint from it, its label)
                    loss, t_i = reflow_loss(ddp_net, e, x, y, args)
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
