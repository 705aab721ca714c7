"""SplitMeanFlow: a flow map distilled from a flow-matching teacher by interval splitting (no JVP).

Paper: Guo, Wang, Yuan, Cao, Chen, Chen, Huo, Zhang, Wang, Liu, Wang, "SplitMeanFlow: Interval
Splitting Consistency in Few-Step Generative Modeling", 2025 (arXiv 2507.16884). NO OFFICIAL CODE
EXISTS, and the paper reports speech synthesis only (no image or toy results to compare with).
Third-party re-implementations read to check the reading below (nothing copied):
github.com/clcarwin/SplitMeanFlow_MNIST (`train_splitmeanflow.py`), github.com/tiaotiaohu-777/
SplitMeanFlow (`src/splitmeanflow.py`). Every choice the paper leaves open is a flag.

Idea: the average velocity is additive over intervals (the paper's "interval splitting
consistency", the integral of v* over [s, t] split at m): for s <= m <= t,
    (t - s) u(x_t, t, s) = (t - m) u(x_t, t, m) + (m - s) u(x_m, m, s),  x_m = x_t - (t - m) u(x_t, t, m),
an algebraic identity, so the loss needs no Jacobian-vector product. With m = (1 - l) t + l s,
l ~ U(0, 1), it is a regression on a stop-gradient target (targets from the current net by default,
from the EMA with `--ema-target`), and a fraction p of the rows carry the boundary condition
u(x_t, t, t) = v: the velocity of the guided flow-matching teacher:
    split rows (1 - p):    || net(x_t, t, s, y) - sg(l u2 + (1 - l) u1) ||^2,
                           u2 = net(x_t, t, m, y), x_m = x_t - (t - m) u2, u1 = net(x_m, m, s, y)
    boundary rows (p):     || net(x_t, t, t, y) - v_T^cfg(x_t, t) ||^2,  v_T^cfg = v_u + w (v_c - v_u)
Both parts go through ONE forward with grad (boundary rows have s = t). The student starts as a
copy of the teacher (an fm checkpoint; with `--teacher oracle` on gmm, the exact velocity, the
student starts from scratch). The paper needs p >= 0.5: the split rows alone are solved by the
flow map of ANY velocity field (u = 0, the identity map, included), so with few boundary rows
training drifts toward such a trivial solution (a warning below 0.5).
Times: t = max, s = min of two U(0, 1) draws, s = t on the first round(p B) rows (as both
re-implementations). A third, github.com/primepake/splitmeanflow, notes in its README that the
paper samples times log-normally (and its code later samples logit-normal): not checked.
Loss: squared error summed over dimensions, batch mean (as fm.py). Sampling: K flow-map steps
x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y), no guidance (the teacher's is distilled in).
Cost: one forward-backward on the batch, two no-grad forwards on the split rows and one teacher
forward on the boundary rows (~4.5 forward passes at p = 0.5; 9 in Dieleman's table, which
counts every term on the full batch).

Run:        python methods/splitmeanflow.py --eval-steps 1 2 4 8   (gmm, teacher results/fm/gmm/model.safetensors;
                the reference run took 20 min on 1 CPU thread)
            python methods/splitmeanflow.py --teacher oracle         (gmm, exact teacher, student from scratch)
            python methods/splitmeanflow.py --dataset mnist --steps 5000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --eval-steps 1 2 4 8
                --eval-every 500 --ckpt-every 500   (the reference run: meanflow's step and batch budget, on top of the
                teacher's 5000 steps; 61 min on 1 CPU thread)
Reference:  results/splitmeanflow/<dataset>/ (teacher: the fm reference run of the same data set)
"""
import copy
import os
import sys
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
    """fm checkpoint of the teacher ({dataset} is replaced; the student starts as its copy) or `oracle` for the exact gmm velocity"""
    teacher_cfg: float = 1.0
    """guidance w of the teacher on the boundary rows, v_u + w (v_c - v_u) (1: none, so the target is the data law)"""
    boundary_p: float = 0.5
    """fraction p of the rows with the boundary loss net(x_t, t, t) = v_T (paper: p >= 0.5, training collapses below)"""
    ema_target: bool = False
    """split targets from the EMA weights instead of the current net (clcarwin: current net; tiaotiaohu-777: EMA)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if not 0 <= args.boundary_p <= 1 or args.teacher_cfg < 0:
        raise SystemExit(f"--boundary-p {args.boundary_p} in [0, 1] / --teacher-cfg {args.teacher_cfg} >= 0 expected")
    if args.boundary_p < 0.5:
        print(f"warning: --boundary-p {args.boundary_p} < 0.5: the split loss alone is solved by the flow map of any velocity field "
              "(u = 0 included); with few boundary rows training collapses toward such a trivial solution (paper: p >= 0.5)", file=sys.stderr)


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def guided(teacher, x_t, t, y, null, w):
    """Teacher velocity with classifier-free guidance v_u + w (v_c - v_u) (one batched call)."""
    if w == 1.0:
        return teacher(x_t, t, t, y)
    v_c, v_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).chunk(2)
    return v_u + w * (v_c - v_u)


def sample_ts(n, n_bnd, device):
    """t = max, s = min of two U(0, 1) draws; s = t on the first n_bnd rows (the boundary rows)."""
    a, b = torch.rand(2, n, device=device)
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    return t, torch.where(torch.arange(n, device=device) < n_bnd, t, s)


@torch.no_grad()
def split_target(tnet, x_t, t, s, l, y):
    """Interval splitting at m = (1 - l) t + l s: l u(x_t, t, m) + (1 - l) u(x_m, m, s), the average
    velocity over [s, t] if tnet is exact (x_m: tnet's own jump to m)."""
    was_training = getattr(tnet, "training", False)  # tnet may be a plain callable (tests: the oracle)
    if was_training:
        tnet.eval()
    m = (1 - l) * t + l * s
    u2 = tnet(x_t, t, m, y)
    u1 = tnet(x_t - bc(t - m, x_t) * u2, m, s, y)
    if was_training:
        tnet.train()
    return bc(l, x_t) * u2 + bc(1 - l, x_t) * u1


def splitmeanflow_loss(net, target_net, teacher, x, y, null, args):
    """Boundary rows first, split rows after, ONE forward with grad on both. Returns (loss, terms)."""
    n = len(x)
    nb = round(args.boundary_p * n)
    e = torch.randn_like(x)
    t, s = sample_ts(n, nb, x.device)
    l = torch.rand(n, device=x.device)
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    with torch.no_grad():
        u_tgt = torch.cat([guided(teacher, x_t[:nb], t[:nb], y[:nb], null, args.teacher_cfg),
                           split_target(target_net, x_t[nb:], t[nb:], s[nb:], l[nb:], y[nb:])])
    err = ((net(x_t, t, s, y) - u_tgt) ** 2).flatten(1).sum(1)
    loss = err.mean()
    return loss, {"loss": loss.detach(), "loss_boundary": err[:nb].sum().detach() / max(nb, 1),
                  "loss_split": err[nb:].sum().detach() / max(n - nb, 1)}  # a part can be empty (--boundary-p 0 or 1)


@torch.no_grad()
def sample(net, e, y, steps):
    """K-step flow-map sampler: x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y)."""
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
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    splitmeanflow_loss = compiled(splitmeanflow_loss, args)  # --compile (common/run.py)

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
                    loss, t_i = splitmeanflow_loss(ddp_net, ema if args.ema_target else net, teacher, x, y, null, args)
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
