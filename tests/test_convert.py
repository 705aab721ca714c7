"""common/convert.py against an independent implementation of the original DiT architecture:
diffusers' DiTTransformer2DModel with random weights, mapped here (by hand, below) to the key
layout of facebookresearch/DiT, converted, and compared as velocities for each convention.

The diffusers port differs from the original in one place, its time sinusoid (frequencies
10000^(-i/(half-1)), `downscale_freq_shift=1`, where DiT and SiT use 10000^(-i/half)); the tests
set it to the original's. Each diffusers block also carries its own copy of the time/class
embedders (a single one in the original): the tests tie them.
"""
import argparse
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.convert import SD_SCALE, convert
from common.dit import load, load_teacher, save
from conftest import ROOT, run_method

diffusers = pytest.importorskip("diffusers")

C, SIZE, P, HID, HEADS, DEPTH, K = 4, 8, 2, 16, 2, 2, 10  # channels, latent side, patch, width, heads, blocks, classes


@functools.lru_cache(maxsize=None)  # built once per shape; the tests only read it
def diffusers_dit(out_channels, seed=0):
    """A tiny DiTTransformer2DModel with every weight random (adaLN, output layer and position
    embedding included), in float64, time sinusoid and embedders as in the original DiT."""
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HID // HEADS, in_channels=C,
                                        out_channels=out_channels, num_layers=DEPTH, sample_size=SIZE, patch_size=P,
                                        num_embeds_ada_norm=K, norm_eps=1e-6).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.pos_embed.pos_embed.normal_(0, 1.0)
        emb0 = m.transformer_blocks[0].norm1.emb
        for b in m.transformer_blocks:
            b.norm1.emb.load_state_dict(emb0.state_dict())
            b.norm1.emb.time_proj.downscale_freq_shift = 0
    return m


def to_original(m):
    """The state dict of `m` in the key layout of facebookresearch/DiT models.py (timm Attention's
    fused qkv = rows [q; k; v], timm Mlp fc1/fc2, the embedders of block 0)."""
    s = {k: v.detach().clone().float() for k, v in m.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb."
    out = {"x_embedder.proj.weight": s["pos_embed.proj.weight"], "x_embedder.proj.bias": s["pos_embed.proj.bias"],
           "pos_embed": m.pos_embed.pos_embed.detach().clone().float(),
           "y_embedder.embedding_table.weight": s[emb + "class_embedder.embedding_table.weight"],
           "final_layer.adaLN_modulation.1.weight": s["proj_out_1.weight"], "final_layer.adaLN_modulation.1.bias": s["proj_out_1.bias"],
           "final_layer.linear.weight": s["proj_out_2.weight"], "final_layer.linear.bias": s["proj_out_2.bias"]}
    for i, j in ((0, 1), (2, 2)):
        for kind in ("weight", "bias"):
            out[f"t_embedder.mlp.{i}.{kind}"] = s[emb + f"timestep_embedder.linear_{j}.{kind}"]
    for b in range(DEPTH):
        d = f"transformer_blocks.{b}."
        for kind in ("weight", "bias"):
            out[f"blocks.{b}.attn.qkv.{kind}"] = torch.cat([s[d + f"attn1.to_{n}.{kind}"] for n in "qkv"])
            out[f"blocks.{b}.attn.proj.{kind}"] = s[d + f"attn1.to_out.0.{kind}"]
            out[f"blocks.{b}.mlp.fc1.{kind}"] = s[d + f"ff.net.0.proj.{kind}"]
            out[f"blocks.{b}.mlp.fc2.{kind}"] = s[d + f"ff.net.2.{kind}"]
            out[f"blocks.{b}.adaLN_modulation.1.{kind}"] = s[d + f"norm1.linear.{kind}"]
    return out


def ours(sd, source, **kw):
    net, meta = convert(sd, source, heads=HEADS, **kw)
    return net.double().eval(), meta


def inputs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K + 1, (n,), generator=g)  # K: the null class
    return torch.randn(n, C, SIZE, SIZE, generator=g, dtype=torch.float64), y


def rel_err(a, b):
    """Largest per-sample error relative to the sample's largest reference entry."""
    return ((a.double() - b.double()).flatten(1).abs().amax(1) / b.double().flatten(1).abs().amax(1)).max().item()


@torch.no_grad()
def test_dit_epsilon_teacher_gives_the_velocity_of_the_original():
    m = diffusers_dit(2 * C)
    net, meta = ours(to_original(m), "dit")
    # DiT's schedule (diffusion/gaussian_diffusion.py, "linear"): betas linspace(1e-4, 0.02, 1000), ab = cumprod(1 - betas)
    ab_all = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    k = torch.tensor([0, 1, 37, 250, 500, 777, 900, 999])
    ab = torch.from_numpy(ab_all[k.numpy()])
    a, s = ab.sqrt(), (1 - ab).sqrt()
    t = s / (a + s)  # our time with the same signal-to-noise ratio: x_t = x_k / (a + s)
    x_t, y = inputs(len(k))
    x_k = (a + s)[:, None, None, None] * x_t
    eps = m(x_k, k, y).sample[:, :C]  # the learned-sigma half is not the teacher's
    x0 = (x_k - s[:, None, None, None] * eps) / a[:, None, None, None]
    v_ref = eps - x0  # our velocity e - x with DiT's own estimates of e and x
    v = net(x_t, t, t, y)
    # diffusers rounds the sinusoid arguments k * freq (k up to 999) in fp32, our float64 net does not: 2.4e-5
    assert rel_err(v, v_ref) < 5e-5, rel_err(v, v_ref)
    assert meta["cfg_channels"] == 3 and net.config["param"] == "eps_ddpm"
    # the ends: outside k in [0, 999] the teacher is the one at the nearest end
    assert torch.equal(net(x_t[:2], torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), y[:2]),
                       net(x_t[:2], t[[-1, -1]], t[[-1, -1]], y[:2]))


@torch.no_grad()
def test_sit_teacher_flips_time_and_sign():
    m = diffusers_dit(2 * C)
    net, meta = ours(to_original(m), "sit")
    t_sit = torch.tensor([0.0, 0.03, 0.25, 0.5, 0.8, 1.0], dtype=torch.float64)  # SiT: t = 0 noise, x_t = t x + (1 - t) e
    x_t, y = inputs(len(t_sit))
    v_ref = -m(x_t, t_sit, y).sample[:, :C]  # SiT predicts x - e; ours is e - x
    v = net(x_t, 1 - t_sit, 1 - t_sit, y)
    assert rel_err(v, v_ref) < 1e-5, rel_err(v, v_ref)
    assert meta["cfg_channels"] == 3 and meta["method"] == "fm" and meta["source"].startswith("sit")


@torch.no_grad()
def test_repa_teacher_is_ours_and_drops_the_projectors():
    m = diffusers_dit(C)
    sd = to_original(m)
    sd.update({"projectors.0.0.weight": torch.randn(32, HID), "projectors.0.0.bias": torch.randn(32)})
    net, meta = ours(sd, "repa")
    t = torch.tensor([0.0, 0.1, 0.4, 0.6, 0.95, 1.0], dtype=torch.float64)  # REPA: x_t = (1 - t) x + t e, v = e - x (ours)
    x_t, y = inputs(len(t), seed=2)
    v = net(x_t, t, t, y)
    v_ref = m(x_t, t, y).sample
    assert rel_err(v, v_ref) < 1e-5, rel_err(v, v_ref)
    # h = t - s is embedded by a zero-output embedder: any s gives the teacher, whose h layer can still learn
    assert torch.equal(net(x_t, t, t * 0.3, y), v) and net.cond.h_embed.mlp[0].weight.abs().sum() > 0
    assert meta["cfg_channels"] is None


def test_float32_and_saved_file_agree(tmp_path):
    """The converted file, reloaded in float32 as the method files do, stays within 1e-4 of the original."""
    m = diffusers_dit(2 * C)
    net, meta = convert(to_original(m), "sit", "x.pt", heads=HEADS)
    save(net, tmp_path / "t.safetensors", **meta)
    back = load(tmp_path / "t.safetensors")
    assert back.config["stored_pos"] and torch.equal(back.pos, net.pos)
    t = torch.tensor([0.2, 0.7])
    x_t, y = inputs(2)
    with torch.no_grad():
        v_ref = -m(x_t, 1 - t.double(), y).sample[:, :C]
        assert rel_err(back(x_t.float(), t, t, y), v_ref) < 1e-4


# ---------------------------------------------------------------- bad input: one line naming the file
def convert_cli(tmp_path, sd, *flags):
    torch.save(sd, tmp_path / "in.pt")
    return convert_cli_file(tmp_path, *flags)


def convert_cli_file(tmp_path, *flags):
    ckpt = tmp_path / "in.pt"
    return subprocess.run([sys.executable, "-m", "common.convert", "--ckpt", str(ckpt), "--out", str(tmp_path / "o.safetensors"),
                           "--heads", str(HEADS), *flags], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("case,flags,needle", [
    ("diffusers", ["--from", "dit"], "not the DiT/SiT key layout"),
    ("plain", ["--from", "repa"], "gives 8 channels per pixel, expected 4"),
    ("plain", ["--from", "sit", "--learn-sigma", "false"], "expected 4"),
    ("projectors", ["--from", "sit"], "use --from repa"),
    ("plain", ["--from", "dit", "--num-classes", "7"], "has 11 rows, expected 8"),
    ("pickled", ["--from", "dit"], "pass --trust-pickle"),
    ("junk", ["--from", "dit"], "cannot read it"),
])
def test_bad_checkpoints_get_one_line(tmp_path, case, flags, needle):
    m = diffusers_dit(2 * C)
    sd = {k: v.float() for k, v in m.state_dict().items()} if case == "diffusers" else to_original(m)
    if case == "projectors":
        sd["projectors.0.0.weight"] = torch.zeros(3, HID)
    if case == "pickled":  # a train.py checkpoint: its argparse args need a full unpickler
        sd = {"ema": sd, "args": argparse.Namespace(model="DiT-XL/2")}
    proc = convert_cli(tmp_path, sd, *flags)
    if case == "junk":
        (tmp_path / "in.pt").write_text("not a checkpoint")
        proc = convert_cli_file(tmp_path, *flags)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert str(tmp_path / "in.pt") in lines[0] and needle in lines[0], lines[0]


def test_cli_writes_a_teacher_file(tmp_path):
    proc = convert_cli(tmp_path, {"ema": to_original(diffusers_dit(2 * C))}, "--from", "dit")
    assert proc.returncode == 0, proc.stderr
    net = load(tmp_path / "o.safetensors")
    with open(tmp_path / "o.safetensors", "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    assert json.loads(meta["latent_scale"]) == SD_SCALE and json.loads(meta["method"]) == "fm"
    assert net.config["param"] == "eps_ddpm" and net.config["num_classes"] == K


def sd_info(**kw):
    return {"kind": "image", "shape": (C, SIZE, SIZE), "num_classes": K, "mean": [0.0] * C, "std": [1 / SD_SCALE] * C,
            "vae": "stabilityai/sd-vae-ft-ema", "norm": "sd", **kw}


@pytest.mark.parametrize("info,needle", [
    (sd_info(), None),
    (sd_info(vae="/models/sd-vae-ft-mse/"), None),  # same encoder, local folder
    (sd_info(num_classes=1000), "with 10 classes, expected (4, 8, 8) with 1000"),
    (sd_info(shape=(4, 32, 32)), "network for data (4, 8, 8)"),
    (sd_info(mean=[0.1, 0.0, 0.0, 0.0], std=[5.0] * 4, norm="stats"), "expects latents z * 0.18215"),
    (sd_info(std=[1.0] * 4), "expects latents z * 0.18215"),
    (sd_info(vae="madebyollin/sdxl-vae-fp16-fix"), "encoded with madebyollin/sdxl-vae-fp16-fix"),
])
def test_load_teacher_checks_the_data(tmp_path, info, needle):
    net, meta = convert(to_original(diffusers_dit(C)), "repa", "r.pt", heads=HEADS)
    save(net, tmp_path / "t.safetensors", **meta)
    if needle is None:
        teacher, teacher_net = load_teacher(str(tmp_path / "t.safetensors"), "imagenet-latent", info)
        assert teacher_net.config["stored_pos"]
    else:
        with pytest.raises(SystemExit, match=None) as err:
            load_teacher(str(tmp_path / "t.safetensors"), "imagenet-latent", info)
        assert str(tmp_path / "t.safetensors") in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- end to end on tiny shards
@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Tiny imagenet-latent shards in the teachers' scaling (norm sd) and a converted SiT teacher."""
    from common.data import write_shard

    root = tmp_path_factory.mktemp("tiny")
    (root / "shards").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        write_shard(str(root / "shards" / f"shard_{i}.safetensors"), torch.randn(16, C, SIZE, SIZE, generator=g) / SD_SCALE,
                    torch.randint(0, K, (16,), generator=g), mean=0.0, std=1 / SD_SCALE, vae="stabilityai/sd-vae-ft-ema",
                    norm="sd", num_classes=K)
    net, meta = convert(to_original(diffusers_dit(2 * C)), "sit", "sit.pt", heads=HEADS)
    save(net, root / "teacher.safetensors", **meta)
    return root


def test_shards_check_at_conversion(tiny_set, tmp_path):
    proc = convert_cli(tmp_path, to_original(diffusers_dit(2 * C)), "--from", "sit", "--data-root", str(tiny_set / "shards"))
    assert proc.returncode == 0 and "agree" in proc.stdout, proc.stderr


# The conversion lives in the teacher file and the DiT's forward (param v_flip / eps_ddpm, stored_pos),
# which every distillation file loads through common.dit.load_teacher; every distillation file is run
# with a teacher file on imagenet-latent by tests/test_methods.py. Here two files drive the converted
# SiT teacher: a score-distillation one and a flow-map one (the teacher velocity is its JVP tangent).
@pytest.mark.parametrize("method", ["dmd2", "ayf"])
def test_converted_teacher_drives_distillation(tiny_set, tmp_path, method):
    run_method(os.path.join(ROOT, "methods", f"{method}.py"), "--dataset", "imagenet-latent", "--data-root", tiny_set / "shards",
               "--teacher", tiny_set / "teacher.safetensors", "--steps", 2, "--batch-size", 4, "--log-every", 1,
               "--eval-every", 2, "--eval-samples", 8, "--ckpt-every", 2, "--out-dir", tmp_path)
    summary = json.loads((tmp_path / method / "imagenet-latent" / "summary.json").read_text())
    assert summary["steps"] == 2


# ---------------------------------------------------------------- the command line, in-process (issue 22)
def convert_main(tmp_path, *flags):
    """common.convert's command line run in this process: (exit code, the last line it printed)."""
    import contextlib
    import io

    from common.convert import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(f) for f in flags])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            print(e.code if isinstance(e.code, str) else "", file=sys.stderr)
    text = (out.getvalue() + err.getvalue()).strip().splitlines()
    return code, text[-1] if text else ""


@pytest.mark.parametrize("source,channels,param", [("dit", 2 * C, "eps_ddpm"), ("sit", 2 * C, "v_flip"), ("repa", C, "v")])
def test_every_source_converts_from_the_command_line(tmp_path, source, channels, param):
    torch.save({"ema": to_original(diffusers_dit(channels))}, tmp_path / "in.pt")
    code, line = convert_main(tmp_path, "--from", source, "--ckpt", tmp_path / "in.pt", "--out", tmp_path / "o.safetensors", "--heads", HEADS)
    assert code == 0 and line.startswith(f"wrote {tmp_path / 'o.safetensors'}") and f"param {param}" in line, line
    assert load(tmp_path / "o.safetensors").config.get("param", "v") == param


def sd_without(key):
    sd = to_original(diffusers_dit(2 * C))
    del sd[key]
    return sd


@pytest.mark.parametrize("case,flags,needle", [
    ("same file", ["--out", "{ckpt}"], "--out {ckpt}: is --ckpt"),
    ("missing key", [], "no t_embedder.mlp.0.weight"),
    ("--heads 3", ["--heads", 3], "--heads 3: does not fit"),
    ("read-only out", ["--out", "/proc/cleanflow/o.safetensors"], "--out /proc/cleanflow/o.safetensors: cannot write"),
    ("out under a file", ["--out", "{ckpt}/o.safetensors"], "cannot write"),
    ("misspelled flag", ["--frm", "dit"], "unrecognized arguments: --frm"),
    ("failed data check", ["--data-root", "{tmp}/no_shards"], "no_shards"),
])
def test_convert_refuses_in_one_line_and_writes_nothing(tmp_path, case, flags, needle):
    ckpt, out = tmp_path / "in.pt", tmp_path / "o.safetensors"
    torch.save({"ema": sd_without("t_embedder.mlp.0.weight") if case == "missing key" else to_original(diffusers_dit(2 * C))}, ckpt)
    before = ckpt.read_bytes()
    fill = lambda s: str(s).replace("{ckpt}", str(ckpt)).replace("{tmp}", str(tmp_path))
    base = {"--from": "dit", "--ckpt": ckpt, "--out": out, "--heads": HEADS}
    for k, v in zip(flags[::2], flags[1::2]):
        base.pop("--from" if k == "--frm" else k, None)
        base[k] = fill(v)
    code, line = convert_main(tmp_path, *[x for kv in base.items() for x in kv])
    assert code != 0 and fill(needle) in line and "Traceback" not in line, line
    assert ckpt.read_bytes() == before and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]
