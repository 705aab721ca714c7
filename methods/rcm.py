"""rCM: score-regularized continuous-time consistency, sCM's consistency term plus DMD's distribution matching.

Paper: Zheng, Ge, Lu, Chen, Song, Liu, Lai, Kreis, Ermon, Zhu, Chen, Liu, "Large Scale Diffusion Distillation via
Score-Regularized Continuous-Time Consistency", ICLR 2026 (arXiv 2510.08431). Official code: github.com/NVlabs/rcm
(video only, Wan2.1; rcm/models/t2v_model_distill_rcm.py [line refs below] and its Wan config read; nothing copied).

Idea: the student is a consistency map, the flow map to s = 0: x0 = G(x_t, t) = x_t - t net(x_t, t, 0, y). (1) sCM's
consistency term on data is exactly methods/ayf.py's EMD at s = 0 after the TrigFlow conversion theta = atan(t / (1 - t)),
x_theta = x_t / rho, F = (cos - sin) x_t + rho u, rho(t) = 1 / (cos + sin) = sqrt((1 - t)^2 + t^2): the official
g_trig is -(1 - t) rho g_ayf, so its normalized regression on F is, in u, AYF's with a time weight rho(t) and a
time-dependent constant c / ((1 - t) rho) [508-589]:

    t ~ p_G = LN(time_mu, time_sigma);  x_t = (1 - t) x + t e;  v_T = teacher^cfg(x_t, t)
    du_dt = jvp(net(., ., 0, y), (x_t, t), (v_T, 1))                        (no grad, fp32, same dropout masks)
    g = a_r (sg(u) - v_T) + t du_dt - (1 - r) t x_t / rho^4,   a_r = (sqrt((1 - t)^2 + (1 - r^2) t^2) - t (1 - 2t)) / rho^2
    step = g / (||g|| + c / ((1 - t) rho));   L_cm = sum_dims (rho u - sg(rho u - step))^2          (c = 0.1)

At r = 1, a_r = 1 and g is ayf's EMD g at s = 0. L_cm's value is the official sum (F - sg F - g_trig / (||g_trig||
+ c))^2, its u-gradient 2 rho step. The warm-up r = min(1, step / tangent_warmup) is the official one converted (r on
the x_theta term and in the sqrt of -cos sqrt(1 - r^2 sin^2)(F - F_T) - r cos sin x_theta - dF), not ayf's (r on the
JVP term); both are exact only at r = 1. (2) DMD2's distribution matching (methods/dmd2.py) on the student's own
rollouts, with a fake velocity net trained on them:

    rollout [477-503]: n jumps to 0 from t_0 = 1, t_j = min(t ~ p_D, t_{j-1}), re-noised x = (1 - t_j) x0 + t_j n with
          fresh noise, only the last jump with grad; n = k mod backsim_steps + 1 at the k-th student (fake) update
    t ~ p_D = LN(dm_mu, dm_sigma);  x_t = (1 - t) x0 + t n;  w = max(mean_dims |x0 - (x_t - t v_real)|, 1e-5)
    grad = t (v_real - v_fake) / w  (= (x0_fake - x0_real) / w);  L_dm = sum_dims (x0 - sg(x0 - grad))^2   [642-678]
    fake: L_fake = rho^2 ||fake(x_t, t, t, y) - (n - sg x0)||^2, t ~ p_D, its own rollout (= x0-regression / sin^2) [680-700]
    student: cm_weight L_cm + dm_weight L_dm (official 100 : 1);  --dm-weight 0: sCM alone; --cm-weight 0: DMD alone

Schedule [294-309]: for tangent_warmup steps the student takes the sCM term alone and the fake net rests; then the
fake net updates every step and the student (both terms) every ttur-th. The official alternates (student_update_freq
5: one student iteration, then four fake ones); here a step is one fake update and every 4th also the student's, the
same 4:1 (the 14B config: 9:1); the student sees the fake net before that step's update. The EMA moves with the student.
Sampler [760-790]: from t_0 = sigma_max / (1 + sigma_max) = 80/81 (not 1), x = rho(t_0) e (official x_theta = e), then
x0 = G(x, t_k) re-noised with fresh noise to the next of sample_thetas (TrigFlow 1.5, 1.4, 1.0 = t .934, .853, .609).
Its fresh noise makes fm_err@K meaningless for K > 1 (read ed@K).

Deviations: data from the training set (official: a teacher-generated set); CFG with the null label (official: a
negative prompt); exact JVP (the official default fd_type 0); r ramps as (step + 1) / tangent_warmup (ayf's;
official step / tangent_warmup); one learning rate for both nets (official Wan: AdamW 2e-6, fake 4e-7, betas (0,
0.999), weight decay 0.01); NaN rows stop the run (official: zeroed); --grad-clip 1 shared default (official: none).
Left out: fixed rollout times (dmd_fix_timesteps), discrete-time CM (dcm). Student and fake net start as the teacher.

Run:        python methods/rcm.py                       (gmm, teacher results/fm/gmm/model.safetensors)
            python methods/rcm.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --tangent-warmup 200
            python methods/rcm.py --dm-weight 0  (sCM alone);   --cm-weight 0 --tangent-warmup 0  (DMD alone)
Reference:  results/rcm/<dataset>/ (teacher as in dmd2.py)
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
    """fm checkpoint of the teacher ({dataset} is replaced), or `oracle` for the exact gmm velocity"""
    teacher_cfg: float = 1.0
    """guidance w of the teacher, v_u + w (v_c - v_u), in both terms (1: none, so the target is the data law; official Wan: 6.0, its v_c + 5 (v_c - v_u))"""
    cm_weight: float = 100.0
    """weight of the sCM consistency term (official loss_scale 100); 0: DMD alone (needs --tangent-warmup 0)"""
    dm_weight: float = 1.0
    """weight of the DMD term (official loss_scale_dmd 1); 0: sCM alone, the fake net never trains"""
    norm_eps: float = 0.1
    """c of the official normalization g_trig / (||g_trig|| + c) (official 0.1); on ayf's g it is c / ((1 - t) rho)"""
    tangent_warmup: int = 500
    """steps of the sCM term alone, over which its warm-up weight r ramps from 0 to 1 (0: none; official Wan 1.3B 1000, 14B 0)"""
    time_mu: float = -0.8
    """p_G, the sCM time: t ~ LN(time_mu, time_sigma), t = sigmoid(N(mu, sigma)) (official default -0.8; Wan 1.3B 0.7)"""
    time_sigma: float = 1.6
    """std of p_G's logit (official 1.6)"""
    dm_mu: float = 0.0
    """p_D, the time of the DMD term, the fake net and the rollout: t ~ LN(dm_mu, dm_sigma) (official default 0.0)"""
    dm_sigma: float = 1.6
    """std of p_D's logit (official 1.6)"""
    dm_shift: float = 0.0
    """> 0: p_D is t = shift u / (1 + (shift - 1) u), u ~ U(0, 1), instead (official Wan configs: UniformShift 5)"""
    ttur: int = 4
    """fake-net updates per student update after the warm-up (official student_update_freq 5 = 4 fake iterations per student one; 14B: 9)"""
    backsim_steps: int = 4
    """the rollout at the k-th student (fake) update runs k mod backsim_steps + 1 student jumps (official max_simulation_steps_fake 4)"""
    sigma_max: float = 80.0
    """the sampler starts at t = sigma_max / (1 + sigma_max) (official 80: t = 80/81; the 14B config 200)"""
    sample_thetas: tuple[float, ...] = (1.5, 1.4, 1.0)
    """TrigFlow times of the sampler's intermediate steps, t = tan / (1 + tan): .934, .853, .609 (official backward_timesteps)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    for name in ("ttur", "backsim_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an update ratio / step count >= 1")
    if args.cm_weight < 0 or args.dm_weight < 0 or args.cm_weight + args.dm_weight == 0 or (args.cm_weight == 0 and args.tangent_warmup):
        raise SystemExit(f"--cm-weight {args.cm_weight} / --dm-weight {args.dm_weight}: expected values >= 0, not both 0, "
                         "and --tangent-warmup 0 with --cm-weight 0 (the warm-up trains the sCM term alone)")
    if args.tangent_warmup < 0:
        raise SystemExit(f"--tangent-warmup {args.tangent_warmup}: expected an integer >= 0")
    if not args.norm_eps > 0 or not args.time_sigma > 0 or not args.dm_sigma > 0 or args.dm_shift < 0 or not args.sigma_max > 0:
        raise SystemExit(f"--norm-eps {args.norm_eps} / --time-sigma {args.time_sigma} / --dm-sigma {args.dm_sigma} / --dm-shift "
                         f"{args.dm_shift} / --sigma-max {args.sigma_max}: expected positive values (dm-shift >= 0)")
    thetas = (math.atan(args.sigma_max), *args.sample_thetas, 0.0)
    if any(a <= b for a, b in zip(thetas, thetas[1:])):
        raise SystemExit(f"--sample-thetas {' '.join(map(str, args.sample_thetas))}: expected decreasing TrigFlow times in "
                         f"(0, atan(sigma_max) = {thetas[0]:.4f})")
    if max(args.eval_steps) > len(args.sample_thetas) + 1:
        raise SystemExit(f"--eval-steps {max(args.eval_steps)}: expected at most {len(args.sample_thetas) + 1} (one more than --sample-thetas)")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def rho(t):
    """1 / (cos + sin) of TrigFlow time theta = atan(t / (1 - t)): x_theta = x_t / rho."""
    return ((1 - t) ** 2 + t**2).sqrt()


def sample_t(n, mu, sigma, like, shift=0.0):
    """t = sigmoid(N(mu, sigma)) (official LogNormal on t = sigma / (1 + sigma)); shift > 0: the official UniformShift."""
    kw = dict(device=like.device, dtype=like.dtype)
    if shift > 0:
        u = torch.rand(n, **kw)
        return shift * u / (1 + (shift - 1) * u)
    return torch.sigmoid(mu + sigma * torch.randn(n, **kw))


def guided(teacher, x_t, t, y, null, w):
    """Teacher velocity with classifier-free guidance v_u + w (v_c - v_u) (one batched call)."""
    if w == 1.0:
        return teacher(x_t, t, t, y)
    v = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    v_c, v_u = v.chunk(2)
    return v_u + w * (v_c - v_u)


def cm_g(net, teacher_v, x_t, t, y, r):
    """One forward WITH grad u = net(x_t, t, 0, y) and the no-grad direction g: ayf's EMD at s = 0 with the official
    warm-up converted. One torch.func.jvp under no_grad in fp32; fork_rng: the grad forward reuses its dropout masks."""
    s = torch.zeros_like(t)
    with torch.no_grad():
        v = teacher_v(x_t, t, y).to(x_t.dtype)
        devices = [x_t.device] if x_t.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.autocast(x_t.device.type, enabled=False):
            du = torch.func.jvp(lambda z, t_: net(z, t_, s, y), (x_t, t), (v, torch.ones_like(t)))[1]
    u = net(x_t, t, s, y)
    with torch.no_grad():
        u_sg, h, p2 = u.detach().to(x_t.dtype), bc(t, x_t), bc(rho(t) ** 2, x_t)
        a = (((1 - h) ** 2 + (1 - r**2) * h**2).sqrt() - h * (1 - 2 * h)) / p2  # 1 at r = 1
        g = a * (u_sg - v) + h * du - (1 - r) * h * x_t / p2**2  # d/dt [t u] - v_T at r = 1: zero on the exact map
    return u, g


def cm_loss(net, teacher_v, x, y, r, args):
    """The sCM term on a data batch x: x_t = (1 - t) x + t e, t ~ p_G, then the normalized regression on F's u-part rho u."""
    e = torch.randn_like(x)
    t = sample_t(len(x), args.time_mu, args.time_sigma, x)
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    u, g = cm_g(net, teacher_v, x_t, t, y, r)
    with torch.no_grad():
        g_norm = g.flatten(1).norm(dim=1)
        w = 1 / (g_norm + args.norm_eps / ((1 - t) * rho(t)))  # = g_trig's official 1 / (||g_trig|| + c), converted
        step = bc(w, g) * g
    a = bc(rho(t), x) * u.to(x.dtype)  # F = (cos - sin) x_t + rho u: the part of F the net moves
    loss = ((a - (a.detach() - step)) ** 2).flatten(1).sum(1).mean()
    return loss, {"cm_loss": loss.detach(), "g_norm": g_norm.mean(), "w": (rho(t) * w).mean()}


def denoise(net, x_t, t, y):
    """The consistency map G(x_t, t) = x_t - t net(x_t, t, 0, y), the flow map to s = 0."""
    return x_t - bc(t, x_t) * net(x_t, t, torch.zeros_like(t), y)


def generate(net, e, y, n, args, grad=True):
    """Backward simulation (official backward_simulation): n jumps to 0 from t_0 = 1, t_j = min(t ~ p_D, t_{j-1}),
    re-noised to t_j with fresh noise in between; only the last jump carries grad (with `grad`)."""
    t = torch.ones(len(e), device=e.device, dtype=e.dtype)
    x = e
    with torch.no_grad():
        for _ in range(n - 1):
            t_next = torch.minimum(sample_t(len(e), args.dm_mu, args.dm_sigma, e, args.dm_shift), t)
            x = (1 - bc(t_next, x)) * denoise(net, x, t, y) + bc(t_next, x) * torch.randn_like(x)
            t = t_next
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return denoise(net, x, t, y)


def dm_loss(x0, y, teacher_v, fake, args):
    """DMD2's normalized distribution-matching loss, time p_D, summed over dims: its x0-gradient is 2 grad / B."""
    t = sample_t(len(x0), args.dm_mu, args.dm_sigma, x0, args.dm_shift)
    with torch.no_grad():
        x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * torch.randn_like(x0)
        v_real, v_fake = teacher_v(x_t, t, y).to(x0.dtype), fake(x_t, t, t, y).to(x0.dtype)
        w = (x0 - (x_t - bc(t, x0) * v_real)).abs().flatten(1).mean(1).clamp(min=1e-5)
        grad = bc(t, x0) * (v_real - v_fake) / bc(w, x0)
    loss = ((x0 - (x0 - grad).detach()) ** 2).flatten(1).sum(1).mean()
    return loss, {"dm_loss": loss.detach(), "dm_w": w.mean()}


def fake_loss(fake, x0, y, args):
    """Flow matching of the fake velocity on sg(x0), t ~ p_D, weight rho(t)^2 (the official x0-regression / sin^2)."""
    x0, n, t = x0.detach(), torch.randn_like(x0), sample_t(len(x0), args.dm_mu, args.dm_sigma, x0, args.dm_shift)
    x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * n
    loss = (bc(rho(t) ** 2, x0) * (fake(x_t, t, t, y).to(x0.dtype) - (n - x0)) ** 2).flatten(1).sum(1).mean()
    return loss, {"fake_loss": loss.detach()}


@torch.no_grad()
def sample(net, e, y, steps, args):
    """Consistency sampling from t_0 = sigma_max / (1 + sigma_max), x = rho(t_0) e; re-noised to the sample_thetas times."""
    thetas = torch.tensor([math.atan(args.sigma_max), *args.sample_thetas[: steps - 1]], dtype=torch.float64)
    ts = (thetas.sin() / (thetas.sin() + thetas.cos())).tolist() + [0.0]
    x = rho(torch.tensor(ts[0])).item() * e
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = denoise(net, x, torch.full((len(x),), t, device=e.device, dtype=e.dtype), y)
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

    teacher, teacher_net = load_teacher(args.teacher, args.dataset, info, device, loader.gmm)
    teacher_v = lambda x_t, t, y: guided(teacher, x_t, t, y, null, args.teacher_cfg)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    fake = copy.deepcopy(net).requires_grad_(True)  # the fake velocity also starts as the teacher
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    LOGGED = ("loss", "cm_loss", "dm_loss", "g_norm", "w", "dm_w", "r", "grad_norm", "fake_loss", "fake_grad_norm")
    gen_log = torch.nn.Module()  # the last student-turn and fake-turn terms, checkpointed so a resumed run logs the same rows
    gen_log.register_buffer("v", torch.zeros(len(LOGGED), device=device))
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k, args)
    saved = {"net": net, "ema": ema, "opt": opt, "fake": fake, "opt_fake": opt_fake, "gen_log": gen_log}
    ddp_net, ddp_fake = ddp(net, world), ddp(fake, world)
    cm_loss, dm_loss, fake_loss = compiled(cm_loss, args), compiled(dm_loss, args), compiled(fake_loss, args)  # --compile (common/run.py)

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
        for g in [*opt.param_groups, *opt_fake.param_groups]:
            g["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        net.train()
        fake.train()
        dmd = step >= args.tangent_warmup and args.dm_weight > 0  # the warm-up: the sCM term alone, no fake net
        after = step - args.tangent_warmup  # steps since the warm-up; the k-th student / fake update sets the rollout
        gen_turn = not dmd or (after + 1) % args.ttur == 0  # two time-scale update rule: fake every step, student every ttur-th
        n_gen = (args.tangent_warmup + (after + 1) // args.ttur - 1) % args.backsim_steps + 1  # official get_effective_iteration
        n_fake = after % args.backsim_steps + 1
        r = min(1.0, (step + 1) / args.tangent_warmup) if args.tangent_warmup else 1.0
        x, y = next(loader)  # this rank's share of the global batch
        terms, gen_terms, zero = [], [], torch.zeros((), device=device)
        for i, (x, y) in enumerate(zip(x.chunk(args.grad_accum), y.chunk(args.grad_accum))):
            torch.manual_seed(micro_seed(args.seed, step, rank * args.grad_accum + i))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
            with no_sync([ddp_net, ddp_fake], i < args.grad_accum - 1):
                if gen_turn:  # student: the sCM term on data (+ the DMD term on its own rollout after the warm-up)
                    with amp:
                        loss_c, t_c = cm_loss(ddp_net, teacher_v, x, y, r, args) if args.cm_weight > 0 else (zero, dict.fromkeys(("cm_loss", "g_norm", "w"), zero))
                        loss_d, t_d = (dm_loss(generate(ddp_net, torch.randn_like(x), y, n_gen, args), y, teacher_v, fake, args) if dmd
                                       else (zero, {"dm_loss": zero, "dm_w": zero}))
                    loss = args.cm_weight * loss_c + args.dm_weight * loss_d
                    (loss / args.grad_accum).backward()
                    gen_terms.append({"loss": loss.detach(), **t_c, **t_d})
                if dmd:  # fake velocity: flow matching on a rollout of its own (no grad), every step after the warm-up
                    with amp:
                        loss_f, t_f = fake_loss(ddp_fake, generate(ddp_net, torch.randn_like(x), y, n_fake, args, grad=False), y, args)
                    (loss_f / args.grad_accum).backward()
                    terms.append(t_f)
        if gen_turn:
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            t_g = mean_terms(gen_terms)
            gen_log.v[:8].copy_(torch.stack([*(t_g[k].float() for k in LOGGED[:6]), torch.full((), r, device=device), gnorm.float()]))
        if dmd:
            fnorm = torch.nn.utils.clip_grad_norm_(fake.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            gen_log.v[8:].copy_(torch.stack([mean_terms(terms)["fake_loss"].float(), fnorm.float()]))
        terms = dict(zip(LOGGED, gen_log.v.clone()))
        stop_if_nonfinite(terms, step, run_dir)
        if dmd:
            opt_fake.step()
            opt_fake.zero_grad(set_to_none=True)
        if gen_turn:
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
