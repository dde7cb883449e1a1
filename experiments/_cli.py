"""Command-line overrides for experiment configs (frozen dataclasses, possibly nested).

A field of a nested config is named by its path: ``--train.steps 3000`` sets
``config.train.steps``, ``--model.d-model 32`` sets ``config.model.d_model``; a top-level
field keeps its plain name (``--n-eval 40``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

import jax


def _parser_for(name: str, hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (inner, *rest) = [a for a in typing.get_args(hint) if a is not type(None)]
        if rest:
            raise TypeError(f"config field {name} has unsupported type {hint}")
        parse = _parser_for(name, inner)
        return lambda s: None if s.lower() == "none" else parse(s)
    if hint is bool:
        return lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()]
    if origin is tuple:
        (inner, *_) = typing.get_args(hint)
        return lambda s: tuple(inner(v) for v in s.split(",") if v)
    if hint in (int, float, str):
        return hint
    raise TypeError(f"config field {name} has unsupported type {hint}")


def _leaves(cls, default, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted name, type hint, default value)`` of every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name], value


def _flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in overrides.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def replace_nested(config, overrides: Mapping[str, Any]):
    """``config`` with fields replaced; keys are dotted paths (``"train.steps"``) or nested dicts."""
    flat, nested = {}, {}
    for key, value in _flatten(overrides).items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = replace_nested(getattr(config, head), sub)
    return dataclasses.replace(config, **_derived(config, flat), **flat)


def _derived(config, overrides: Mapping[str, Any]) -> dict[str, None]:
    """Fields that ``__post_init__`` filled in from a ``None`` default (``d_head`` from
    ``d_model // n_heads``): reset to ``None`` so that they follow the overridden fields
    instead of keeping the value derived from the defaults."""
    if not overrides:
        return {}
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in overrides or f.default is not None or value is None or not f.init:
            continue
        if getattr(dataclasses.replace(config, **{f.name: None}), f.name) == value:
            out[f.name] = None
    return out


def parse_config(cls, argv=None, *, presets: dict[str, dict] | None = None, description: str = ""):
    """Build ``cls`` from its defaults, an optional ``--preset``, then ``--field value`` overrides.

    Nested configs take ``--group.field value``. Tuples are given comma-separated
    (``--scales 0,0.5,1``); booleans as true/false; optional fields accept ``none``.
    Presets map dotted names (or nested dicts) to values.
    """
    default = cls()
    parser = argparse.ArgumentParser(description=description)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="start from a named preset")
    for name, hint, value in _leaves(cls, default):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_parser_for(name, hint),
                            default=argparse.SUPPRESS, help=f"default: {value!r}")
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", None)
    overrides = _flatten(presets[preset]) if preset else {}
    overrides.update(args)
    return replace_nested(default, overrides)


def config_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)


def use_every_cpu_core() -> None:
    """One JAX CPU device per core, so sharded work (sweeps) runs on every core.

    Call before the first JAX computation; on a GPU or TPU machine it only affects the
    CPU backend.
    """
    jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)
