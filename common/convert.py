"""A public DiT / SiT / REPA-SiT checkpoint as a plain checkpoint of our DiT (the distillation teacher).

    python -m common.convert --from sit|repa|dit --ckpt PATH --out teacher.safetensors [--data-root SHARDS]

then `python methods/<method>.py --dataset imagenet-latent --data-root SHARDS --teacher teacher.safetensors`.
Nothing is downloaded here: PATH is a file the user fetched from the official repositories
(facebookresearch/DiT `DiT-XL-2-256x256.pt`, willisma/SiT `SiT-XL-2-256x256.pt`, sihyun-yu/REPA
`last.pt`) or a train.py checkpoint of theirs (the `ema` weights are taken), as .pt or .safetensors.

The three share the original DiT code's key layout (Peebles & Xie 2023): x_embedder.proj (patch
conv), pos_embed (fixed 2-D sin-cos, copied as stored: our `stored_pos`), t_embedder.mlp.{0,2},
y_embedder.embedding_table (num_classes + 1 rows: the last is the null class of guidance, as ours),
blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1} and final_layer.{linear,
adaLN_modulation.1}; the blocks, adaLN order (shift, scale, gate x 2), LayerNorms (no affine, eps
1e-6), tanh-GELU and unpatchify are ours. REPA's `projectors.*` (its alignment heads) are dropped
(`decoder_blocks.*` of its legacy checkpoints renumbered after the blocks); a learned sigma (DiT,
SiT at 256) is the second half of the output CHANNELS, interleaved per patch pixel in
final_layer.linear ((p, p, C) rows), and is dropped. Our h = t - s embedder is added with its
output layer zero, so the teacher is exactly net(x_t, t, t, y) and a student copied from it starts
at the teacher. Time embedding: the original's sinusoid is ours (cat[cos, sin], frequencies
10000^(-i/half), no scale); what differs is the time it is fed (the `param` of our DiT):
  sit   x_t = t' x + (1 - t') e, model predicts x - e at t' = 1 - t      -> param "v_flip"
  repa  x_t = (1 - t) x + t e, model predicts e - x at t (ours)          -> param "v"
  dit   epsilon at integer step k of betas linspace(1e-4, 0.02, 1000)    -> param "eps_ddpm"
(SiT: transport/path.py ICPlan; REPA: loss.py SILoss "linear"; DiT: diffusion/gaussian_diffusion.py.)

Guidance: the distillation files apply v_u + w (v_c - v_u) on every channel (as REPA's sampler).
DiT's and SiT's `forward_with_cfg` guide only the first 3 of the 4 latent channels (channel 4 keeps
the conditional output, "for exact reproducibility"); the file records `cfg_channels: 3` for them,
used by nothing unless a method file chooses to. Latents: all three were trained on the Stable
Diffusion VAE's latents times 0.18215 (sd-vae-ft-ema and -mse share the encoder; only the
decoders differ), recorded as `vae`, `vae_encoders` and `latent_scale` and checked by
`load_teacher` against the shards' metadata (encode them with `--norm sd`).
"""
import argparse
import os
import re

import torch
from safetensors import SafetensorError

from common.dit import DiT, save

SD_SCALE = 0.18215
SOURCES = {  # param, learned sigma of the released 256px models, the sampling scripts' default decoder, cfg channels
    "dit": dict(param="eps_ddpm", learn_sigma=True, vae="stabilityai/sd-vae-ft-mse", cfg_channels=3,
                ref="Peebles & Xie 2023, github.com/facebookresearch/DiT"),
    "sit": dict(param="v_flip", learn_sigma=True, vae="stabilityai/sd-vae-ft-mse", cfg_channels=3,
                ref="Ma et al. 2024, github.com/willisma/SiT"),
    "repa": dict(param="v", learn_sigma=False, vae="stabilityai/sd-vae-ft-ema", cfg_channels=None,
                 ref="Yu et al. 2025, github.com/sihyun-yu/REPA"),
}
HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT/SiT S, B, L, XL


def read_state(path, trust_pickle=False):
    """The state dict of a checkpoint file: the `ema` (else `model`) entry of a train.py checkpoint,
    or the file itself; DDP / torch.compile prefixes removed."""
    if not os.path.isfile(path):
        raise SystemExit(f"--ckpt {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line error
        if "Unsupported global" in str(err):
            raise SystemExit(f"--ckpt {path}: holds pickled objects besides tensors (train.py's args?); "
                             "pass --trust-pickle if you trust the file") from None
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(err).splitlines() or [""])[0])[:120]
        raise SystemExit(f"--ckpt {path}: cannot read it as a .pt or .safetensors checkpoint ({type(err).__name__}: {first})") from None
    for key in ("ema", "model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SystemExit(f"--ckpt {path}: not a state dict of tensors (nor one under 'ema' / 'model')")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v.float() for k, v in obj.items()}


def convert(sd, source, path="checkpoint", learn_sigma=None, num_classes=None, heads=None):
    """Our DiT holding the weights of an original-layout state dict `sd` (see the module docstring),
    and the metadata of the converted file. Every mismatch is a one-line SystemExit naming `path`."""
    spec = SOURCES[source]
    learn_sigma = spec["learn_sigma"] if learn_sigma is None else learn_sigma
    sd = dict(sd)
    if "x_embedder.proj.weight" not in sd or "final_layer.linear.weight" not in sd:
        raise SystemExit(f"--ckpt {path}: not the DiT/SiT key layout (no x_embedder.proj.weight / final_layer.linear.weight; "
                         f"keys start {sorted(sd)[:4]}); expected a facebookresearch/DiT, willisma/SiT or sihyun-yu/REPA state dict")
    n_enc = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for k in [k for k in sd if k.startswith("decoder_blocks.")]:  # REPA legacy: decoder blocks follow the encoder's
        i, rest = k.split(".", 2)[1:]
        sd[f"blocks.{int(i) + n_enc}.{rest}"] = sd.pop(k)
    dropped = [k for k in sd if k.startswith("projectors.")]
    if dropped and source != "repa":
        raise SystemExit(f"--ckpt {path}: has REPA projectors.* weights, expected a plain {source.upper()} checkpoint (use --from repa)")
    for k in dropped:
        del sd[k]
    if any(".q_norm." in k or ".k_norm." in k for k in sd):
        raise SystemExit(f"--ckpt {path}: trained with REPA's --qk-norm (LayerNorm with affine on q, k), which our DiT does not have")
    w = sd["x_embedder.proj.weight"]
    hidden, c_in, p = w.shape[0], w.shape[1], w.shape[2]
    n_tok = sd["pos_embed"].shape[-2] if "pos_embed" in sd else 0
    grid = int(round(n_tok**0.5))
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if grid * grid != n_tok or n_tok == 0 or depth == 0:
        raise SystemExit(f"--ckpt {path}: pos_embed {tuple(sd['pos_embed'].shape) if 'pos_embed' in sd else None} and "
                         f"{depth} blocks; expected a square [1, N, {hidden}] position embedding and blocks.0..")
    heads = heads or HEADS.get(hidden)
    if heads is None:
        raise SystemExit(f"--ckpt {path}: hidden size {hidden} is not a DiT/SiT S/B/L/XL width; pass --heads")
    c_out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if c_out != c_in * (2 if learn_sigma else 1):
        raise SystemExit(f"--ckpt {path}: final_layer.linear gives {c_out} channels per pixel, expected "
                         f"{c_in * (2 if learn_sigma else 1)} for --from {source} with learn_sigma={learn_sigma} "
                         f"(pass --learn-sigma {'false' if learn_sigma else 'true'} if it was trained so)")
    table = sd["y_embedder.embedding_table.weight"]
    num_classes = table.shape[0] - 1 if num_classes is None else num_classes
    if table.shape[0] == num_classes:  # trained without label dropout: no null class, a zero row stands in
        table = torch.cat([table, torch.zeros_like(table[:1])])
    if table.shape[0] != num_classes + 1:
        raise SystemExit(f"--ckpt {path}: y_embedder.embedding_table has {table.shape[0]} rows, expected "
                         f"{num_classes + 1} (--num-classes {num_classes} + the null class)")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    try:
        net = DiT(input_size=grid * p, patch_size=p, in_channels=c_in, hidden=hidden, depth=depth, heads=heads,
                  mlp_ratio=mlp_ratio, num_classes=num_classes, param=spec["param"], stored_pos=True)
    except ValueError as err:  # e.g. --heads that do not divide the width
        raise SystemExit(f"--heads {heads}: does not fit the checkpoint's hidden size {hidden} (needs hidden / heads even); "
                         f"{path}: {err}") from None

    def keep_channels(t):  # output rows are (p, p, c_out): keep the first c_in channels of each pixel
        return t.reshape(p, p, c_out, *t.shape[1:])[:, :, :c_in].reshape(p * p * c_in, *t.shape[1:])

    try:
        ours = {"patch.weight": w, "patch.bias": sd.pop("x_embedder.proj.bias"), "pos": sd.pop("pos_embed").reshape(1, n_tok, hidden),
                "cond.y_embed.weight": table, "ada.1.weight": sd.pop("final_layer.adaLN_modulation.1.weight"),
                "ada.1.bias": sd.pop("final_layer.adaLN_modulation.1.bias"),
                "out.weight": keep_channels(sd.pop("final_layer.linear.weight")), "out.bias": keep_channels(sd.pop("final_layer.linear.bias"))}
        del sd["x_embedder.proj.weight"], sd["y_embedder.embedding_table.weight"]
        for i in (0, 2):
            for kind in ("weight", "bias"):
                ours[f"cond.t_embed.mlp.{i}.{kind}"] = sd.pop(f"t_embedder.mlp.{i}.{kind}")
        names = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3", "adaLN_modulation.1": "ada.1"}
        for b in range(depth):
            for theirs, mine in names.items():
                for kind in ("weight", "bias"):
                    key = f"blocks.{b}.{theirs}.{kind}"
                    if key not in sd:
                        raise SystemExit(f"--ckpt {path}: no {key}; expected the DiT/SiT block layout")
                    ours[f"blocks.{b}.{mine}.{kind}"] = sd.pop(key)
    except KeyError as err:
        raise SystemExit(f"--ckpt {path}: no {err.args[0]}; expected the DiT/SiT key layout (a truncated or other checkpoint?)") from None
    if sd:
        raise SystemExit(f"--ckpt {path}: unexpected keys {sorted(sd)[:5]} for --from {source}")
    gen = torch.Generator().manual_seed(0)  # h embedder: our usual first layer, a zero output layer
    h = net.cond.h_embed.mlp
    ours.update({"cond.h_embed.mlp.0.weight": torch.randn(h[0].weight.shape, generator=gen) * 0.02,
                 "cond.h_embed.mlp.0.bias": torch.zeros_like(h[0].bias),
                 "cond.h_embed.mlp.2.weight": torch.zeros_like(h[2].weight), "cond.h_embed.mlp.2.bias": torch.zeros_like(h[2].bias)})
    try:
        net.load_state_dict(ours)
    except RuntimeError as err:
        raise SystemExit(f"--ckpt {path}: shapes do not fit a DiT ({str(err).splitlines()[1].strip()[:200]})") from None
    meta = dict(method="fm", dataset="imagenet-latent", source=f"{source}: {os.path.basename(path)} ({spec['ref']})",
                vae=spec["vae"], vae_encoders=["sd-vae-ft-ema", "sd-vae-ft-mse"], latent_scale=SD_SCALE,
                cfg_channels=spec["cfg_channels"])
    return net, meta


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m common.convert", description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--from", dest="source", choices=sorted(SOURCES), help="layout and convention of --ckpt (required)")
    ap.add_argument("--ckpt", help="the original checkpoint (.pt or .safetensors) (required)")
    ap.add_argument("--out", help="our DiT checkpoint to write (.safetensors) (required)")
    ap.add_argument("--learn-sigma", choices=["true", "false"], help="default: true for dit and sit, false for repa")
    ap.add_argument("--num-classes", type=int, help="default: embedding rows - 1")
    ap.add_argument("--heads", type=int, help="default: from the width (S 6, B 12, L 16, XL 16)")
    ap.add_argument("--data-root", help="imagenet-latent shards to check the teacher against (shape, classes, VAE, scale)")
    ap.add_argument("--trust-pickle", action="store_true", help="torch.load a train.py checkpoint with weights_only=False")
    a, unknown = ap.parse_known_args(argv)
    if unknown:  # before the missing ones: a misspelled --from is named as such
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    missing = [f for f, v in (("--from", a.source), ("--ckpt", a.ckpt), ("--out", a.out)) if v is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")
    if os.path.abspath(a.out) == os.path.abspath(a.ckpt) or (os.path.exists(a.out) and os.path.samefile(a.out, a.ckpt)):
        raise SystemExit(f"--out {a.out}: is --ckpt; write the converted file elsewhere (the original is kept)")
    if a.heads is not None and a.heads <= 0:
        raise SystemExit(f"--heads {a.heads}: expected a positive integer")
    sd = read_state(a.ckpt, a.trust_pickle)
    ls = None if a.learn_sigma is None else a.learn_sigma == "true"
    net, meta = convert(sd, a.source, a.ckpt, ls, a.num_classes, a.heads)
    root, ext = os.path.splitext(a.out)
    tmp = f"{root}.tmp{os.getpid()}{ext}"  # written and checked, then moved to --out: nothing is left on a failed check
    try:
        if os.path.dirname(a.out):
            os.makedirs(os.path.dirname(a.out), exist_ok=True)
        save(net, tmp, **meta)
        if a.data_root:
            from common.data import make_loader
            from common.dit import load_teacher

            load_teacher(tmp, "imagenet-latent", make_loader("imagenet-latent", 1, root=a.data_root).info)
        os.replace(tmp, a.out)
    except (OSError, SafetensorError) as err:  # safetensors has its own error type for I/O
        raise SystemExit(f"--out {a.out}: cannot write it ({getattr(err, 'strerror', None) or str(err).splitlines()[0][:160]})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    c = net.config
    print(f"wrote {a.out}: DiT {c['input_size']}px/{c['patch_size']} hidden {c['hidden']} depth {c['depth']} "
          f"{c['num_classes']} classes, param {c.get('param', 'v')}, from {a.ckpt}")
    if a.data_root:
        print(f"checked against --data-root {a.data_root}: shape, classes, VAE and latent scale agree")


if __name__ == "__main__":
    main()
