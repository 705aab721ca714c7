"""The networks every method shares: a small DiT for images and an MLP for vectors.

Both are called as `net(x_t, t, s, y, c=None) -> u`: the average velocity from time t to time
s <= t (the README's notation). They embed t and h = t - s with two sinusoidal embedders, the
class label y (id `num_classes` is the null class used for guidance dropout; unconditional data
has num_classes = 0 and always passes y = 0), and `n_cond` optional extra scalars c [B, n_cond]
(a guidance scale, a guidance interval, ...). The output layer is zero-initialized (adaLN-zero).
`v_head=True` (improved MeanFlow) adds a second output layer: forward then returns (u, v).
TVM's tweaks (Zhou et al. 2025, github.com/lumalabs/tvm): `norm="rms"` (RMSNorm without affine in
place of the LayerNorms) and `modnorm=True` (each adaLN chunk RMS-normalized). Both default off
and enter the config only when on, so older checkpoints keep loading and resuming.
Decoupled MeanFlow (Lee, Yu, Shin 2026, github.com/kyungmnlee/dmf, models/dmft.py): `decouple=N`
(1 <= N <= depth) feeds the first N blocks ("encoder") the embedding of (t, h = 0, y, c) and the
remaining blocks and the output layer ("decoder") that of (s, h = 0, y, c), with the same embedders:
at s = t the network is the flow model it was copied from (a DMF fine-tune starts from an fm
checkpoint). 0 (default) is off; like the TVM options it adds no parameter and enters the config only
when on.
TwinFlow (Cheng et al. 2026, github.com/inclusionAI/TwinFlow, tutorials/mnist/networks.py): `linear_t=True` embeds t
by Linear(1, hidden) -> SiLU -> Linear (the official MNIST net's time embedder) in place of the sinusoid: TwinFlow
evaluates the net at negative times, and the sinusoid's cos half is even in t (only its sine half tells t from -t).
The h = t - s embedder keeps its sinusoid. Default off; when off the config and the parameters are as before.
Public teachers converted by `python -m common.convert` (DiT, SiT, REPA-SiT) use the same way:
`stored_pos=True` keeps the checkpoint's position embedding (a persistent buffer) and `param`
maps our (x_t, t) to the original's input and its output to our velocity e - x: "v" (ours, REPA),
"v_flip" (SiT: the net sees 1 - t and predicts x - e) or "eps_ddpm" (DiT: epsilon on the 1000-step
linear-beta schedule, see ddpm_time). `load_teacher` checks such a teacher's VAE and latent scale
against the data.

Attention goes through `kernels.attention_jvp.sdpa`, which has a forward-mode rule, so
`torch.func.jvp` through the DiT works (PyTorch's fused attention has none: kernels/attention_jvp.py).

Precision: the time embedding's sinusoid and the output are in the wider of the weights' dtype
and fp32: under `torch.autocast` (the `--precision bf16` of the method files) fp32, so targets and
losses stay fp32; a float64 network (`net.double()`) is float64 end to end (finite-difference checks). `net.grad_ckpt = True` recomputes each DiT block in the backward
(activation checkpointing) on forwards with grad outside a torch.func transform, on forward-AD dual
numbers too (TVM's JVP with grad: primal and tangent are recomputed together).

`save`/`load` use safetensors with the network config in the metadata, so a checkpoint rebuilds
its own network; `save_state`/`load_state` store a nested training state (optimizer, RNG
states) the same way. Writes are atomic (temporary file + os.replace).
"""
import contextlib
import copy
import json
import math
import os

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.attention_jvp import sdpa


DDPM_LINEAR = (1e-4, 0.02, 1000)  # DiT's (and ADM's) `get_named_beta_schedule("linear", 1000)`


def ddpm_time(t):
    """Our time t (x_t = (1 - t) x + t e) -> the point of DiT's discrete linear-beta DDPM schedule
    (x_k = sqrt(ab_k) x + sqrt(1 - ab_k) e) with the same signal-to-noise ratio, in float64:
    (t clamped to the schedule's range t(k=0) ~ 0.0099 .. t(k=999) ~ 0.9937, the continuous step k
    in [0, 999] (log ab linear between integer steps), the input scale 1 / sqrt((1 - t)^2 + t^2)
    mapping x_t to x_k). Outside that range the teacher is the one at the nearest end."""
    lo, hi, n = DDPM_LINEAR
    lab = torch.cumsum(torch.log1p(-torch.linspace(lo, hi, n, dtype=torch.float64, device=t.device)), 0)  # log ab_k
    ends = torch.exp(0.5 * (torch.log1p(-torch.exp(lab[[0, -1]])) - lab[[0, -1]]))  # sigma / alpha at k = 0, n - 1
    t = torch.clamp(t.double(), ends[0] / (1 + ends[0]), ends[1] / (1 + ends[1]))
    r2 = (1 - t) ** 2 + t**2
    target = 2 * torch.log1p(-t) - torch.log(r2)  # log ab of t: ab = (1 - t)^2 / r2
    i = torch.searchsorted(-lab, -target).clamp(1, n - 1)
    return t, i - 1 + (lab[i - 1] - target) / (lab[i - 1] - lab[i]), torch.rsqrt(r2)


def out_dtype(module):
    """The wider of the module's weight dtype and fp32: fp32 under bf16 autocast, float64 for a float64 net."""
    return torch.promote_types(next(module.parameters()).dtype, torch.float32)


def timestep_embedding(t, dim, max_period=10000.0, dtype=torch.float32):
    """Sinusoidal embedding of a scalar in [0, 1], unscaled (frequencies <= 1) as in the official
    MeanFlow DiT: a 1000x scale (DDPM DiT) makes d/dt of the network, and so every JVP target,
    needlessly large. Computed in `dtype` (fp32, or float64 for a float64 net)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    # the product before the view: under torch.compile, a view of a torch.func.jvp input whose primal is a
    # slice and whose tangent is not (MeanFlow's t[j:]) trips an internal assert of forward AD (torch 2.14)
    args = (t.to(dtype) * freqs[:, None]).T
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """Embeds a [B] scalar (t, h or an extra condition) into a [B, hidden] vector; `linear`: the raw scalar
    goes into the MLP (Linear(1, hidden) first, PyTorch's default init U(-1, 1)) in place of its sinusoid."""

    def __init__(self, hidden, freq_dim=256, linear=False):
        super().__init__()
        self.freq_dim, self.linear = freq_dim, linear
        self.mlp = nn.Sequential(nn.Linear(1 if linear else freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        if self.linear:
            return self.mlp(t.to(out_dtype(self))[:, None].to(self.mlp[0].weight.dtype))
        return self.mlp(timestep_embedding(t, self.freq_dim, dtype=out_dtype(self)).to(self.mlp[0].weight.dtype))


class Conditioning(nn.Module):
    """Sum of the t, h = t - s, class and extra-condition embeddings (shared by DiT and MLP)."""

    def __init__(self, hidden, num_classes, n_cond, linear_t=False):
        super().__init__()
        self.t_embed, self.h_embed = ScalarEmbedder(hidden, linear=linear_t), ScalarEmbedder(hidden)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # last id = null class
        self.c_embed = nn.ModuleList(ScalarEmbedder(hidden) for _ in range(n_cond))

    def forward(self, t, s, y, c, t_in=None):
        # t_in: the time the t embedder sees, if not t (a converted public teacher's own time scale)
        emb = self.t_embed(t if t_in is None else t_in) + self.h_embed(t - s) + self.y_embed(y)
        if len(self.c_embed):
            if c is None or c.shape[-1] != len(self.c_embed):
                raise ValueError(f"network expects c of shape [B, {len(self.c_embed)}], got {None if c is None else tuple(c.shape)}")
            emb = emb + sum(m(c[:, i]) for i, m in enumerate(self.c_embed))
        return emb


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with a correct gradient through its forward-mode tangent. torch's layer_norm JVP rule gives a
    wrong input gradient when the tangent is differentiated (torch 2.14.1 CPU: gradcheck fails; 8e-4 relative on
    FMM's loss with the MLP), which every loss that backpropagates through a JVP (tvm, lsd, esd, fmm, ayf
    --tangent-grad, pid --derivative jvp) does. A dual-number input therefore takes the formula written out;
    any other input takes torch's kernel, bit for bit as before (tests/test_dit.py)."""

    def forward(self, x):
        fwAD = torch.autograd.forward_ad
        if fwAD._current_level < 0 or fwAD.unpack_dual(x).tangent is None:
            return super().forward(x)
        out = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype  # autocast runs layer_norm in fp32
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        dims = tuple(range(-len(self.normalized_shape), 0))
        mu = xf.mean(dims, keepdim=True)
        y = (xf - mu) * torch.rsqrt(((xf - mu) ** 2).mean(dims, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias if self.bias is not None else y * self.weight
        return y.to(out)


def norm_layer(hidden, norm):
    """Pre-attention/MLP/final normalization without affine: "layer" (DiT) or "rms" (TVM)."""
    return nn.RMSNorm(hidden, eps=1e-6, elementwise_affine=False) if norm == "rms" else LayerNorm(hidden, elementwise_affine=False, eps=1e-6)


def mod_norm(a, n):
    """TVM's modulation norm: each of the n adaLN chunks of `a` [B, n*hidden] RMS-normalized (no weight)."""
    a = a.unflatten(-1, (n, -1))
    return (a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)).flatten(-2)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """DiT block with adaLN-zero conditioning; attention through sdpa (JVP-capable)."""

    def __init__(self, hidden, heads, mlp_ratio, qk_norm, dropout, norm="layer", modnorm=False):
        super().__init__()
        self.heads, self.modnorm = heads, modnorm
        self.norm1 = norm_layer(hidden, norm)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        head_dim = hidden // heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm2 = norm_layer(hidden, norm)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Dropout(dropout), nn.Linear(int(hidden * mlp_ratio), hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, emb):
        a = self.ada(emb)
        sh1, sc1, g1, sh2, sc2, g2 = (mod_norm(a, 6) if self.modnorm else a).chunk(6, dim=-1)
        B, N, C = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), sh1, sc1)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = sdpa(self.q_norm(q), self.k_norm(k), v).transpose(1, 2).reshape(B, N, C)
        x = x + g1[:, None] * self.drop(self.proj(a))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


def pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos position embedding, [grid*grid, dim]."""
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    out = [f(g.reshape(-1, 1) * omega) for g in (gy, gx) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()


def _dual_block(block, hp, ht, ep, et):
    """block on dual numbers built from plain (primal, tangent) pairs: in the caller's dual level, or in a
    fresh one when the backward recomputes it outside any."""
    fwAD = torch.autograd.forward_ad
    with contextlib.nullcontext() if fwAD._current_level >= 0 else fwAD.dual_level():
        return fwAD.unpack_dual(block(fwAD.make_dual(hp, ht), fwAD.make_dual(ep, et)))[:2]


def _checkpoint_dual(block, h, emb):
    """Activation checkpointing of a block whose inputs carry forward-AD tangents (TVM): the backward
    recomputes primal and tangent together, so the JVP with grad is checkpointed too."""
    fwAD = torch.autograd.forward_ad
    (hp, ht), (ep, et) = fwAD.unpack_dual(h)[:2], fwAD.unpack_dual(emb)[:2]
    ht, et = (torch.zeros_like(p) if d is None else d for p, d in ((hp, ht), (ep, et)))  # (a decoupled decoder's s: no tangent)
    hp, ht = torch.utils.checkpoint.checkpoint(_dual_block, block, hp, ht, ep, et, use_reentrant=False)
    return fwAD.make_dual(hp, ht)


class DiT(nn.Module):
    """A small Diffusion Transformer (Peebles & Xie 2023) conditioned on (t, h, y, c)."""

    def __init__(self, input_size=28, patch_size=4, in_channels=1, hidden=128, depth=4, heads=4, mlp_ratio=4.0,
                 num_classes=10, n_cond=0, qk_norm=False, dropout=0.0, v_head=False, norm="layer", modnorm=False, param="v", stored_pos=False,
                 decouple=0, linear_t=False):
        super().__init__()
        if input_size % patch_size or hidden % heads or (hidden // heads) % 2 or hidden % 4:
            raise ValueError(f"DiT: input_size {input_size} must be divisible by patch_size {patch_size}, "
                             f"hidden {hidden} by 4 and by heads {heads} (even head dim)")
        if not 0 <= decouple <= depth or (decouple and param == "eps_ddpm"):
            raise ValueError(f"DiT: decouple {decouple} must be in [0, depth {depth}] (and 0 with param eps_ddpm)")
        self.config = dict(kind="dit", input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden=hidden, depth=depth, heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                           n_cond=n_cond, qk_norm=qk_norm, dropout=dropout, **({"v_head": True} if v_head else {}))
        self.config.update({"norm": norm} if norm != "layer" else {}, **({"modnorm": True} if modnorm else {}))  # TVM options
        # public-teacher options (common/convert.py): output parameterization, position embedding from the checkpoint
        if param not in ("v", "v_flip", "eps_ddpm") or (param != "v" and v_head):
            raise ValueError(f"DiT: param {param!r} must be v, v_flip or eps_ddpm (and v without v_head)")
        self.config.update({"param": param} if param != "v" else {}, **({"stored_pos": True} if stored_pos else {}))
        self.config.update({"decouple": decouple} if decouple else {})  # DMF's encoder/decoder split
        self.config.update({"linear_t": True} if linear_t else {})  # TwinFlow's linear time embedding
        self.param, self.decouple = param, decouple
        self.modnorm = modnorm
        self.p, self.c, self.grid = patch_size, in_channels, input_size // patch_size
        self.patch = nn.Conv2d(in_channels, hidden, patch_size, patch_size)
        self.register_buffer("pos", pos_embed_2d(hidden, self.grid)[None], persistent=stored_pos)
        self.cond = Conditioning(hidden, num_classes, n_cond, linear_t)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio, qk_norm, dropout, norm, modnorm) for _ in range(depth))
        self.norm = norm_layer(hidden, norm)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, patch_size * patch_size * in_channels)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in [self.cond.t_embed, self.cond.h_embed, *self.cond.c_embed]:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        nn.init.normal_(self.cond.y_embed.weight, std=0.02)
        if linear_t:  # a scalar input: std 0.02 would leave the embedding nearly constant in t
            self.cond.t_embed.mlp[0].reset_parameters()
        for m in [*(b.ada[-1] for b in self.blocks), self.ada[-1], self.out]:  # adaLN-zero
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.grad_ckpt = False  # a run-time switch, not part of the config
        # v_head (improved MeanFlow): a second adaLN-zero final layer on the same trunk; forward returns (u, v)
        self.v_head = nn.ModuleList([copy.deepcopy(self.ada), copy.deepcopy(self.out)]) if v_head else None

    def forward(self, x, t, s, y, c=None):
        x_in, t_in, s_in = x, None, None
        if self.param == "v_flip":  # SiT: the net's time runs from noise (0) to data (1), it predicts x - e
            t_in, s_in = 1 - t, 1 - s
        elif self.param == "eps_ddpm":  # DiT: epsilon at the DDPM step of the same signal-to-noise ratio
            t_c, t_in, scale = ddpm_time(t)
            x_in = x * scale.to(x.dtype)[:, None, None, None]
        h = self.patch(x_in).flatten(2).transpose(1, 2) + self.pos
        emb = self.cond(t, t if self.decouple else s, y, c, t_in)
        emb_s = self.cond(s, s, y, c, s_in) if self.decouple else emb  # decoupled (DMF): the decoder sees s alone
        # checkpointing cannot run inside torch.func.jvp (functorch level set): plain blocks there; on
        # forward-AD dual numbers (TVM's JVP with grad) primal and tangent are checkpointed as a pair
        ckpt = self.grad_ckpt and torch.is_grad_enabled() and torch._C._functorch.maybe_current_level() is None
        dual = ckpt and torch.autograd.forward_ad.unpack_dual(emb).tangent is not None
        for i, block in enumerate(self.blocks):
            e = emb if i < self.decouple else emb_s  # emb_s is emb when not decoupled
            if dual:
                h = _checkpoint_dual(block, h, e)
            else:
                h = torch.utils.checkpoint.checkpoint(block, h, e, use_reentrant=False) if ckpt else block(h, e)
        u = self.final(h, emb_s, self.ada, self.out)
        if self.param == "v_flip":
            u = -u
        elif self.param == "eps_ddpm":  # x = (x_t - t eps) / (1 - t), v = eps - x = (eps - x_t) / (1 - t)
            u = ((u.double() - x.double()) / (1 - t_c)[:, None, None, None]).to(u.dtype)
        return u if self.v_head is None else (u, self.final(h, emb_s, *self.v_head))

    def final(self, h, emb, ada, out):
        a = ada(emb)
        shift, scale = (mod_norm(a, 2) if self.modnorm else a).chunk(2, dim=-1)
        h = out(modulate(self.norm(h), shift, scale))
        h = h.reshape(len(h), self.grid, self.grid, self.p, self.p, self.c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(len(h), self.c, self.grid * self.p, self.grid * self.p).to(out_dtype(out))


class MLP(nn.Module):
    """Residual MLP for vector data, same call signature and conditioning as the DiT."""

    def __init__(self, dim=2, hidden=256, depth=4, num_classes=0, n_cond=0, dropout=0.0, v_head=False, decouple=0, linear_t=False):
        super().__init__()
        if not 0 <= decouple <= depth:
            raise ValueError(f"MLP: decouple {decouple} must be in [0, depth {depth}]")
        self.config = dict(kind="mlp", dim=dim, hidden=hidden, depth=depth, num_classes=num_classes, n_cond=n_cond,
                           dropout=dropout, **({"v_head": True} if v_head else {}), **({"decouple": decouple} if decouple else {}),
                           **({"linear_t": True} if linear_t else {}))
        self.decouple = decouple  # as in the DiT: blocks[:decouple] see t, the rest s
        self.inp = nn.Linear(dim, hidden)
        self.cond = Conditioning(hidden, num_classes, n_cond, linear_t)
        self.blocks = nn.ModuleList(
            nn.Sequential(LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Dropout(dropout),
                          nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(LayerNorm(hidden), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)
        self.v_head = copy.deepcopy(self.out) if v_head else None  # as in the DiT: forward returns (u, v)

    def forward(self, x, t, s, y, c=None):
        emb = self.cond(t, t if self.decouple else s, y, c)
        emb_s = self.cond(s, s, y, c) if self.decouple else emb
        h = self.inp(x) + emb
        for i, block in enumerate(self.blocks):
            h = h + block(h + (emb if i < self.decouple else emb_s))
        dt = out_dtype(self.out)
        return self.out(h).to(dt) if self.v_head is None else (self.out(h).to(dt), self.v_head(h).to(dt))


def build(config):
    """Rebuilds a network from its config dict (as stored in a checkpoint)."""
    config = dict(config)
    kind = config.pop("kind")
    return {"dit": DiT, "mlp": MLP}[kind](**config)


def write_atomic(path, write):
    """write(tmp) into a temporary file beside `path` (same extension), then os.replace: a reader
    never sees a torn file, and a kill leaves only a *.tmp* file (removed at the next start)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_save(tensors, metadata, path):
    def write(tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _sort_header(tmp)

    write_atomic(path, write)


def _sort_header(path):
    """safetensors writes its metadata in hash order, so identical runs gave different bytes:
    rewrite the header (same length) with sorted keys."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
        meta = head.pop("__metadata__", None)
        new = json.dumps({**({"__metadata__": dict(sorted(meta.items()))} if meta else {}), **dict(sorted(head.items()))},
                         separators=(",", ":")).encode()
        if len(new) <= n:
            f.seek(8)
            f.write(new.ljust(n))


def save(net, path, **meta):
    """Writes the weights and the config (plus any extra string-able metadata) atomically."""
    net = getattr(net, "module", net)
    meta = {"config": net.config, **meta}
    _atomic_save(net.state_dict(), {k: json.dumps(meta[k], sort_keys=True) for k in sorted(meta)}, path)


def read_meta(path):
    """Returns the metadata dict of a checkpoint (values JSON-decoded), with a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise ValueError(f"checkpoint {path}: not a safetensors file ({err})") from None
    return {k: json.loads(v) for k, v in meta.items()}


def load(path, expect=None, prefix="", device="cpu"):
    """Rebuilds the network stored at `path`. `expect`: config entries that must match."""
    meta = read_meta(path)
    if "config" not in meta:
        raise ValueError(f"checkpoint {path}: no network config in its metadata")
    config = meta["config"]
    for k, v in (expect or {}).items():
        if config.get(k) != v:
            raise ValueError(f"checkpoint {path}: network has {k}={config.get(k)!r}, expected {v!r}")
    net = build(config)
    with safe_open(path, framework="pt", device=str(device)) as f:
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    net.load_state_dict(state)
    return net.to(device)


def _flatten(obj, prefix, tensors, rest):
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
    elif isinstance(obj, dict):
        rest[prefix] = {"__dict__": [str(k) for k in obj], "__int__": [isinstance(k, int) for k in obj]}
        for k, v in obj.items():
            _flatten(v, f"{prefix}/{k}", tensors, rest)
    elif isinstance(obj, (list, tuple)):
        rest[prefix] = {"__list__": len(obj)}
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}/{i}", tensors, rest)
    else:
        rest[prefix] = obj


def _unflatten(prefix, tensors, rest):
    if prefix in tensors:
        return tensors[prefix]
    node = rest[prefix]
    if isinstance(node, dict) and "__dict__" in node:
        return {(int(k) if i else k): _unflatten(f"{prefix}/{k}", tensors, rest)
                for k, i in zip(node["__dict__"], node["__int__"])}
    if isinstance(node, dict) and "__list__" in node:
        return [_unflatten(f"{prefix}/{i}", tensors, rest) for i in range(node["__list__"])]
    return node


def save_state(state, path):
    """Atomically writes a nested dict of tensors / JSON values (e.g. model, EMA, optimizer and
    RNG states) as one safetensors file; non-tensor leaves live in the metadata."""
    tensors, rest = {}, {}
    _flatten(state, "", tensors, rest)
    # safetensors refuses tensors that share storage (tied weights, RNG states): a fresh CPU copy of
    # each, made tensor by tensor (no second copy of the whole state on the GPU)
    _atomic_save({k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, {"state": json.dumps(rest)}, path)


def load_state(path):
    """Inverse of save_state."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {path}: no such checkpoint")
    with safe_open(path, framework="pt") as f:
        rest = json.loads((f.metadata() or {}).get("state", "null") or "null")
        if rest is None:
            raise ValueError(f"--resume {path}: not a training checkpoint (no 'state' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _unflatten("", tensors, rest)


def load_teacher(spec, dataset, info, device="cpu", gmm=None):
    """The frozen teacher of a distillation method, as `teacher(x_t, t, s, y) -> velocity`, and
    its network (None for the oracle). `spec`: a checkpoint path, where `{dataset}` is replaced
    (default `results/fm/{dataset}/model.safetensors`, the fm reference run), or `oracle` for the
    exact velocity of the `gmm` mixture. Every mismatch is a one-line SystemExit naming --teacher."""
    if spec == "oracle":
        if gmm is None:
            raise SystemExit(f"--teacher oracle: only the gmm data set has an exact velocity, not {dataset}")
        return (lambda x_t, t, s, y: gmm.velocity(x_t, t, y)), None
    path = spec.format(dataset=dataset)
    try:
        meta = read_meta(path)
        net = load(path, device=device)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        raise SystemExit(f"--teacher {path}: {err}") from None
    config = meta["config"]
    if meta.get("method", "fm") != "fm":
        raise SystemExit(f"--teacher {path}: a {meta['method']} checkpoint; expected a flow-matching teacher (methods/fm.py or common.convert)")
    if meta.get("dataset", dataset) != dataset:
        raise SystemExit(f"--teacher {path}: trained on {meta['dataset']}, not on --dataset {dataset}")
    shape = (config["dim"],) if config["kind"] == "mlp" else (config["in_channels"], config["input_size"], config["input_size"])
    if tuple(shape) != tuple(info["shape"]) or config["num_classes"] != info["num_classes"]:
        raise SystemExit(f"--teacher {path}: network for data {shape} with {config['num_classes']} classes, "
                         f"expected {tuple(info['shape'])} with {info['num_classes']}")
    if "latent_scale" in meta:  # a converted public teacher (common/convert.py): the latents it was trained on
        sc, (mean, std) = meta["latent_scale"], (torch.as_tensor(info.get(k, math.nan), dtype=torch.float64) for k in ("mean", "std"))
        if not (mean.abs().max() < 1e-6 and (std * sc - 1).abs().max() < 1e-4):
            raise SystemExit(f"--teacher {path}: expects latents z * {sc} (shards with mean 0 and std 1/{sc}: `python -m "
                             f"common.data encode --norm sd`), the --data-root shards have mean {mean.tolist()}, std {std.tolist()}")
        if info.get("vae") and os.path.basename(str(info["vae"]).rstrip("/")) not in meta["vae_encoders"]:
            raise SystemExit(f"--teacher {path}: expects latents of the {' / '.join(meta['vae_encoders'])} encoder, "
                             f"the --data-root shards were encoded with {info['vae']}")
    net.requires_grad_(False).eval()
    return net, net
