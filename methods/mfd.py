"""Mean Flow Distillation (MFD): a one-step student matched to a flow-matching teacher through
the average velocities of the teacher and of an auxiliary flow over time intervals [r, t].

Paper: "Mean Flow Distillation: Robust and Stable Distillation for Flow Matching Models", ICML 2026
(arXiv 2606.11155; seed 004). Official code (PyTorch, SANA 1.6B with LoRA adapters):
github.com/happyw1nd/MFD, t2i_SANA/scripts/train_sana_mfd.py -- read to check the student loss,
the time sampling, the auxiliary training, the update ratio and the ODE step; nothing copied.

Idea: VSD / Diff-Instruct push a generated sample along v_fake - v_real at one time t. MFD
replaces the instantaneous velocities by average velocities over [r, t], obtained by Euler
rollouts of the auxiliary net v_A (the velocity of the student's own distribution, trained by
flow matching on its samples, no CFG) and of the frozen teacher v_T (with CFG w). The plain-text
paper lost its equations; in cleanflow notation (checked against the official code):

    x0 = G(e, 1) = e - net(e, 1, 1, y)                     student, a copy of the teacher
    t, r = max, min of two time draws;  x_t = (1 - t) x0 + t n   (gradient flows through x0)
    K = ceil((t - r) / ode_step) per sample, h = (t - r) / K, tau_k = t - k h   (no grad)
    x_{k+1}^F = x_k^F - h v_F(x_k^F, tau_k),  u_F = (x_t - x_r^F) / (t - r),  F in {A, T}  (eq. 15-16)
    L_G = mean((u_T - u_A) * x_t),   dL/dx0 = (1 - t)(u_T - u_A) / numel           (eq. 17-20)
    L_A = mean((v_A(x_s, s) - (n - sg(x0)))^2),  x_s = (1 - s) sg(x0) + s n      (eq. 9, velocity form)

A descent step moves x0 along u_A - u_T = u_fake - u_real (the distribution-matching sign rule).
The Jacobian of the ODE solution w.r.t. x_t is dropped on purpose (eq. 18 -> 19, paper B.6): the
rollouts run under no_grad and u_A, u_T are constants. `aux_ratio` auxiliary updates precede every
student update (Alg. 1, TTUR). `--ode-step 1` (any step >= t - r) gives K = 1 for every pair,
u_F = v_F(x_t, t): the per-sample direction of Diff-Instruct / VSD (v_A - v_T), weighted (1 - t)
at t = max of two draws; the official Diff-Instruct (methods/vsd.py) weighs t at t ~ LN(-1.2, 1.2)
(share of the expected weight on t > 0.5: 0.500 vs 0.363): VSD's direction, not Diff-Instruct's
objective (the official script reaches K = 1 with --r_not_equal_t_ratio 0, r = t: the same).
Where: sample_tr (times), avg_velocity (eq. 15-16), student_loss (eq. 17-20), aux_loss (eq. 9),
generate (the student sampler; Alg. 1 is the training loop at the bottom).

Official code over the paper: times uniform by default (the code; LN(-0.4, 1) of paper
A.3 with --time-dist logit-normal); aux-ratio 9:1 (code default 9 aux + 1 student per cycle; paper
text "10:1"; the SANA launch script uses blocks of 50 + 20); both losses are means over all
elements as the code's (the fm teacher sums over dimensions: a constant factor); the auxiliary
net never sees the null label (the code trains it on the prompt only). Deviations: continuous
t, r (the code rounds them to 1/1000, SANA's timestep grid); full network copies instead of LoRA
adapters on a shared base; u_F is computed as the mean of the K Euler velocities, which equals
(x_t - x_r)/(t - r) exactly but has no cancellation when t - r is tiny; per-sample K in one
batch (the loop runs max K, each row only its own K steps; the code has batch size 1). One
training step = `aux_ratio` auxiliary updates + one student update (--steps counts student
updates). `label_dropout` is unused; the auxiliary net's labels are resampled from the batch's. With a teacher checkpoint the student and aux copy its
network (--hidden, --depth ... are ignored); with `--teacher oracle` (gmm) they are fresh nets.
Multi-step student (`--gen-steps`, the code trains SANA at 4 with gradient through every step)
and sampling: Euler on the student's velocity, x <- x - (t_k - t_{k+1}) net(x, t_k, t_k, y);
K = 1 is G(e, 1), larger K are DDIM-like steps of the denoiser G.

Run:        python methods/mfd.py --teacher oracle                    (gmm, exact teacher)
            python methods/mfd.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --aux-lr 1e-4 --ema-decay 0.99 --ode-step 0.05
Paper / code defaults (SANA): lr 1e-4 (student and aux), batch 1 per GPU x 8, ode_step 0.02
(0.03 text-to-image), CFG 4.5, AdamW wd 1e-4, grad clip 1. Reference: results/mfd/<dataset>/,
results/mfd/step_ablation/ (ODE-step trend, paper Table 2), results/mfd/grad_variance/ (Fig. 2).
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
    """teacher guidance w, v_cfg = v_u + w (v_c - v_u) (official SANA: 4.5)"""
    ode_step: float = 0.02
    """Euler step of the rollouts over [r, t], K = ceil((t - r) / ode_step); >= 1: K = 1, VSD's direction (mfd's time weight)"""
    aux_ratio: int = 9
    """auxiliary-net updates per student update (official code 9; paper text 10)"""
    aux_lr: float = 1e-3
    """AdamW learning rate of the auxiliary net (official 1e-4)"""
    time_dist: str = "uniform"
    """t, r and auxiliary times: uniform (official code) or logit-normal LN(time_mu, time_sigma) (paper)"""
    time_mu: float = -0.4
    """mean of the logit-normal (paper -0.4)"""
    time_sigma: float = 1.0
    """std of the logit-normal"""
    gen_steps: int = 1
    """Euler steps of the student generator in training (1: G(e, 1); official SANA 4)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.time_dist not in ("logit-normal", "uniform"):
        raise SystemExit(f"--time-dist {args.time_dist}: expected logit-normal or uniform")
    if not args.ode_step > 0:
        raise SystemExit(f"--ode-step {args.ode_step}: expected a positive step size (>= 1: one Euler step)")
    if args.aux_ratio < 1:
        raise SystemExit(f"--aux-ratio {args.aux_ratio}: expected an integer >= 1 (auxiliary updates per student update)")
    if args.gen_steps < 1 or args.aux_lr <= 0:
        raise SystemExit(f"--gen-steps {args.gen_steps} / --aux-lr {args.aux_lr}: expected an integer >= 1 / a positive value")


# ---------------------------------------------------------------- ALGO LOGIC
def sample_t(n, args, device):
    if args.time_dist == "uniform":
        return torch.rand(n, device=device)
    return torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(n, device=device))


def sample_tr(n, args, device):
    """t = max, r = min of two time draws (official sample_t_r with r_not_equal_t_ratio 1)."""
    a, b = sample_t(2 * n, args, device).chunk(2)
    return torch.maximum(a, b), torch.minimum(a, b)


def velocity(net, x, t, y, null, w):
    """Guided velocity v_u + w (v_c - v_u) (one batched call)."""
    if w == 1.0:
        return net(x, t, t, y)
    v = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    v_c, v_u = v.chunk(2)
    return v_u + w * (v_c - v_u)


def generate(net, e, y, steps):
    """Student sampler: Euler on its velocity from t = 1 to 0; one step is G(e, 1) = e - net(e, 1, 1, y)."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    for k in range(steps):
        x = x - (ts[k] - ts[k + 1]) * net(x, ts[k].expand(len(x)), ts[k].expand(len(x)), y)
    return x


@torch.no_grad()
def avg_velocity(vel, x_t, t, r, y, step):
    """Average velocity of `vel(x, tau, y)` over [r, t] from an Euler rollout (eq. 15-16) with
    K = ceil((t - r) / step) steps of size (t - r) / K per sample. Returns (u, K); u is the mean
    of the K Euler velocities, i.e. exactly (x_t - x_r) / (t - r)."""
    dims = [1] * (x_t.dim() - 1)
    K = torch.ceil((t - r).double() / step).clamp(min=1).long()
    h = (t - r) / K
    # t and r come from the host (student_loss): the rollout's length and its row subsets are known
    # there and reach the device by non-blocking copies, so the loop never waits for the device
    t, h, Kx = (to_device(z, x_t.device) for z in (t, h, K))
    x, acc = x_t.clone(), torch.zeros_like(x_t)
    for k in range(int(K.max())):  # host-sync-ok: K lives where t and r do (the host in a step)
        a = to_device((K > k).nonzero().squeeze(1), x_t.device)  # host-sync-ok: unfinished rows, as K
        v = vel(x[a], t[a] - k * h[a], y[a])
        x[a] = x[a] - h[a].view(-1, *dims) * v
        acc[a] = acc[a] + v
    return acc / Kx.view(-1, *dims), Kx


def to_device(z, device):
    """z on `device`; from the host through pinned memory without blocking."""
    if z.device == device:
        return z
    return (z.pin_memory() if device.type == "cuda" else z).to(device, non_blocking=True)


def student_loss(x0, y, teacher_v, aux_v, args):
    """MFD student loss (eq. 17-20) on generated samples x0 (with grad); teacher_v and aux_v are
    velocity callables (x, tau, y). Returns (loss, terms)."""
    dims = [1] * (x0.dim() - 1)
    t, r = sample_tr(len(x0), args, torch.device("cpu"))  # on the host: see avg_velocity
    noise = torch.randn_like(x0)
    t_ = to_device(t, x0.device)
    x_t = (1 - t_.view(-1, *dims)) * x0 + t_.view(-1, *dims) * noise
    u_A, K = avg_velocity(aux_v, x_t.detach(), t, r, y, args.ode_step)
    u_T, _ = avg_velocity(teacher_v, x_t.detach(), t, r, y, args.ode_step)
    # Jacobian-free (eq. 19): d loss / d x0 = (1 - t)(u_T - u_A) / numel, so descent moves x0 along u_A - u_T
    loss = ((u_T - u_A) * x_t).mean()
    gap = (u_A - u_T).pow(2).flatten(1).sum(1).mean()
    return loss, {"loss": loss.detach(), "gap": gap.detach(), "ode_k": K.float().mean()}


def aux_loss(aux, x0, y, args):
    """Flow matching of the auxiliary net on sg(x0), labels only, no CFG (eq. 9 as a velocity loss)."""
    x0 = x0.detach()
    dims = [1] * (x0.dim() - 1)
    noise = torch.randn_like(x0)
    t = sample_t(len(x0), args, x0.device)
    x_t = (1 - t.view(-1, *dims)) * x0 + t.view(-1, *dims) * noise
    return ((aux(x_t, t, t, y) - (noise - x0)) ** 2).mean()


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
    aux = copy.deepcopy(net)  # the student's flow; starts at the teacher (or at the fresh student)
    net.grad_ckpt = aux.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    opt_aux = torch.optim.AdamW(aux.parameters(), lr=args.aux_lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    teacher_v = lambda x, t, y: velocity(teacher, x, t, y, null, args.teacher_cfg)
    aux_v = lambda x, t, y: aux(x, t, t, y)
    sample_fn = torch.no_grad()(lambda e, y, k: generate(ema, e.to(device), y.to(device), k))
    saved = {"net": net, "ema": ema, "opt": opt, "aux": aux, "opt_aux": opt_aux}  # what a checkpoint holds besides the data stream
    ddp_net, ddp_aux = ddp(net, world), ddp(aux, world)
    aux_loss, student_loss = compiled(aux_loss, args), compiled(student_loss, args)  # --compile (common/run.py)

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
        _, y = next(loader)  # this rank's share of the global batch: only its labels are used
        micro = list(y.chunk(args.grad_accum))
        # `aux_ratio` auxiliary updates on fresh samples of the current student (Alg. 1), then one student update
        for j in range(args.aux_ratio + 1):
            terms = []
            for i, y in enumerate(micro):
                torch.manual_seed(micro_seed(args.seed, step, (j * world + rank) * args.grad_accum + i))
                y = y.to(device, non_blocking=True)
                e = torch.randn(len(y), *info["shape"], device=device)
                with no_sync([ddp_net, ddp_aux], i < args.grad_accum - 1):
                    with amp:
                        if j < args.aux_ratio:
                            y_a = y[torch.randint(len(y), (len(y),), device=device)]  # fresh labels from the batch's
                            with torch.no_grad():
                                x_a = generate(net, e, y_a, args.gen_steps)
                            loss, t_i = aux_loss(ddp_aux, x_a, y_a, args), {}
                        else:
                            x0 = generate(ddp_net, e, y, args.gen_steps)
                            loss, t_i = student_loss(x0, y, teacher_v, aux_v, args)
                    (loss / args.grad_accum).backward()
                terms.append({**t_i, "aux_loss" if j < args.aux_ratio else "loss": loss.detach()})
            if j < args.aux_ratio:
                gnorm_aux = torch.nn.utils.clip_grad_norm_(aux.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
                stop_if_nonfinite({"aux_loss": terms[-1]["aux_loss"], "aux_grad_norm": gnorm_aux}, step, run_dir)
                opt_aux.step()
                opt_aux.zero_grad(set_to_none=True)
                aux_terms = mean_terms(terms)
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), **aux_terms, "aux_grad_norm": gnorm_aux, "grad_norm": gnorm}
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
