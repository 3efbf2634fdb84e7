#!/usr/bin/env bash
# The tiling table (issue 17, item 4): image AUROC of a 64 px model on 512 px
# synthetic parts with SMALL defects (`datagen --defect-scale`), the whole frame
# resized to the model's input against the frame cut into tiles
# (`train --tile`), same data, epochs and seeds; then the cost in frames per
# second (`ganomalyd bench --tiles`, release build, CPU).
#
# Modes (trainer flags on top of the common ones below):
#   whole     the 512 px image resized to 64 px (what a camera does without tiles)
#   tile128   16 tiles of 128 source px, each resized to 64 px (`--tile 128`)
#   whole45   whole with 9× the epochs: tile128's number of optimiser steps
#   tile64    64 tiles of 64 source px, native resolution (`--tile 64`; 4× tile128's time)
# Each run's figures are `ganomaly-train eval` on test/ (20 good, 5 per defect
# type; max over tiles per image when tiled): the AUROC of every exported score.
#
# Usage: benches/tiles.sh [-s "0 1"] [-x "brushed_metal woven_fabric"] [-m "whole whole45 tile128 tile64"]
#                         [-e EPOCHS] [-t THREADS] [-o OUTDIR] [-f]
#   -f also runs the fps bench (needs target/release/ganomalyd built from this tree).
# Entry point for `make bench-tiles`. Runtime on a 2-core box: see benches/README.md ("Tiles").
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS="0 1"
TEXTURES="brushed_metal woven_fabric"
MODES="whole whole45 tile128 tile64"
EPOCHS=5
THREADS=1
TRAIN_GOOD=40
OUT=target/tiles
FPS=0
while getopts "s:x:m:e:t:o:f" opt; do
  case $opt in
    s) SEEDS=$OPTARG ;;
    x) TEXTURES=$OPTARG ;;
    m) MODES=$OPTARG ;;
    e) EPOCHS=$OPTARG ;;
    t) THREADS=$OPTARG ;;
    o) OUT=$OPTARG ;;
    f) FPS=1 ;;
    *) sed -n '2,19p' "$0"; exit 2 ;;
  esac
done

TRAIN=${TRAIN:-target/release/ganomaly-train}
DAEMON=${DAEMON:-target/release/ganomalyd}
mkdir -p "$OUT"
# 512 px parts; defects at 0.05 of the usual size: a hole ~5 px across, a
# scratch 6–13 px long and about 1 px wide, a stain 4–7 px, a crack 6–11 px.
SIZE=512
SCALE=${SCALE:-0.05}

for tex in $TEXTURES; do
  data=$OUT/data-$tex
  if [ ! -d "$data/train/good" ]; then
    nice "$TRAIN" datagen --out "$data" --texture "$tex" --size $SIZE --seed 0 \
      --train-good "$TRAIN_GOOD" --test-good 20 --test-per-defect 5 --defect-scale "$SCALE" >/dev/null
  fi
  # Trained on train/ alone: with test/ beside it the trainer scores every
  # epoch's generators on it (statistics and all), minutes per epoch of tiles
  # on a loaded 2-core box; `eval` scores test/ once, tiled as the model says.
  mkdir -p "$data-train"
  ln -sfn "$(realpath "$data")/train" "$data-train/train"
  for mode in $MODES; do
    ep=$EPOCHS
    case $mode in
      whole) flags= ;;
      # The whole frame given tile128's optimiser steps (36 fit images: 1 step an
      # epoch; 576 tiles: 9), the control for the tiled runs' extra steps.
      whole45) flags= ep=$((EPOCHS * 9)) ;;
      tile128) flags="--tile 128" ;;
      tile64) flags="--tile 64" ;;
      *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
    for seed in $SEEDS; do
      run=$OUT/$tex-$mode-$seed
      [ -f "$run.eval.json" ] && continue
      start=$(date +%s)
      # shellcheck disable=SC2086
      nice "$TRAIN" train --data "$data-train" --out "$run.onnx" --isize 64 --nc 3 --nz 100 --ngf 16 --ndf 16 \
        --epochs "$ep" --batch 64 --seed "$seed" --threads "$THREADS" --map-kernel 5 \
        --default-score map_max --eval-every 0 --quiet $flags >"$run.log" 2>&1
      nice "$TRAIN" eval --model "$run.onnx" --data "$data" --json --threads "$THREADS" >"$run.eval.json" 2>"$run.eval.log"
      echo "$tex $mode seed $seed: $(( $(date +%s) - start )) s, load $(cut -d' ' -f1 /proc/loadavg)" >&2
    done
  done
done

echo "| texture | mode | seed | latent | recon | map_max | mahalanobis | patch | fused |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for tex in $TEXTURES; do
  for mode in $MODES; do
    for seed in $SEEDS; do
      r=$OUT/$tex-$mode-$seed.eval.json
      [ -f "$r" ] || continue
      jq -r --arg t "$tex" --arg m "$mode" --arg s "$seed" \
        '[$t, $m, $s, (.scores | .latent.auroc, .recon.auroc, .map_max.auroc, .mahalanobis.auroc, .patch.auroc, .fused.auroc)]
         | map(if type == "number" then (. * 1000 | round / 1000 | tostring) else (. // "—" | tostring) end)
         | "| " + join(" | ") + " |"' "$r"
    done
  done
done

if [ "$FPS" = 1 ]; then
  model=$OUT/$(set -- $TEXTURES; echo "$1")-whole-$(set -- $SEEDS; echo "$1").onnx
  for tiles in "" 128 64; do
    # shellcheck disable=SC2086
    "$DAEMON" bench --model "$model" --width $SIZE --height $SIZE --frames 300 --batch 16 \
      ${tiles:+--tiles $tiles}
  done
fi
