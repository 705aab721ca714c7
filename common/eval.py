"""Evaluation helpers: sample quality at 1, 2 and 4 steps, sample grids, and a standalone scorer.

A method hands in `sample_fn(e, y, steps) -> x0` (its own sampler) and the data loader.
- vector data: energy distance between model samples and fresh data samples (`ed@K`); on `gmm`
  also the flow-map error against the exact oracle map f*(e, 1, 0) (`fm_err@K`, RMS distance
  between the model's K-step sample and the exact ODE endpoint of the same noise and label).
- images: Frechet distance of features (`fid@K`, clean-fid's formula). Features: for mnist a small
  CNN trained once on the shipped digits (seeded, cached under ~/.cache/cleanflow), plus `acc@K`,
  its accuracy on class-conditional samples; otherwise clean-fid's Inception network (Parmar et
  al., "On Aliased Resizing and Surprising Subtleties in GAN Evaluation", github.com/GaParmar/
  clean-fid) from a TorchScript file (`--inception`), on the evaluation device, after clean-fid's
  "clean" resize to 299 px. Latent data are decoded first by a diffusers AutoencoderKL from a local
  folder (`--vae`): z = x * std + mean (the shards' statistics), images = vae.decode(z).sample.
  The reference statistics come from an .npz with `mu` and `sigma` (`--fid-ref`, e.g. ADM's
  VIRTUAL_imagenet256_labeled.npz) or are computed once from n data rows.

Scale: under torch.distributed every rank draws the same noise (seeded, as one process would),
samples its contiguous share of the rows in batches, and features are reduced as sufficient
statistics (count, sum, sum of outer products in float64): 50k samples never sit in one batch or
one process, and every rank returns the same metrics. Run as a module to score a saved model:
`python -m common.eval --ckpt run/model.safetensors --fid-ref ref.npz --inception inception.pt ...`.
"""
import contextlib
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE = os.environ.get("CLEANFLOW_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cleanflow"))
CHUNK = 2000  # evaluation noise is drawn in chunks of this many rows (fixes the noise of every row)
DECODE = 32  # VAE decode batch (a 256 px decode is memory-hungry)
CLEANFID_INCEPTION = "/tmp/inception-2015-12-05.pt"  # where clean-fid caches its download on Linux


def energy_distance(a, b):
    """Energy distance 2E|a-b| - E|a-a'| - E|b-b'| (a V-statistic; 0 iff equal laws)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def time_forward(net, x, y, reps=10):
    """Median seconds of one forward pass of `net` on the batch (x, y) at random (t, s), without
    grad: the unit of the forward-pass-equivalent (FPE) cost. Leaves every RNG untouched."""
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(len(x), generator=gen).to(x.device)
    n_cond = getattr(net, "config", {}).get("n_cond", 0)  # extra scalar inputs (a guidance scale, ...): ones
    c = torch.ones(len(x), n_cond, device=x.device) if n_cond else None
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for i in range(reps + 3):
            sync()
            tic = time.perf_counter()
            net(x, t, t * 0.5, y, c)
            sync()
            times.append(time.perf_counter() - tic)
    net.train(was_training)
    return float(np.median(times[3:]))


# ---------------------------------------------------------------- distributed helpers
PRECISION = "fp32"  # the run's --precision (common.run.setup sets it): "bf16" samples, decodes and runs Inception under bf16 autocast


def _amp(device):
    """bf16 autocast on `device` when the run's precision is bf16 (autocast knows cpu and cuda)."""
    dev = torch.device(device).type
    if dev not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(dev, torch.bfloat16, enabled=PRECISION == "bf16")


def _from_rank0(fn):
    """fn() computed on rank 0 only (e.g. a 2048-d sqrtm) and handed to every rank."""
    rank, world = _rank_world()
    if world == 1:
        return fn()
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([fn() if rank == 0 else 0.0], dtype=torch.float64, device=dev)
    return _all_sum(t).item()


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _share(n, rank=None):
    """Rows [lo, hi) of n that this rank (or `rank`) evaluates: contiguous, sizes differ by <= 1."""
    r, w = _rank_world()
    r = r if rank is None else rank
    return r * n // w, (r + 1) * n // w


def _all_sum(t):
    if _rank_world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


def _gather_rows(x, n):
    """All n rows on every rank from each rank's share x (on the communication device)."""
    _, w = _rank_world()
    if w == 1:
        return x
    m = -(-n // w)
    pad = torch.cat([x, x.new_zeros(m - len(x), *x.shape[1:])])
    out = [torch.empty_like(pad) for _ in range(w)]
    torch.distributed.all_gather(out, pad)
    return torch.cat([o[:_share(n, i)[1] - _share(n, i)[0]] for i, o in enumerate(out)])


@torch.no_grad()
def draw(sample_fn, shape, labels, steps, seed, batch=CHUNK, rows=None):
    """Yields (rows, samples) for the evaluation rows [lo, hi) = `rows` (default: all), `batch` at a
    time. The noise of every row is drawn from one generator seeded with `seed`, in chunks of CHUNK
    rows as one process always did, so every step count, method and world size sees the same noise."""
    gen, n = torch.Generator().manual_seed(seed), len(labels)
    lo, hi = rows or (0, n)
    for i in range(0, hi, CHUNK):
        e = torch.randn(min(CHUNK, n - i), *shape, generator=gen)
        for j in range(max(lo, i), min(hi, i + len(e)), batch):
            r = slice(j, min(j + batch, hi, i + len(e)))
            yield r, sample_fn(e[r.start - i:r.stop - i], labels[r], steps)


class Stats:
    """Mean and covariance of feature rows from running sums (float64), summed over ranks."""

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, f):
        f = f.double()
        self.n, self.s, self.ss = self.n + len(f), self.s + f.sum(0), self.ss + f.T @ f

    def mu_sigma(self):
        d = len(self.s)
        flat = _all_sum(torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.s.device),
                                   self.s, self.ss.flatten()]))
        n, s, ss = flat[0].item(), flat[1:d + 1], flat[d + 1:].reshape(d, d)
        mu = s / n
        return mu.cpu().numpy(), ((ss - n * torch.outer(mu, mu)) / (n - 1)).cpu().numpy()


def frechet(a, b):
    """Frechet distance of two (mu, sigma) pairs (clean-fid's implementation)."""
    from cleanfid.fid import frechet_distance

    return float(frechet_distance(a[0], a[1], b[0], b[1]))


# ---------------------------------------------------------------- feature networks
class DigitCNN(nn.Module):
    """Small MNIST classifier; its 128-d penultimate layer is the FID feature space."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.conv(x))


def mnist_classifier(epochs=4, seed=0):
    """The cached digit classifier (trained deterministically on 4500 of the digits on first use);
    returns (model, accuracy on the other 500)."""
    from safetensors.torch import load_file, save_file

    from common.data import load_mnist

    path = os.path.join(CACHE, f"mnist_cnn_v2_e{epochs}_s{seed}.safetensors")
    model = DigitCNN()
    x, y = load_mnist()  # sorted by label: split by a fixed permutation
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    if os.path.isfile(path):
        model.load_state_dict(load_file(path))
    else:
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = DigitCNN()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _ in range(epochs):
                perm = torch.randperm(4500, generator=gen)
                for i in range(0, 4500, 100):
                    idx = perm[i:i + 100]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        os.makedirs(CACHE, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(model.state_dict(), tmp)
        os.replace(tmp, path)
    model.eval()
    with torch.no_grad():
        acc = (model(x[4500:]).argmax(1) == y[4500:]).float().mean().item()
    return model, acc


def load_inception(path, device):
    """(features, note): features maps uint8-range float images [N, 3, 299, 299] to [N, D]. `path`:
    clean-fid's Inception TorchScript file (inception-2015-12-05.pt) or any TorchScript module with
    that call; None tries clean-fid's own download cache."""
    if path is None:
        if not os.path.isfile(CLEANFID_INCEPTION):
            return None, "no Inception weights (pass --inception FILE, clean-fid's inception-2015-12-05.pt): FID skipped"
        path = CLEANFID_INCEPTION
    if not os.path.isfile(path):
        raise SystemExit(f"--inception {path}: no such file (expected clean-fid's inception-2015-12-05.pt)")
    try:
        net = torch.jit.load(path, map_location=device).eval()
    except Exception as err:
        raise SystemExit(f"--inception {path}: not a TorchScript module ({type(err).__name__})") from None
    if hasattr(net, "layers"):  # the real file: as clean-fid's InceptionV3W (resize_inside=False)
        feats = lambda x: net.layers((x - 128) / 128).reshape(len(x), -1)
    else:
        feats = lambda x: net(x).reshape(len(x), -1)
    try:  # one image now, rather than a failure at the first evaluation
        with torch.no_grad():
            probe = feats(torch.full((2, 3, 299, 299), 128.0, device=device))
        assert probe.dim() == 2 and probe.shape[0] == 2 and probe.dtype.is_floating_point
    except Exception as err:  # noqa: BLE001 - any other call signature is the same one-line error
        raise SystemExit(f"--inception {path}: does not map images [N, 3, 299, 299] to features [N, D] as clean-fid's "
                         f"inception-2015-12-05.pt does ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]})") from None
    return feats, None


def resize_clean(img):
    """clean-fid's "clean" resize to 299 px (PIL bicubic on each float channel, clipped to [0, 255]),
    batched on the images' device: torch's antialiased bicubic uses PIL's kernel (a = -0.5) and in
    float64 agrees with clean-fid's resizer to 2e-5 (of 255) from 16 to 512 px (tests/test_eval.py)."""
    return F.interpolate(img.double(), (299, 299), mode="bicubic", align_corners=False, antialias=True).clamp(0, 255).float()


def load_vae(spec, device):
    """A diffusers AutoencoderKL from a local folder (save_pretrained layout) or single file."""
    from diffusers.models import AutoencoderKL

    from common.data import vae_kind

    if not os.path.exists(spec):
        raise SystemExit(f"--vae {spec}: no such folder (expected a local diffusers AutoencoderKL folder)")
    vae_kind(spec)
    try:
        load = AutoencoderKL.from_pretrained if os.path.isdir(spec) else AutoencoderKL.from_single_file
        vae = load(spec, local_files_only=True)
    except Exception as err:
        raise SystemExit(f"--vae {spec}: cannot load a diffusers AutoencoderKL ({str(err).splitlines()[0][:200]})") from None
    return vae.to(device).eval().requires_grad_(False)


class Evaluator:
    """Metrics of a sampler at several step counts against a data set (see module docstring). Call
    it on every rank under torch.distributed. Uses its own generators: evaluating never changes
    the training stream. `note`: why a metric is skipped (or None); `decode`: latents -> images."""

    def __init__(self, loader, n=2000, seed=0, device="cpu", vae=None, fid_ref=None, inception=None, batch=250):
        self.loader, self.n, self.seed, self.device = loader, n, seed, torch.device(device)
        info = loader.info
        self.kind, self.note, self.shape, self.decode = info["kind"], None, tuple(info["shape"]), None
        self.batch = batch if self.kind == "image" else CHUNK
        gen = torch.Generator().manual_seed(seed + 1)
        if fid_ref is not None and getattr(loader, "shards", None) is not None:  # the labels only: no latent read
            real, self.labels = None, loader.shards.labels[loader._draw(n, gen)[0]]
        else:
            real, self.labels = loader.sample(n, gen)
        if self.kind == "vector":
            self.real = real
            if loader.gmm is not None:  # the exact endpoints of the evaluation noise, computed once
                e = torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(seed))
                self.exact = loader.gmm.flow_map(e.double(), 1.0, 0.0, self.labels, steps=100)
            return
        self.features, self.classify = self._extractor(info, vae, inception)
        if self.features is None:
            return
        dim = self.features(torch.zeros(2, *self.shape, device=self.device)).shape[1]
        if fid_ref is not None:
            self.ref = load_ref(fid_ref, dim)
        else:  # mnist: all 5000 digits as the reference set (as always); else the n data rows
            data, step = (loader.x, 500) if loader.name == "mnist" else (real, self.batch)
            stats, (lo, hi) = Stats(), _share(len(data))
            for i in range(lo, hi, step):
                stats.add(self.features(data[i:min(i + step, hi)].to(self.device)))
            self.ref = stats.mu_sigma()

    def _extractor(self, info, vae, inception):
        if self.loader.name == "mnist":
            model, self.classifier_acc = mnist_classifier()
            model = model.to(self.device)
            return (_nograd(lambda x: model.conv(x.clamp(-1, 1))),
                    _nograd(lambda x: model(x.clamp(-1, 1)).argmax(1)))
        channels = self.shape[0]
        if "mean" in info or self.loader.name == "imagenet-latent":
            named = info.get("vae")  # the shards' VAE: used when it is a local folder (never downloaded)
            vae = vae if vae is not None else (named if os.path.isdir(str(named)) else None)
            if vae is None:
                self.note = (f"latent data without a VAE (pass --vae DIR, a local diffusers AutoencoderKL folder"
                             f"{f' of {named}' if named else ''}): FID skipped, grids show latent channels 0-2")
                return None, None
            vae = load_vae(vae, self.device) if isinstance(vae, str) else vae
            if vae.config.latent_channels != channels:
                raise SystemExit(f"--vae: latent_channels {vae.config.latent_channels}, but the data have {channels} channels")
            shards = getattr(self.loader, "shards", None)
            mean, std = (torch.as_tensor(info.get(k, getattr(shards, k, v)), dtype=torch.float32).reshape(1, -1, 1, 1).to(self.device)
                         for k, v in (("mean", 0.0), ("std", 1.0)))
            self.decode = _nograd(lambda x: torch.cat([vae.decode(z * std + mean).sample.float() for z in
                                                       x.to(self.device).float().split(DECODE)]).clamp(-1, 1))
            channels = vae.config.out_channels
        net, self.note = load_inception(inception, self.device)
        if net is None or channels != 3:
            self.note = self.note or f"FID needs 3-channel images, the data have {channels}: skipped"
            return None, None
        decode = self.decode or (lambda x: x)

        def feats(x):  # as clean-fid: images -> uint8 values -> resized floats -> Inception
            u8 = ((decode(x.float()).clamp(-1, 1) + 1) * 127.5).round()
            return net(resize_clean(u8)).float()

        return _nograd(feats), None

    def __call__(self, sample_fn, steps=(1, 2, 4)):
        metrics = {"feature_net_acc": self.classifier_acc} if hasattr(self, "classifier_acc") else {}
        for k in steps:
            batches = draw(sample_fn, self.shape, self.labels, k, self.seed, self.batch, _share(self.n))
            if self.kind == "vector":
                with _amp(self.device):
                    x = torch.cat([x.float().to(self.device) for _, x in batches])
                x = _gather_rows(x, self.n).cpu()
                if not torch.isfinite(x).all():
                    metrics[f"nonfinite@{k}"] = 1.0
                    continue
                metrics[f"ed@{k}"] = energy_distance(x, self.real)
                if self.loader.gmm is not None:
                    metrics[f"fm_err@{k}"] = math.sqrt(((x.double() - self.exact) ** 2).sum(1).mean().item())
                continue
            stats, counts = Stats(), torch.zeros(2, dtype=torch.float64, device=self.device)  # [nonfinite, correct]
            with _amp(self.device):  # the sampler runs as the batches are drawn
                for rows, x in batches:
                    x = x.float().to(self.device)
                    if not torch.isfinite(x).all():
                        counts[0] += 1
                    elif self.features is not None:
                        stats.add(self.features(x))
                        if self.classify is not None:
                            counts[1] += (self.classify(x).cpu() == self.labels[rows]).sum()
            if _all_sum(counts)[0] > 0:
                metrics[f"nonfinite@{k}"] = 1.0
            elif self.features is not None:
                mu_sigma = stats.mu_sigma()  # a collective: every rank
                metrics[f"fid@{k}"] = _from_rank0(lambda: frechet(mu_sigma, self.ref))
                if self.classify is not None:  # float32 mean, as before
                    metrics[f"acc@{k}"] = (torch.tensor(counts[1].item(), dtype=torch.float32) / self.n).item()
        return metrics


def load_ref(path, dim):
    """(mu, sigma) from an .npz (ADM's reference batches and clean-fid's stats files have both)."""
    if not os.path.isfile(path):
        raise SystemExit(f"--fid-ref {path}: no such file (expected an .npz with mu [D] and sigma [D, D])")
    try:
        with np.load(path) as z:
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    except Exception as err:
        raise SystemExit(f"--fid-ref {path}: expected an .npz with arrays 'mu' and 'sigma' ({type(err).__name__}: {err})") from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise SystemExit(f"--fid-ref {path}: mu {mu.shape}, sigma {sigma.shape} do not fit the {dim}-d features of the feature network")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise SystemExit(f"--fid-ref {path}: mu or sigma holds NaN or inf values (a broken reference file)")
    return mu, sigma


def _nograd(fn):
    def run(x):
        with torch.no_grad(), _amp(x.device):
            return fn(x)
    return run


# ---------------------------------------------------------------- grids
@torch.no_grad()
def save_grid(sample_fn, loader, steps, path, seed=0, n=None, decode=None):
    """One figure with the model's samples at each step count (same noise), next to the data:
    a scatter for 2-D data, an image grid (a row of 10 per class, or 64) for images. `decode`
    (Evaluator.decode) turns latents into images; without it latent grids show channels 0-2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(seed)
    if loader.info["kind"] == "vector":
        real, y = loader.sample(n or 2000, torch.Generator().manual_seed(seed + 1))
        fig, axes = plt.subplots(1, len(steps) + 1, figsize=(3 * (len(steps) + 1), 3.2))
        panels = [("data", real)] + [(f"{k} step{'s' * (k > 1)}", torch.cat([x.float().cpu() for _, x in
                                      draw(sample_fn, real.shape[1:], y, k, seed)])) for k in steps]
        lim = real.abs().max().item() * 1.3
        for ax, (title, pts) in zip(axes, panels):
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
            ax.set_title(title)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    else:
        import torchvision

        k_cls = loader.info["num_classes"]
        n = n or (10 * min(k_cls, 10) if k_cls else 64)
        shape = loader.info["shape"]
        e = torch.randn(n, *shape, generator=gen)
        y = torch.arange(n) % max(min(k_cls, 10), 1) if k_cls else torch.zeros(n, dtype=torch.long)
        if k_cls:  # rows of one class each
            y = y.sort(stable=True).values
        fig, axes = plt.subplots(1, len(steps), figsize=(4 * len(steps), 4.3))
        for ax, k in zip(np.atleast_1d(axes), steps):
            x = sample_fn(e, y, k).float()
            x = (decode(x) if decode is not None else x).cpu().clamp(-1, 1)
            img = torchvision.utils.make_grid(x[:, :3] * 0.5 + 0.5, nrow=int(math.ceil(math.sqrt(n))) if not k_cls else n // min(k_cls, 10), padding=1)
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(f"{k} step{'s' * (k > 1)}")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------- standalone scorer
@dataclass
class Score:
    """Scores a saved model: `python -m common.eval --ckpt run/model.safetensors ...` (or under torchrun)."""

    ckpt: str
    """model.safetensors written by a method (the network config travels in its metadata)"""
    dataset: Optional[str] = None
    """data set (default: the checkpoint's)"""
    data_root: str = "data"
    """folder of cifar10 or of the imagenet-latent shards"""
    vae: Optional[str] = None
    """local diffusers AutoencoderKL folder decoding latent data (default: the shards' vae, if a local folder)"""
    inception: Optional[str] = None
    """clean-fid's Inception TorchScript file inception-2015-12-05.pt (or a stand-in with its call)"""
    fid_ref: Optional[str] = None
    """.npz with reference `mu` and `sigma` (e.g. ADM's VIRTUAL_imagenet256_labeled.npz); default: --samples data rows"""
    steps: tuple[int, ...] = (1, 2, 4)
    """sampling step counts to score"""
    samples: int = 50000
    """samples per step count"""
    sampler: Optional[Literal["flowmap", "euler", "denoiser"]] = None
    """flowmap: x <- x - (t_k - t_k+1) u(x, t_k, t_k+1); euler: u(x, t, t) as a velocity; denoiser: x0 = x - t u(x, t, t),
    re-noised to the next time (default: the checkpoint's `sampler` metadata, else flowmap)"""
    cfg_scale: Optional[float] = None
    """guidance u_null + w (u_y - u_null) (default: the checkpoint's `cfg_scale`, else 1: none)"""
    seed: int = 0
    """evaluation seed (noise, labels, data rows)"""
    batch: int = 250
    """samples per batch and process"""
    device: str = "auto"
    """auto | cpu | cuda"""
    out: Optional[str] = None
    """metrics JSON (default: eval_<sampler>.json next to --ckpt)"""


def make_sampler(net, kind, w, null, device):
    """sample_fn(e, y, k) of a network u(x, t, s, y) with one of the three samplers (see Score)."""

    def u(x, t, s, y):
        t, s = t.expand(len(x)), s.expand(len(x))
        if w == 1.0:
            return net(x, t, s, y)
        out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]), torch.cat([y, torch.full_like(y, null)]))
        u_y, u_null = out.chunk(2)
        return u_null + w * (u_y - u_null)

    @torch.no_grad()
    def sample(e, y, k):
        x, y, ts = e.to(device), y.to(device), torch.linspace(1, 0, k + 1, device=device)
        if kind == "denoiser":  # fresh noise per row, seeded by the row's own noise: batch- and rank-free
            seeds = [zlib.crc32(row.numpy().tobytes()) for row in e.cpu()]
            for j in range(k):
                x0 = x - ts[j] * u(x, ts[j], ts[j], y)
                if j < k - 1:
                    fresh = torch.stack([torch.randn(e.shape[1:], generator=torch.Generator().manual_seed(sd * 64 + j)) for sd in seeds])
                    x = (1 - ts[j + 1]) * x0 + ts[j + 1] * fresh.to(device)
            return x0
        for j in range(k):
            x = x - (ts[j] - ts[j + 1]) * u(x, ts[j], ts[j + 1] if kind == "flowmap" else ts[j], y)
        return x

    return sample


def score(args):
    from common.data import make_loader
    from common.dit import load, read_meta

    if args.samples < 2 or args.batch <= 0 or not args.steps or min(args.steps) <= 0:
        raise SystemExit(f"--samples {args.samples} / --batch {args.batch} / --steps {args.steps}: expected positive integers "
                         "(at least 2 samples: a distance needs a covariance)")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise SystemExit(f"--cfg-scale {args.cfg_scale}: expected a finite number")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device not in ("auto", "cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"--device {args.device}: expected auto, cpu or cuda (with a GPU)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    try:
        meta = read_meta(args.ckpt)
        net = load(args.ckpt, device=device).eval().requires_grad_(False)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:  # their text names the file too: once is enough
        raise SystemExit(f"--ckpt {args.ckpt}: {str(err).splitlines()[0].replace(f'checkpoint {args.ckpt}: ', '')}") from None
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise SystemExit(f"--ckpt {args.ckpt}: the network's weights hold NaN or inf values (a diverged run?); nothing to score")
    config, dataset = meta["config"], args.dataset or meta.get("dataset")
    if dataset is None:
        raise SystemExit(f"--dataset: the checkpoint {args.ckpt} does not name its data set; pass --dataset")
    if config.get("n_cond", 0):
        raise SystemExit(f"--ckpt {args.ckpt}: the network takes {config['n_cond']} extra conditions c; the scorer feeds none")
    sampler = args.sampler or meta.get("sampler", "flowmap")
    if sampler not in ("flowmap", "euler", "denoiser"):
        raise SystemExit(f"--sampler: the checkpoint names {sampler!r}; pass --sampler flowmap|euler|denoiser")
    w = args.cfg_scale if args.cfg_scale is not None else float(meta.get("cfg_scale", 1.0))
    loader = make_loader(dataset, world, args.seed, args.data_root)  # its batch size is unused here
    info = loader.info
    shape = (config["dim"],) if config["kind"] == "mlp" else (config["in_channels"], config["input_size"], config["input_size"])
    if tuple(shape) != tuple(info["shape"]) or config["num_classes"] != info["num_classes"]:
        raise SystemExit(f"--ckpt {args.ckpt}: network for data {shape} with {config['num_classes']} classes, but --dataset "
                         f"{dataset} has {tuple(info['shape'])} with {info['num_classes']}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"eval_{sampler}.json")
    if rank == 0:  # before the evaluation, not after it
        try:
            probe = f"{os.path.splitext(out)[0]}.tmp{os.getpid()}.json"
            open(probe, "w").close()
            os.remove(probe)
            if os.path.isdir(out):
                raise IsADirectoryError(21, "a folder")
        except OSError as err:
            raise SystemExit(f"--out {out}: cannot write it ({err.strerror or err})") from None
    tic = time.perf_counter()
    ev = Evaluator(loader, args.samples, args.seed, device, args.vae, args.fid_ref, args.inception, args.batch)
    ref_s = time.perf_counter() - tic
    metrics = ev(make_sampler(net, sampler, w, info["num_classes"], device), args.steps)
    result = dict(ckpt=args.ckpt, dataset=dataset, sampler=sampler, cfg_scale=w, samples=args.samples, seed=args.seed,
                  world_size=world, fid_ref=args.fid_ref, note=ev.note, metrics=metrics, setup_s=ref_s,
                  sampling_s=time.perf_counter() - tic - ref_s)
    if rank == 0:
        tmp = f"{os.path.splitext(out)[0]}.tmp{os.getpid()}.json"
        try:
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, out)
        except OSError as err:
            raise SystemExit(f"--out {out}: cannot write it ({err.strerror or err})") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        print(json.dumps(metrics))
        if ev.note:
            print(f"note: {ev.note}")
        print(f"wrote {out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    import tyro

    score(tyro.cli(Score, args=sys.argv[1:], prog="python -m common.eval"))
