"""Attention with a fused Jacobian-vector product (JVP) and a backward through both outputs.

Why this file exists: every JVP-based few-step method (MeanFlow, iMF, sCM, AYF, TVM, ...) pushes a
tangent through the network. PyTorch's fused attention kernels have no forward-mode rule, and the
math fallback materializes the N x M attention matrix. TVM moreover back-propagates through the
JVP output. The math, per batch-head with scale c (rows i, keys j):

    S  = c Q K^T        P = softmax_row(S)        O = P V
    dS = c (dQ K^T + Q dK^T)      mu = rowsum(P * dS)      dO = (P * dS) V - mu * O + P dV

Streaming form (one pass over key blocks, running max m, rescale a = exp(m_old - m_new), fp32
statistics): keep l, acc += p V, nu += rowsum(p * dS) and one tangent accumulator
tacc += (p * dS) V + p dV; at the end O = acc / l, mu = nu / l, dO = tacc / l - mu * O; save
lse = m + log l and mu. The two-pass form reuses a saved lse and O (p = exp(S - lse)).
Backward through both outputs, cotangents G (of O) and Gt (of dO), either possibly absent:

    D = rowsum(G * O)   Dt = rowsum(Gt * O)   E = rowsum(Gt * dO)   Delta = D + E - mu * Dt
    B = Gt V^T          dSc = dS - mu
    dP  = G V^T + Gt dV^T + B * dSc - dS * Dt
    gS  = P * (dP - Delta)          gdS = P * (B - Dt)
    gQ  = c (gS K + gdS dK)         gK  = c (gS^T Q + gdS^T dQ)
    gdQ = c gdS K                   gdK = c gdS^T Q
    gV  = P^T G + (P * dSc)^T Gt    gdV = P^T Gt

With Gt = 0 this is the ordinary flash-attention backward (checked in float64 against
torch.func.jvp plus autograd on naive attention, tests/test_attention_jvp.py).

Public API
----------
- ``attention_jvp(q, k, v, dq, dk, dv, causal=False, scale=None) -> (o, do)``: one fused pass that
  returns the output and its JVP. Differentiable: its backward takes the cotangents of o AND of do
  (either may be absent).
- ``sdpa(q, k, v, causal=False, scale=None)``: drop-in for ``F.scaled_dot_product_attention`` on
  (B, H, N, D) tensors. Plain forward/backward with no JVP; under ``torch.func.jvp`` or
  ``torch.autograd.forward_ad`` its tangent is produced by the kernel in its two-pass form (reusing
  the saved lse and o), and that tangent is itself differentiable (TVM's loss on the JVP).
- ``attention_jvp_reference`` / ``attention_backward_reference``: closed-form pure-PyTorch versions
  (they materialize P). They are the CPU path and the test oracle.

Conventions
-----------
- Shapes q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv); N != M allowed; any strides.
- ``causal=True`` uses the bottom-right alignment of flash-attention (key j is visible to query i
  iff j <= i + M - N), which is the ordinary lower triangle when N == M. Rows that see no key
  (only possible with causal and N > M) return o = do = 0 instead of NaN.
- Statistics (running max, normalizer, lse, mu) are fp32 whatever the input dtype.

Dispatch (module global ``BACKEND``, default "auto")
----------------------------------------------------
- CUDA tensors -> Triton kernels.
- CPU tensors -> the closed-form reference, unless ``TRITON_INTERPRET=1`` was in the environment
  when this module was imported, in which case the Triton kernels run on CPU through the Triton
  interpreter (that is how the tests check the kernels without a GPU). The variable is read at
  import time because ``triton.jit`` decides at decoration time whether it builds an interpreted
  function.
- ``BACKEND = "reference"`` or ``"triton"`` forces one path (tests and benchmarks use this).
- ``sdpa``'s primal forward and plain backward go through PyTorch's fused attention on CUDA
  (flash for fp16/bf16, memory-efficient otherwise; ``primal_kind``), whose log-sum-exp feeds
  the two-pass tangent: fm, dmd2, mfd and sampling never reach the Triton kernels, and a plain
  call allocates no tangent or mu buffer. ``PRIMAL = "kernel"`` turns this off; ``"torch"``
  also uses PyTorch's CPU flash kernel (tests). A PyTorch kernel that raises falls back to ours
  with a warning, counted in ``FALLBACKS``. ``attention_jvp`` is ours throughout.
- If ``import triton`` fails (e.g. macOS) the module still imports and always uses the reference.

Known limits: the Triton interpreter stores bf16 as raw integers, so bf16 is only meaningful on a
GPU. fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set, the
same rule as torch matmuls.

Credits: the structure (Function whose ``jvp`` calls a second differentiable Function, backward
through both outputs) follows lumalabs/tvm ``jvp_utils``; the streaming forward+JVP follows the
idea of amorehead/jvp_flash_attention and NVlabs/rcm. The code here is written from the formulas
above.
"""
import contextlib
import math
import os
import re
import warnings
from typing import Optional

import torch

try:  # Triton is optional: without it everything runs through the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    triton = tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, see module docstring
BACKEND = "auto"  # "auto" | "reference" | "triton"
PRIMAL = "auto"  # "auto" | "torch" | "kernel": who computes sdpa's primal forward and plain backward
FALLBACKS = {}  # PyTorch-kernel failures that fell back to the project's kernels: message -> count

__all__ = ["sdpa", "attention_jvp", "attention_jvp_reference", "attention_backward_reference"]


def _use_triton(x):
    if BACKEND == "reference" or not HAS_TRITON:
        return False
    if BACKEND == "triton":
        return True
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch reference (closed form; materializes P). CPU path and test oracle.
# ----------------------------------------------------------------------------------------------

def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mask(n, m, device):
    """True where key j is NOT visible to query i (bottom-right causal alignment)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).triu(m - n + 1)


def _ref_probs(q, k, causal, scale):
    """P, lse and the mask (None if not causal) in the compute dtype.

    P comes from torch.softmax rather than exp(S - lse): on CPU the fused softmax is several times
    faster than logsumexp + exp. lse = max_j S - log(max_j P) is exact enough since max P >= 1/M.
    Rows that see no key get P = 0 and lse = +inf (as in the kernel)."""
    cd = _compute_dtype(q)
    s = scale * (q.to(cd) @ k.to(cd).transpose(-2, -1))
    mask = _mask(s.shape[-2], s.shape[-1], s.device) if causal else None
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.softmax(s, dim=-1)
    empty = torch.isneginf(m)
    if mask is not None:
        p = p.masked_fill(empty, 0.0)  # softmax of an all -inf row is NaN
    lse = torch.where(empty, float("inf"), m - torch.log(p.amax(-1, keepdim=True))).squeeze(-1)
    return p, lse.float() if cd == torch.float32 else lse, mask


def _ref_dscores(q, k, dq, dk, mask, scale):
    cd = _compute_dtype(q)
    ds = scale * (dq.to(cd) @ k.to(cd).transpose(-2, -1) + q.to(cd) @ dk.to(cd).transpose(-2, -1))
    return ds if mask is None else ds.masked_fill(mask, 0.0)  # masked dS is 0, never -inf


def attention_jvp_reference(q, k, v, dq, dk, dv, causal=False, scale=None, o=None, lse=None):
    """Closed-form o, do, lse, mu. If ``o`` and ``lse`` are given they are reused (two-pass form;
    P itself is recomputed with a softmax, which is cheaper on CPU than exp(S - lse)).

    o and do come back in the input dtype, lse and mu in fp32 (fp64 for fp64 inputs). ``dq``, ``dk``
    or ``dv`` may be None (zero tangent). Not meant to be differentiated through autograd directly
    (use ``attention_jvp``), although it is plain torch code.
    """
    scale = _default_scale(q, scale)
    cd = _compute_dtype(q)
    p, lse_new, mask = _ref_probs(q, k, causal, scale)
    lse = lse_new if lse is None else lse
    vc = v.to(cd)
    o_c = p @ vc if o is None else o.to(cd)
    tacc = torch.zeros_like(o_c)
    mu = torch.zeros_like(lse)
    if dq is not None or dk is not None:
        ds = _ref_dscores(q, k, q.new_zeros(()).expand_as(q) if dq is None else dq,
                          k.new_zeros(()).expand_as(k) if dk is None else dk, mask, scale)
        pds = p * ds
        mu = pds.sum(-1).to(lse.dtype)
        tacc = pds @ vc
    if dv is not None:
        tacc = tacc + p @ dv.to(cd)
    do = tacc - mu.to(cd).unsqueeze(-1) * o_c
    return o_c.to(q.dtype) if o is None else o, do.to(q.dtype), lse, mu


def attention_backward_reference(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, causal=False,
                                 scale=None):
    """Closed-form gradients (gq, gk, gv, gdq, gdk, gdv) of <g, o> + <gt, do> (module docstring).

    ``g`` or ``gt`` may be None. With ``gt`` None this is the ordinary attention backward and the
    tangents may be None too; the last three results are then None.
    """
    scale = _default_scale(q, scale)
    cd = _compute_dtype(q)
    p, _, mask = _ref_probs(q, k, causal, scale)  # lse unused: P is recomputed by softmax
    qc, kc, vc, oc = q.to(cd), k.to(cd), v.to(cd), o.to(cd)
    dP = torch.zeros_like(p)
    gv = torch.zeros_like(vc)
    delta = torch.zeros_like(p[..., 0])
    if g is not None:
        gc = g.to(cd)
        dP = dP + gc @ vc.transpose(-2, -1)
        gv = gv + p.transpose(-2, -1) @ gc
        delta = delta + (gc * oc).sum(-1)
    gq = gk = None
    gdq = gdk = gdv = None
    if gt is not None:
        gtc = gt.to(cd)
        dqc = torch.zeros_like(qc) if dq is None else dq.to(cd)
        dkc = torch.zeros_like(kc) if dk is None else dk.to(cd)
        dvc = torch.zeros_like(vc) if dv is None else dv.to(cd)
        mu_c = mu.to(cd).unsqueeze(-1)
        ds = _ref_dscores(qc, kc, dqc, dkc, mask, scale)
        dt = (gtc * oc).sum(-1, keepdim=True)
        delta = delta + (gtc * do.to(cd)).sum(-1) - mu_c.squeeze(-1) * dt.squeeze(-1)
        b = gtc @ vc.transpose(-2, -1)
        dsc = ds - mu_c
        dP = dP + gtc @ dvc.transpose(-2, -1) + b * dsc - ds * dt
        gds = p * (b - dt)
        gv = gv + (p * dsc).transpose(-2, -1) @ gtc
        gdv = p.transpose(-2, -1) @ gtc
        gdq = scale * (gds @ kc)
        gdk = scale * (gds.transpose(-2, -1) @ qc)
        gq = scale * (gds @ dkc)
        gk = scale * (gds.transpose(-2, -1) @ dqc)
    gs = p * (dP - delta.unsqueeze(-1))
    gq = scale * (gs @ kc) + (0 if gq is None else gq)
    gk = scale * (gs.transpose(-2, -1) @ qc) + (0 if gk is None else gk)
    cast = lambda x, ref: None if x is None else x.to(ref.dtype)  # noqa: E731
    return (cast(gq, q), cast(gk, k), cast(gv, v), cast(gdq, q), cast(gdk, k), cast(gdv, v))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _load_tile(ptr, offs_r, offs_c, s_r, s_c, n_r, n_c):
        return tl.load(ptr + offs_r[:, None] * s_r + offs_c[None, :] * s_c,
                       mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)

    @triton.jit
    def _visible(offs_m, offs_n, N, M, CAUSAL: tl.constexpr):
        ok = (offs_n[None, :] < M) & (offs_m[:, None] >= 0)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (M - N))
        return ok

    @triton.jit
    def _fwd_kernel(Q, K, V, TQ, TK, TV, O, TO, LSE, MU,
                    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                    stqb, stqh, stqn, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
                    sob, soh, son, sod, stob, stoh, ston, stod,
                    H, N, M, D: tl.constexpr, DV: tl.constexpr, scale,
                    CAUSAL: tl.constexpr, HAS_JVP: tl.constexpr, HAS_DQK: tl.constexpr,
                    HAS_DV: tl.constexpr, TWO_PASS: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, A: tl.constexpr):
        """One program = BLOCK_M query rows of one (batch, head).

        Fused mode: the usual online softmax, plus nu = rowsum(p dS) and ONE tangent accumulator
        tacc = (p dS) V + p dV that share the rescale factor alpha. TWO_PASS mode: lse and O are
        known, so p = exp(S - lse) is already normalized and only the tangent is accumulated.
        """
        # batch/head/row strides come divided by A, their common power-of-2 factor (<= 16): the
        # products tell Triton the pointers' alignment (16-byte loads, cp.async) that 72 hides
        sqb, sqh, sqn = sqb * A, sqh * A, sqn * A
        skb, skh, skn = skb * A, skh * A, skn * A
        svb, svh, svn = svb * A, svh * A, svn * A
        stqb, stqh, stqn = stqb * A, stqh * A, stqn * A
        stkb, stkh, stkn = stkb * A, stkh * A, stkn * A
        stvb, stvh, stvn = stvb * A, stvh * A, stvn * A
        sob, soh, son = sob * A, soh * A, son * A
        stob, stoh, ston = stob * A, stoh * A, ston * A
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < N

        q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N, D)
        if HAS_DQK:
            tq = _load_tile(TQ + b * stqb + h * stqh, offs_m, offs_d, stqn, stqd, N, D)
        K += b * skb + h * skh
        V += b * svb + h * svh
        TK += b * stkb + h * stkh
        TV += b * stvb + h * stvh

        if TWO_PASS:
            m_i = tl.load(LSE + pid_bh * N + offs_m, mask=row_ok, other=float("inf"))
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        tacc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        nu = tl.zeros([BLOCK_M], tl.float32)

        hi = M
        if CAUSAL:  # last visible key of this block is (pid_m+1)*BLOCK_M - 1 + M - N
            hi = tl.maximum(tl.minimum(M, (pid_m + 1) * BLOCK_M + M - N), 0)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(K, offs_n, offs_d, skn, skd, M, D)
            v = _load_tile(V, offs_n, offs_dv, svn, svd, M, DV)
            ok = _visible(offs_m, offs_n, N, M, CAUSAL)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
            s = tl.where(ok, s, float("-inf"))
            if TWO_PASS:
                # finite lse for every row that sees a key; +inf (-> p = 0) for the others
                p = tl.exp(s - m_i[:, None])
                alpha = tl.full([BLOCK_M], 1.0, tl.float32)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
                m_i = m_new
            if HAS_JVP:
                tacc = tacc * alpha[:, None]
                if HAS_DQK:
                    tk = _load_tile(TK, offs_n, offs_d, stkn, stkd, M, D)
                    ds = (tl.dot(tq, tl.trans(k), input_precision=DOT_PREC)
                          + tl.dot(q, tl.trans(tk), input_precision=DOT_PREC)) * scale
                    pds = p * tl.where(ok, ds, 0.0)
                    nu = nu * alpha + tl.sum(pds, 1)
                    tacc += tl.dot(pds.to(v.dtype), v, input_precision=DOT_PREC)
                if HAS_DV:
                    tv = _load_tile(TV, offs_n, offs_dv, stvn, stvd, M, DV)
                    tacc += tl.dot(p.to(tv.dtype), tv, input_precision=DOT_PREC)

        empty = l_i == 0.0  # rows that see no key at all
        l_safe = tl.where(empty, 1.0, l_i)
        o_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
        if TWO_PASS:
            o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
                        mask=o_mask, other=0.0).to(tl.float32)
        else:
            o = acc / l_safe[:, None]
            tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod,
                     o.to(O.dtype.element_ty), mask=o_mask)
            lse = tl.where(empty, float("inf"), tl.where(empty, 0.0, m_i) + tl.log(l_safe))
            tl.store(LSE + pid_bh * N + offs_m, lse, mask=row_ok)
        if HAS_JVP:
            mu = nu / l_safe
            do = tacc / l_safe[:, None] - mu[:, None] * o
            tl.store(TO + b * stob + h * stoh + offs_m[:, None] * ston + offs_dv[None, :] * stod,
                     do.to(TO.dtype.element_ty), mask=o_mask)
            tl.store(MU + pid_bh * N + offs_m, mu, mask=row_ok)

    @triton.jit
    def _bwd_pre_kernel(O, TO, G, GT, MU, DELTA, DT,
                        sob, soh, son, sod, stob, stoh, ston, stod,
                        sgb, sgh, sgn, sgd, sgtb, sgth, sgtn, sgtd,
                        H, N, DV: tl.constexpr, HAS_G: tl.constexpr, HAS_GT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, A: tl.constexpr):
        """Row statistics: Delta = D + E - mu Dt and Dt (module docstring), O(N d) work."""
        # batch/head/row strides come divided by A, their common power-of-2 factor (<= 16): the
        # products tell Triton the pointers' alignment (16-byte loads, cp.async) that 72 hides
        sob, soh, son = sob * A, soh * A, son * A
        stob, stoh, ston = stob * A, stoh * A, ston * A
        sgb, sgh, sgn = sgb * A, sgh * A, sgn * A
        sgtb, sgth, sgtn = sgtb * A, sgth * A, sgtn * A
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_dv = tl.arange(0, BLOCK_DV)
        o = _load_tile(O + b * sob + h * soh, offs_m, offs_dv, son, sod, N, DV).to(tl.float32)
        delta = tl.zeros([BLOCK_M], tl.float32)
        if HAS_G:
            g = _load_tile(G + b * sgb + h * sgh, offs_m, offs_dv, sgn, sgd, N, DV)
            delta += tl.sum(g.to(tl.float32) * o, 1)
        if HAS_GT:
            gt = _load_tile(GT + b * sgtb + h * sgth, offs_m, offs_dv, sgtn, sgtd, N, DV)
            gt = gt.to(tl.float32)
            to = _load_tile(TO + b * stob + h * stoh, offs_m, offs_dv, ston, stod, N, DV)
            mu = tl.load(MU + pid_bh * N + offs_m, mask=offs_m < N, other=0.0)
            dt = tl.sum(gt * o, 1)
            delta += tl.sum(gt * to.to(tl.float32), 1) - mu * dt
            tl.store(DT + pid_bh * N + offs_m, dt, mask=offs_m < N)
        tl.store(DELTA + pid_bh * N + offs_m, delta, mask=offs_m < N)

    @triton.jit
    def _bwd_tile(q, k, v, tq, tk, tv, g, gt, lse, delta, mu, dt, ok, scale,
                  HAS_G: tl.constexpr, HAS_GT: tl.constexpr, DOT_PREC: tl.constexpr):
        """Recomputes one (BLOCK_M x BLOCK_N) tile: returns P, P*(dS-mu), gS and gdS."""
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.zeros_like(p)
        if HAS_G:
            dp += tl.dot(g, tl.trans(v), input_precision=DOT_PREC)
        pdsc = tl.zeros_like(p)
        gds = tl.zeros_like(p)
        if HAS_GT:
            ds = (tl.dot(tq, tl.trans(k), input_precision=DOT_PREC)
                  + tl.dot(q, tl.trans(tk), input_precision=DOT_PREC)) * scale
            ds = tl.where(ok, ds, 0.0)
            bm = tl.dot(gt, tl.trans(v), input_precision=DOT_PREC)
            dsc = ds - mu[:, None]
            dp += tl.dot(gt, tl.trans(tv), input_precision=DOT_PREC) + bm * dsc - ds * dt[:, None]
            pdsc = p * dsc
            gds = p * (bm - dt[:, None])
        gs = p * (dp - delta[:, None])
        return p, pdsc, gs, gds

    @triton.jit
    def _bwd_kv_kernel(Q, K, V, TQ, TK, TV, G, GT, LSE, DELTA, MU, DT,
                       GK, GV, GTK, GTV,
                       sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                       stqb, stqh, stqn, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
                       sgb, sgh, sgn, sgd, sgtb, sgth, sgtn, sgtd,
                       H, N, M, D: tl.constexpr, DV: tl.constexpr, scale,
                       CAUSAL: tl.constexpr, HAS_G: tl.constexpr, HAS_GT: tl.constexpr,
                       DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, A: tl.constexpr):
        """One program = BLOCK_N keys; loops over query blocks; writes gK, gV, gdK, gdV.

        Gradient buffers are contiguous (B, H, M, D) and share the strides of ``GK``/``GV``.
        """
        # batch/head/row strides come divided by A, their common power-of-2 factor (<= 16): the
        # products tell Triton the pointers' alignment (16-byte loads, cp.async) that 72 hides
        sqb, sqh, sqn = sqb * A, sqh * A, sqn * A
        skb, skh, skn = skb * A, skh * A, skn * A
        svb, svh, svn = svb * A, svh * A, svn * A
        stqb, stqh, stqn = stqb * A, stqh * A, stqn * A
        stkb, stkh, stkn = stkb * A, stkh * A, stkn * A
        stvb, stvh, stvn = stvb * A, stvh * A, stvn * A
        sgb, sgh, sgn = sgb * A, sgh * A, sgn * A
        sgtb, sgth, sgtn = sgtb * A, sgth * A, sgtn * A
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k = _load_tile(K + b * skb + h * skh, offs_n, offs_d, skn, skd, M, D)
        v = _load_tile(V + b * svb + h * svh, offs_n, offs_dv, svn, svd, M, DV)
        tk = k
        tv = v
        if HAS_GT:
            tk = _load_tile(TK + b * stkb + h * stkh, offs_n, offs_d, stkn, stkd, M, D)
            tv = _load_tile(TV + b * stvb + h * stvh, offs_n, offs_dv, stvn, stvd, M, DV)
        Q += b * sqb + h * sqh
        TQ += b * stqb + h * stqh
        G += b * sgb + h * sgh
        GT += b * sgtb + h * sgth
        gk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        gv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        gtk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        gtv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        lo = 0
        if CAUSAL:  # first query that sees key pid_n*BLOCK_N is that key index - (M - N)
            lo = tl.maximum(pid_n * BLOCK_N - (M - N), 0)
            lo = (lo // BLOCK_M) * BLOCK_M
        for start_m in range(lo, N, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < N
            q = _load_tile(Q, offs_m, offs_d, sqn, sqd, N, D)
            lse = tl.load(LSE + pid_bh * N + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + pid_bh * N + offs_m, mask=row_ok, other=0.0)
            g = q
            tq = q
            gt = q
            mu = delta
            dt = delta
            if HAS_G:
                g = _load_tile(G, offs_m, offs_dv, sgn, sgd, N, DV)
            if HAS_GT:
                tq = _load_tile(TQ, offs_m, offs_d, stqn, stqd, N, D)
                gt = _load_tile(GT, offs_m, offs_dv, sgtn, sgtd, N, DV)
                mu = tl.load(MU + pid_bh * N + offs_m, mask=row_ok, other=0.0)
                dt = tl.load(DT + pid_bh * N + offs_m, mask=row_ok, other=0.0)
            ok = _visible(offs_m, offs_n, N, M, CAUSAL)
            p, pdsc, gs, gds = _bwd_tile(q, k, v, tq, tk, tv, g, gt, lse, delta, mu, dt, ok,
                                         scale, HAS_G, HAS_GT, DOT_PREC)
            gk += tl.dot(tl.trans(gs.to(q.dtype)), q, input_precision=DOT_PREC)
            if HAS_G:
                gv += tl.dot(tl.trans(p.to(g.dtype)), g, input_precision=DOT_PREC)
            if HAS_GT:
                gv += tl.dot(tl.trans(pdsc.to(gt.dtype)), gt, input_precision=DOT_PREC)
                gtv += tl.dot(tl.trans(p.to(gt.dtype)), gt, input_precision=DOT_PREC)
                gk += tl.dot(tl.trans(gds.to(tq.dtype)), tq, input_precision=DOT_PREC)
                gtk += tl.dot(tl.trans(gds.to(q.dtype)), q, input_precision=DOT_PREC)
        kmask = (offs_n[:, None] < M) & (offs_d[None, :] < D)
        vmask = (offs_n[:, None] < M) & (offs_dv[None, :] < DV)
        base_k = pid_bh * M * D + offs_n[:, None] * D + offs_d[None, :]
        base_v = pid_bh * M * DV + offs_n[:, None] * DV + offs_dv[None, :]
        tl.store(GK + base_k, (gk * scale).to(GK.dtype.element_ty), mask=kmask)
        tl.store(GV + base_v, gv.to(GV.dtype.element_ty), mask=vmask)
        if HAS_GT:
            tl.store(GTK + base_k, (gtk * scale).to(GTK.dtype.element_ty), mask=kmask)
            tl.store(GTV + base_v, gtv.to(GTV.dtype.element_ty), mask=vmask)

    @triton.jit
    def _bwd_q_kernel(Q, K, V, TQ, TK, TV, G, GT, LSE, DELTA, MU, DT, GQ, GTQ,
                      sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                      stqb, stqh, stqn, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
                      sgb, sgh, sgn, sgd, sgtb, sgth, sgtn, sgtd,
                      H, N, M, D: tl.constexpr, DV: tl.constexpr, scale,
                      CAUSAL: tl.constexpr, HAS_G: tl.constexpr, HAS_GT: tl.constexpr,
                      DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, A: tl.constexpr):
        """One program = BLOCK_M queries; loops over key blocks; writes gQ and gdQ (contiguous)."""
        # batch/head/row strides come divided by A, their common power-of-2 factor (<= 16): the
        # products tell Triton the pointers' alignment (16-byte loads, cp.async) that 72 hides
        sqb, sqh, sqn = sqb * A, sqh * A, sqn * A
        skb, skh, skn = skb * A, skh * A, skn * A
        svb, svh, svn = svb * A, svh * A, svn * A
        stqb, stqh, stqn = stqb * A, stqh * A, stqn * A
        stkb, stkh, stkn = stkb * A, stkh * A, stkn * A
        stvb, stvh, stvn = stvb * A, stvh * A, stvn * A
        sgb, sgh, sgn = sgb * A, sgh * A, sgn * A
        sgtb, sgth, sgtn = sgtb * A, sgth * A, sgtn * A
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        row_ok = offs_m < N
        q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, N, D)
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * N + offs_m, mask=row_ok, other=0.0)
        g = q
        tq = q
        gt = q
        mu = delta
        dt = delta
        if HAS_G:
            g = _load_tile(G + b * sgb + h * sgh, offs_m, offs_dv, sgn, sgd, N, DV)
        if HAS_GT:
            tq = _load_tile(TQ + b * stqb + h * stqh, offs_m, offs_d, stqn, stqd, N, D)
            gt = _load_tile(GT + b * sgtb + h * sgth, offs_m, offs_dv, sgtn, sgtd, N, DV)
            mu = tl.load(MU + pid_bh * N + offs_m, mask=row_ok, other=0.0)
            dt = tl.load(DT + pid_bh * N + offs_m, mask=row_ok, other=0.0)
        K += b * skb + h * skh
        V += b * svb + h * svh
        TK += b * stkb + h * stkh
        TV += b * stvb + h * stvh
        gq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        gtq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = M
        if CAUSAL:
            hi = tl.maximum(tl.minimum(M, (pid_m + 1) * BLOCK_M + M - N), 0)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(K, offs_n, offs_d, skn, skd, M, D)
            v = _load_tile(V, offs_n, offs_dv, svn, svd, M, DV)
            tk = k
            tv = v
            if HAS_GT:
                tk = _load_tile(TK, offs_n, offs_d, stkn, stkd, M, D)
                tv = _load_tile(TV, offs_n, offs_dv, stvn, stvd, M, DV)
            ok = _visible(offs_m, offs_n, N, M, CAUSAL)
            p, pdsc, gs, gds = _bwd_tile(q, k, v, tq, tk, tv, g, gt, lse, delta, mu, dt, ok,
                                         scale, HAS_G, HAS_GT, DOT_PREC)
            gq += tl.dot(gs.to(k.dtype), k, input_precision=DOT_PREC)
            if HAS_GT:
                gq += tl.dot(gds.to(tk.dtype), tk, input_precision=DOT_PREC)
                gtq += tl.dot(gds.to(k.dtype), k, input_precision=DOT_PREC)
        qmask = row_ok[:, None] & (offs_d[None, :] < D)
        base = pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :]
        tl.store(GQ + base, (gq * scale).to(GQ.dtype.element_ty), mask=qmask)
        if HAS_GT:
            tl.store(GTQ + base, (gtq * scale).to(GTQ.dtype.element_ty), mask=qmask)


# Shared memory per block (opt-in) by compute capability, for torch builds whose device properties
# lack ``shared_memory_per_block_optin``; 99 KB (sm_86/89/120) otherwise.
SMEM_BYTES = {(8, 0): 166_912, (8, 7): 166_912, (9, 0): 232_448, (10, 0): 232_448}


def smem_budget(device):
    p = torch.cuda.get_device_properties(device)
    return getattr(p, "shared_memory_per_block_optin", 0) or SMEM_BYTES.get((p.major, p.minor),
                                                                           101_376)


def tiles(kind, dtype, d, dv, budget):
    """(BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, num_warps, num_stages) of one kernel group: "fwd"
    (plain forward), "jvp" (forward with a tangent, fused or two-pass), "bwd" (plain backward),
    "bwd_jvp" (backward through the tangent). Shared memory grows with BLOCK_M, BLOCK_N, the head
    dim, the element size and the pipeline depth (num_stages); these choices fit the 232,448 B
    of an H100 and (budget < 200 KB) the 166,912 B of an A100 as compiled by Triton 3.8 for
    sm_90 / sm_80 (tests/test_kernel_compile.py checks every group, dtype and head dim <= 128).
    Tiles are small under the interpreter so that small test shapes span several tiles.

    The kernels are specialized as launched: the head dims are constants and the batch/head/row
    strides come divided by their common power-of-2 factor A (a constant), so a DiT call (head dim
    72, q/k/v views of one qkv tensor, head stride 72) gets 16-byte loads and cp.async; the
    shared-memory figures above are those of that specialization (compile_ahead).

    Head dims are padded to a power of 2 (tl.arange): 72 runs as 128, i.e. 1.78x the matmul work
    of the real head dim; splitting D into 64 + 16 would cut that to 1.11x at the price of twice
    the loads and dots in every kernel, which we did not do."""
    bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    if INTERPRET:
        return 16, 16, bd, bdv, 1, 1
    f32, big = dtype == torch.float32, budget >= 200_000
    bm, bn, stages = 64, 32 if max(bd, bdv) > 64 else 64, 2
    if kind == "fwd" and not f32:
        stages = 3
    elif kind == "bwd" and f32:
        stages = 1
    elif kind == "bwd_jvp":
        bm, bn, stages = (32 if big or not f32 else 16), 32, 1 if f32 else 2
    if budget < 160_000:  # consumer GPUs (99 KB): one stage, half the rows (not compile-checked)
        bm, stages = max(16, bm // 2), 1
    if max(bd, bdv) > 128:  # head dims up to 256: half the tiles (not compile-checked)
        bm, bn = max(16, bm // 2), max(16, bn // 2)
    return bm, bn, bd, bdv, 4, stages


_BWD = ("_bwd_pre_kernel", "_bwd_kv_kernel", "_bwd_q_kernel")
VARIANTS = {  # kernel group -> the (kernel, flags) a launch of that group compiles
    "fwd": [("_fwd_kernel", dict(HAS_JVP=False, HAS_DQK=False, HAS_DV=False, TWO_PASS=False))],
    "jvp": [("_fwd_kernel", dict(HAS_JVP=True, HAS_DQK=True, HAS_DV=True, TWO_PASS=two))
            for two in (False, True)],
    "bwd": [(name, dict(HAS_G=True, HAS_GT=False)) for name in _BWD],
    "bwd_jvp": [(name, dict(HAS_G=True, HAS_GT=True)) for name in _BWD],
}
DIT_HEADS = {64: 12, 72: 16, 128: 16}  # DiT-B/2 (768 = 12 x 64), XL/2 (1152 = 16 x 72), 2048


class _Plan:
    """What ``compile_ahead`` records instead of launching: the tiles' budget (and optional
    override), the dot precision, and [(kernel, args, meta)] of every launch."""

    def __init__(self, budget, dot_prec, t=None):
        self.budget, self.dot_prec, self.t, self.calls = budget, dot_prec, t, []


def _launch(plan, kernel, grid, args, meta):
    if plan is None:
        kernel[grid](*args, **meta)
    else:
        plan.calls.append((kernel, args, meta))


def _tiles(plan, kind, x, d, dv):
    if plan is not None and plan.t is not None:
        return plan.t
    return tiles(kind, x.dtype, d, dv, _budget(x) if plan is None else plan.budget)


def _specialize(fn, args, meta):
    """(signature, constexprs, attrs) that a launch of ``fn`` with ``args``/``meta`` compiles,
    by Triton's rules: tensors are pointers, 16-byte aligned ones marked so; integers equal to
    1 become constants, those divisible by 16 are marked so; floats are fp32."""
    sig, consts, attrs = {}, {}, {}
    values = dict(zip(fn.arg_names, args), **meta)
    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
              torch.float64: "fp64"}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        x = values[name]
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", x
        elif torch.is_tensor(x):
            sig[name] = "*" + dtypes[x.dtype]
            if x.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(x, float):
            sig[name] = "fp32"
        elif x == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32" if -2 ** 31 <= x < 2 ** 31 else "i64"
            if x % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def dit_inputs(d, dtype, B=2, N=256, heads=None, device="cpu"):
    """q, k, v, their tangents, the primal output o (as PyTorch's flash kernel returns it), lse,
    and the cotangents g, gt of o and do, laid out as a DiT block's attention call sees them:
    q/k/v (and dq/dk/dv) are views of one (B, N, 3, H, d) qkv tensor, g and gt come from the
    ``.transpose(1, 2).reshape(B, N, H d)`` after the call."""
    H = heads or DIT_HEADS.get(d, 16)

    def qkv():
        return torch.randn(B, N, 3, H, d, dtype=dtype, device=device).permute(2, 0, 3, 1, 4)

    def cot():
        return torch.randn(B, N, H, d, dtype=dtype, device=device).transpose(1, 2)

    q, k, v = qkv()
    dq, dk, dv = qkv()
    o = torch.randn(B, H, N, d, dtype=dtype, device=device)
    lse = torch.randn(B, H, N, device=device)
    return q, k, v, dq, dk, dv, o, lse, cot(), cot()


def compile_ahead(kind, dtype, d, dot_prec, target, budget, t=None, inputs=None):
    """Compiles the kernels of group ``kind`` for ``target`` (a ``triton.backends.compiler.
    GPUTarget``; no GPU needed) exactly as a launch specializes them: the launch code runs on
    CPU tensors laid out like a DiT call (``dit_inputs(d, dtype)``, or ``inputs``), records its
    kernel calls instead of launching, and each is compiled with Triton's specialization of
    those arguments (``_specialize``). Tiles are the ones ``tiles`` picks for ``budget`` (``t``
    overrides them). Returns [(kernel name, flags, tiles, CompiledKernel)]; the kernel's
    ``.metadata.shared`` is its shared memory in bytes, ``.asm["ptx"]`` its PTX."""
    from triton.compiler import ASTSource

    q, k, v, dq, dk, dv, o, lse, g, gt = inputs or dit_inputs(d, dtype)
    plan = _Plan(budget, dot_prec, t)
    scale = _default_scale(q, None)
    if kind == "fwd":
        _triton_forward(q, k, v, None, None, None, False, scale, plan=plan)
    elif kind == "jvp":
        _triton_forward(q, k, v, dq, dk, dv, False, scale, plan=plan)
        _triton_forward(q, k, v, dq, dk, dv, False, scale, o=o, lse=lse, plan=plan)
    else:
        mu = torch.zeros_like(lse)
        _triton_backward(q, k, v, dq, dk, dv, o, o, lse, mu, g, gt if kind == "bwd_jvp" else None,
                         False, scale, plan=plan)
    out = []
    for fn, args, meta in plan.calls:
        meta = dict(meta)
        options = dict(num_warps=meta.pop("num_warps", 4), num_stages=meta.pop("num_stages", 3))
        sig, consts, attrs = _specialize(fn, args, meta)
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options)
        flags = {f: meta[f] for f in ("HAS_JVP", "HAS_DQK", "HAS_DV", "TWO_PASS", "HAS_G",
                                      "HAS_GT") if f in meta}
        t_used = tuple(meta.get(b, 0) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV")) + (
            options["num_warps"], options["num_stages"])
        out.append((fn.__name__, flags, t_used, kernel))
    return out


def ptx_loads(ptx, dtype):
    """(16-byte global loads incl. cp.async, scalar global loads of the element width) in a kernel's PTX."""
    wide = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx)) + ptx.count("cp.async.cg")
    width = 32 if dtype == torch.float32 else 16
    return wide, len(re.findall(rf"ld\.global(?:\.(?:nc|ca|cg|cs|lu|L1::\w+|L2::\w+))*\.[bsuf]{width}\s", ptx))


def _dot_prec(x, plan=None):
    if plan is not None:
        return plan.dot_prec
    if x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def _budget(x):
    return smem_budget(x.device) if x.is_cuda else 0


def _check(q, k, v):
    assert q.dim() == k.dim() == v.dim() == 4, "expected (B, H, N, D) tensors"
    assert q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
    assert q.shape[-1] == k.shape[-1] and q.shape[-1] <= 256 and v.shape[-1] <= 256
    assert q.dtype == k.dtype == v.dtype


def _align(tensors):
    """Largest power of two <= 16 dividing every batch/head/row stride of ``tensors``."""
    a = 16
    for x in tensors:
        for st in x.stride()[:-1]:
            while st % a:
                a //= 2
    return a


def _strides(a, tensors):
    """Each tensor's strides with the batch/head/row ones divided by ``a`` (see the kernels)."""
    out = []
    for x in tensors:
        *outer, last = x.stride()
        out += [st // a for st in outer] + [last]
    return out


def _triton_forward(q, k, v, dq, dk, dv, causal, scale, o=None, lse=None, plan=None):
    """Fused (o, do, lse, mu); with ``o``/``lse`` given, the two-pass tangent (o, do, lse, mu).
    A plain call (no tangent) returns do = mu = None."""
    _check(q, k, v)
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[-1]
    has_dqk = dq is not None or dk is not None
    if has_dqk:  # a missing one of dq/dk contributes nothing; zeros keep the kernel simple
        dq = torch.zeros_like(q) if dq is None else dq
        dk = torch.zeros_like(k) if dk is None else dk
    has_jvp = has_dqk or dv is not None
    two_pass = o is not None
    if not two_pass:
        o = torch.empty(B, H, N, DV, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    else:
        lse = lse.contiguous()
    # plain calls allocate no tangent or mu buffer: the kernel never touches TO/MU then
    do = torch.empty_like(o) if has_jvp else o
    mu = torch.empty(B, H, N, device=q.device, dtype=torch.float32) if has_jvp else lse
    tq = dq if dq is not None else q
    tk = dk if dk is not None else k
    tv = dv if dv is not None else v
    bm, bn, bd, bdv, warps, stages = _tiles(plan, "jvp" if has_jvp else "fwd", q, D, DV)
    tensors = (q, k, v, tq, tk, tv, o, do)
    a = _align(tensors)
    args = (q, k, v, tq, tk, tv, o, do, lse, mu, *_strides(a, tensors), H, N, M, D, DV, scale)
    meta = dict(CAUSAL=causal, HAS_JVP=has_jvp, HAS_DQK=has_dqk, HAS_DV=dv is not None,
                TWO_PASS=two_pass, DOT_PREC=_dot_prec(q, plan), BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=bd, BLOCK_DV=bdv, A=a, num_warps=warps, num_stages=stages)
    _launch(plan, _fwd_kernel, (triton.cdiv(N, bm), B * H), args, meta)
    if not has_jvp:
        return o, None, lse, None
    return o, do, lse, mu


def _triton_backward(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, causal, scale, plan=None):
    _check(q, k, v)
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[-1]
    has_g, has_gt = g is not None, gt is not None
    if has_gt:
        dq = torch.zeros_like(q) if dq is None else dq
        dk = torch.zeros_like(k) if dk is None else dk
        dv = torch.zeros_like(v) if dv is None else dv
    else:
        dq, dk, dv, do = q, k, v, o  # unused placeholders
    g_ = g if has_g else o
    gt_ = gt if has_gt else o
    bm, bn, bd, bdv, warps, stages = _tiles(plan, "bwd_jvp" if has_gt else "bwd", q, D, DV)
    f32 = dict(device=q.device, dtype=torch.float32)
    delta = torch.empty(B, H, N, **f32)
    dt = torch.empty(B, H, N, **f32) if has_gt else delta
    mu = mu.contiguous() if has_gt else delta
    lse = lse.contiguous()
    pre = (o, do, g_, gt_)
    a = _align(pre)
    _launch(plan, _bwd_pre_kernel, (triton.cdiv(N, bm), B * H),
            (o, do, g_, gt_, mu, delta, dt, *_strides(a, pre), H, N, DV),
            dict(HAS_G=has_g, HAS_GT=has_gt, BLOCK_M=bm, BLOCK_DV=bdv, A=a))
    gq = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    gk = torch.empty(B, H, M, D, device=q.device, dtype=k.dtype)
    gv = torch.empty(B, H, M, DV, device=q.device, dtype=v.dtype)
    gtq = torch.empty_like(gq) if has_gt else gq
    gtk = torch.empty_like(gk) if has_gt else gk
    gtv = torch.empty_like(gv) if has_gt else gv
    ins = (q, k, v, dq, dk, dv, g_, gt_)
    a = _align(ins)
    common = (*_strides(a, ins), H, N, M, D, DV, scale)
    meta = dict(CAUSAL=causal, HAS_G=has_g, HAS_GT=has_gt, DOT_PREC=_dot_prec(q, plan),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, A=a, num_warps=warps,
                num_stages=stages)
    _launch(plan, _bwd_kv_kernel, (triton.cdiv(M, bn), B * H),
            (q, k, v, dq, dk, dv, g_, gt_, lse, delta, mu, dt, gk, gv, gtk, gtv, *common), meta)
    _launch(plan, _bwd_q_kernel, (triton.cdiv(N, bm), B * H),
            (q, k, v, dq, dk, dv, g_, gt_, lse, delta, mu, dt, gq, gtq, *common), meta)
    if not has_gt:
        return gq, gk, gv, None, None, None
    return gq, gk, gv, gtq, gtk, gtv


# ----------------------------------------------------------------------------------------------
# torch.compile: the Triton launches as custom ops (opaque nodes with a shape rule), used only while
# a graph is traced; eager calls launch directly (no op-dispatch overhead). The reference is plain
# torch and is traced as it is.
# ----------------------------------------------------------------------------------------------

def _empty(x):
    return x.new_empty(0)


if HAS_TRITON:

    @torch.library.custom_op("cleanflow::attention_fwd", mutates_args=())
    def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: Optional[torch.Tensor],
                dk: Optional[torch.Tensor], dv: Optional[torch.Tensor], o: Optional[torch.Tensor],
                lse: Optional[torch.Tensor], causal: bool, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """_triton_forward; absent outputs (and the given o, lse of the two-pass form: an op may
        not return its inputs) come back as empty tensors."""
        o_, do, lse_, mu = _triton_forward(q, k, v, dq, dk, dv, causal, scale, o, lse)
        two_pass = o is not None
        return (_empty(q) if two_pass else o_, _empty(q) if do is None else do,
                _empty(q) if two_pass else lse_, _empty(q) if mu is None else mu)

    @_fwd_op.register_fake
    def _fwd_fake(q, k, v, dq, dk, dv, o, lse, causal, scale):  # the allocations of _triton_forward
        B, H, N, _ = q.shape
        jvp = dq is not None or dk is not None or dv is not None
        o_ = q.new_empty(B, H, N, v.shape[-1]) if o is None else o
        stat = lambda: q.new_empty(B, H, N, dtype=torch.float32)  # noqa: E731
        return (_empty(q) if o is not None else o_, torch.empty_like(o_) if jvp else _empty(q),
                _empty(q) if o is not None else stat(), stat() if jvp else _empty(q))

    @torch.library.custom_op("cleanflow::attention_bwd", mutates_args=())
    def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: Optional[torch.Tensor],
                dk: Optional[torch.Tensor], dv: Optional[torch.Tensor], o: torch.Tensor,
                do: Optional[torch.Tensor], lse: torch.Tensor, mu: Optional[torch.Tensor],
                g: Optional[torch.Tensor], gt: Optional[torch.Tensor], causal: bool, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor]:
        """_triton_backward; the tangents' gradients are empty tensors when gt is None."""
        grads = _triton_backward(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, causal, scale)
        return tuple(_empty(q) if x is None else x for x in grads)

    @_bwd_op.register_fake
    def _bwd_fake(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, causal, scale):
        B, H, N, D = q.shape
        M, DV = k.shape[2], v.shape[-1]
        gq, gk, gv = q.new_empty(B, H, N, D), k.new_empty(B, H, M, D), v.new_empty(B, H, M, DV)
        if gt is None:
            return gq, gk, gv, _empty(q), _empty(q), _empty(q)
        return gq, gk, gv, torch.empty_like(gq), torch.empty_like(gk), torch.empty_like(gv)


def _tracing(x):
    """Whether a graph is being traced: is_compiling (Dynamo, and AOTAutograd in recent torch), or x is
    not a plain tensor (AOTAutograd's functional/fake tensors)."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _traced_forward(q, k, v, dq, dk, dv, causal, scale, o, lse):
    o_, do, lse_, mu = _fwd_op(q, k, v, dq, dk, dv, o, lse, causal, scale)
    none = lambda x: None if x.numel() == 0 and x.dim() == 1 else x  # noqa: E731
    return (o_ if o is None else o), none(do), (lse_ if o is None else lse), none(mu)


def _forward(q, k, v, dq, dk, dv, causal, scale, o=None, lse=None):
    with _no_autocast(q):  # the reference's fp32 matmuls stay fp32
        if _use_triton(q):
            if _tracing(q):  # Dynamo or AOTAutograd is tracing: one graph node
                return _traced_forward(q, k, v, dq, dk, dv, causal, scale, o, lse)
            return _triton_forward(q, k, v, dq, dk, dv, causal, scale, o, lse)
        return attention_jvp_reference(q, k, v, dq, dk, dv, causal, scale, o, lse)


def _backward(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, causal, scale):
    if g is None and gt is None:
        return (None,) * 6
    with _no_autocast(q):
        if _use_triton(q):
            if _tracing(q):
                grads = _bwd_op(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, causal, scale)
                return grads[:3] + ((None,) * 3 if gt is None else grads[3:])
            return _triton_backward(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, causal, scale)
        return attention_backward_reference(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, causal,
                                            scale)


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------

class _AttentionJVP(torch.autograd.Function):
    """(q, k, v, dq, dk, dv) -> (o, do, lse, mu); backward through o and do."""

    @staticmethod
    def forward(q, k, v, dq, dk, dv, causal, scale):
        o, do, lse, mu = _forward(q, k, v, dq, dk, dv, causal, scale)
        if do is None:  # no tangent at all: do = 0 (the kernel's plain call writes none)
            do, mu = torch.zeros_like(o), torch.zeros_like(lse)
        return o, do, lse, mu

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, dq, dk, dv, causal, scale = inputs
        o, do, lse, mu = output
        ctx.save_for_backward(q, k, v, dq, dk, dv, o, do, lse, mu)
        ctx.mark_non_differentiable(lse, mu)
        ctx.set_materialize_grads(False)
        ctx.causal, ctx.scale = causal, scale

    @staticmethod
    def backward(ctx, g, gt, _glse, _gmu):
        q, k, v, dq, dk, dv, o, do, lse, mu = ctx.saved_tensors
        if gt is None:  # gradients of the tangents are zero, the rest is the plain backward
            gq, gk, gv, _, _, _ = _backward(q, k, v, None, None, None, o, None, lse, None, g,
                                            None, ctx.causal, ctx.scale)
            zero = lambda x: None if x is None else torch.zeros_like(x)  # noqa: E731
            return gq, gk, gv, zero(dq), zero(dk), zero(dv), None, None
        grads = _backward(q, k, v, dq, dk, dv, o, do, lse, mu, g, gt, ctx.causal, ctx.scale)
        return (*grads, None, None)


def attention_jvp(q, k, v, dq, dk, dv, causal=False, scale=None):
    """Attention output and its JVP in one fused pass: returns (o, do), both differentiable."""
    o, do, _, _ = _AttentionJVP.apply(q, k, v, dq, dk, dv, causal, _default_scale(q, scale))
    return o, do


class _SDPATangent(torch.autograd.Function):
    """Two-pass tangent: given the primal's o and lse, (q, k, v, dq, dk, dv) -> (do, mu).

    o and lse are cached functions of (q, k, v), passed as constants: the backward returns the
    total derivative of do with respect to the six real inputs (the module docstring's backward with G = 0).
    """

    @staticmethod
    def forward(q, k, v, dq, dk, dv, o, lse, causal, scale):
        _, do, _, mu = _forward(q, k, v, dq, dk, dv, causal, scale, o=o, lse=lse)
        return do, mu

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, dq, dk, dv, o, lse, causal, scale = inputs
        do, mu = output
        ctx.save_for_backward(q, k, v, dq, dk, dv, o, lse, do, mu)
        ctx.mark_non_differentiable(mu)
        ctx.set_materialize_grads(False)
        ctx.causal, ctx.scale = causal, scale

    @staticmethod
    def backward(ctx, gt, _gmu):
        q, k, v, dq, dk, dv, o, lse, do, mu = ctx.saved_tensors
        grads = _backward(q, k, v, dq, dk, dv, o, do, lse, mu, None, gt, ctx.causal, ctx.scale)
        return (*grads, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# The primal through PyTorch's fused attention (flash / memory-efficient; CPU flash for tests)
# ----------------------------------------------------------------------------------------------

_CAPABILITY = {}


def _capability(x):
    idx = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx]


def primal_kind(q, k, v, causal=False):
    """Which PyTorch kernel serves sdpa's primal forward and plain backward: "flash" (CUDA,
    fp16/bf16, equal head dims, multiple of 8, <= 256, sm_80+), "efficient" (CUDA, any float
    dtype, head dims a multiple of 8 (16-bit) or 4 (fp32)), "cpu" (PyTorch's CPU flash kernel;
    only with PRIMAL = "torch", for tests), or None: the project's kernels (Triton on CUDA, the
    reference on CPU). PyTorch's causal mask is top-left aligned, ours bottom-right: causal
    calls with N != M keep our kernels. ``PRIMAL = "kernel"`` turns this path off."""
    if PRIMAL == "kernel" or (PRIMAL == "auto" and not q.is_cuda):
        return None
    if causal and q.shape[2] != k.shape[2]:
        return None
    if q.device.type == "cpu":
        return "cpu"
    if not q.is_cuda or any(x.stride(-1) != 1 for x in (q, k, v)):
        return None
    d, dv = q.shape[-1], v.shape[-1]
    half = q.dtype in (torch.float16, torch.bfloat16)
    if (half and d == dv and d % 8 == 0 and d <= 256 and _capability(q) >= (8, 0)
            and torch.backends.cuda.flash_sdp_enabled()):
        return "flash"
    align = 8 if half else 4
    if d % align == 0 and dv % align == 0 and torch.backends.cuda.mem_efficient_sdp_enabled():
        return "efficient"
    return None


def _fallback(what, err):
    msg = f"{what}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    if msg not in FALLBACKS:
        warnings.warn(f"kernels.attention_jvp: PyTorch's fused attention failed, using the "
                      f"project's kernels instead ({msg})")
    FALLBACKS[msg] = FALLBACKS.get(msg, 0) + 1


def _torch_forward(kind, q, k, v, causal, scale):
    """(o, lse, extra): lse as the kernel returns it (efficient pads its rows to a multiple of
    32; ``lse[..., :N]`` is the real one), extra what its backward needs."""
    aten = torch.ops.aten
    if kind == "cpu":
        o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                  scale=scale)
        return o, lse, ()
    if kind == "flash":
        o, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        return o, lse, (cq, ck, mq, mk, seed, offset)
    o, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)
    return o, lse, (seed, offset)


def _torch_backward(kind, extra, g, q, k, v, o, lse, causal, scale):
    aten = torch.ops.aten
    if g.stride(-1) != 1:
        g = g.contiguous()
    if kind == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, o, lse, 0.0, causal, scale=scale)
    if kind == "flash":
        cq, ck, mq, mk, seed, offset = extra
        return aten._scaled_dot_product_flash_attention_backward(
            g, q, k, v, o, lse, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale)
    seed, offset = extra
    gq, gk, gv, _ = aten._scaled_dot_product_efficient_attention_backward(
        g, q, k, v, None, o, lse, seed, offset, 0.0, [True, True, True, False], causal,
        scale=scale)
    return gq, gk, gv


class _Stash:
    """Carries the PyTorch kernel's name and extra outputs from ``_SDPA.forward`` to its
    ``setup_context`` (a non-tensor input: torch.func passes the very object through)."""
    __slots__ = ("kind", "extra")

    def __init__(self):
        self.kind, self.extra = None, ()


class _SDPA(torch.autograd.Function):
    """(q, k, v) -> (o, lse). Plain forward/backward through PyTorch's fused attention where
    ``primal_kind`` allows (else the project's kernels); the ``jvp`` rule calls _SDPATangent.
    lse is the kernel's (the efficient kernel pads its rows; the tangent uses the first N)."""

    @staticmethod
    def forward(q, k, v, causal, scale, stash):
        kind = primal_kind(q, k, v, causal)
        if kind is not None:
            try:
                with _no_autocast(q):
                    o, lse, stash.extra = _torch_forward(kind, q, k, v, causal, scale)
                stash.kind = kind
                return o, lse
            except RuntimeError as err:
                _fallback(f"{kind} forward", err)
        o, _, lse, _ = _forward(q, k, v, None, None, None, causal, scale)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale, stash = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.causal, ctx.scale, ctx.kind, ctx.extra = causal, scale, stash.kind, stash.extra

    @staticmethod
    def backward(ctx, g, _glse):
        q, k, v, o, lse = ctx.saved_tensors
        if g is None:
            return None, None, None, None, None, None
        if ctx.kind is not None:
            try:
                with _no_autocast(q):
                    gq, gk, gv = _torch_backward(ctx.kind, ctx.extra, g, q, k, v, o, lse,
                                                 ctx.causal, ctx.scale)
                return gq, gk, gv, None, None, None
            except RuntimeError as err:
                _fallback(f"{ctx.kind} backward", err)
        gq, gk, gv, _, _, _ = _backward(q, k, v, None, None, None, o, None,
                                        lse[..., :q.shape[2]], None, g, None, ctx.causal,
                                        ctx.scale)
        return gq, gk, gv, None, None, None

    @staticmethod
    def jvp(ctx, dq, dk, dv, *_):
        q, k, v, o, lse = ctx.saved_tensors
        if dq is None and dk is None and dv is None:
            return torch.zeros_like(o), None
        zero = lambda t, x: torch.zeros_like(x) if t is None else t  # noqa: E731
        do, _ = _SDPATangent.apply(q, k, v, zero(dq, q), zero(dk, k), zero(dv, v), o,
                                   lse[..., :q.shape[2]], ctx.causal, ctx.scale)
        return do, None  # lse is non-differentiable (its tangent would be mu)


def _no_autocast(x):
    """Autocast off on x's device (autocast knows no meta device: a no-op there)."""
    return torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else contextlib.nullcontext()


def sdpa(q, k, v, causal=False, scale=None):
    """Drop-in for ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)`` on
    (B, H, N, D) tensors (see the module docstring for the causal alignment when N != M), with a
    forward-mode rule usable by ``torch.func.jvp`` and ``torch.autograd.forward_ad``.

    Mixed dtypes (e.g. fp32 q/k after an RMSNorm and bf16 v under autocast) are cast to one dtype:
    the autocast dtype when autocast is on for the device (as PyTorch's own sdpa does), else v's."""
    dev = q.device.type
    amp = dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)  # autocast knows no meta device
    dt = torch.get_autocast_dtype(dev) if amp else v.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return _sdpa(q, k, v, causal, _default_scale(q, scale))


@torch.compiler.allow_in_graph
def _sdpa(q, k, v, causal, scale):
    """_SDPA as one node of a torch.compile graph: Dynamo refuses an autograd.Function with a custom
    jvp ("Unsupported custom jvp", a graph break at every attention call) but puts this function in
    the graph untraced; AOTAutograd then traces it with its forward, backward and jvp rules
    (under torch.func.jvp too). Eager calls are unchanged (allow_in_graph returns the function)."""
    return _SDPA.apply(q, k, v, causal, scale, _Stash())[0]
