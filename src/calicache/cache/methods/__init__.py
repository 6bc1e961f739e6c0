"""The method registry: one file per method, one line here. The CLI's `--method` choices, its
per-method flags and config files all read this dict."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import CONFIG_FORMAT, MethodConfig
from .fora import FORAConfig, NoCacheConfig
from .forecast import ForecastConfig
from .goc import GOCConfig
from .icc import ICCConfig

METHODS: dict[str, type[MethodConfig]] = {
    "none": NoCacheConfig,
    "fora": FORAConfig,
    "icc": ICCConfig,
    "forecast": ForecastConfig,
    "goc": GOCConfig,
}


def config_from_dict(data: dict, base: str | os.PathLike | None = None, where: str = "config") -> MethodConfig:
    """A method config from its JSON object (`{"method": "icc", "rank": 21, ...}`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a cache config is a JSON object like {{\"method\": \"fora\", \"period\": 2}}")
    if data.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        raise ValueError(f"{where}: 'format' is {data['format']!r}, not {CONFIG_FORMAT!r}; is this a cache config?")
    method = data.get("method")
    if method not in METHODS:
        raise ValueError(f"{where}: 'method' is {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method].from_dict(data, base, where)


def load_config(path: str | os.PathLike) -> MethodConfig:
    """Read a cache config saved by `config.save(path)`; file paths in it are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cache config file {path} does not exist; write one with config.save(path)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON cache config ({e})") from e
    return config_from_dict(data, path.parent, str(path))


__all__ = ["METHODS", "MethodConfig", "NoCacheConfig", "FORAConfig", "ICCConfig", "ForecastConfig", "GOCConfig",
           "config_from_dict", "load_config"]
