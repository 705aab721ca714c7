"""Drifting: the field against a hand computation and against the official batched formula (groups as
a leading axis, no masks), its scale invariance, its shrinking at q = p with the group size (the spec's
numbers on the mixture), the sign (the official loss trains a Gaussian toy; the flipped field drives it
away), the detached target, the one-step sampler, the digit-classifier features, and bad flags."""
import dataclasses
import os

import torch

from common.data import GMM, default_gmm
from common.eval import energy_distance, mnist_classifier
from conftest import ROOT, load_method, run_inline

drifting = load_method("drifting")
SCRIPT = os.path.join(ROOT, "methods", "drifting.py")
TEMPS = (0.02, 0.05, 0.2)


def official_batched(gen, pos, temps):
    """The official drift_loss's goal written for equal groups on a leading axis ([B, C, S], no masks,
    weights 1, no unconditional negatives): (goal [B, C_g, S], scale of the inputs)."""
    B, C, S = gen.shape
    tgt = torch.cat([gen, pos], 1)
    sq = ((gen[:, :, None, :] - tgt[:, None, :, :]) ** 2).sum(-1)
    dist = sq.clamp_min(1e-8).sqrt()
    scale = dist.mean()
    r = max(scale / S ** 0.5, 1e-3)
    dn = dist / max(scale, 1e-3)
    dn[:, torch.arange(C), torch.arange(C)] += 100.0
    total = torch.zeros_like(gen)
    for R in temps:
        a = (torch.softmax(-dn / R, -1) * torch.softmax(-dn / R, -2)).clamp_min(1e-6).sqrt()
        a_neg, a_pos = a[:, :, :C], a[:, :, C:]
        coef = torch.cat([-a_neg * a_pos.sum(-1, keepdim=True), a_pos * a_neg.sum(-1, keepdim=True)], -1)
        f = torch.einsum("bij,bjs->bis", coef, tgt / r) - coef.sum(-1)[..., None] * gen / r
        total = total + f / (f ** 2).mean().clamp_min(1e-8).sqrt()
    return gen / r + total, r


def test_field_one_sample_one_positive_by_hand():
    # one generated x, one positive p: the self term is masked (+100 / R: affinity clipped to 1e-3), so
    # every V_R is 1e-3 (p - x) / r and its unit-RMS version (p - x) / rms(p - x) for every R;
    # s = mean(|x - x| = 1e-4 (the 1e-8 clip), |p - x|), r = s / sqrt(D)
    x, p = torch.tensor([[[0.3, -1.2, 2.0]]], dtype=torch.float64), torch.tensor([[[1.1, 0.4, 1.5]]], dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.long)
    forces, r = drifting.drift_forces(x, p, y, y, TEMPS)
    s = (1e-4 + (p - x).norm()) / 2
    assert abs(r - s / 3 ** 0.5) < 1e-12
    for v in forces:
        torch.testing.assert_close(v, 1e-3 * (p - x) / r, rtol=1e-6, atol=0)
    goal, r2 = drifting.drift_goal(x, p, y, y, TEMPS)
    torch.testing.assert_close(goal, x / r + 3 * (p - x) / (p - x).pow(2).mean().sqrt(), rtol=1e-9, atol=1e-12)


def test_field_is_the_official_formula_per_group():
    # 2 groups (labels 0, 1) x 4 generated / 4 positives, 2 locations of dimension 3, rows shuffled:
    # the masked field equals the official one computed on the groups stacked on a leading axis
    # (there, a "batch" entry is one group at one location)
    g = torch.Generator().manual_seed(0)
    gen, pos = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64) + 0.5
    ref, r_ref = official_batched(gen.permute(0, 2, 1, 3).reshape(4, 4, 3), pos.permute(0, 2, 1, 3).reshape(4, 4, 3), TEMPS)
    ref = ref.reshape(2, 2, 4, 3).permute(0, 2, 1, 3).reshape(8, 2, 3)  # back to rows [N, L, D]
    perm, perm_p = torch.randperm(8, generator=g), torch.randperm(8, generator=g)
    y = torch.arange(2).repeat_interleave(4)
    goal, r = drifting.drift_goal(gen.reshape(8, 2, 3)[perm], pos.reshape(8, 2, 3)[perm_p], y[perm], y[perm_p], TEMPS)
    assert abs(r - r_ref) < 1e-12
    torch.testing.assert_close(goal, ref[perm], rtol=1e-10, atol=1e-10)


def test_field_is_invariant_to_scale_and_shift_of_the_features():
    # distances are divided by their mean, coordinates by r: scaled units do not see units (up to the 1e-8
    # clip of the squared self-distance, 1e-4 in the mean distance)
    g = torch.Generator().manual_seed(1)
    x, p = torch.randn(40, 1, 2, generator=g, dtype=torch.float64), torch.randn(40, 1, 2, generator=g, dtype=torch.float64) + 1
    y = torch.randint(0, 2, (40,), generator=g)
    f1, r1 = drifting.drift_forces(x, p, y, y, TEMPS)
    f2, r2 = drifting.drift_forces(7 * x + 3, 7 * p + 3, y, y, TEMPS)
    assert abs(r2 / r1 - 7) < 1e-4
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def field_ratio(C, reps=3, R=0.05):
    """RMS of the raw field V_R at q = p over its RMS at q shifted by 0.8 (both coordinates), mixture, float64."""
    G, out = default_gmm(), []
    for rep in range(reps):
        gen = torch.Generator().manual_seed(rep)
        x, p = G.sample(C, gen)[0].double()[:, None], G.sample(C, gen)[0].double()[:, None]
        y = torch.zeros(C, dtype=torch.long)
        (va,), ra = drifting.drift_forces(x, p, y, y, (R,))
        (vb,), rb = drifting.drift_forces(x + 0.8, p, y, y, (R,))
        out.append(((va * ra).pow(2).mean() / (vb * rb).pow(2).mean()).sqrt().item())
        assert vb[:, 0].mean(0).sum() < 0  # on average back along -shift, toward the data
    return sum(out) / reps


def test_field_at_q_equal_p_shrinks_with_the_group_size():
    # spec (R = 0.05): 0.37 / 0.17 / 0.067 at C = 128 / 512 / 2048; here C = 32, 128, 512 (cheap)
    r32, r128, r512 = field_ratio(32), field_ratio(128), field_ratio(512)
    assert r32 > r128 > r512 and r512 < 0.6 * r128, (r32, r128, r512)
    assert abs(r128 - 0.37) < 0.06 and abs(r512 - 0.17) < 0.04, (r128, r512)


TOY = GMM([[1.5, -1.0]], [1.0], [0.6])  # one Gaussian, sigma 0.6: the generator a + b e can reach it


def train_toy(steps=30, C=128, flip=False, seed=0):
    """The official loss on an affine generator x = a + b e (a one-step net: u = e - x), Adam lr 0.05,
    fresh data each step; returns (energy distance before, after) on 2000 samples."""
    torch.manual_seed(seed)
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    log_b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    net = lambda e, t, s, y: e - (a + log_b.exp() * e)  # noqa: E731
    opt = torch.optim.Adam([a, log_b], lr=0.05)
    args = dataclasses.replace(drifting.Args(), temps=TEMPS)
    forces = drifting.drift_forces
    if flip:
        drifting.drift_forces = lambda *z: (lambda fr: ([-v for v in fr[0]], fr[1]))(forces(*z))
    g = torch.Generator().manual_seed(100 + seed)
    real = TOY.sample(2000, g)[0].double()
    e_eval = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    ed = lambda: energy_distance(drifting.sample(net, e_eval, None, 1).detach().float(), real.float())  # noqa: E731
    before = ed()
    try:
        for _ in range(steps):
            x = TOY.sample(C, g)[0].double()
            loss, _ = drifting.drifting_loss(net, None, x, torch.zeros(C, dtype=torch.long), args)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        drifting.drift_forces = forces
    return before, ed()


def test_official_loss_trains_the_toy_and_the_flipped_field_does_not():
    # spec: ED 0.203 -> 1.1e-3 in 300 steps at C = 1024 (mixture toy); here 30 steps at C = 128 (measured: 1.24 -> 0.0065,
    # flipped 3.7)
    before, after = train_toy()
    assert after < 0.03 * before, (before, after)
    before_f, after_f = train_toy(flip=True)
    assert before_f == before and after_f > 2 * before, (before_f, after_f)


def test_target_is_under_stop_gradient():
    # with the generator output a leaf z, d loss / d z = 2 (z / r - goal) / (r numel) = -2 sum_R V_R/rms(V_R) / (r numel):
    # no gradient through the goal (a goal with grad would give z / r - goal = -V, a constant: zero gradient)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    x = default_gmm().sample(64, g)[0].double()
    y = torch.zeros(64, dtype=torch.long)
    net = lambda e, t, s, y_: e - z  # noqa: E731
    loss, terms = drifting.drifting_loss(net, None, x, y, drifting.Args())
    (grad,) = torch.autograd.grad(loss, z)
    forces, r = drifting.drift_forces(z.detach()[:, None], x[:, None], y, y, TEMPS)
    v = sum(f / f.pow(2).mean().sqrt() for f in forces)[:, 0]
    torch.testing.assert_close(grad, -2 * v / (r * z.numel()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss.detach(), v.pow(2).mean(), rtol=1e-9, atol=0)


def test_one_step_sampler_for_every_step_count():
    calls = []

    def net(x, t, s, y):
        calls.append((t.clone(), s.clone()))
        return 0.5 * x + 1.0

    e = torch.randn(5, 2)
    for k in (1, 2, 4):
        calls.clear()
        x = drifting.sample(net, e, None, k)
        torch.testing.assert_close(x, 0.5 * e - 1.0)
        assert len(calls) == 1 and (calls[0][0] == 1).all() and (calls[0][1] == 0).all()


def test_classifier_features_conv_maps_not_the_fid_layer():
    clf = mnist_classifier()[0].requires_grad_(False)
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    maps = drifting.feature_maps(x, [clf.conv[:3], clf.conv[3:6]])
    shapes = {k: tuple(v.shape) for k, v in maps.items()}
    assert shapes == {"global": (3, 1, 784), "conv0": (3, 196, 32), "conv0_mean": (3, 1, 32), "conv0_std": (3, 1, 32),
                      "conv1": (3, 49, 64), "conv1_mean": (3, 1, 64), "conv1_std": (3, 1, 64)}
    torch.testing.assert_close(maps["conv1"].mean(1, keepdim=True), maps["conv1_mean"])
    sum(v.sum() for v in maps.values()).backward()  # the frozen encoder passes the gradient to the samples
    assert x.grad.abs().sum() > 0


def test_bad_flags_get_one_line(tmp_path):
    for flags, needle in ((["--features", "mae"], "--features mae"), (["--temps", 0.05, -1], "--temps"),
                          (["--temps"], "--temps")):
        proc = run_inline(SCRIPT, *flags, "--out-dir", tmp_path)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_label_dropout_forms_the_unconditional_group_in_the_loop(tmp_path, mnist_fid_ref):
    # the loop drops labels to the null class before the loss: class groups become one unconditional group,
    # so the same step with every label dropped logs another loss than with none dropped (and the same as
    # the same run again: the difference is the grouping, not noise)
    from conftest import run_here
    flags = ["--dataset", "mnist", "--steps", 1, "--batch-size", 32, "--hidden", 16, "--depth", 1, "--heads", 2,
             "--features", "pixels", "--eval-every", 100, "--eval-samples", 16, "--eval-steps", 1, "--log-every", 1, "--fid-ref", mnist_fid_ref]
    loss = {}
    for name, p in (("none", 0.0), ("all", 1.0), ("all again", 1.0)):  # --steps 1: the loss of step 1
        g = run_here(SCRIPT, *flags, "--label-dropout", p, "--out-dir", tmp_path / name.replace(" ", "_"))
        loss[name] = float(g["terms"]["loss"])
    assert loss["all"] == loss["all again"] and abs(loss["all"] - loss["none"]) > 1e-6 * abs(loss["none"]), loss
