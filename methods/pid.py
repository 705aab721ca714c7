"""PID: Physics Informed Distillation, a one-step trajectory net distilled from a teacher's ODE without data.

Paper: Tee, Zhang, Yoon, Gowda, Kim, Yoo, "Physics Informed Distillation for Diffusion Models", TMLR 2024
(arXiv 2411.08378). Official code: github.com/pantheon5100/pid_diffusion at b99605b (PyTorch, EDM VE;
cm/karras_diffusion.py OneShotDenoiser.ode_losses and .denoise, cm/train_util.py, scripts/cm_train.py,
scripts/distill_pid_diffusion.sh), read to check the loss, the levels, the init and the sampler; nothing copied.

Idea (a physics-informed neural network for the teacher's probability-flow ODE): the student is the
ODE's solution as a function of time from a fixed noise z, x_theta(z, sigma); the ODE residual in
denoiser form, (x - sigma dx/dsigma) - D(x, sigma), must vanish along it. There is no data: every row
is noise, and no trajectory is ever simulated. Conversion (EDM VE -> ours): x_sigma = x_t / (1 - t),
sigma = t / (1 - t) (sigma_max = 80 is t = 80/81 = 0.98765); the residual is the same VECTOR in both
variables, (x_t - t dx_t/dt) - (x_t - t v(x_t, t)), both sides being x0 estimates. Ours, with the
map from t_max (1 by default) to s:

    f(s) = f(x_T, t_max, s) = x_T - (t_max - s) net(x_T, t_max, s, y),   x_T = t_max e   (x_T = e at t_max = 1)
    R = (f - s df_ds) - sg(f - s v_T(f, s)) = -s (df_ds - v_T(f, s)) in value    (kd:131-210)
    loss = mean_rows mean_dims R^2   (the official `l2` norm; its runs use LPIPS: see deviations)

the Lagrangian residual d/ds f = v_T(f, s) in x0 space (an s^2 weight against velocity space). The
gradient flows through f AND df_ds (both student evaluations carry grad in the official code); the
teacher's x0 estimate D(f, s) = f - s v_T(f, s) is computed under no_grad, so the target is detached
as a whole (the paper: backprop through the teacher would let the student exploit it). df_ds
(`--derivative`): fd (default, what the official trains with) = the backward difference over a fixed
Karras grid of `--levels` 250 levels, s_i = sigma_i / (1 + sigma_i), sigma from sigma_max to sigma_min
(rho 7); level i ~ U{0..N-1}, partner i + 1 (the next level toward data; N - 2 for the last level),
df_ds = (f(s_i) - f(s_{i+1})) / (s_i - s_{i+1}). A secant's intercept at sigma = 0 equals its
intercept at t = 0 (x_sigma = x_t / (1 - t) maps lines to lines and fixes t = 0), so this difference
in t gives EXACTLY the official one in sigma (tests/test_pid.py). jvp = the exact derivative by
forward-mode AD (tangent 1 on s, backprop through the tangent), the path of the exactness tests:
on the gmm mixture the official difference leaves a residual at the exact map as large as a 1e-2
model perturbation (results/pid/README.md). Both take two forward-pass equivalents with grad.
Where: karras_ts (levels), sample_levels (the level law), derivative (f and df_ds), pid_loss, sample.

The student starts as a copy of the teacher checkpoint (official: the student loads the teacher's
weights, random_init False; --hidden, --depth ... are ignored; a fresh net with `--teacher oracle`).
The official student is x_theta(z, sigma) = (sigma/80) z + (1 - sigma/80) F(c z, 0.25 log sigma) with c
constant; ours is the flow map's own form f = x_T - (t_max - s) net, also the identity at s = t_max.
Sampler: official one shot x_theta(z, sigma_min); ours K flow-map steps on linspace(t_max, 0, K + 1)
from x_T = t_max e (our sigma can reach 0). Only maps from t_max are trained: a K-step sample's later
jumps start below t_max, a map this loss never trains, so the 2- and 4-step numbers of results/pid/
are NOT PID's numbers (1 step is the paper's use).

Deviations: LPIPS (bilinear upsampling to 224) -> plain MSE, mean over dimensions (2-D data and CPU;
the official `l2` option), uniform weight as the official configs; AdamW (every file) for RAdam; t_max
1 by default (our noise is exact at t = 1; `--t-max 0.98765` starts where the official does, from
x_T = t_max e, which ignores the data part (1 - t_max) x of x_{t_max} as EDM does at sigma_max).
Labels: the official draws them uniformly (ImageNet-64, no guidance, no dropout); here the data
batch's labels (the data set's class frequencies, as the evaluation uses) with the generic 10% label
dropout (--label-dropout 0 follows the official); the data itself is discarded. Teacher guidance:
none in the paper (--teacher-cfg 1); classifier-free guidance inside [cfg_t_min, cfg_t_max] is offered.

Run:        python methods/pid.py --eval-every 500   (gmm, teacher results/fm/gmm/model.safetensors; --derivative jvp:
                the exact derivative; --teacher oracle: the exact gmm velocity)
            python methods/pid.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --eval-every 250
                --ckpt-every 250   (the mnist standard budget from results/fm/mnist)
Paper / code values (CIFAR-10): batch 512, RAdam lr 2e-4, wd 0, 800k steps, EMA 0.999 / 0.9999 / 0.99995,
dropout 0, fp32, 250 levels, sigma in [0.002, 80], rho 7, LPIPS; ImageNet-64: batch 2048, lr 1e-4, 400k steps,
fp16. Reference: results/pid/<dataset>/
"""
import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
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
    """guidance w of the teacher, v_cfg = v_u + w (v_c - v_u) (1: none, as the paper; the target is then the data law)"""
    cfg_t_min: float = 0.0
    """teacher guidance applies for t in [cfg_t_min, cfg_t_max]"""
    cfg_t_max: float = 1.0
    """upper end of the guidance interval"""
    derivative: str = "fd"
    """df/ds: fd (the official: backward difference to the next Karras level) | jvp (exact, forward-mode AD)"""
    levels: int = 250
    """number N of Karras levels the target time s is drawn from (official start_scales 250, fixed)"""
    sigma_min: float = 0.002
    """smallest EDM sigma of the levels (official 0.002; t = sigma / (1 + sigma))"""
    sigma_max: float = 80.0
    """largest EDM sigma of the levels (official 80, t = 80/81)"""
    rho: float = 7.0
    """rho of the Karras grid (official 7)"""
    t_max: float = 1.0
    """start time of the map, x_T = t_max e (1: our noise is exact; official sigma_max: t_max = sigma_max / (1 + sigma_max))"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.derivative not in ("fd", "jvp"):
        raise SystemExit(f"--derivative {args.derivative}: expected fd or jvp")
    if args.levels < 2:
        raise SystemExit(f"--levels {args.levels}: expected an integer >= 2 (fd takes a neighbouring level)")
    if not 0 < args.sigma_min < args.sigma_max or not args.rho > 0:
        raise SystemExit(f"--sigma-min {args.sigma_min} / --sigma-max {args.sigma_max} / --rho {args.rho}: expected 0 < min < max, rho > 0")
    if not args.sigma_max / (1 + args.sigma_max) - 1e-9 <= args.t_max <= 1:
        raise SystemExit(f"--t-max {args.t_max}: expected a value in [sigma_max / (1 + sigma_max), 1] = "
                         f"[{args.sigma_max / (1 + args.sigma_max):.6g}, 1] (the map must start at or above every level)")
    if not 0 <= args.cfg_t_min <= args.cfg_t_max <= 1:
        raise SystemExit(f"--cfg-t-min {args.cfg_t_min} / --cfg-t-max {args.cfg_t_max}: expected 0 <= min <= max <= 1")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def karras_ts(args):
    """The N-level Karras sigma grid (decreasing, float64) and its times s = sigma / (1 + sigma)."""
    a, b = args.sigma_max ** (1 / args.rho), args.sigma_min ** (1 / args.rho)
    sigma = (a + torch.arange(args.levels, dtype=torch.float64) / (args.levels - 1) * (b - a)) ** args.rho
    return sigma, sigma / (1 + sigma)


def sample_levels(n, args, like):
    """(s_i, s_{i+1}) per row in the dtype of `like`: i ~ U{0..N-1}, its partner the next level toward
    data, N - 2 for the last level (kd ode_losses: indices_plus1[== N] = N - 2)."""
    ts = karras_ts(args)[1].to(like.device)
    i = torch.randint(0, args.levels, (n,), device=like.device)
    j = torch.where(i + 1 == args.levels, args.levels - 2, i + 1)
    return ts[i].to(like.dtype), ts[j].to(like.dtype)


def guided(teacher, x_t, t, y, null, args):
    """Teacher velocity v_u + w (v_c - v_u) for t in [cfg_t_min, cfg_t_max], plain v_c outside."""
    if args.teacher_cfg == 1.0:
        return teacher(x_t, t, t, y)
    v_c, v_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])).chunk(2)
    w = torch.where((t >= args.cfg_t_min) & (t <= args.cfg_t_max), args.teacher_cfg, 1.0)
    return v_u + bc(w, x_t).to(v_c.dtype) * (v_c - v_u)


def derivative(net, x_T, t, s, s_next, y, args):
    """f = x_T - (t - s) u(x_T, t, s) and df_ds, both differentiable in the weights. jvp: forward-mode
    dual numbers, tangent 1 on s (one ordinary call of `net`: a DDP module accepts it), backprop through
    the tangent; fd: a second forward WITH grad at the partner level (the official y_hat_dt), inside
    fork_rng so that both draw the same dropout masks."""
    if args.derivative == "jvp":
        with fwAD.dual_level():
            u, du_ds = fwAD.unpack_dual(net(x_T, t, fwAD.make_dual(s, torch.ones_like(s)), y))
        du_ds = torch.zeros_like(u) if du_ds is None else du_ds  # a field that ignores s
        u, du_ds = u.to(x_T.dtype), du_ds.to(x_T.dtype)
        return x_T - bc(t - s, x_T) * u, u - bc(t - s, x_T) * du_ds
    with torch.random.fork_rng(devices=[x_T.device] if x_T.is_cuda else []):
        f_next = x_T - bc(t - s_next, x_T) * net(x_T, t, s_next, y).to(x_T.dtype)
    f = x_T - bc(t - s, x_T) * net(x_T, t, s, y).to(x_T.dtype)
    return f, (f - f_next) / bc(s - s_next, x_T)


def pid_loss(net, teacher_v, e, y, args):
    """PID loss on noise e (no data): the ODE residual in x0 space at a random Karras level.
    `teacher_v(x, t, y)` is the (guided) teacher velocity, called under no_grad."""
    t = torch.full((len(e),), args.t_max, device=e.device, dtype=e.dtype)
    x_T = args.t_max * e
    s, s_next = sample_levels(len(e), args, e)
    f, df_ds = derivative(net, x_T, t, s, s_next, y, args)
    with torch.no_grad():  # the teacher's x0 estimate D(f, s) at the student's point (kd: teacher_denoise_fn, no_grad)
        target = f.detach() - bc(s, e) * teacher_v(f.detach(), s, y).to(e.dtype)
    res = (f - bc(s, e) * df_ds) - target
    loss = res.pow(2).flatten(1).mean(1).mean()
    return loss, {"loss": loss.detach(), "res_norm": res.detach().flatten(1).norm(dim=1).mean()}


@torch.no_grad()
def sample(net, e, y, steps, t_max=1.0):
    """K flow-map steps on linspace(t_max, 0, K + 1) from x = t_max e: x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y)."""
    ts = torch.linspace(t_max, 0, steps + 1, device=e.device)
    x = t_max * e
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
    teacher_v = lambda x_t, t, y: guided(teacher, x_t, t, y, null, args)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, args.t_max)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    pid_loss = compiled(pid_loss, args)  # --compile (common/run.py)

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
        _, y = next(loader)  # this rank's share of the global batch: only its labels are used (no data)
        terms = []
        for i, y in enumerate(y.chunk(args.grad_accum)):
            torch.manual_seed(micro_seed(args.seed, step, rank * args.grad_accum + i))
            y = y.to(device, non_blocking=True)
            y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
            e = torch.randn(len(y), *info["shape"], device=device)  # the only input: noise
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = pid_loss(ddp_net, teacher_v, e, y, args)
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
