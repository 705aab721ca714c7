"""Consistency models: Consistency Distillation (CD) and Consistency Training (CT), with the improved-CT recipe.

Papers: Song, Dhariwal, Chen, Sutskever, "Consistency Models", ICML 2023 (arXiv 2303.01469);
Song, Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024 (arXiv 2310.14189, iCT).
Official code: github.com/openai/consistency_models (PyTorch: ImageNet-64, LSUN; cm/karras_diffusion.py,
cm/script_util.py, cm/train_util.py, scripts/cm_train.py, scripts/launch.sh) and
github.com/openai/consistency_models_cifar10 (JAX: CIFAR-10). iCT has no official code; a third-party
version, github.com/Kinyugo/consistency_models, was compared. Read to check the details; nothing copied.

Idea: a consistency function maps every point of a probability-flow ODE trajectory to its origin.
Here f(x_t, t) = x_t - t net(x_t, t, 0, y), the flow map to s = 0 in the project's notation, so
f(x, 0) = x holds by construction (the official c_skip / c_out, which enforce it at sigma_min = 0.002,
are not used: a difference of 0.002 u). Times come from the Karras grid of the official EDM sigma,
sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..N-1, converted exactly
with t = sigma / (1 + sigma) (our x_t = x_sigma / (1 + sigma)); t_0 = 80/81, t_{N-1} = 0.001996.
A pair n, n+1 (n in 0..N-2) puts the student at t_n and the target at t_{n+1} < t_n:

    x_t = (1 - t_n) x + t_n e
    CD   x' = one Heun step of the teacher ODE from t_n to t_{n+1}, IN SIGMA as the official
              heun_solver (karras_diffusion.py): eps(x, t) = x + (1 - t) v_T(x, t) = d x_sigma / d sigma,
              x_sigma = x_t / (1 - t); 2 teacher calls, no grad (`--solver euler`: one; Euler in sigma
              equals Euler in t)
    CT   x' = (1 - t_{n+1}) x + t_{n+1} e   (the same x and e; the official Euler step with the data as denoiser)
    loss = mean_batch lambda_n d(f_theta(x_t, t_n), sg f_target(x', t_{n+1}))

A Heun step in sigma and one in t are different discretizations of the same ODE; at the exact velocity
of the gmm mixture the CD residual |f*(x_t) - f*(x')| / dt of the sigma step is ten times that of a t
step at N = 18 (tests/test_cm.py). The file follows the official code: sigma.
f_target is an EMA of the student with rate mu, updated after each optimizer step (--ema-target-decay for
CD; 0 makes it the online weights under stop-gradient, as the CIFAR-10 CD code where no target EMA exists;
ImageNet-64 / LSUN CD use 0.95). CT (--recipe cm) grows the grid and the rate with the step k
(script_util.py): N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, mu(k) = exp(s0 ln(mu0) / (N(k) - 1)),
K = --curriculum. --recipe ict (CT only): mu = 0, N(k) = min(s0 2^floor(k/K'), s1) + 1 with
K' = floor(K / (log2 floor(s1/s0) + 1)), n drawn with p(n) proportional to
Phi((ln sigma_n - Pm)/Ps) - Phi((ln sigma_{n+1} - Pm)/Ps) (our logit-normal LN(Pm, Ps) binned on the grid),
weight lambda_n = 1/(sigma_n - sigma_{n+1}) = (1 - t_n)(1 - t_{n+1}) / (t_n - t_{n+1}) and the
pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c, c = 0.00054 sqrt(dim), over the whole sample (as the
paper; Kinyugo applies it elementwise). The student's dropout masks are reused in the target forward
(fork_rng; the official saves and restores the RNG state). Distances (--distance): l2 = mean over dims
of the squared error, l1 = mean absolute error, huber as above. LPIPS, the distance of the headline
runs, is NOT ported. With an L2 distance from data (CT) the fixed point is E[f(x', t_{n+1}) | x_t],
the exact map up to O(dt); a pseudo-Huber or l1 distance moves it to a robust location of those
targets (measured in tests/test_cm.py, stated on the results page).
Sampling (multistep consistency): t_k = linspace(1, 0, K + 1); x0 = f(x, t_k), re-noise
x = (1 - t_{k+1}) x0 + t_{k+1} n; the last x0 is the sample.
Where: karras_ts (grid), schedule (N(k), mu(k)), sample_n (index law), teacher_step (CD's Heun / Euler
in sigma), cm_loss (targets, weight, distance, shared dropout masks), sample (multistep sampler).

Initialization (--init): CD starts from the teacher (its weights copied into the student). CT on
CIFAR-10 starts from scratch, but the released ImageNet-64 / LSUN CT commands pass the teacher path and
cm_train.py then copies the teacher into the student (the teacher is not used in the CT loss): `--init
teacher` (the default) does that; `--init scratch` does not (and CT then loads no teacher). With
`--teacher oracle` there is no net to copy: the student starts from scratch.
Deviations: no c_skip / c_out; LPIPS not ported (l2 by default); the sampler starts from e at t = 1
(the official from 80 e at sigma 80, our t_0 e at t_0 = 0.98765, dropping the data's 1/81 share, i.e.
the net is used 1.2% beyond its trained times), re-noises with t_{k+1} n (official sqrt(sigma^2 -
sigma_min^2)) and uses an even grid in t (official: ternary-searched grid indices, e.g. CD ImageNet-64
2 steps at sigma 1.382); AdamW (CIFAR-10: RAdam); no class guidance of the teacher.
Cost: CD 6 forward passes per iteration as coded (student forward + backward 3, target 1, Heun 2;
seed 002 counts 5), CT 4.

CPU defaults (chosen for 3000 gmm / 2000 mnist steps): --mode cd, N = 18 (the paper's CIFAR-10 CD grid;
its t-gaps are small enough for the Heun step and few enough that the boundary reaches t_0 in a short
run), mu = 0 (CIFAR-10 CD), --distance l2, CT: s0 2, s1 150, mu0 0.9 (CIFAR-10), K = --steps.
Paper recipes as flags (values of launch.sh / the configs; [paper] not re-checked here):
  CD CIFAR-10:   --num-scales 18 --ema-target-decay 0 --lr 4e-4 --batch-size 512 --ema-decay 0.9999 --steps 800000 (LPIPS)
  CD ImageNet-64: --num-scales 40 --ema-target-decay 0.95 --lr 8e-6 --batch-size 2048 --ema-decay 0.9999 --steps 600000
  CT CIFAR-10:   --mode ct --ct-scales 2 150 --ct-mu0 0.9 --curriculum 800000 --init scratch --lr 4e-4 --batch-size 512
  CT ImageNet-64: --mode ct --ct-scales 2 200 --ct-mu0 0.95 --curriculum 800000 --init teacher --lr 1e-4 --batch-size 2048
  iCT CIFAR-10 [paper]: --mode ct --recipe ict --ict-scales 10 1280 --curriculum 400000 --init scratch --lr 1e-4
                 --batch-size 1024 --dropout 0.3 --ema-decay 0.99993
Run:        python methods/cm.py --teacher oracle --eval-every 500   (gmm, exact teacher velocity, student from scratch)
            python methods/cm.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --eval-every 250
                --ckpt-every 250   (teacher and initial weights: results/fm/mnist/model.safetensors)
            add --mode ct (--recipe ict) for consistency training
Reference:  results/cm/<dataset>/
"""
import copy
import math
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
    """fm checkpoint of the teacher ({dataset} is replaced): CD's ODE and, with --init teacher, the initial weights; `oracle`: the exact gmm velocity"""
    mode: str = "cd"
    """cd: consistency distillation (teacher ODE step) | ct: consistency training (from data)"""
    recipe: str = "cm"
    """cm: Song et al. 2023 | ict: improved CT (Song & Dhariwal 2024; --mode ct only): mu 0, doubling N(k), lognormal n, 1/dsigma weight"""
    init: str = "teacher"
    """teacher: the student starts as a copy of the teacher (CD; the released ImageNet-64 / LSUN CT) | scratch (CIFAR-10 CT)"""
    solver: str = "heun"
    """CD's teacher step from t_n to t_{n+1}, in sigma as the official code: heun (2 teacher calls) | euler (1)"""
    distance: str = "auto"
    """l2 (mean over dims) | l1 | huber (pseudo-Huber over the sample); auto: l2 for --recipe cm (paper: LPIPS, not ported), huber for ict"""
    num_scales: int = 18
    """N of CD's fixed Karras grid (paper: 18 CIFAR-10, 40 ImageNet-64 / LSUN)"""
    ema_target_decay: float = 0.0
    """CD's target-network EMA rate mu (0: online weights under stop-grad, CIFAR-10; 0.95 ImageNet-64 / LSUN)"""
    ct_scales: tuple[int, int] = (2, 150)
    """s0, s1 of CT's N(k) (--recipe cm; CIFAR-10 and LSUN 2 150, ImageNet-64 2 200)"""
    ct_mu0: float = 0.9
    """mu0 of CT's mu(k) = exp(s0 ln(mu0) / (N(k) - 1)) (CIFAR-10 0.9, ImageNet-64 / LSUN 0.95)"""
    ict_scales: tuple[int, int] = (10, 1280)
    """s0, s1 of iCT's doubling N(k) (paper: 10 1280)"""
    curriculum: int = 0
    """K, the steps over which N(k) grows (0: --steps; official 800k CT, iCT 400k CIFAR-10)"""
    ict_mean: float = -1.1
    """P_mean of iCT's lognormal sigma law (= our logit-normal mean), binned on the grid"""
    ict_std: float = 2.0
    """P_std of iCT's lognormal sigma law"""
    huber_c: float = 0.00054
    """pseudo-Huber c = huber_c sqrt(dim) (iCT: 0.00054, c = 0.03 on CIFAR-10)"""
    sigma_min: float = 0.002
    """smallest sigma of the Karras grid (t = sigma / (1 + sigma))"""
    sigma_max: float = 80.0
    """largest sigma of the Karras grid"""
    rho: float = 7.0
    """rho of the Karras grid"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    for name, ok in (("mode", ("cd", "ct")), ("recipe", ("cm", "ict")), ("init", ("teacher", "scratch")),
                     ("solver", ("heun", "euler")), ("distance", ("auto", "l2", "l1", "huber"))):
        if getattr(args, name) not in ok:
            raise SystemExit(f"--{name} {getattr(args, name)}: expected one of {' | '.join(ok)}")
    if args.recipe == "ict" and args.mode != "ct":
        raise SystemExit("--recipe ict: improved consistency TRAINING, expected --mode ct")
    if args.num_scales < 2 or min(args.ct_scales) < 2 or args.ct_scales[0] > args.ct_scales[1] or not 1 <= args.ict_scales[0] <= args.ict_scales[1]:
        raise SystemExit(f"--num-scales {args.num_scales} / --ct-scales {args.ct_scales} / --ict-scales {args.ict_scales}: "
                         "expected N >= 2, s0 <= s1 (CT s0 >= 2)")
    if not 0 <= args.ema_target_decay < 1 or not 0 < args.ct_mu0 < 1:
        raise SystemExit(f"--ema-target-decay {args.ema_target_decay} / --ct-mu0 {args.ct_mu0}: expected [0, 1) / (0, 1)")
    if args.curriculum < 0 or not args.ict_std > 0 or not args.huber_c > 0:
        raise SystemExit(f"--curriculum {args.curriculum} / --ict-std {args.ict_std} / --huber-c {args.huber_c}: expected >= 0 / > 0 / > 0")
    if not 0 < args.sigma_min < args.sigma_max or not args.rho > 0:
        raise SystemExit(f"--sigma-min {args.sigma_min} / --sigma-max {args.sigma_max} / --rho {args.rho}: expected 0 < min < max, rho > 0")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def karras_ts(N, args):
    """The N-point Karras sigma grid (decreasing, float64) and its times t = sigma / (1 + sigma)."""
    a, b = args.sigma_max ** (1 / args.rho), args.sigma_min ** (1 / args.rho)
    sigma = (a + torch.arange(N, dtype=torch.float64) / (N - 1) * (b - a)) ** args.rho
    return sigma, sigma / (1 + sigma)


def schedule(k, args):
    """(N, mu) at training step k: CD fixed; CT's sqrt curriculum and adaptive mu (script_util.py);
    iCT's doubling curriculum, mu = 0."""
    if args.mode == "cd":
        return args.num_scales, args.ema_target_decay
    K = args.curriculum or args.steps
    if args.recipe == "cm":
        s0, s1 = args.ct_scales
        m = max(math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1), 1)
        return m + 1, math.exp(s0 * math.log(args.ct_mu0) / m)
    s0, s1 = args.ict_scales
    k_stage = max(math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    return min(s0 * 2 ** (k // k_stage), s1) + 1, 0.0


def sample_n(B, N, args, device):
    """Pair indices n in 0..N-2: uniform (cm), or iCT's lognormal sigma law binned on the grid."""
    if args.recipe == "cm":
        return torch.randint(0, N - 1, (B,), device=device)
    sigma = karras_ts(N, args)[0]
    cdf = 0.5 * (1 + torch.erf((sigma.log() - args.ict_mean) / (args.ict_std * math.sqrt(2))))
    return torch.multinomial(cdf[:-1] - cdf[1:], B, replacement=True).to(device)


@torch.no_grad()
def teacher_step(teacher_v, x_t, t, r, y, solver="heun"):
    """One step of the teacher ODE from t to r < t, Heun or Euler in EDM sigma (official heun_solver):
    d x_sigma / d sigma = eps(x_t, t) = x_t + (1 - t) v_T(x_t, t), x_sigma = x_t / (1 - t)."""
    t, r = bc(t, x_t), bc(r, x_t)
    dsig = r / (1 - r) - t / (1 - t)
    eps = x_t + (1 - t) * teacher_v(x_t, t.flatten(), y).to(x_t.dtype)
    x_r = (x_t / (1 - t) + dsig * eps) * (1 - r)  # Euler in sigma (= Euler in t)
    if solver == "euler":
        return x_r
    eps2 = x_r + (1 - r) * teacher_v(x_r, r.flatten(), y).to(x_t.dtype)
    return (x_t / (1 - t) + dsig * (eps + eps2) / 2) * (1 - r)


def consistency(net, x_t, t, y):
    """f(x_t, t) = x_t - t net(x_t, t, 0, y): the flow map to s = 0."""
    return x_t - bc(t, x_t) * net(x_t, t, torch.zeros_like(t), y).to(x_t.dtype)


def distance(a, b, kind, huber_c):
    """Per-sample distance: l2 mean of squares, l1 mean of abs, huber sqrt(||a - b||^2 + c^2) - c, c = huber_c sqrt(dim)."""
    d = (a - b).flatten(1)
    if kind == "l2":
        return d.pow(2).mean(1)
    if kind == "l1":
        return d.abs().mean(1)
    c = huber_c * math.sqrt(d.shape[1])
    return (d.pow(2).sum(1) + c**2).sqrt() - c


def cm_loss(net, target, teacher_v, x, y, N, args):
    """CD / CT loss on a data batch x with an N-point grid. `target` is the target network (the EMA
    of rate mu, or the online net); `teacher_v(x, t, y)` the teacher velocity (CD only)."""
    e = torch.randn_like(x)
    n = sample_n(len(x), N, args, x.device)
    sigma, ts = karras_ts(N, args)
    t, r = ts.to(x)[n], ts.to(x)[n + 1]
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    with torch.no_grad():
        if args.mode == "cd":
            x_r = teacher_step(teacher_v, x_t, t, r, y, args.solver)
        else:  # the same x and e at the earlier time
            x_r = (1 - bc(r, x)) * x + bc(r, x) * e
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # the student below draws these dropout masks
            f_tgt = consistency(target, x_r, r, y)
    f = consistency(net, x_t, t, y)
    kind = args.distance if args.distance != "auto" else ("l2" if args.recipe == "cm" else "huber")
    d = distance(f, f_tgt, kind, args.huber_c)
    lam = 1 / (sigma[:-1] - sigma[1:]).to(x)[n] if args.recipe == "ict" else torch.ones_like(t)  # on the device: no host sync
    loss = (lam * d).mean()
    return loss, {"loss": loss.detach(), "dist": d.mean().detach(), "N": torch.tensor(float(N))}


@torch.no_grad()
def sample(net, e, y, steps):
    """Multistep consistency sampling on t_k = linspace(1, 0, K + 1): x0 = f(x, t_k), then re-noise
    x = (1 - t_{k+1}) x0 + t_{k+1} n; returns the last x0."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    for k in range(steps):
        x = consistency(net, x, ts[k].expand(len(x)), y)
        if k < steps - 1:
            x = (1 - ts[k + 1]) * x + ts[k + 1] * torch.randn_like(x)
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

    need_teacher = args.mode == "cd" or args.init == "teacher"  # CT from scratch uses no teacher at all
    teacher, teacher_net = load_teacher(args.teacher, args.dataset, info, device, loader.gmm) if need_teacher else (None, None)
    teacher_v = lambda x_t, t, y: teacher(x_t, t, t, y)
    start = teacher_net if args.init == "teacher" else None  # the oracle has no net: scratch
    net = (copy.deepcopy(start).requires_grad_(True).train() if start is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    ema_target = copy.deepcopy(net).requires_grad_(False).train()  # target network; train(): the student's dropout masks
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "ema_target": ema_target, "opt": opt}  # what a checkpoint holds besides the data stream
    ddp_net = ddp(net, world)
    cm_loss = compiled(cm_loss, args)  # --compile (common/run.py)

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
        N, mu = schedule(step, args)  # grid size and target rate of this step
        x, y = next(loader)  # this rank's share of the global batch
        terms = []
        for i, (x, y) in enumerate(zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum))):
            torch.manual_seed(micro_seed(args.seed, step, rank * args.grad_accum + i))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss, t_i = cm_loss(ddp_net, ema_target, teacher_v, x, y, N, args)
                (loss / args.grad_accum).backward()
            terms.append(t_i)
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), "grad_norm": gnorm, "mu": torch.tensor(mu)}
        stop_if_nonfinite(terms, step, run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the EMA records no autograd history
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - args.ema_decay)
            torch._foreach_lerp_(list(ema_target.parameters()), list(net.parameters()), 1 - mu)  # mu = 0: the online weights

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
