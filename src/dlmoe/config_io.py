"""Run configs from YAML files and dotted command-line overrides (OmegaConf), to and from JSON.

    cfg = load_run_config("configs/demo.yaml", ["train.steps=50", "model.moe.router.kind=token_choice"])

Unknown keys are refused with the closest valid names; wrong value types name the key and value.
Dotted keys may fill an optional section that is null: `model.moe.router.block.top_p=0.6` creates
block routing with the other fields at their defaults.

The router's schema is that of its kind (`TokenChoiceConfig` / `ExpertChoiceConfig`), the
`model.moe.router.kind` that the last layer setting it gives. Router fields of the other kind are
dropped from the layers before a switch of kind (a token-choice run fine-tuned as expert choice),
and where the kind holds, dropped at their neutral defaults (old flat configs) and refused otherwise.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dlmoe._fs import atomic_write_text
from dlmoe.config import RouterConfig, RunConfig
from dlmoe.routing.config import ROUTER_CONFIGS, fields_for_kind, other_kind_field

ALLOWED_CONFIG = "a YAML mapping of sections: run_dir, model, data, train, sample, parallel"
RUN_CONFIG_DAMAGED = (
    "the run's config is damaged: restore config.json from a copy of the run, or start the run over with --overwrite"
)


def read_json(path: str | Path, what: str, *, mapping: bool = True) -> Any:
    """The parsed contents of the JSON file `path`, or ONE-line ValueError naming the file, where it
    stops parsing (line, column) and `what` (what the file is and what to do), e.g.
    "runs/x/config.json is not valid JSON (Expecting value at line 1, column 1); the run's config is
    damaged: ...". `mapping`: the file must hold a JSON object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; {what}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text at byte {err.start}); {what}") from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror or err}); {what}") from None
    if not text.strip():
        raise ValueError(f"{path} is not valid JSON (the file is empty); {what}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); {what}"
        ) from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON (nested too deeply); {what}") from None
    if mapping and not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object (it holds a {_json_kind(data)}); {what}")
    return data


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong with a YAML file and where (line, column), on one line; a tag is refused by name."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    context = getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
    tag = re.search(r"constructor for the tag '([^']+)'", problem)
    if tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        text = f"the tag {name} at {where} is not allowed (plain YAML values only; nothing was executed)"
    elif isinstance(err, yaml.constructor.ConstructorError):
        text = f"{problem} (at {where})"
    else:
        text = f"YAML syntax error at {where} ({context + ': ' if context else ''}{problem})"
    return " ".join(text.split())


def _read_config_file(path: Path) -> DictConfig:
    """A --config file as OmegaConf (YAML; JSON when it ends in .json), refused in ONE line naming the
    file when it cannot be read, does not parse, is empty, or is not a mapping of sections. YAML is
    read with a safe loader: tags such as !!python/object are refused, never executed."""
    if path.suffix.lower() == ".json":
        data = read_json(path, f"a config file must hold {ALLOWED_CONFIG} (as a JSON object)", mapping=False)
        if not isinstance(data, dict):
            raise ValueError(
                f"config file {path} holds a {_json_kind(data)}; expected {ALLOWED_CONFIG} (as a JSON object)"
            )
        if not data:
            raise ValueError(f"config file {path} is empty; expected {ALLOWED_CONFIG}")
        return OmegaConf.create(data)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"config file {path} is not UTF-8 text (byte {err.start}); expected {ALLOWED_CONFIG}"
        ) from None
    except OSError as err:
        raise ValueError(f"config file {path} cannot be read ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)  # the shape, and refuses any tag a safe loader does not know
        loaded = OmegaConf.load(io.StringIO(text)) if isinstance(data, dict) and data else None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path}: {_yaml_problem(err)}; expected {ALLOWED_CONFIG}") from None
    if data is None or data == {}:
        raise ValueError(
            f"config file {path} is empty (or only comments); expected {ALLOWED_CONFIG}, e.g. 'train: {{steps: 100}}'"
        )
    if not isinstance(data, dict):
        kind = "list" if isinstance(data, list) else f"single value {data!r}"[:80]
        raise ValueError(f"config file {path}: its top level is a {kind}; expected {ALLOWED_CONFIG}")
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"config file {path} does not hold {ALLOWED_CONFIG}")
    return loaded


def _clean(err: OmegaConfBaseException) -> str:
    message = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {message}" if key and key not in message else message


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None
) -> RunConfig:
    """Defaults ← `base` (a saved run's config dict) ← YAML file ← `key=value` overrides, validated."""
    layers: list[Any] = []
    try:
        if base is not None:
            layers.append(OmegaConf.create(base))
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"config file {str(path)!r} does not exist")
            layers.append(_read_config_file(path))
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        return _merged(layers)
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid config: {_clean(err)}") from None


def _merged(layers: list[DictConfig]) -> RunConfig:
    """The layers merged over the RunConfig schema with the router schema of the effective kind."""
    containers = [OmegaConf.to_container(layer) for layer in layers]
    kind = _router_kinds(containers)[-1]
    schema = OmegaConf.structured(RunConfig)
    if schema.model.moe is not None:
        schema.model.moe.router = OmegaConf.structured(ROUTER_CONFIGS[kind])
    merged = OmegaConf.merge(schema, *(OmegaConf.create(c) for c in _for_kind(containers, kind)))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _router_of(layer: Any) -> dict[str, Any] | None:
    """The layer's `model.moe.router` mapping, if it has one."""
    for key in ("model", "moe", "router"):
        if not isinstance(layer, dict) or not isinstance(layer.get(key), dict):
            return None
        layer = layer[key]
    return layer


def _router_kinds(layers: list[Any]) -> list[str]:
    """The router kind in effect after each layer (the default kind before any sets one)."""
    kind = RouterConfig.__dataclass_fields__["kind"].default
    kinds = []
    for layer in layers:
        router = _router_of(layer)
        if router is not None and isinstance(router.get("kind"), str) and router["kind"] in ROUTER_CONFIGS:
            kind = router["kind"]
        kinds.append(kind)
    return kinds or [kind]


def _for_kind(layers: list[Any], kind: str) -> list[Any]:
    """The layers with the router fields of the other kind removed: all of them in layers before
    the kind switched to `kind`, the neutral ones elsewhere (others refused, `fields_for_kind`)."""
    for layer, in_effect in zip(layers, _router_kinds(layers), strict=False):
        router = _router_of(layer)
        if router is None:
            continue
        if in_effect != kind:  # written for the other kind, which a later layer replaced
            for name in [n for n in router if n != "kind" and other_kind_field(n) is not None]:
                del router[name]
        else:
            kept = fields_for_kind(kind, router, where="model.moe.router")
            for name in [n for n in router if n not in kept]:
                del router[name]
    return layers


def run_config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def run_config_from_dict(data: dict[str, Any], where: str | Path | None = None) -> RunConfig:
    """Rebuild (and validate) a RunConfig saved by `run_config_to_dict`; `where`: the file it was
    read from, named in the errors."""
    source = "" if where is None else f" in {where}"
    if not isinstance(data, dict):
        raise ValueError(f"the saved config{source} is a {type(data).__name__}, not a run config (a JSON object)")
    try:
        return _merged([OmegaConf.create(data)])
    except OmegaConfBaseException as err:
        raise ValueError(f"invalid saved config{source}: {_clean(err)}") from None


def read_saved_run_config(path: str | Path) -> RunConfig:
    """A run's saved `config.json` (`<run_dir>/config.json`), every problem one line naming the file."""
    return run_config_from_dict(read_json(path, RUN_CONFIG_DAMAGED), where=path)


def save_run_config(config: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(run_config_to_dict(config), indent=2, sort_keys=True) + "\n")
