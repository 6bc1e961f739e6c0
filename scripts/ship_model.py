"""Write a trained checkpoint as a shipped model: weights + config + recommended sampling settings.

    python scripts/ship_model.py TRAIN_OUT/model.safetensors src/calicache/assets/fmnist-dit.safetensors \
        --cfg-scale 3 --steps 20 --clip-denoised
"""

import argparse
import json
from pathlib import Path

from calicache import load_model, save_model, weight_hash

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("src")
p.add_argument("dst")
p.add_argument("--cfg-scale", type=float, required=True)
p.add_argument("--steps", type=int, required=True)
p.add_argument("--clip-denoised", action="store_true")
p.add_argument("--train-json", default=None, help="train.json of the run, recorded in the metadata")
args = p.parse_args()
model = load_model(args.src)
extra = {}
if args.train_json:
    t = json.loads(Path(args.train_json).read_text())
    extra["training"] = {k: t[k] for k in ("config", "steps_done", "wall_seconds", "final_loss_mean100") if k in t}
recommended = {"cfg_scale": args.cfg_scale, "steps": args.steps, "clip_denoised": args.clip_denoised}
save_model(model, args.dst, recommended=recommended, weight_hash=weight_hash(model), **extra)
print(f"wrote {args.dst} (weight hash {weight_hash(model)[:16]}..., recommended {recommended})")
