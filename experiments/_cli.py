"""Command-line overrides for experiment configs (frozen dataclasses)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing

import jax


def _parser_for(field: dataclasses.Field, hint):
    origin = typing.get_origin(hint)
    if hint is bool:
        return lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()]
    if origin is tuple:
        (inner, *_) = typing.get_args(hint)
        return lambda s: tuple(inner(v) for v in s.split(",") if v)
    if hint in (int, float, str):
        return hint
    raise TypeError(f"config field {field.name} has unsupported type {hint}")


def parse_config(cls, argv=None, *, presets: dict[str, dict] | None = None, description: str = ""):
    """Build ``cls`` from its defaults, an optional ``--preset``, then ``--field value`` overrides.

    Tuples are given comma-separated (``--scales 0,0.5,1``); booleans as true/false.
    """
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="start from a named preset")
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_parser_for(f, hints[f.name]),
                            default=None, help=f"default: {f.default!r}")
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", None)
    base = dict(presets[preset]) if preset else {}
    base.update({k: v for k, v in args.items() if v is not None})
    return dataclasses.replace(cls(), **base)


def config_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)


def use_every_cpu_core() -> None:
    """One JAX CPU device per core, so sharded work (sweeps) runs on every core.

    Call before the first JAX computation; on a GPU or TPU machine it only affects the
    CPU backend.
    """
    jax.config.update("jax_num_cpu_devices", os.cpu_count() or 1)
