"""Safe loading and saving of DiT weights: original `.pt` checkpoints, calicache safetensors files,
registry names with published weights, and the models shipped inside the package."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch

from ..tensorfile import decode_metadata, load_tensors, read_header, read_torch, save_tensors
from ..utils import Outputs, atomic_path
from .dit import DIT_MODELS, DiT, DiTConfig, make_config

FORMAT = "calicache-dit"

# Published checkpoints of the original DiT release (downloaded on first use).
PUBLISHED = {
    "DiT-XL/2": ("DiT-XL-2-256x256.pt", {}),
    "DiT-XL/2-512": ("DiT-XL-2-512x512.pt", {"input_size": 64}),
}
PUBLISHED_URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"

# Models shipped inside the package: name -> file under calicache/assets.
SHIPPED = {"fmnist-dit": "fmnist-dit.safetensors"}


def weight_hash(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the state dict in canonical form (sorted names, float32 little-endian bytes).

    The same weights give the same hash whatever file format they came from.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


MODEL_FIX = "re-create or re-download it"


def save_model(model: DiT, path: str | os.PathLike, outputs: Outputs | None = None, **metadata: object) -> Path:
    """Weights and config in one safetensors file (config and extras as JSON metadata, plus a content
    checksum); with `outputs` the file is committed with that set of outputs (the temporary file it is
    in until then is returned)."""
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    meta.update({k: json.dumps(v) for k, v in metadata.items()})
    return save_tensors(path, model.state_dict(), meta, outputs)


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a calicache safetensors file (values decoded)."""
    return decode_metadata(read_header(path, MODEL_FIX), path, MODEL_FIX)


def _shapes(state: Mapping[str, torch.Tensor]) -> dict:
    """The config fields a DiT state dict's shapes tell (all but heads, classes and label dropout)."""
    required = ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight", "blocks.0.mlp.fc1.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not a DiT state dict: missing {missing}")
    hidden, in_ch, p, _ = state["x_embedder.proj.weight"].shape
    tokens = state["pos_embed"].shape[1]
    out = state["final_layer.linear.weight"].shape[0] // (p * p)
    return dict(
        input_size=math.isqrt(tokens) * p,
        patch_size=p,
        in_channels=in_ch,
        hidden_size=hidden,
        depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        learn_sigma=out == 2 * in_ch,
    )


def _registry_heads(shapes: dict) -> int:
    """Heads of the registry architectures with this width and depth; none or several is an error."""
    heads = {c.num_heads for c in DIT_MODELS.values()
             if (c.hidden_size, c.depth, c.mlp_ratio) == (shapes["hidden_size"], shapes["depth"], shapes["mlp_ratio"])}
    if len(heads) != 1:
        raise ValueError(
            f"the attention head count cannot be read from the weights, and no registry architecture has width "
            f"{shapes['hidden_size']} and depth {shapes['depth']}"
            + (f" with one head count (candidates {sorted(heads)})" if heads else "")
            + "; pass --arch (arch=) with a registry name, e.g. --arch DiT-S/2, or the heads, e.g. "
            f"--arch '{{\"num_heads\": {max(1, shapes['hidden_size'] // 64)}}}'"
        )
    return heads.pop()


def infer_config(state: Mapping[str, torch.Tensor], arch: str | dict | None = None) -> DiTConfig:
    """A DiT config from the tensor shapes; `arch` supplies what shapes cannot tell (heads).

    Without `arch` the heads come from the registry architecture of the same width and depth;
    when there is none, the heads cannot be known and this is an error naming `--arch`."""
    overrides = dict(arch) if isinstance(arch, dict) else {}
    name = arch if isinstance(arch, str) else overrides.pop("name", None)
    unknown = sorted(set(overrides) - set(DiTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"--arch (arch=) has fields that are not DiT config fields {unknown}; fields: "
                         f"{sorted(DiTConfig.__dataclass_fields__)}, or a registry name {sorted(DIT_MODELS)}")
    shapes = _shapes(state)
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    # A null-class row exists exactly when label dropout was used in training.
    if name is not None:
        base = make_config(name)
        shapes["num_classes"] = base.num_classes
        shapes["class_dropout_prob"] = base.class_dropout_prob
        shapes["num_heads"] = base.num_heads
    else:
        shapes["num_classes"] = rows - 1
        if "num_heads" not in overrides:
            shapes["num_heads"] = _registry_heads(shapes)
    shapes.update(overrides)
    # Compared before building the config, whose own checks (e.g. heads) would hide the real mismatch.
    if name is not None:
        differs = {k: (v, getattr(make_config(name), k)) for k, v in shapes.items()
                   if k not in overrides and v != getattr(make_config(name), k)}
        if differs:
            raise ValueError(
                f"weights do not match architecture {name}: "
                + ", ".join(f"{k} is {a} in the file but {b} in {name}" for k, (a, b) in differs.items())
            )
    return DiTConfig(**shapes)


def _arch_from_args(args: argparse.Namespace, state: Mapping[str, torch.Tensor], path: Path) -> dict:
    """The architecture a facebookresearch/DiT train.py checkpoint records in its `args`:
    the registry name `args.model` and `args.num_classes`; sizes the data set (input size, channels,
    learned variance) come from the shapes."""
    name = getattr(args, "model", None)
    if name not in DIT_MODELS:
        raise ValueError(f"{path}: the checkpoint's args name the model {name!r}, which is not a registry "
                         f"architecture {sorted(DIT_MODELS)}; pass --arch (arch=) with its name or JSON fields")
    shapes = _shapes(state)
    arch = {"name": name, **{k: shapes[k] for k in ("input_size", "in_channels", "learn_sigma")}}
    if isinstance(getattr(args, "num_classes", None), int):
        arch["num_classes"] = args.num_classes
    return arch


def _torch_state(path: Path) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """The weights of a torch checkpoint (EMA first), and the original train.py's `args` if present."""
    obj = read_torch(path, "pass a state dict of tensors (torch.save(model.state_dict(), path)) or a DiT "
                           "checkpoint of the original train.py")
    ckpt_args = obj.get("args") if isinstance(obj, dict) else None
    ckpt_args = ckpt_args if isinstance(ckpt_args, argparse.Namespace) else None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]  # training checkpoints of the original code: the EMA weights sample best
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return obj, ckpt_args


def _build(state: Mapping[str, torch.Tensor], cfg: DiTConfig, path: object) -> DiT:
    model = DiT(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5]))
        raise ValueError(f"{path}: does not fit the DiT architecture {cfg}: " + "; ".join(parts))
    model.load_state_dict(state)
    return model.eval()


def _download(name: str) -> Path:
    fname, _ = PUBLISHED[name]
    cache = Path(os.environ.get("CALICACHE_HOME", Path.home() / ".cache" / "calicache")) / "models"
    target = cache / fname
    if target.exists():
        return target
    url = PUBLISHED_URL.format(fname)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(target) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
    except Exception as e:  # noqa: BLE001 - any network failure gets the same advice
        raise RuntimeError(
            f"cannot download {name} weights from {url} ({e}). On a machine without network, "
            f"download {fname} elsewhere and pass its path: load_model('path/{fname}')"
        ) from e
    return target


def shipped_asset(filename: str) -> Path:
    """A file shipped in calicache/assets; a missing one is a clear error."""
    path = Path(str(resources.files("calicache") / "assets" / filename))
    if not path.exists():
        raise FileNotFoundError(f"shipped asset {filename} is missing from {path.parent}; reinstall calicache")
    return path


def shipped_path(name: str) -> Path:
    return shipped_asset(SHIPPED[name])


def shipped_file(name_or_path: str | os.PathLike) -> Path:
    """A file argument that also takes a shipped asset's name: `fmnist-dit-cd` (factors),
    `fmnist-dit-goc20` (GOC steps), `fmnist-classifier`, from any folder. A file that exists
    under that name wins; anything else is returned as a path for the caller to open."""
    path = Path(name_or_path)
    if path.exists() or path.name != str(name_or_path):
        return path
    assets = resources.files("calicache") / "assets"
    match = [a for a in assets.iterdir() if a.name.split(".")[0] == path.name] if assets.is_dir() else []
    return Path(str(match[0])) if match else path


def load_model(path_or_name: str | os.PathLike, arch: str | dict | None = None) -> DiT:
    """A DiT in eval mode from a file, a shipped model name, or a registry name with weights."""
    key = str(path_or_name)
    if key in SHIPPED:
        path = shipped_path(key)
    elif key in PUBLISHED and not Path(key).exists():
        arch = arch or {"name": key.removesuffix("-512"), **PUBLISHED[key][1]}
        path = _download(key)
    elif key in DIT_MODELS and not Path(key).exists():
        raise ValueError(
            f"{key} has no published weights; use create_model({key!r}) for a random model, "
            f"or pass a checkpoint path. Published: {sorted(PUBLISHED)}; shipped: {sorted(SHIPPED)}"
        )
    else:
        path = Path(key)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file. Give a checkpoint path, a shipped model {sorted(SHIPPED)} "
            f"or a published one {sorted(PUBLISHED)}"
        )
    if path.is_dir():  # a diffusers DiTTransformer2DModel (or DiTPipeline) folder
        from .convert import load_diffusers_dit
        return load_diffusers_dit(path)
    if path.suffix == ".safetensors":
        # Files of other tools (and calicache's from before checksums) load unverified, with a note.
        state, header = load_tensors(path, MODEL_FIX, require_checksum=False)
        meta = decode_metadata(header, path, MODEL_FIX)
        if "config" in meta:
            cfg = _stored_config(meta["config"], arch, path)
        else:
            cfg = _infer(state, arch, path)
        model = _build(state, cfg, path)
        # Recommended sampling settings (cfg_scale, steps) travel with the weights.
        model.calicache_defaults = dict(meta.get("recommended", {}))
        return model
    state, ckpt_args = _torch_state(path)
    if arch is None and ckpt_args is not None:  # the original train.py records its architecture
        arch = _arch_from_args(ckpt_args, state, path)
    return _build(state, _infer(state, arch, path), path)


def _infer(state: Mapping[str, torch.Tensor], arch: str | dict | None, path: Path) -> DiTConfig:
    """`infer_config` with the file named in its errors."""
    try:
        return infer_config(state, arch)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _stored_config(stored: dict, arch: str | dict | None, path: Path) -> DiTConfig:
    """The config saved with a calicache file; `arch` may override fields, a registry name must agree."""
    cfg_dict = dict(stored)
    name = arch if isinstance(arch, str) else (arch or {}).get("name")
    if isinstance(arch, dict):
        cfg_dict.update({k: v for k, v in arch.items() if k != "name"})
    try:
        cfg = DiTConfig(**cfg_dict)
    except TypeError as e:
        raise ValueError(f"{path}: the stored config is not a DiT config ({e}); re-save it with save_model") from e
    if name is not None:
        ref = make_config(name, **{k: v for k, v in (arch if isinstance(arch, dict) else {}).items() if k != "name"})
        differs = [f"{k} is {getattr(cfg, k)} in the file but {getattr(ref, k)} in {name}"
                   for k in DiTConfig.__dataclass_fields__ if getattr(cfg, k) != getattr(ref, k)]
        if differs:
            raise ValueError(f"{path}: weights do not match architecture {name}: " + ", ".join(differs)
                             + "; drop --arch/arch= for calicache files, their config is stored inside")
    return cfg
