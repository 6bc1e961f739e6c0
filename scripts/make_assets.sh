#!/usr/bin/env bash
# Rebuilds the shipped assets from a training run, with calicache's own commands.
#   bash scripts/make_assets.sh TRAIN_OUT CFG_SCALE
# TRAIN_OUT is the --out folder of `calicache train` (see docs/data.md for the exact training command).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:?training output folder}
cfg=${2:?guidance scale}
a=src/calicache/assets
python scripts/ship_model.py "$run/model.safetensors" $a/fmnist-dit.safetensors --cfg-scale "$cfg" --steps 20 \
    --train-json "$run/train.json"
# CD-SVD factors at rank ~C/9 (192/9), the paper's ratio for DiT-XL/2 (128/1152), 256 training images.
calicache calibrate --model fmnist-dit --svd cd --rank 21 --steps 20 --num 256 --threads 2 \
    --overwrite --out $a/fmnist-dit-cd.safetensors
# GOC compensation steps for 20 adm-spaced DDIM steps at period 2, found from uncached runs.
calicache calibrate --method goc --model fmnist-dit --steps 20 --num 40 --period 2 --threads 2 \
    --overwrite --out $a/fmnist-dit-goc20.json
