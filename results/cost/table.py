"""Prints the cost table (markdown) from the summaries written by results/cost/measure.sh, next to
an estimate by the rules of Dieleman's table (seed 002: forward 1, backward 2, forward + JVP 2,
backward through forward + JVP 4; no-grad passes count as forwards, a no-grad JVP 2; a pass on a fraction
of the batch counts by that fraction). A row appears once measure.sh has run its config."""
import glob
import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def estimate(method, a):
    """(FPE per training step, how) by Dieleman's rules, read off each file's training step."""
    if method == "fm":
        return 3, "fwd + bwd (Dieleman: 3)"
    if method == "meanflow":  # JVP rows: fwd+JVP 2 and bwd 2 through u only (sg target); other rows 3
        e = 3 + a["ratio"] + (2 if a.get("cfg_kappa", 0) > 0 else 0)
        return e, f"3 + JVP share {a['ratio']:g}" + (" + 2 guidance fwd" if a.get("cfg_kappa", 0) > 0 else "") + " (Dieleman, all rows JVP: 4)"
    if method == "soflow":  # no-grad fwd at (x_l, l, s) on the s != t rows (all rows with dropout) + fwd/bwd 3 + guidance fwds
        j = 1.0 if a.get("dropout", 0) > 0 else round(a["ratio"] * mb(a)) / mb(a)
        g = 0 if not cond(a) or (a["cfg_omega"] == 1 and a["cfg_kappa"] == 0) else 1 if a["cfg_kappa"] == 0 else 2
        return 3 + j + g, f"3 + finite-difference fwd x {j:g}" + (f" + {g} guidance fwd" if g else "") + " (Dieleman: 7, FM and consistency batches apart)"
    if method == "dmd2":  # every step: G fwd (no grad) + fake fwd/bwd; generator turn: G bwd + teacher + fake fwd
        gan_fake, gan_gen = (6, 3) if a["gan_weight"] > 0 else (0, 0)  # disc on fake + real x, gen through fake
        e = 4 + gan_fake + (4 + gan_gen) / a["ttur"]
        return e, f"4{' + 6 GAN' if gan_fake else ''} every step + ({4 + gan_gen}) every {a['ttur']}th"
    if method == "vsd":  # dmd2's rule: every step G fwd (no grad) + fake fwd/bwd; generator turn: G bwd + teacher + fake fwd
        gan_fake, gan_gen = (6, 3) if a["gan_weight"] > 0 else (0, 0)
        e = 4 + gan_fake + (4 + gan_gen) / a["ttur"]
        return e, f"4{' + 6 GAN' if gan_fake else ''} fake + ({4 + gan_gen}) generator per {a['ttur']} step(s) (Diff-Instruct: 1)"
    if method == "sid":  # every step: G fwd (no grad) + fake fwd/bwd; generator turn: G fwd/bwd + teacher and fake fwd + bwd to x_t
        g = 2 if a["teacher_cfg"] != 1 else 1
        e = 4 + (3 + 3 * g + 3) / a["ttur"]
        return e, f"4 every step + (G 3 + teacher {3 * g} + fake 3, both backward to their input) every {a['ttur']}th (not in Dieleman's table)"
    if method == "fsf_dmd":  # L_CD: teacher 1 + fwd/JVP 2 + fwd/bwd 3; L_FSF: M-1 no-grad jumps + 3 + teacher + EMA
        m = a["sim_steps"]
        return 6 + (m - 1) + 5, f"CD 6 (AYF-EMD in Dieleman's table: 6) + DM {m + 4}"
    if method == "mfd":  # ratio x (student fwd + aux fwd/bwd) + student fwd/bwd + 2 rollouts of E[K] steps
        n = max(1, round(1 / a["ode_step"])) if a["ode_step"] < 1 else 1
        ek = (n + 1) * (2 * n + 1) / (6 * n)  # E[ceil(|t - r| / h)] for uniform t, r and h = 1 / n
        r = a.get("aux_ratio", a.get("ratio"))  # --aux-ratio (the measure.sh runs predate the rename: ratio)
        return 4 * r + 3 + 2 * ek, f"4 x {r} aux + 3 + 2 x E[K] {ek:.2f}"
    if method == "imf":  # target v_c, v_u: one no-grad fwd on a doubled batch; no-grad JVP on s != t rows; fwd/bwd 3
        # (--v-head adds only a second final layer on the same trunk: no extra pass)
        tgt = 2 if cond(a) else 1  # unconditional data: v_c only
        j = 1.0 if a.get("dropout", 0) > 0 else round(a["ratio"] * mb(a)) / mb(a)  # dropout: the JVP on every row
        return 3 + tgt + 2 * j, f"3 + target {tgt} fwd + no-grad JVP 2 x {j:g} (Dieleman: 5)"
    if method == "alphaflow":  # per step: fwd/bwd 3 + guidance fwds + (0 < a < 1) Euler-step fwd or (a = 0) JVP, s != t rows
        r = round(a["ratio"] * mb(a)) / mb(a)
        j = 1.0 if a.get("dropout", 0) > 0 else r
        g = 0 if not cond(a) or (a["cfg_omega"] == 1 and a["cfg_kappa"] == 0) else 1 if a["cfg_kappa"] == 0 else 2
        cost = lambda al: 3 + g + (r if 0 < al < 1 else 0) + (2 * j if al == 0 else 0)
        al = [alpha(k, a) for k in range(a["steps"])]
        e = sorted(cost(x) for x in al)[len(al) // 2]  # the median step, as the measured s/step
        k1 = next(k for k in range(a["alpha_k_end"] + 2) if alpha(k, a) < 1)
        k0 = next(k for k in range(a["alpha_k_end"] + 2) if alpha(k, a) == 0)
        run = f"a = {al[0]:g} on all {len(al)} steps" if min(al) == max(al) else f"a {max(al):g} -> {min(al):g} over {len(al)} steps"
        return e, (f"{run}; a = 1 (FM, steps < {k1}) {cost(1):g}, Euler "
                   f"step (+{r:g} fwd) {cost(0.5):g}, a = 0 (+ JVP 2 x {j:g}, steps >= {k0}) {cost(0):g}"
                   + (f"; guidance +{g}" if g else "") + " (not in Dieleman's table; MF there: 4)")
    if method == "tvm":  # fwd+JVP with grad 2 + bwd through both 4; FM fwd/bwd 3 on its own rows; target EMA fwd at f
        g = 1 if cond(a) and (a["cfg_w"] != 1 or a.get("cfg_w_range")) else 0  # target EMA on a doubled batch
        return 10 + g, "JVP fwd 2 + bwd 4 + FM 3 + target EMA 1" + (" + 1 guidance" if g else "") + " (Dieleman: 10)"
    if method == "shortcut":  # fwd/bwd 3 + two no-grad EMA half-steps on the bootstrap rows (+ guided rows doubled)
        n = mb(a)
        nb = n // a["bootstrap_every"]
        nc = nb // int(math.log2(a["denoise_timesteps"])) if cond(a) and a["bootstrap_cfg"] != 1 else 0
        return 3 + 2 * (nb + nc) / n, f"3 + 2 EMA fwd x {nb}/{n} rows" + (f" + 2 x {nc}/{n} guided" if nc else "") + " (Dieleman: 8)"
    if method == "splitmeanflow":  # fwd/bwd 3 + teacher on boundary rows + two no-grad fwds on split rows
        p = round(a["boundary_p"] * mb(a)) / mb(a)
        tg = 2 if a["teacher_cfg"] != 1 else 1
        return 3 + tg * p + 2 * (1 - p), f"3 + teacher {tg} x {p:g} + 2 fwd x {1 - p:g} (Dieleman: 9)"
    if method == "psd":  # fwd/bwd 3 (the weight head is tiny) + two no-grad fwds on the split rows; diagonal rows on e - x
        p = int(a["boundary_p"] * mb(a)) / mb(a)
        return 3 + 2 * (1 - p), f"3 + 2 fwd x {1 - p:g} split rows (Dieleman: 8, every term on the full batch)"
    if method == "ayf":  # teacher fwd + no-grad JVP 2 + fwd/bwd 3, every row (the JVP ignores ratio); LMD: teacher at f
        tg = 2 if a["teacher_cfg"] != 1 else 1  # --tangent-grad: JVP 2 + bwd through both 4; LMD: + bwd through the teacher 2 tg
        if a.get("tangent_grad"):
            lmd = a["objective"] == "lmd"
            return 6 + tg * (3 if lmd else 1), (f"JVP with grad 2 + bwd through both 4 + teacher {tg}" + (f" + bwd through it {2 * tg}" if lmd else "")
                                                + f", all rows, {a['objective']} --tangent-grad (Dieleman: LMD 9, EMD 7)")
        return 5 + tg, f"teacher {tg} + no-grad JVP 2 + 3, all rows, {a['objective']} (AYF-EMD / LMD in Dieleman's table: 6)"
    if method == "freeflow":  # no-grad dF/dd on every row (JVP 2 or two FD fwds); fwd/bwd 3; teacher on pred rows;
        n = mb(a)  # correction rows: aux fwd 1 + teacher + aux fwd/bwd 3
        p = min(max(round(a["pred_frac"] * n), 1), n - 1) / n
        tg = 2 if a["teacher_cfg"] != 1 else 1
        return 5 + tg * p + (4 + tg) * (1 - p), (f"{a['deriv']} 2 (all rows) + 3 + teacher {tg} x {p:g} + (aux 1 + teacher {tg} "
                                                 f"+ aux fwd/bwd 3) x {1 - p:g} (Dieleman: 12)")
    if method == "cm":  # student fwd/bwd 3 + target fwd 1 (+ CD: the teacher's Heun step 2, Euler 1)
        tg = (2 if a["solver"] == "heun" else 1) if a["mode"] == "cd" else 0
        return 4 + tg, f"3 + target 1" + (f" + teacher {a['solver']} {tg}" if tg else "") + " (Dieleman: CD 5, CT 4)"
    if method == "ect":  # fwd/bwd 3 + the self-target fwd 1 (no teacher in the loss)
        return 4, "3 + target 1 (not in Dieleman's table; CT there: 4)"
    if method == "scm":  # no-grad JVP 2 + fwd/bwd 3 (+ sCD: teacher 1, 2 guided); the log-variance head is tiny
        tg = 0 if a["mode"] == "sct" else (2 if a["teacher_cfg"] != 1 else 1)
        return 5 + tg, f"no-grad JVP 2 + 3" + (f" + teacher {tg}" if tg else "") + " (not in Dieleman's table)"
    if method == "facm":  # no-grad JVP 2 + CM fwd/bwd 3 + FM fwd/bwd 3 + teacher (1, 2 guided; 0 from data)
        tg = 0 if a["teacher"] == "none" else (2 if a["teacher_cfg"] != 1 else 1)
        return 8 + tg, f"no-grad JVP 2 + CM 3 + FM 3 + teacher {tg} (Dieleman: 8, the JVP's primal taken with grad)"
    if method == "ctm":  # teacher Heun 2 E[k]; student inner fwd/bwd 3; target net's outer jump fwd + bwd to its input 3;
        ek = (2 * a["k_max"] + 1) / 3  # target: inner no-grad + outer 2; DSM fwd/bwd 3 (the adaptive weight's grads stop at the last layer)
        d = 3 if a["dsm_weight"] > 0 else 0
        return 8 + d + 2 * ek, f"teacher 2 x E[k] {ek:.2f} + 3 + target-net jump 3 + target 2" + (" + DSM 3" if d else "") + " (Dieleman: 7)"
    if method == "pid":  # two student evaluations with grad (fd: two forwards; jvp: fwd + JVP) 2 + bwd through both 4 + teacher at f
        tg = 2 if a["teacher_cfg"] != 1 else 1
        return 6 + tg, f"{a['derivative']}: 2 student evaluations with grad 2 + bwd through both 4 + teacher {tg} (Dieleman: 7)"
    if method == "dmf":  # every row: FM fwd/bwd 3 + MF (fwd+JVP 2, bwd through u 2) 4; guidance: no-grad fwds per term
        g = 0 if not cond(a) or (a["cfg_omega"] == 1 and a["cfg_kappa"] == 0) else 1 if a["cfg_kappa"] == 0 else 2
        j = 2 if a.get("dropout", 0) > 0 else 0  # dropout: the no-grad JVP on the FM rows too
        return 7 + 2 * g + j, ("FM 3 + MF 4 on every row" + (f" + guidance {g} x 2 terms" if g else "") + (" + JVP on FM rows 2" if j else "")
                               + " (not in Dieleman's table)")
    if method == "lsd":  # first max(1, floor(eta B)) rows FM fwd/bwd 3; the others JVP with grad 2 + bwd through both 4 + teacher 1
        n = mb(a)
        p = min(n, max(1, int(n * a["diag_frac"]))) / n
        return 3 * p + 7 * (1 - p), f"FM 3 x {p:g} + (JVP 2 + bwd 4 + teacher 1) x {1 - p:g} (Dieleman: 10, every term on every row)"
    if method == "esd":  # as lsd, the teacher's v 1 and a no-grad spatial JVP 2 in place of the teacher at f
        n = mb(a)
        p = min(n, max(1, int(n * a["diag_frac"]))) / n
        return 3 * p + 9 * (1 - p), f"FM 3 x {p:g} + (JVP 2 + bwd 4 + v 1 + spatial JVP 2) x {1 - p:g} (Dieleman: 10, every term on every row)"
    if method == "fmm":  # FMM: fwd with grad 1 + fwd with JVP 2 + bwd through both 4 + bwd of the fwd 2; PFMM: fwd/bwd 3 + 2 teacher fwds
        if not a.get("progressive"):
            return 9, "fwd 1 + fwd with JVP 2 + bwd through both 4 + bwd 2 (Dieleman: FMM 9)"
        n = min(a["distill_steps"], a["steps"])
        return sorted([9] * n + [5] * (a["steps"] - n))[a["steps"] // 2], (f"FMM 9 on the first {n} of {a['steps']} steps, then "
                                                                             "3 + 2 teacher fwd = 5; the median step (Dieleman: PFMM 5)")
    if method == "reflow":  # fwd/bwd 3 + the teacher's fixed-step ODE per pair (euler K, heun 2K - 1, rk4 4K fwd; guided: doubled batch)
        k = a["pair_steps"]
        n = {"euler": k, "heun": 2 * k - 1, "rk4": 4 * k}[a["pair_solver"]] * (2 if a["teacher_cfg"] != 1 else 1)
        if a.get("pairs"):  # cached: num_pairs ODE solves once, spread over the run's steps x batch rows
            share = a["num_pairs"] / (a["steps"] * a["batch_size"])
            return 3 + n * share, f"3 + teacher ODE {n} fwd x {share:.3g} (pairs cached once, amortized; not in Dieleman's table)"
        return 3 + n, f"3 + teacher ODE {n} fwd per pair, online ({a['pair_solver']} x {k}; not in Dieleman's table)"
    if method == "imm":  # student fwd/bwd 3 + the no-grad target fwd at r 1 (online or EMA); the M x M kernel is on outputs
        return 4, "3 + target 1 (not in Dieleman's table; CT there: 4)"
    if method == "drifting":  # generator fwd/bwd 3; mnist --features classifier: digit-CNN conv stages fwd on the data 1, on the
        # samples fwd + bwd 3, each ~0.09 of the reference DiT's forward (FLOPs); the field itself (distances, softmaxes) not counted
        enc = a["dataset"] == "mnist" and a.get("features", "classifier") == "classifier"
        return 3 + (4 * 0.09 if enc else 0), "fwd/bwd 3" + (" + 4 classifier passes x 0.09 FLOPs of the DiT" if enc else "") + " (not in Dieleman's table)"
    if method == "rcm":  # warm-up: sCM alone (teacher + no-grad JVP 2 + 3); then every step: fake rollout E[n] no-grad fwds +
        # fake fwd/bwd 3; every ttur-th also the student: sCM 5 + tg, DMD rollout E[n] - 1 fwds + last jump 3 + teacher + fake fwd 1
        tg = 2 if a["teacher_cfg"] != 1 else 1
        n = (a["backsim_steps"] + 1) / 2  # E[k mod K + 1]
        cm, dm = (5 + tg if a["cm_weight"] > 0 else 0), (n + 3 + tg if a["dm_weight"] > 0 else 0)
        if a["dm_weight"] == 0:
            return 5 + tg, f"sCM alone: teacher {tg} + no-grad JVP 2 + 3 (AYF-EMD in Dieleman's table: 6)"
        w = min(a["tangent_warmup"], a["steps"]) / a["steps"]  # the warm-up's share of the run
        after = n + 3 + (cm + dm) / a["ttur"]
        return w * (5 + tg) + (1 - w) * after, (f"warm-up sCM {5 + tg} x {w:.2g}; then fake {n + 3:g} every step + student "
                                                 f"(sCM {cm} + DMD {dm:g}) every {a['ttur']}th = {after:.3g} (not in Dieleman's table)")
    if method == "twinflow":  # adv rows' one-step fwd + fwd/bwd 3 + guidance 2 (0 < t < 1 rows) + RCGM N fwds (non-adv) + dm pair 2 (e2e)
        n, w = mb(a), [sum(a["parts"][:i + 1]) / sum(a["parts"]) for i in range(4)]
        f = [b - c for b, c in zip([round(n * x) / n for x in w], [0] + [round(n * x) / n for x in w[:3]])]  # e2e, mul, any, adv
        g = 2 * (f[1] + f[2]) if cond(a) and a["cfg_ratio"] > 0 else 0
        dm = 2 * f[0] if a["dm_weight"] > 0 else 0
        e = f[3] + 3 + g + a["rcgm_steps"] * (1 - f[3]) + dm
        return e, f"adv gen {f[3]:g} + 3 + RCGM {a['rcgm_steps']} x {1 - f[3]:g}" + (f" + guidance {g:g}" if g else "") + f" + dm pair {dm:g} (not in Dieleman's table)"
    return None, "—"


def cond(a):
    """Class-conditional data (the guidance forwards and null labels exist)."""
    return a["dataset"] not in ("checkerboard", "moons", "spirals", "8gaussians")


def mb(a):
    """Rows of one micro-batch on one process (what the row fractions are rounded on)."""
    return a["batch_size"] // a.get("grad_accum", 1)


def alpha(k, a):
    """alpha-Flow's a at step k (methods/alphaflow.py alpha_schedule)."""
    k0, k1 = a["alpha_k_init"], a["alpha_k_end"]
    if k < k0 or k > k1:
        return 1.0 if k < k0 else 0.0
    x = 1 - 1 / (1 + math.exp(-a["alpha_gamma"] * (k - (k0 + k1) / 2) / (k1 - k0)))
    return 0.0 if x < a["alpha_snap"] else 1.0 if x > 1 - a["alpha_snap"] else x


def passes(name):
    """The summaries of one run name in every measurement pass (runs/, runs2/, ...)."""
    out = []
    for d in sorted(glob.glob(os.path.join(HERE, "runs*"))):
        out += [json.load(open(p)) for p in glob.glob(os.path.join(d, name, "*", "mnist", "summary.json"))]
    return out


def main():
    """Print cost.md: the estimate against the measurement for every measured run and reference run."""
    print("| run | FPE (Dieleman's rules) | how | s/step | forward s | FPE measured |")
    print("|---|---|---|---|---|---|")
    params = {}  # run -> parameter count (the guidance inputs of imf and tvm add embeddings)
    for path in sorted(glob.glob(os.path.join(HERE, "runs", "*", "*", "mnist", "summary.json"))):
        args = json.load(open(os.path.join(os.path.dirname(path), "args.json")))
        name = os.path.relpath(path, os.path.join(HERE, "runs")).split(os.sep)[0]
        ss = passes(name)
        s = ss[0]
        est, how = estimate(s["method"], args)
        params[name] = s["params"]
        cell = lambda key, f: " / ".join(f.format(x[key]) for x in ss)
        print(f"| {name} | {est:.3g} | {how} | {cell('sec_per_step', '{:.3f}')} | {cell('fwd_time_s', '{:.4f}')} | {cell('fpe', '{:.2f}')} |")
    hw = s["hardware"]
    common = max(set(params.values()), key=list(params.values()).count)
    others = "".join(f", {n} {p}" for n, p in params.items() if p != common)
    others = f" ({others[2:]}: their extra inputs' embeddings)" if others else ""
    print(f"\nCPU ({hw['cpu']}, {hw['threads']} threads, torch {hw['torch']}), batch {args['batch_size']}, "
          f"{common} parameters{others}; median step time over the run (60 steps; mfd 20); forward time: median of 10 "
          "at start-up. Where a cell holds two numbers they are two passes of measure.sh, one after the other "
          "on the same quiet machine: their spread is the noise of these figures. One training step is the "
          "file's own --steps unit: a DMD2 step updates the generator once in `ttur`, an MFD step is `ratio` "
          "auxiliary updates and one student update. No GPU.")

    # The mnist reference runs (results/<method>/mnist): the same estimate for their own arguments against
    # the FPE each run logged over its whole length, one thread per run.
    refs = sorted(glob.glob(os.path.join(HERE, "..", "*", "mnist", "summary.json")))
    if refs:
        print("\n| reference run | FPE (Dieleman's rules) | how | s/step | forward s | FPE measured |")
        print("|---|---|---|---|---|---|")
        for path in refs:
            s = json.load(open(path))
            est, how = estimate(s["method"], json.load(open(os.path.join(os.path.dirname(path), "args.json"))))
            print(f"| {s['method']} | {'—' if est is None else f'{est:.3g}'} | {how} | {s['sec_per_step']:.3f} | "
                  f"{s['fwd_time_s']:.4f} | {s['fpe']:.2f} |")
        multi = [f"{s['method']} {s['hardware']['threads']}" for s in map(lambda p: json.load(open(p)), refs)
                 if s.get("hardware", {}).get("threads", 1) != 1]
        print("\nThe mnist reference runs of the results table (batch 64, the mnist DiT), one thread each"
              + (f" (threads where not 1: {', '.join(multi)})" if multi else "") + ", most of them next to other runs "
              "on the 2 cores: s/step is the median over the whole run, the forward time the median of "
              "10 at start-up. Not a quiet machine: read the ratios.")


if __name__ == "__main__":
    main()
