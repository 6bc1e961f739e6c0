#!/usr/bin/env bash
# Inception FID, sFID, IS, precision/recall (ADM's suite) against the Fashion-MNIST test set, plus PSNR/SSIM against the
# uncached samples, for no cache / FORA / ICC CD / GOC / calibrated forecast CD on the shipped model (20 DDIM steps,
# period 2, guidance 4, shipped CD factors r=21 and GOC steps).
#   bash benchmarks/fid.sh [OUT] [NUM]      (defaults: runs/fid, 1000 samples per configuration)
set -euo pipefail
out=${1:-runs/fid}
num=${2:-1000}
factors=$(python -c "from calicache.models.io import shipped_asset; print(shipped_asset('fmnist-dit-cd.safetensors'))")
common=(--model fmnist-dit --num "$num" --steps 20 --threads 2)
calicache sample "${common[@]}" --out "$out/none"
calicache sample "${common[@]}" --method fora --period 2 --out "$out/fora"
calicache sample "${common[@]}" --method icc --period 2 --svd cd --factors "$factors" --out "$out/icc-cd"
calicache sample "${common[@]}" --method goc --period 2 --out "$out/goc"
calicache sample "${common[@]}" --method forecast --period 2 --svd cd --factors "$factors" --out "$out/forecast-cd"
for m in none fora icc-cd goc forecast-cd; do
  calicache eval --samples "$out/$m/samples.npz" --ref fashion-mnist-test --against "$out/none/samples.npz" \
      --threads 2 --json > "$out/$m/eval.json"
  echo "$m: $(python -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: d[k] for k in d if k in ('fid', 'sfid', 'precision', 'recall', 'psnr', 'class_agreement')})" "$out/$m/eval.json")"
done
