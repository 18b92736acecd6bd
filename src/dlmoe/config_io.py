"""Run configs from YAML files and dotted command-line overrides (OmegaConf), to and from JSON.

    cfg = load_run_config("configs/demo.yaml", ["train.steps=50", "model.moe.router.kind=token_choice"])

Unknown keys are refused with the closest valid names; wrong value types name the key and value.
Dotted keys may fill an optional section that is null: `model.moe.router.block.top_p=0.6` creates
block routing with the other fields at their defaults.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlmoe.config import RunConfig


def _clean(err: OmegaConfBaseException) -> str:
    message = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {message}" if key and key not in message else message


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None
) -> RunConfig:
    """Defaults ← `base` (a saved run's config dict) ← YAML file ← `key=value` overrides, validated."""
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    try:
        if base is not None:
            layers.append(OmegaConf.create(base))
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"config file {str(path)!r} does not exist")
            layers.append(OmegaConf.load(path))
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid config: {_clean(err)}") from None


def run_config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild (and validate) a RunConfig saved by `run_config_to_dict`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(data))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid saved config: {_clean(err)}") from None


def save_run_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(run_config_to_dict(config), indent=2, sort_keys=True) + "\n")
