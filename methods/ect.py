"""Easy Consistency Tuning (ECT): a consistency model tuned from a pretrained flow model, no teacher in the loss.

Paper: Geng, Pokle, Luo, Lin, Kolter, "Consistency Models Made Easy", ICLR 2025 (arXiv 2406.14548).
Official code: github.com/locuslab/ect (main: CIFAR-10 on EDM; branch imgnet: ImageNet-64 on EDM2),
read to check the loss, the curriculum, the weights, the sampler and the recipes; nothing copied.

Idea: a consistency function f(x_t, t) maps every point of an ODE trajectory to its end at t = 0.
Diffusion training is consistency training with the largest step (the target at s = 0 is the data
itself); ECT starts from a pretrained flow (diffusion) model and shrinks the step dt = t - s along
training, so training moves continuously from the diffusion loss to the consistency condition.
The target is the CURRENT network under stop-gradient (no EMA target, no teacher term): consistency
training from data, with the student's dropout masks and the same noise e. In our notation (data at
t = 0; the official EDM sigma converts exactly, sigma = t / (1 - t), x_t = x_sigma / (1 + sigma)):

    f(x_t, t) = x_t - t net(x_t, t, 0, y)                 (the flow map to s = 0; f(x, 0) = x by construction)
    x_t = (1 - t) x + t e,  x_s = (1 - s) x + s e         (the same e)
    t ~ LN(time_mu, time_sigma)                           (= the official sigma_t ~ LogNormal(-1.1, 2), exactly)
    sigma_r = sigma_t (1 - q^-(stage+1) (1 + k sigmoid(-b sigma_t))), clamped at 0;  s = sigma_r / (1 + sigma_r)
    stage = step // stage_len                             (the dt curriculum as a function of training progress)
    delta = || f(x_t, t) - sg f(x_s, s) ||_2              (sum over dims, then sqrt; pseudo-Huber sqrt(d^2 + c^2) - c if c > 0)
    loss = mean( delta / (sigma_t - sigma_r) ),  sigma_t - sigma_r = (t - s) / ((1 - t)(1 - s))

Rows whose sigma_r clamps to 0 (at stage 0 with q 2: t < 0.66) have s = 0 and the data as target
(f(x_s, 0) = x): diffusion training inside the same loss, no mask needed. `--weight snrpk` (ImageNet
branch) multiplies by 1/sigma_t^2 + 1/sigma_data^2 instead of dividing by sigma_t - sigma_r. The
target's NaNs are counted (`target_nan`), not hidden: the official nan_to_num would train on zeros.
A property of the method, not a bug: with c = 0 the loss is a sum of NORMS, whose fixed point given
x_t is the geometric median of the targets, not their mean; trained from data (targets holding the
conditional e), the exact flow map is not its fixed point: on the 2-D mixture |GM - f*| / dt does not
shrink as dt falls from 0.1 to 0.003 (mean over 12 points 0.30 -> 0.27; tests/test_ect.py asserts it).
`--distance l2` (squared L2) is unbiased to O(dt) (0.46 -> 0.0097 there); the official norm stays the
default. The norm's gradient is a unit vector per row over sigma_t - sigma_r: it grows like 1 / dt.
Where: sample_t (time law), curriculum (s of t and the stage), consistency (f), ect_loss, sample.
Sampler (multistep consistency, official generator_fn): x0 = f(x, t_k), then re-noise
x = (1 - t_{k+1}) x0 + t_{k+1} n; 1 step f(e, 1); 2 steps over [1, t_mid, 0] (CIFAR-10 t_mid 0.451 =
sigma 0.821; ImageNet-64 0.604 = sigma 1.526); other step counts over linspace(1, 0, K + 1).
Cost: one forward-backward and one no-grad forward (4 FPE, as CT in seed 002, which has no ECT entry).

Start: the student is a copy of the fm checkpoint `--teacher` (measured: the copied net's
f(x_t, t) = x_t - t net(x_t, t, 0) is the teacher's x0-prediction x_t - t net(x_t, t, t) to 0.05-0.2%
relative, as its h = t - s embedding barely moved in fm training). On gmm the default is the fm
reference run's model; `--teacher oracle` (the exact velocity has no weights to copy) starts from a
fresh net, i.e. consistency training from scratch with ECT's curriculum, the stage-0 s = 0 rows doing
the diffusion pretraining.

Deviations: times start at t = 1 (official sigma_max 80, t 0.988, with x = 80 e); no c_skip/c_out
boundary machinery (sigma_min 0.002 at eval, none in training: f(x, 0) = x holds here by construction);
AdamW (CIFAR-10: RAdam; ImageNet: Adam with EDM2's inverse-sqrt learning-rate decay and power EMA,
not ported); our MLP/DiT instead of DDPM++ / EDM2 U-Nets. `--distance l2` and the NaN count are ours.

Run:        python methods/ect.py   (gmm: 3000 steps, 8 stages of 375 steps, teacher results/fm/gmm/model.safetensors)
            python methods/ect.py --dataset mnist --steps 2000 --stage-len 250 --batch-size 64 --lr 1e-4 --ema-decay 0.99
                --eval-every 250 --ckpt-every 250   (8 stages in the leaderboard's 2000 steps; teacher results/fm/mnist)
Paper recipes as flags (official run_ecm.sh, run_ecm_1hour.sh, imgnet run_imgnet_ecm.sh):
  CIFAR-10 (EDM VP, 200k iterations, stages 0-7):  --dataset cifar10 --steps 200000 --stage-len 25000 --q 2 --batch-size 128
      --lr 1e-4 --grad-clip 0 --dropout 0.2 --label-dropout 0 --ema-decay 0.9999 --sample-mid 0.451   (1-hour: --q 256
      --stage-len 10000000 --ema-decay 0.9993). FID 1 / 2 NFE: 4.54 / 2.20 at 100k, 3.86 / 2.15 at 200k (official README).
  ImageNet-64 (EDM2-S, 100k iterations, stages 0-3):  --steps 100000 --stage-len 25000 --q 4 --batch-size 128 --lr 1e-3
      --adam-betas 0.9 0.99 --grad-clip 0 --dropout 0.4 --label-dropout 0 --time-mu -0.8 --time-sigma 1.6 --huber-c 0.06
      --weight snrpk --sigma-data 0.5 --sample-mid 0.604   (the edm2-img64-s preset overrides the LogNormal(-1.1, 2)
      default with (-0.8, 1.6); imgnet ct_train.py sets c 0.06)
Reference:  results/ect/<dataset>/ (pretrained net: the fm reference run of the same data set)
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
    """fm checkpoint the student starts as a copy of ({dataset} is replaced; not used in the loss), or `oracle` (gmm): a fresh net"""
    time_mu: float = -1.1
    """mean of the logit-normal t, = the official log-normal EDM sigma (CIFAR-10 -1.1; ImageNet-64 preset -0.8)"""
    time_sigma: float = 2.0
    """std of the logit-normal t (CIFAR-10 2.0; ImageNet-64 preset 1.6)"""
    q: float = 2.0
    """curriculum decay: dt shrinks by q each stage (CIFAR-10 2, ImageNet-64 4, 1-hour CIFAR-10 recipe 256)"""
    stage_len: int = 375
    """optimizer steps per curriculum stage (paper: 25000 of 200k CIFAR-10 / 100k ImageNet-64 iterations; 375 = 8 stages in
    the 3000-step gmm run, pass 250 for the 2000-step mnist run)"""
    map_k: float = 8.0
    """k of the mapping sigma_r = sigma_t (1 - q^-(stage+1) (1 + k sigmoid(-b sigma_t))) (paper: 8)"""
    map_b: float = 1.0
    """b of the same mapping (paper: 1)"""
    distance: str = "norm"
    """norm: ||f - sg T||_2 (official; its fixed point is a geometric median, biased from data) | l2: squared L2 (unbiased to O(dt))"""
    huber_c: float = 0.0
    """pseudo-Huber c of --distance norm, sqrt(d^2 + c^2) - c (CIFAR-10 0, a plain norm; ImageNet-64 0.06)"""
    weight: str = "dt"
    """dt: divide by sigma_t - sigma_r (CIFAR-10) | snrpk: multiply by 1/sigma_t^2 + 1/sigma_data^2 (ImageNet-64)"""
    sigma_data: float = 0.5
    """sigma_data of --weight snrpk (EDM: 0.5)"""
    sample_mid: tuple[float, ...] = (0.451,)
    """intermediate times t of the (len + 1)-step sampler (CIFAR-10 0.451 = sigma 0.821; ImageNet-64 0.604); other K: uniform"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    if args.distance not in ("norm", "l2") or args.weight not in ("dt", "snrpk"):
        raise SystemExit(f"--distance {args.distance} / --weight {args.weight}: expected norm or l2 / dt or snrpk")
    if not args.q > 1 or args.stage_len < 1 or args.map_k < 0:
        raise SystemExit(f"--q {args.q} / --stage-len {args.stage_len} / --map-k {args.map_k}: expected q > 1, an integer >= 1, k >= 0")
    if not args.time_sigma > 0 or args.huber_c < 0 or not args.sigma_data > 0:
        raise SystemExit(f"--time-sigma {args.time_sigma} / --huber-c {args.huber_c} / --sigma-data {args.sigma_data}: "
                         "expected a positive std, c >= 0 and a positive sigma_data")
    if args.huber_c > 0 and args.distance == "l2":
        raise SystemExit(f"--huber-c {args.huber_c}: applies to --distance norm only (got --distance l2)")
    mid = [1.0, *args.sample_mid, 0.0]
    if not all(a > b for a, b in zip(mid, mid[1:])):
        raise SystemExit(f"--sample-mid {args.sample_mid}: expected decreasing times strictly between 1 and 0")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def sample_t(n, args, like):
    """t ~ LN(time_mu, time_sigma): sigmoid of the official log-sigma draw, in the dtype of `like`."""
    return torch.sigmoid(args.time_mu + args.time_sigma * torch.randn(n, device=like.device, dtype=like.dtype))


def curriculum(t, stage, args):
    """The target time s(t) of a stage (official t_to_r_sigmoid), in EDM sigma = t / (1 - t):
    sigma_r = sigma_t (1 - q^-(stage+1) (1 + k sigmoid(-b sigma_t))), clamped at 0 (the data as target)."""
    sigma = t / (1 - t)
    r = (sigma * (1 - args.q ** -(stage + 1) * (1 + args.map_k * torch.sigmoid(-args.map_b * sigma)))).clamp(min=0)
    return r / (1 + r)


def consistency(net, x_t, t, y):
    """f(x_t, t) = x_t - t net(x_t, t, 0, y): the flow map to s = 0, so f(x, 0) = x exactly."""
    return x_t - bc(t, x_t) * net(x_t, t, torch.zeros_like(t), y)


def ect_loss(net, x, y, stage, args):
    """ECT on a data batch x at a curriculum stage: the target is `net` itself under no_grad (the current
    weights), at x_s with the same e; fork_rng makes the grad forward draw the target's dropout masks."""
    e = torch.randn_like(x)
    t = sample_t(len(x), args, x)
    s = curriculum(t, stage, args)
    x_t, x_s = (1 - bc(t, x)) * x + bc(t, x) * e, (1 - bc(s, x)) * x + bc(s, x) * e
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        target = consistency(net, x_s, s, y).to(x.dtype)
    d2 = ((consistency(net, x_t, t, y).to(x.dtype) - target) ** 2).flatten(1).sum(1)
    dist = d2 if args.distance == "l2" else (d2 + args.huber_c**2).sqrt() - args.huber_c
    if args.weight == "dt":  # 1 / (sigma_t - sigma_r)
        w = (1 - t) * (1 - s) / (t - s)
    else:  # snrpk: SNR(sigma_t) + 1 / sigma_data^2
        w = ((1 - t) / t) ** 2 + 1 / args.sigma_data**2
    loss = (w * dist).mean()
    return loss, {"loss": loss.detach(), "delta": d2.detach().sqrt().mean(), "s0_frac": (s == 0).float().mean(),
                  "target_nan": (~torch.isfinite(target)).sum().float(), "stage": torch.tensor(float(stage))}


@torch.no_grad()
def sample(net, e, y, steps, mid=(0.451,)):
    """Multistep consistency sampling over [1, *mid, 0] (when steps = len(mid) + 1, else linspace(1, 0, K + 1)):
    x0 = f(x, t_k), then re-noise x = (1 - t_{k+1}) x0 + t_{k+1} n with fresh n ~ N(0, I)."""
    ts = [1.0, *mid, 0.0] if steps == len(mid) + 1 else torch.linspace(1, 0, steps + 1).tolist()
    x = e
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = consistency(net, x, torch.full((len(x),), t, device=x.device, dtype=x.dtype), y)
        if t_next > 0:
            x = (1 - t_next) * x + t_next * torch.randn_like(x)
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

    teacher_net = load_teacher(args.teacher, args.dataset, info, device, loader.gmm)[1]  # its weights only: no teacher in the loss
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, args.sample_mid)
    saved = {"net": net, "ema": ema, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    ect_loss = compiled(ect_loss, args)  # --compile (common/run.py)

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
                    loss, t_i = ect_loss(ddp_net, x, y, step // args.stage_len, args)  # the curriculum stage
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
