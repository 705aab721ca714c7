#!/usr/bin/env bash
# Cost of one training step in forward-pass equivalents (FPE), measured on this machine:
# MeanFlow with the JVP only on the s != t rows (our default, ratio 0.25), on the whole batch
# (ratio 1: the JVP where it is not needed too), without any JVP (ratio 0: flow matching in
# MeanFlow's clothes), and with the paper's training guidance (k 0.5: two extra forward passes);
# fm as the plain-training baseline (Dieleman's table: 3 FPE); the distillation methods with the
# fm mnist teacher (results/fm/mnist/model.safetensors): DMD2 (TTUR 1:5) with and without its GAN
# branch, FSF-DMD (M = 2), MFD at the reference run's ODE step and at the VSD limit, SplitMeanFlow,
# AYF (EMD) and FreeFlow (JVP derivative); trained from data: iMF, alpha-Flow in its costliest
# regime, a = 0 from step 1 on (--alpha-k-init 0 --alpha-k-end 1: the MeanFlow JVP target), TVM and Shortcut, each at
# its defaults; the consistency models cm, ect, scm, facm and ctm at their defaults. Same DiT and batch as the mnist reference runs. Run it on a quiet machine; then
#     OUT=results/cost/runs2 bash results/cost/measure.sh   (a second pass: the table shows both)
#     python results/make_table.py   (rewrites results/cost/cost.md from table.py and the README)
# ONLY="imf tvm" runs only the configs whose run name starts with one of these words, and then
# $OUT is NOT wiped (only the selected runs' own folders are), e.g. to add the new methods to
# existing passes:  ONLY="imf alphaflow tvm shortcut splitmeanflow ayf freeflow" OUT=results/cost/runs2 bash ...
set -euo pipefail
cd "$(dirname "$0")/../.."
NET="--dataset mnist --batch-size 64 --hidden 128 --depth 4 --heads 4 --patch-size 4 --steps ${STEPS:-60} --log-every 20 --eval-every 100000 --eval-samples 100 --eval-steps 1"
OUT=${OUT:-results/cost/runs}
ONLY=${ONLY:-}
# want NAME: is run NAME selected by $ONLY (all runs when it is empty)? A selected run's old folder is removed.
want() {
  if [ -n "$ONLY" ]; then
    local w hit=
    for w in $ONLY; do [[ $1 == "$w"* ]] && hit=1; done
    [ -n "$hit" ] || return 1
    rm -rf "${OUT:?}/$1"
  fi
}
[ -n "$ONLY" ] || rm -rf "$OUT"
if want fm; then python methods/fm.py $NET --out-dir $OUT/fm; fi
for v in "ratio0.25:--ratio 0.25" "ratio1:--ratio 1.0" "ratio0:--ratio 0.0" "ratio0.25-cfg:--ratio 0.25 --cfg-kappa 0.5"; do
  if want meanflow-${v%%:*}; then python methods/meanflow.py $NET ${v#*:} --out-dir $OUT/meanflow-${v%%:*}; fi
done
if want dmd2; then python methods/dmd2.py $NET --out-dir $OUT/dmd2; fi
if want dmd2-gan; then python methods/dmd2.py $NET --gan-weight 3e-3 --out-dir $OUT/dmd2-gan; fi
if want sid; then python methods/sid.py $NET --out-dir $OUT/sid; fi
if want fsf_dmd; then python methods/fsf_dmd.py $NET --out-dir $OUT/fsf_dmd; fi
MFD="--dataset mnist --batch-size 64 --steps ${MFD_STEPS:-20} --log-every 10 --eval-every 100000 --eval-samples 100 --eval-steps 1"
if want mfd-step0.05; then python methods/mfd.py $MFD --ode-step 0.05 --out-dir $OUT/mfd-step0.05; fi
if want mfd-vsd; then python methods/mfd.py $MFD --ode-step 1 --out-dir $OUT/mfd-vsd; fi
if want imf; then python methods/imf.py $NET --out-dir $OUT/imf; fi
if want alphaflow-a0; then python methods/alphaflow.py $NET --alpha-k-init 0 --alpha-k-end 1 --out-dir $OUT/alphaflow-a0; fi
if want tvm; then python methods/tvm.py $NET --out-dir $OUT/tvm; fi
if want shortcut; then python methods/shortcut.py $NET --out-dir $OUT/shortcut; fi
if want splitmeanflow; then python methods/splitmeanflow.py $NET --out-dir $OUT/splitmeanflow; fi
if want ayf; then python methods/ayf.py $NET --out-dir $OUT/ayf; fi
if want ayf-lmd-tangent-grad; then python methods/ayf.py $NET --objective lmd --tangent-grad --out-dir $OUT/ayf-lmd-tangent-grad; fi
if want freeflow; then python methods/freeflow.py $NET --out-dir $OUT/freeflow; fi
# consistency models (issue 25), distilled from / initialized by the fm mnist teacher, each at its defaults
if want cm; then python methods/cm.py $NET --out-dir $OUT/cm; fi
if want ect; then python methods/ect.py $NET --out-dir $OUT/ect; fi
if want scm; then python methods/scm.py $NET --out-dir $OUT/scm; fi
if want facm; then python methods/facm.py $NET --out-dir $OUT/facm; fi
if want ctm; then python methods/ctm.py $NET --out-dir $OUT/ctm; fi
if want pid; then python methods/pid.py $NET --out-dir $OUT/pid; fi
if want soflow; then python methods/soflow.py $NET --out-dir $OUT/soflow; fi
if want dmf; then python methods/dmf.py $NET --out-dir $OUT/dmf; fi
if want lsd; then python methods/lsd.py $NET --out-dir $OUT/lsd; fi
if want esd; then python methods/esd.py $NET --out-dir $OUT/esd; fi
if want psd; then python methods/psd.py $NET --out-dir $OUT/psd; fi
if want fmm; then python methods/fmm.py $NET --out-dir $OUT/fmm; fi
if want reflow; then python methods/reflow.py $NET --out-dir $OUT/reflow; fi
if want imm; then python methods/imm.py $NET --out-dir $OUT/imm; fi
if want vsd; then python methods/vsd.py $NET --out-dir $OUT/vsd; fi
if want drifting; then python methods/drifting.py $NET --out-dir $OUT/drifting; fi
if want rcm; then python methods/rcm.py $NET --tangent-warmup 0 --out-dir $OUT/rcm; fi
if want twinflow; then python methods/twinflow.py $NET --out-dir $OUT/twinflow; fi
