"""FSF-DMD: distribution matching for a flow-map generator without a fake score network.

Paper: "Distribution Matching Distillation without Fake Score Network" (2026; authors and arXiv
id not in the plain-text copy cleanflow was built from). No official code.
RECONSTRUCTION: the plain-text copy lost every equation; what is below is rebuilt from its prose,
its appendix and the project's notes on it, and every constant we could not read is a flag.

Idea: DMD2 (methods/dmd2.py; diff the two files) needs a fake velocity net that tracks the
generator. If the generator is a flow map f(x_t, t, s) = x_t - (t - s) net(x_t, t, s, y), its own
endpoint pseudo-velocity u(x_t, t, 0) = (x_t - f(x_t, t, 0)) / t is the fake velocity under the
PF-ODE coupling (paper eq. 10-13, A.3 eq. 43-46), so the fake net, its optimizer, its flow-
matching loop, the TTUR and the GAN are gone; the EMA generator supplies v_fake:

    L = L_CD + dm_weight * L_FSF                                        (paper eq. 15-16)
    L_CD  (AYF EMD, Sabour et al.): gap d = sigmoid(N(cd_mu, cd_sigma)), s ~ U(0, 1 - d), t = s + d
          (s = t on a diag_ratio fraction, paper B.1); x_t from data; no grad:
          (u_m, du_dt) = jvp(net(., ., s, y), (x_t, t), (v_T, 1)), g = (u_m - v_T) + r (t - s) du_dt,
          g <- g / (||g|| + cd_eps);  L_CD = ||net(x_t, t, s, y) - sg(u_m - g)||^2, r ramps 0 -> tangent_r
    L_FSF (eq. 14, 20-22): x0 from M = sim_steps flow-map steps from e, sg on every intermediate
          state (gradient through the last jump only); t = shift_b(U(t_min, t_max)) with
          shift_b(t) = b t / (1 + (b - 1) t); x_t = (1 - t) sg(x0) + t n;  v_real = v_T^cfg(x_t, t),
          v_fake = sg(ema(x_t, t, 0, y));  x0_real = x_t - t v_real;  w = mean_dims |x0 - x0_real|;
          grad = t (v_real - v_fake) / w;  L_FSF = 0.5 sum_dims (x0 - sg(x0 - grad))^2 (batch mean)
    self-teacher (`--teacher self`, eq. 23-25, from scratch): v_real = CFG of sg(ema(x_t, t, t, y)),
          and consistency training in place of L_CD: the same EMD form with the conditional
          velocity e - x as tangent and target (with r = 1 and no normalization this is MeanFlow).

Reconstructed or chosen here (not readable in the paper): the L_CD time law (LN pairs; AYF's gap law as a flag)
and its normalization constant; a JVP where the paper uses a finite difference; L_FSF summed over
dimensions like L_CD (DMD2 takes a mean over all elements; with Adam only the ratio of the two
terms matters, and summing keeps dm_weight independent of the data dimension); the DM time range
[t_min, t_max] of DMD2 before the shift; the fake side's own EMA decay --fake-ema-decay
(paper: 0.99995; --ema-decay is the evaluation EMA's); guidance on the teacher only inside [cfg_t_min, cfg_t_max). Not reproduced:
the paper's pseudo-Huber + cosine CD loss, random masking, NorMuon, the iMF/DMF conditioning.
Paper values (Tab. 6/8/9, as far as the copy's tables read): dm_weight 0.05 (flow-map init),
0.001 (FM init), 0.01 (scratch); shift b 10 (1 scratch); M = 2 (1 scratch); CFG 6.0 on [0, 0.9).
Finding (tests/test_fsf_dmd.py): with the independent noising above, L_FSF does not vanish at the
exact solution (the exact map is not its fixed point): E[x | x_t] differs from the ODE endpoint
f*(x_t, t, 0), and the difference contracts the samples (mode seeking); only its mean part vanishes.

Run:        python methods/fsf_dmd.py                   (gmm, teacher results/fm/gmm/model.safetensors)
            python methods/fsf_dmd.py --dataset mnist --steps 2000 --batch-size 64 --lr 1e-4 --ema-decay 0.99 --tangent-warmup 200
            python methods/fsf_dmd.py --teacher self --sim-steps 1 --shift 1 --dm-weight 0.01   (from scratch)
Reference:  results/fsf_dmd/<dataset>/ (teacher as in dmd2.py), efficiency vs DMD2 in results/fsf_dmd/efficiency/
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
    """fm checkpoint of the teacher ({dataset} is replaced), `oracle` for the exact gmm velocity, or `self` (from scratch)"""
    teacher_cfg: float = 1.0
    """guidance w of the teacher, v_cfg = v_u + w (v_c - v_u) (paper: 6.0; 1: none, so the target is the data law)"""
    cfg_t_min: float = 0.0
    """guidance applies for t in [cfg_t_min, cfg_t_max)"""
    cfg_t_max: float = 1.0
    """upper end of the guidance interval (paper: 0.9)"""
    dm_weight: float = 0.05
    """lambda of L_CD + lambda L_FSF (paper: 0.05 flow-map init, 0.001 FM init, 0.01 scratch)"""
    shift: float = 10.0
    """time shift b of the distribution-matching t, b t / (1 + (b - 1) t) (paper: 10; 1 scratch)"""
    t_min: float = 0.02
    """lower end of the distribution-matching time before the shift (as DMD2)"""
    t_max: float = 0.98
    """upper end of the distribution-matching time before the shift (as DMD2)"""
    sim_steps: int = 2
    """flow-map steps M of the backward simulation, sg on intermediates (paper: 2; 1 scratch)"""
    cd_time: str = "pair"
    """L_CD times: pair (paper B.1: two draws "then reordered", t = max, s = min; the law was lost in our copy:
    LN(cd_mu, cd_sigma)) or gap (AYF: d = sigmoid(N(cd_mu, cd_sigma)), s ~ U(0, 1 - d), t = s + d; AYF -0.6, 1.6)"""
    cd_mu: float = -0.4
    """mean of the L_CD time logit (a choice: MeanFlow's -0.4)"""
    cd_sigma: float = 1.0
    """std of the L_CD time logit (a choice: MeanFlow's 1.0)"""
    diag_ratio: float = 0.5
    """fraction of the L_CD batch with s = t (paper B.1: 50%)"""
    tangent_r_max: float = 1.0
    """final tangent weight r of EMD (paper: 1, the exact map is a fixed point only at r = 1; AYF: 0.99)"""
    tangent_warmup: int = 500
    """steps over which r ramps linearly from 0 to tangent_r_max"""
    tangent_norm: bool = False
    """normalize g / (||g|| + cd_eps) as AYF (paper A.4: CD trains stably without it, and it degrades CD)"""
    cd_eps: float = 0.1
    """EMD normalization constant (AYF: 0.1; only with --tangent-norm)"""
    fake_ema_decay: float = 0.99995
    """decay of the EMA generator that supplies v_fake (paper: 0.99995), separate from --ema-decay (evaluation)"""


def check_args(args):
    # ---- checks: a clear one-line error naming the flag (the generic flags: common/run.py)
    for name in ("sim_steps", "tangent_warmup"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if not 0 <= args.t_min < args.t_max <= 1 or not 0 <= args.cfg_t_min <= args.cfg_t_max <= 1:
        raise SystemExit(f"--t-min {args.t_min} / --t-max {args.t_max} / --cfg-t-min {args.cfg_t_min} / --cfg-t-max {args.cfg_t_max}: expected 0 <= min < max <= 1")
    for name in ("diag_ratio", "tangent_r_max", "fake_ema_decay"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a value in [0, 1]")
    if args.dm_weight < 0 or args.shift <= 0 or args.cd_eps <= 0 or args.cd_sigma <= 0 or args.cd_time not in ("pair", "gap"):
        raise SystemExit(f"--dm-weight {args.dm_weight} >= 0, --shift {args.shift} > 0, --cd-eps {args.cd_eps} > 0, --cd-sigma {args.cd_sigma} > 0, --cd-time pair|gap expected")


# ---------------------------------------------------------------- ALGO LOGIC
def bc(t, x):
    """[B] -> [B, 1, ...] to broadcast against x."""
    return t.view(-1, *[1] * (x.dim() - 1))


def guided(teacher, x_t, t, y, null, args):
    """Teacher velocity with classifier-free guidance v_u + w (v_c - v_u) inside [cfg_t_min, cfg_t_max)."""
    if args.teacher_cfg == 1.0:
        return teacher(x_t, t, t, y)
    v = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    v_c, v_u = v.chunk(2)
    w = torch.where((t >= args.cfg_t_min) & (t < args.cfg_t_max), args.teacher_cfg, 1.0)
    return v_u + bc(w, x_t) * (v_c - v_u)


def jump(net, x, t, s, y):
    """Flow-map step f(x_t, t, s) = x_t - (t - s) net(x_t, t, s, y) (t, s scalars)."""
    return x - (t - s) * net(x, t.expand(len(x)), s.expand(len(x)), y)


def generate(net, e, y, steps):
    """Flow-map-consistent backward simulation (paper eq. 19-20): `steps` flow-map steps on
    linspace(1, 0, steps + 1), sg on every intermediate state, gradient through the last jump only."""
    ts = torch.linspace(1, 0, steps + 1, device=e.device)
    x = e
    with torch.no_grad():
        for k in range(steps - 1):
            x = jump(net, x, ts[k], ts[k + 1], y)
    return jump(net, x, ts[-2], ts[-1], y)


@torch.no_grad()
def sample(net, e, y, steps):
    """K-step flow-map sampler: x <- x - (t_k - t_{k+1}) net(x, t_k, t_{k+1}, y)."""
    return generate(net, e, y, steps)


def sample_dm_t(n, args, device):
    t = args.t_min + (args.t_max - args.t_min) * torch.rand(n, device=device)
    return args.shift * t / (1 + (args.shift - 1) * t)


def dm_loss(x0, y, teacher, fake, null, args):
    """L_FSF (paper eq. 14, 22): the DMD2 loss with v_fake = fake(x_t, t, 0, y), the endpoint
    pseudo-velocity (pass the EMA generator, it is evaluated without grad)."""
    t = sample_dm_t(len(x0), args, x0.device)
    with torch.no_grad():
        x_t = (1 - bc(t, x0)) * x0 + bc(t, x0) * torch.randn_like(x0)
        v_real = guided(teacher, x_t, t, y, null, args)
        v_fake = fake(x_t, t, torch.zeros_like(t), y)
        w = (x0 - (x_t - bc(t, x0) * v_real)).abs().flatten(1).mean(1)
        grad = torch.nan_to_num(bc(t, x0) * (v_real - v_fake) / bc(w, x0))
    loss = 0.5 * ((x0 - (x0 - grad).detach()) ** 2).flatten(1).sum(1).mean()
    return loss, {"loss_dm": loss.detach(), "dm_w": w.mean()}


def sample_cd_ts(n, args, device):
    """L_CD times (--cd-time): pair, t = max and s = min of two LN(cd_mu, cd_sigma) draws (paper B.1), or
    AYF's gap d = sigmoid(N(cd_mu, cd_sigma)), s ~ U(0, 1 - d), t = s + d; s = t on the first
    round(diag_ratio n) rows."""
    a, b = torch.sigmoid(args.cd_mu + args.cd_sigma * torch.randn(2, n, device=device))
    if args.cd_time == "pair":
        t, s = torch.maximum(a, b), torch.minimum(a, b)
    else:
        s = (1 - a) * torch.rand(n, device=device)
        t = s + a
    return t, torch.where(torch.arange(n, device=device) < round(args.diag_ratio * n), t, s)


def cd_loss(net, teacher, x, y, null, r, args):
    """L_CD: AYF's EMD consistency distillation (Sabour et al. 2025, without tangent normalization by default) with the guided teacher velocity;
    with `--teacher self`, consistency training with the conditional velocity e - x instead."""
    e = torch.randn_like(x)
    t, s = sample_cd_ts(len(x), args, x.device)
    x_t = (1 - bc(t, x)) * x + bc(t, x) * e
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # same dropout masks below
        v = e - x if args.teacher == "self" else guided(teacher, x_t, t, y, null, args)
        u_m, du_dt = torch.func.jvp(lambda z, t_: net(z, t_, s, y), (x_t, t), (v, torch.ones_like(t)))
        g = (u_m - v) + r * bc(t - s, x) * du_dt
        if args.tangent_norm:
            g = g / (bc(g.flatten(1).norm(dim=1), x) + args.cd_eps)
    loss = ((net(x_t, t, s, y) - (u_m - g)) ** 2).flatten(1).sum(1).mean()
    return loss, {"loss_cd": loss.detach()}


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

    if args.teacher == "self":  # from scratch: the EMA generator's velocity (s = t) is the teacher
        teacher, teacher_net = (lambda x_t, t, s, y: ema(x_t, t, t, y)), None
    else:
        teacher, teacher_net = load_teacher(args.teacher, args.dataset, info, device, loader.gmm)
    net = (copy.deepcopy(teacher_net).requires_grad_(True).train() if teacher_net is not None else make_net()).to(device)
    net.grad_ckpt = args.grad_ckpt
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    ema_fake = copy.deepcopy(ema)  # the fake side: v_fake = ema_fake(x_t, t, 0, y), its own (slow) decay
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=args.adam_betas, weight_decay=args.weight_decay, fused=device.type == "cuda")
    sample_fn = lambda e, y, k: sample(ema, e.to(device), y.to(device), k)
    saved = {"net": net, "ema": ema, "ema_fake": ema_fake, "opt": opt}  # no fake network, no second optimizer
    ddp_net = ddp(net, world)
    cd_loss, dm_loss = compiled(cd_loss, args), compiled(dm_loss, args)  # --compile (common/run.py)

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
            r = args.tangent_r_max * min(1.0, (step + 1) / args.tangent_warmup)
            with no_sync([ddp_net], i < args.grad_accum - 1):
                with amp:
                    loss_cd, t_i = cd_loss(ddp_net, teacher, x, y, null, r, args)
                    x0 = generate(ddp_net, torch.randn_like(x), y, args.sim_steps)
                    loss_dm, dm_terms = dm_loss(x0, y, teacher, ema_fake, null, args)  # the fake side is an EMA generator
                    loss = loss_cd + args.dm_weight * loss_dm
                (loss / args.grad_accum).backward()
            terms.append({**t_i, **dm_terms, "loss": loss.detach()})
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        terms = {**mean_terms(terms), "grad_norm": gnorm}
        stop_if_nonfinite(terms, step, run_dir)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the EMA records no autograd history
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - args.ema_decay)
            torch._foreach_lerp_(list(ema_fake.parameters()), list(net.parameters()), 1 - args.fake_ema_decay)

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
