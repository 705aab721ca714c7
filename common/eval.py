"""Evaluation helpers: sample quality at 1, 2 and 4 steps, and sample grids.

A method hands in `sample_fn(e, y, steps) -> x0` (its own sampler) and the data loader.
- vector data: energy distance between model samples and fresh data samples (`ed@K`); on `gmm`
  also the flow-map error against the exact oracle map f*(e, 1, 0) (`fm_err@K`, RMS distance
  between the model's K-step sample and the exact ODE endpoint of the same noise and label).
- images: FID through clean-fid's Frechet distance (`fid@K`). Features: for mnist a small CNN
  trained once on the shipped digits (seeded, cached under ~/.cache/cleanflow); otherwise
  clean-fid's Inception network where its weights can be loaded (none can be downloaded here).
  For mnist also `acc@K`: the CNN's accuracy on class-conditional samples (label fidelity).
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE = os.environ.get("CLEANFLOW_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cleanflow"))


def energy_distance(a, b):
    """Energy distance 2E|a-b| - E|a-a'| - E|b-b'| (a V-statistic; 0 iff equal laws)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


@torch.no_grad()
def draw(sample_fn, shape, labels, steps, gen, batch=2000):
    """Model samples at `steps` steps for the given labels, and the noise used. Noise comes from
    `gen` only, so every step count (and every method) sees the same noise."""
    xs, es = [], []
    for i in range(0, len(labels), batch):
        e = torch.randn(len(labels[i:i + batch]), *shape, generator=gen)
        xs.append(sample_fn(e, labels[i:i + batch], steps).float().cpu())
        es.append(e)
    return torch.cat(xs), torch.cat(es)


def time_forward(net, x, y, reps=10):
    """Median seconds of one forward pass of `net` on the batch (x, y) at random (t, s), without
    grad: the unit of the forward-pass-equivalent (FPE) cost. Leaves every RNG untouched."""
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(len(x), generator=gen).to(x.device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for i in range(reps + 3):
            sync()
            tic = time.perf_counter()
            net(x, t, t * 0.5, y)
            sync()
            times.append(time.perf_counter() - tic)
    net.train(was_training)
    return float(np.median(times[3:]))


# ---------------------------------------------------------------- image features
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


def inception():
    """clean-fid's Inception feature extractor, or None (with the reason) when its weights
    cannot be loaded (this workplace has no internet)."""
    try:
        from cleanfid.features import build_feature_extractor

        return build_feature_extractor("clean", torch.device("cpu")), None
    except Exception as err:  # no weights in the cache and no download possible
        return None, f"Inception weights unavailable ({type(err).__name__}); FID skipped"


def frechet(f1, f2):
    from cleanfid.fid import frechet_distance

    f1, f2 = f1.double().numpy(), f2.double().numpy()
    return float(frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)))


class Evaluator:
    """Metrics of a sampler at several step counts against a data set (see module docstring).
    Uses its own generators: evaluating never changes the training stream."""

    def __init__(self, loader, n=2000, seed=0):
        self.loader, self.n, self.seed = loader, n, seed
        self.kind, self.note, self.shape = loader.info["kind"], None, loader.info["shape"]
        real, self.labels = loader.sample(n, torch.Generator().manual_seed(seed + 1))
        if self.kind == "vector":
            self.real = real
            if loader.gmm is not None:  # the exact endpoints of the evaluation noise, computed once
                e = torch.randn(n, *self.shape, generator=torch.Generator().manual_seed(seed))
                self.exact = loader.gmm.flow_map(e.double(), 1.0, 0.0, self.labels, steps=100)
        else:
            self.features, self.classify = self._extractor()
            if self.features is not None:  # mnist: all 5000 digits as the reference set
                self.real_feat = self.features(loader.x if loader.name == "mnist" else real)

    def _extractor(self):
        if self.loader.name == "mnist":
            model, self.classifier_acc = mnist_classifier()
            feats = lambda x: torch.cat([model.conv(x[i:i + 500].clamp(-1, 1)) for i in range(0, len(x), 500)])
            return (lambda x: _nograd(feats, x)), (lambda x: _nograd(lambda z: model(z.clamp(-1, 1)).argmax(1), x))
        model, self.note = inception()
        if model is None or self.shape[0] != 3:
            self.note = self.note or "FID needs 3-channel images: skipped"
            return None, None
        from cleanfid.resize import build_resizer

        resize = build_resizer("clean")  # as clean-fid's own get_model_features: uint8 -> 299 px

        def feats(x):
            imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            big = torch.stack([torch.from_numpy(resize(im).transpose(2, 0, 1).copy()) for im in imgs])
            return torch.cat([model(big[i:i + 100]) for i in range(0, len(big), 100)]).float()

        return (lambda x: _nograd(feats, x)), None

    def __call__(self, sample_fn, steps=(1, 2, 4)):
        metrics = {"feature_net_acc": self.classifier_acc} if hasattr(self, "classifier_acc") else {}
        for k in steps:
            x, e = draw(sample_fn, self.shape, self.labels, k, torch.Generator().manual_seed(self.seed))
            if not torch.isfinite(x).all():
                metrics[f"nonfinite@{k}"] = 1.0
                continue
            if self.kind == "vector":
                metrics[f"ed@{k}"] = energy_distance(x, self.real)
                if self.loader.gmm is not None:
                    metrics[f"fm_err@{k}"] = math.sqrt(((x.double() - self.exact) ** 2).sum(1).mean().item())
            elif self.features is not None:
                metrics[f"fid@{k}"] = frechet(self.features(x), self.real_feat)
                if self.classify is not None:
                    metrics[f"acc@{k}"] = (self.classify(x) == self.labels).float().mean().item()
        return metrics


def _nograd(fn, x):
    with torch.no_grad():
        return fn(x)


# ---------------------------------------------------------------- grids
@torch.no_grad()
def save_grid(sample_fn, loader, steps, path, seed=0, n=None):
    """One figure with the model's samples at each step count (same noise), next to the data:
    a scatter for 2-D data, an image grid (a row of 10 per class, or 64) for images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = torch.Generator().manual_seed(seed)
    if loader.info["kind"] == "vector":
        real, y = loader.sample(n or 2000, torch.Generator().manual_seed(seed + 1))
        fig, axes = plt.subplots(1, len(steps) + 1, figsize=(3 * (len(steps) + 1), 3.2))
        panels = [("data", real)] + [(f"{k} step{'s' * (k > 1)}", draw(sample_fn, real.shape[1:], y, k, torch.Generator().manual_seed(seed))[0]) for k in steps]
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
            x = sample_fn(e, y, k).float().cpu().clamp(-1, 1)
            img = torchvision.utils.make_grid(x[:, :3] * 0.5 + 0.5, nrow=int(math.ceil(math.sqrt(n))) if not k_cls else n // min(k_cls, 10), padding=1)
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(f"{k} step{'s' * (k > 1)}")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
