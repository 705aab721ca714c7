import pytest
import torch

from common.dit import DiT, MLP, build, load, save


def tiny_dit(**kw):
    return DiT(**{**dict(input_size=8, patch_size=2, in_channels=3, hidden=32, depth=2, heads=2, num_classes=10), **kw})


def randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # adaLN-zero makes a fresh net output 0: give every weight a value
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def test_shapes_and_zero_init():
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    y = torch.tensor([0, 5, 10])  # 10 = null class
    net = tiny_dit()
    out = net(x, t, t * 0.5, y)
    assert out.shape == x.shape and torch.all(out == 0)  # adaLN-zero output layer
    mlp = MLP(dim=5, hidden=16, depth=2, num_classes=3)
    assert mlp(torch.randn(4, 5), torch.rand(4), torch.rand(4), torch.zeros(4, dtype=torch.long)).shape == (4, 5)


@pytest.mark.parametrize("make", [lambda: tiny_dit(n_cond=2, qk_norm=True), lambda: MLP(dim=3, hidden=16, depth=2, num_classes=4, n_cond=2)])
def test_every_condition_matters(make):
    net = randomize(make()).eval()
    shape = (4, 3, 8, 8) if isinstance(net, DiT) else (4, 3)
    x, t, s = torch.randn(shape), torch.full((4,), 0.7), torch.full((4,), 0.2)
    y, c = torch.tensor([0, 1, 2, 3]), torch.rand(4, 2)
    base = net(x, t, s, y, c)
    for changed in [net(x, t + 0.1, s, y, c), net(x, t, s + 0.1, y, c), net(x, t, s, (y + 1) % 4, c), net(x, t, s, y, c + 0.5)]:
        assert (changed - base).abs().max() > 1e-4
    # each row depends only on its own inputs (no mixing across the batch)
    assert torch.allclose(net(x[:1], t[:1], s[:1], y[:1], c[:1]), base[:1], atol=1e-5)
    with pytest.raises(ValueError, match="expects c"):
        net(x, t, s, y)


def test_jvp_through_dit():
    net = randomize(tiny_dit())
    x, t, s, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.zeros(2), torch.tensor([1, 2])
    dx = torch.randn_like(x)
    u, du = torch.func.jvp(lambda z, t_: net(z, t_, s, y), (x, t), (dx, torch.ones(2)))
    eps = 1e-3  # central difference along the same direction
    fd = (net(x + eps * dx, t + eps, s, y) - net(x - eps * dx, t - eps, s, y)) / (2 * eps)
    assert torch.allclose(du, fd, atol=2e-2 * fd.abs().max().item())
    assert torch.allclose(u, net(x, t, s, y), atol=1e-5)


def test_save_load_roundtrip(tmp_path):
    for net, x in [(randomize(tiny_dit(n_cond=1)), torch.randn(2, 3, 8, 8)), (randomize(MLP(dim=2, hidden=8, depth=1)), torch.randn(2, 2))]:
        path = str(tmp_path / "m.safetensors")
        save(net, path, dataset="toy")
        net2 = load(path)
        args = (x, torch.rand(2), torch.rand(2) * 0.1, torch.zeros(2, dtype=torch.long))
        c = torch.rand(2, 1) if isinstance(net, DiT) else None
        assert torch.equal(net.eval()(*args, c), net2.eval()(*args, c))
        assert build(net.config).config == net.config


def test_load_errors(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save(tiny_dit(), path)
    with pytest.raises(ValueError, match="hidden=32, expected 64"):
        load(path, expect={"hidden": 64})
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(str(tmp_path / "missing.safetensors"))
    (tmp_path / "bad.safetensors").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load(str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_float64_end_to_end(kind):
    # the output is float64, and a central difference of the float64 net agrees with its JVP (in x and t) to 1e-8:
    # an fp32 step anywhere inside (the output cast, the time embedding) leaves 1e-3 or more
    net = randomize(tiny_dit() if kind == "dit" else MLP(dim=3, hidden=16, depth=2, num_classes=4)).double()
    shape = (2, 3, 8, 8) if kind == "dit" else (2, 3)
    g = torch.Generator().manual_seed(1)
    x, dx = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    t, s, y = torch.tensor([0.7, 0.4], dtype=torch.float64), torch.tensor([0.1, 0.0], dtype=torch.float64), torch.tensor([1, 2])
    f = lambda z, t_: net(z, t_, s, y)
    u, du = torch.func.jvp(f, (x, t), (dx, torch.ones_like(t)))
    assert u.dtype == du.dtype == torch.float64
    eps = 1e-5  # float64 truncation ~1e-10 and rounding ~1e-11; measured 1e-9 (dit), 6e-11 (mlp); fp32 inside: 3e-3, 3e-2
    fd = (f(x + eps * dx, t + eps) - f(x - eps * dx, t - eps)) / (2 * eps)
    err = ((du - fd).abs().max() / du.abs().max()).item()
    assert du.abs().max() > 1e-2 and err < 1e-8, err


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_bf16_autocast_returns_fp32(kind):
    net = randomize(tiny_dit() if kind == "dit" else MLP(dim=3, hidden=16, depth=2, num_classes=4))
    x = torch.randn((2, 3, 8, 8) if kind == "dit" else (2, 3))
    with torch.autocast("cpu", torch.bfloat16):
        out = net(x, torch.rand(2), torch.zeros(2), torch.tensor([1, 2]))
    assert out.dtype == torch.float32 and net(x, torch.rand(2), torch.zeros(2), torch.tensor([1, 2])).dtype == torch.float32
    assert net.bfloat16()(x.bfloat16(), torch.rand(2), torch.zeros(2), torch.tensor([1, 2])).dtype == torch.float32  # upcast only


# ---------------------------------------------------------------- the decoupled option (DMF)
def embeddings_seen(net, x, t, s, y):
    """The conditioning vector each DiT block and the output layer receive (forward pre-hooks)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[1])) for b in net.blocks]
    hooks.append(net.ada.register_forward_pre_hook(lambda m, a: seen.append(a[0])))
    out = net(x, t, s, y)
    for h in hooks:
        h.remove()
    return seen, out


def test_decoupled_dit_routes_t_to_the_encoder_and_s_to_the_decoder():
    net = randomize(tiny_dit(depth=3, decouple=2)).eval()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 7, 10])
    t, s = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.1, 0.2, 0.0, 0.3])
    seen, out = embeddings_seen(net, x, t, s, y)
    enc, dec = net.cond(t, t, y, None), net.cond(s, s, y, None)
    assert len(seen) == 4 and not torch.allclose(enc, dec)
    assert all(torch.equal(e, enc) for e in seen[:2]) and all(torch.equal(e, dec) for e in seen[2:])
    # the encoder's output does not depend on s; the net's does
    h0 = []
    hook = net.blocks[1].register_forward_hook(lambda m, a, o: h0.append(o))
    out2 = net(x, t, s * 0.5, y)
    net(x, t, s, y)
    hook.remove()
    assert torch.equal(h0[0], h0[1]) and (out2 - out).abs().max() > 1e-4


def test_decoupled_mlp_routes_t_to_the_encoder_and_s_to_the_decoder():
    net = randomize(MLP(dim=3, hidden=16, depth=3, num_classes=4, decouple=1)).eval()
    x, t, s, y = torch.randn(5, 3), torch.rand(5) * 0.5 + 0.5, torch.rand(5) * 0.5, torch.tensor([0, 1, 2, 3, 4])
    et, es = net.cond(t, t, y, None), net.cond(s, s, y, None)
    h = net.inp(x) + et
    h = h + net.blocks[0](h + et)
    for b in net.blocks[1:]:
        h = h + b(h + es)
    assert torch.allclose(net(x, t, s, y), net.out(h), atol=1e-6)


@pytest.mark.parametrize("kind", ["dit", "dit_v_flip", "mlp"])
def test_old_checkpoints_load_into_the_decoupled_net(kind, tmp_path):
    # a checkpoint written without the option (its config has no "decouple") loads as before, and its state dict
    # loads strictly into the decoupled net (no parameter added), which at s = t IS the old net (also a converted
    # SiT teacher, whose time runs the other way)
    make = {"dit": lambda **kw: tiny_dit(**kw), "dit_v_flip": lambda **kw: tiny_dit(param="v_flip", **kw),
            "mlp": lambda **kw: MLP(dim=3, hidden=16, depth=2, num_classes=4, **kw)}[kind]
    old = randomize(make()).eval()
    assert "decouple" not in old.config and make(decouple=0).config == old.config
    path = str(tmp_path / "old.safetensors")
    save(old, path)
    back = load(path)
    assert "decouple" not in back.config and back.decouple == 0
    new = build({**back.config, "decouple": 1}).eval()
    new.load_state_dict(back.state_dict())  # strict
    assert new.config["decouple"] == 1 and new.state_dict().keys() == old.state_dict().keys()
    x = torch.randn((4, 3) if kind == "mlp" else (4, 3, 8, 8))
    t, y = torch.rand(4), torch.tensor([0, 1, 2, 3])
    assert torch.allclose(new(x, t, t, y), old(x, t, t, y), atol=1e-6)
    assert not torch.allclose(new(x, t, 0.3 * t, y), old(x, t, 0.3 * t, y), atol=1e-4)
    save(new, path)
    assert load(path).config["decouple"] == 1


def test_decouple_bad_values():
    for kw in [dict(decouple=3), dict(decouple=-1), dict(decouple=1, param="eps_ddpm")]:
        with pytest.raises(ValueError, match="decouple"):
            tiny_dit(**kw)
    with pytest.raises(ValueError, match="decouple"):
        MLP(dim=2, hidden=8, depth=2, decouple=3)


def test_decoupled_dit_checkpointed_forward_ad_matches():
    # activation checkpointing on forward-AD dual numbers (TVM's JVP with grad): the decoder's s has no tangent
    fwAD = torch.autograd.forward_ad
    net = randomize(tiny_dit(decouple=1)).double()
    g = torch.Generator().manual_seed(2)
    x, dx = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t, s, y = torch.tensor([0.8, 0.6], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64), torch.tensor([1, 2])
    outs = []
    for ckpt in (False, True):
        net.grad_ckpt = ckpt
        with fwAD.dual_level():
            p, d = fwAD.unpack_dual(net(fwAD.make_dual(x, dx), fwAD.make_dual(t, torch.ones_like(t)), s, y))[:2]
        outs.append((p, d))
    ref = torch.func.jvp(lambda z, t_: net(z, t_, s, y), (x, t), (dx, torch.ones_like(t)))[1]
    assert torch.allclose(outs[0][1], ref) and torch.allclose(outs[1][1], ref) and torch.allclose(outs[1][0], outs[0][0])


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_tangent_has_the_right_gradient_and_plain_calls_are_torchs_kernel(affine):
    """torch's layer_norm forward-AD rule gives a wrong input gradient through the tangent (torch 2.14 CPU); the
    networks' LayerNorm writes the formula out for dual inputs (gradcheck passes) and is torch's kernel otherwise."""
    import torch.autograd.forward_ad as fwAD
    from common.dit import LayerNorm
    torch.manual_seed(0)
    ln = LayerNorm(8, elementwise_affine=affine, eps=1e-6).double()
    if affine:
        with torch.no_grad():
            ln.weight.normal_(), ln.bias.normal_()
    tx = torch.randn(3, 8, dtype=torch.float64)

    def through_tangent(x):
        with fwAD.dual_level():
            p, t = fwAD.unpack_dual(ln(fwAD.make_dual(x, tx)))
        return (t ** 2).sum() + (p * t).sum()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(through_tangent, (x,))
    ref = torch.nn.LayerNorm(8, elementwise_affine=affine, eps=1e-6).double()
    ref.load_state_dict(ln.state_dict())
    assert torch.equal(ln(x), ref(x))  # plain input: torch's kernel, bit for bit
    with fwAD.dual_level():  # dual input: the same values and tangent as torch's rule
        a, b = fwAD.unpack_dual(ln(fwAD.make_dual(x.detach(), tx))), fwAD.unpack_dual(ref(fwAD.make_dual(x.detach(), tx)))
    torch.testing.assert_close(a.primal, b.primal), torch.testing.assert_close(a.tangent, b.tangent)


# ---------------------------------------------------------------- the linear time embedding (TwinFlow)
def test_sinusoid_cos_half_cannot_tell_t_from_minus_t():
    # the sinusoid's cos half is even in t: an embedder reading only it (sine-half weights zero) maps t and -t to
    # the same vector; only the sine half is odd
    from common.dit import ScalarEmbedder, timestep_embedding

    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    a, b = timestep_embedding(t, 256, dtype=torch.float64), timestep_embedding(-t, 256, dtype=torch.float64)
    assert torch.equal(a[:, :128], b[:, :128]) and torch.equal(a[:, 128:], -b[:, 128:]) and a[:, 128:].abs().min() > 0
    emb = ScalarEmbedder(16).double()
    with torch.no_grad():
        emb.mlp[0].weight[:, 128:] = 0
    assert torch.equal(emb(t), emb(-t))


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_linear_t_tells_t_from_minus_t(kind):
    make = (lambda **kw: tiny_dit(**kw)) if kind == "dit" else (lambda **kw: MLP(dim=3, hidden=16, depth=2, num_classes=4, **kw))
    net = make(linear_t=True)
    assert net.config["linear_t"] is True and build(net.config).config == net.config
    assert net.cond.t_embed.mlp[0].in_features == 1 and net.cond.h_embed.mlp[0].in_features == 256  # h keeps its sinusoid
    t = torch.tensor([0.05, 0.3, 0.8])
    first = lambda z: net.cond.t_embed.mlp[0](z[:, None])  # the first layer's pre-activations: every channel odd-affine in t
    assert ((first(t) - first(-t)).abs() > 1e-4).float().mean() > 0.95  # the sinusoid: half the inputs equal
    w = net.cond.t_embed.mlp[0].weight.abs()
    assert 0.3 < w.mean() < 0.7  # PyTorch's default U(-1, 1) init, not the sinusoid's std 0.02 (a flat embedding)
    net = randomize(net).eval()
    x = torch.randn((3, 3, 8, 8) if kind == "dit" else (3, 3))
    y = torch.tensor([0, 1, 2])
    assert (net(x, t, t, y) - net(x, -t, -t, y)).abs().max() > 1e-3
    g = torch.func.jacrev(lambda t_: net(x, t_, t_, y).sum())(t)  # d/dt through Linear(1, hidden)
    assert g.abs().min() > 0


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_old_checkpoints_load_without_linear_t(kind, tmp_path):
    # off (default): no config key, the same parameters; a checkpoint written without the option loads unchanged
    make = (lambda **kw: tiny_dit(**kw)) if kind == "dit" else (lambda **kw: MLP(dim=3, hidden=16, depth=2, num_classes=4, **kw))
    torch.manual_seed(0)
    old = randomize(make()).eval()
    torch.manual_seed(0)
    off = make(linear_t=False)
    assert "linear_t" not in old.config and off.config == old.config
    assert {k: v.shape for k, v in off.state_dict().items()} == {k: v.shape for k, v in old.state_dict().items()}
    path = str(tmp_path / "old.safetensors")
    save(old, path)
    back = load(path).eval()
    off.load_state_dict(old.state_dict())  # strict
    x = torch.randn((2, 3, 8, 8) if kind == "dit" else (2, 3))
    args = (x, torch.rand(2), torch.rand(2) * 0.1, torch.tensor([1, 2]))
    assert "linear_t" not in back.config and torch.equal(back(*args), old(*args)) and torch.equal(off.eval()(*args), old(*args))
    new = make(linear_t=True)
    assert new.state_dict().keys() == old.state_dict().keys()  # the same names; only t_embed.mlp.0 is [hidden, 1]
    save(randomize(new), path)
    assert load(path).config["linear_t"] is True
