#!/usr/bin/env bash
# Cost of one training step in forward-pass equivalents (FPE), measured on this machine:
# MeanFlow with the JVP only on the s != t rows (our default, ratio 0.25), on the whole batch
# (ratio 1: the JVP where it is not needed too), without any JVP (ratio 0: flow matching in
# MeanFlow's clothes), and with the paper's training guidance (k 0.5: two extra forward passes);
# fm as the plain-training baseline (Dieleman's table: 3 FPE); the distillation methods with the
# fm mnist teacher (results/fm/mnist/model.safetensors): DMD2 (TTUR 1:5) with and without its GAN
# branch, FSF-DMD (M = 2), MFD at the reference run's ODE step and at the VSD limit. Same DiT and
# batch as the mnist reference runs. Run it on a quiet machine; then
#     OUT=results/cost/runs2 bash results/cost/measure.sh   (a second pass: the table shows both)
#     python results/make_table.py   (rewrites results/cost/cost.md from table.py and the README)
set -euo pipefail
cd "$(dirname "$0")/../.."
NET="--dataset mnist --batch-size 64 --hidden 128 --depth 4 --heads 4 --patch-size 4 --steps ${STEPS:-60} --log-every 20 --eval-every 100000 --eval-samples 100 --eval-steps 1"
OUT=${OUT:-results/cost/runs}
rm -rf "$OUT"
python methods/fm.py $NET --out-dir $OUT/fm
for v in "ratio0.25:--ratio 0.25" "ratio1:--ratio 1.0" "ratio0:--ratio 0.0" "ratio0.25-cfg:--ratio 0.25 --cfg-kappa 0.5"; do
  python methods/meanflow.py $NET ${v#*:} --out-dir $OUT/meanflow-${v%%:*}
done
python methods/dmd2.py $NET --out-dir $OUT/dmd2
python methods/dmd2.py $NET --gan-weight 3e-3 --out-dir $OUT/dmd2-gan
python methods/fsf_dmd.py $NET --out-dir $OUT/fsf_dmd
MFD="--dataset mnist --batch-size 64 --steps ${MFD_STEPS:-20} --log-every 10 --eval-every 100000 --eval-samples 100 --eval-steps 1"
python methods/mfd.py $MFD --ode-step 0.05 --out-dir $OUT/mfd-step0.05
python methods/mfd.py $MFD --ode-step 1 --out-dir $OUT/mfd-vsd
