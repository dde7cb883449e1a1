"""Orbax checkpoints of a training run: model, optimizer state, step, key and configs.

Layout: ``run_dir/checkpoints/<step>/`` holds the arrays (``state``) and a JSON record
(``meta``: step, configs, the PRNG key implementation, a SHA-256 checksum of every array
and any extra fields). Orbax writes each step into a temporary directory and renames it
when complete, so a crash mid-write leaves the previous checkpoints untouched and the
partial one invisible. On restore the checksums are verified, so a truncated or
bit-flipped file is reported (with the step and the earlier steps to fall back to)
instead of silently loading wrong parameters. An existing step is never overwritten.

Once Orbax has finished a step, ``<step>/files.sha256`` records the SHA-256 of every file
in it (the format ``sha256sum`` writes, so ``cd <step> && sha256sum -c files.sha256``
checks a step by hand). Restoring verifies these files before Orbax reads any array:
Orbax reads arrays concurrently on an event loop that it closes as soon as one read
fails, and the reads still in flight then each print an "Event loop is closed"
traceback, hundreds of them for a large model. A damaged file is found before that
happens, and the error names it. A step without ``files.sha256`` was interrupted after
Orbax committed it and is reported as partial.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import Array, Key, PRNGKeyArray, PyTree, UInt32

from .._io import atomic_write, key_from_parts, key_parts, sha256_arrays, sha256_file

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "latest_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
]

_FORMAT = 2
# Format 1 checkpoints (before files.sha256 existed) still restore, without the file check.
_READABLE_FORMATS = (1, 2)
_FILES = "files.sha256"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, empty, partial or corrupted."""


class Checkpoint(NamedTuple):
    """What :func:`restore_checkpoint` returns."""

    model: Any
    opt_state: Any
    step: int
    key: PRNGKeyArray
    metadata: dict


def _ckpt_dir(run_dir) -> Path:
    return Path(run_dir).expanduser().resolve() / "checkpoints"


def _manager(run_dir, *, keep: int | None = None, create: bool) -> ocp.CheckpointManager:
    path = _ckpt_dir(run_dir)
    options = dict(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    if jax.process_count() > 1:
        # A run's arrays live on this process's devices (under jax.distributed a stacked run
        # trains each process's share of the runs in its own folder), so each process
        # checkpoints alone, with no barrier shared with processes writing other folders.
        process = jax.process_index()
        if create:
            path.mkdir(parents=True, exist_ok=True)
        options.update(create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=process, active_processes={process}, barrier_sync_key_prefix=f"sfpjax_process_{process}"))
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(**options), item_handlers=handlers)


def _config_dict(config) -> dict | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return json.loads(json.dumps(dataclasses.asdict(config)))
    raise ValueError(f"configs must be dataclass instances, got {type(config).__name__}.")


def _arrays(tree) -> list:
    return jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))


def _file_sums(step_dir: Path) -> str:
    lines = [
        f"{sha256_file(p)}  {p.relative_to(step_dir).as_posix()}\n"
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != _FILES
    ]
    return "".join(lines)


def _verify_files(step_dir: Path) -> str | None:
    """Why the files of ``step_dir`` fail their recorded SHA-256, or ``None`` if they pass."""
    check = f"check by hand with `cd {step_dir} && sha256sum -c {_FILES}`"
    try:
        lines = (step_dir / _FILES).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return f"its file checksums {step_dir / _FILES} cannot be read ({type(e).__name__})"
    for n, line in enumerate(lines, 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            return f"line {n} of {step_dir / _FILES} is not '<sha256>  <file>'"
        path = step_dir / name
        if not path.is_file():
            return f"its file {path} is missing"
        if sha256_file(path) != digest:
            return f"its file {path} does not match the SHA-256 recorded when it was written ({check})"
    return None


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: PyTree,
    opt_state: PyTree,
    key: Key[Array, "*K"] | UInt32[Array, "*K n"],
    model_config=None,
    train_config=None,
    extra: dict | None = None,
    keep: int | None = None,
    _manager_: ocp.CheckpointManager | None = None,
) -> Path:
    """Write the arrays of ``model`` and ``opt_state``, the ``step`` and ``key`` to ``run_dir``.

    Args:
        run_dir: the run directory; checkpoints go to ``run_dir/checkpoints/<step>``.
        step: number of optimizer steps taken so far.
        model, opt_state: pytrees (a stack of models works the same); their array leaves
            are saved, the structure comes back from the ``like_*`` trees at restore.
        key: the run's base PRNG key (typed or raw; a stack of keys for a stack of
            models), saved exactly.
        model_config, train_config: dataclasses recorded as JSON and compared on restore.
        extra: more JSON-serializable fields for the record.
        keep: keep only the newest ``keep`` checkpoints (older ones are deleted after the
            new one is complete); ``None`` keeps all.

    Returns:
        The directory of the new checkpoint.

    Raises:
        CheckpointError: a checkpoint for ``step`` already exists (it is never overwritten).

    >>> import tempfile, jax.numpy as jnp, jax.random as jr, sfpjax
    >>> d = tempfile.mkdtemp()
    >>> path = sfpjax.save_checkpoint(d, 3, model={"w": jnp.ones(2)}, opt_state=(), key=jr.key(0))
    >>> sfpjax.latest_checkpoint(d)
    3
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    mngr = _manager_ if _manager_ is not None else _manager(run_dir, keep=keep, create=True)
    try:
        if step in mngr.all_steps():
            raise CheckpointError(
                f"a checkpoint for step {step} already exists in {_ckpt_dir(run_dir)}; it is never "
                "overwritten. Remove that directory yourself if it should be replaced."
            )
        model_leaves = [np.asarray(x) for x in _arrays(model)]
        opt_leaves = [np.asarray(x) for x in _arrays(opt_state)]
        key_data, key_impl = key_parts(key)
        state = {"model": model_leaves, "opt_state": opt_leaves, "key": key_data}
        meta = {
            "format": _FORMAT,
            "step": step,
            "key_impl": key_impl,
            "model_config": _config_dict(model_config),
            "train_config": _config_dict(train_config),
            "checksums": {
                "model": sha256_arrays(model_leaves),
                "opt_state": sha256_arrays(opt_leaves),
                "key": sha256_arrays([key_data]),
            },
            "extra": extra or {},
        }
        mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        mngr.wait_until_finished()
        step_dir = _ckpt_dir(run_dir) / str(step)
        atomic_write(step_dir / _FILES, _file_sums(step_dir).encode())
    finally:
        if _manager_ is None:
            mngr.close()
    return step_dir


def _steps(run_dir) -> list[int]:
    path = _ckpt_dir(run_dir)
    if not Path(run_dir).expanduser().is_dir():
        raise CheckpointError(f"run directory {Path(run_dir).expanduser()} does not exist.")
    if not path.is_dir():
        return []
    # Orbax names a step directory "<step>" only once it is complete; temporary
    # directories of interrupted writes carry a suffix and are ignored here.
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def latest_checkpoint(run_dir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step in ``run_dir``, or ``None`` if there is none.

    Raises:
        CheckpointError: ``run_dir`` does not exist.

    >>> import tempfile, sfpjax
    >>> sfpjax.latest_checkpoint(tempfile.mkdtemp()) is None
    True
    """
    steps = _steps(run_dir)
    return steps[-1] if steps else None


def _mismatches(saved: dict | None, given: dict | None, what: str, ignore=()) -> list[str]:
    if saved is None or given is None:
        return []
    out = []
    for name in sorted(set(saved) | set(given)):
        if name in ignore:
            continue
        a, b = saved.get(name, "<absent>"), given.get(name, "<absent>")
        if a != b:
            out.append(f"{what}.{name}: checkpoint has {a!r}, given {b!r}")
    return out


def _abstract(leaves) -> list:
    return [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]


def _check_like(saved_meta_leaves: list, like_leaves: list, what: str, step: int) -> None:
    if len(saved_meta_leaves) != len(like_leaves):
        raise ValueError(
            f"checkpoint step {step}: {what} has {len(saved_meta_leaves)} arrays but the given "
            f"{what} has {len(like_leaves)}; the checkpoint was written for a different structure "
            "(another model config, trainable filter or optimizer)."
        )
    for i, (s, g) in enumerate(zip(saved_meta_leaves, like_leaves)):
        if tuple(s.shape) != tuple(g.shape) or np.dtype(s.dtype) != np.dtype(g.dtype):
            raise ValueError(
                f"checkpoint step {step}: {what} array {i} has shape {tuple(s.shape)} and dtype "
                f"{np.dtype(s.dtype)}, the given {what} has shape {tuple(g.shape)} and dtype "
                f"{np.dtype(g.dtype)}."
            )


def restore_checkpoint(
    run_dir: str | os.PathLike,
    like_model: PyTree,
    like_opt_state: PyTree,
    model_config=None,
    train_config=None,
    *,
    step: int | None = None,
    ignore_fields: tuple[str, ...] = (),
) -> Checkpoint:
    """Load a checkpoint into the structure of ``like_model`` and ``like_opt_state``.

    Args:
        run_dir: the run directory given to :func:`save_checkpoint`.
        like_model, like_opt_state: trees with the structure, shapes and dtypes to restore
            into (e.g. a freshly initialized model and ``optimizer.init`` of it).
        model_config, train_config: the configs the caller runs with; every field that
            differs from the recorded one is named in the error.
        step: which step; default the latest.
        ignore_fields: ``train_config`` fields allowed to differ (bookkeeping such as
            ``log_every`` that does not change the parameters).

    Returns:
        :class:`Checkpoint` ``(model, opt_state, step, key, metadata)``.

    Raises:
        CheckpointError: no such directory, no checkpoint, or a checkpoint that cannot be
            read or fails its checksum (the message names the step and the earlier ones).
        ValueError: the configs or array shapes differ from the checkpoint's.

    >>> import tempfile, jax.numpy as jnp, jax.random as jr, sfpjax
    >>> d = tempfile.mkdtemp()
    >>> _ = sfpjax.save_checkpoint(d, 1, model={"w": jnp.ones(2)}, opt_state=(), key=jr.key(7))
    >>> ck = sfpjax.restore_checkpoint(d, {"w": jnp.zeros(2)}, ())
    >>> ck.step, ck.model["w"].tolist()
    (1, [1.0, 1.0])
    """
    steps = _steps(run_dir)
    if not steps:
        raise CheckpointError(
            f"no checkpoint in {_ckpt_dir(run_dir)}: nothing to restore (train without resume first)."
        )
    if step is None:
        step = steps[-1]
    step = int(step)
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {_ckpt_dir(run_dir)}; available steps: {steps}.")
    earlier = [s for s in steps if s < step]
    hint = (
        f" Earlier checkpoints: {earlier}; restore one with step={earlier[-1]} (to resume a run "
        f"from it, first move {_ckpt_dir(run_dir) / str(step)} aside)."
        if earlier
        else " There is no earlier checkpoint."
    )

    def corrupted(reason: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint step {step} in {_ckpt_dir(run_dir)} is partial or corrupted: {reason}.{hint}"
        )

    step_dir = _ckpt_dir(run_dir) / str(step)
    if (step_dir / _FILES).exists():
        # Before any Orbax read: see the module docstring for why.
        problem = _verify_files(step_dir)
        if problem is not None:
            raise corrupted(problem)
    mngr = _manager(run_dir, create=False)
    try:
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
            raise corrupted(f"its record could not be read ({type(e).__name__}: {str(e)[:200]})") from e
        if not isinstance(meta, dict) or meta.get("format") not in _READABLE_FORMATS or "checksums" not in meta:
            raise corrupted("its record is not an sfpjax checkpoint record")
        if meta["format"] >= 2 and not (step_dir / _FILES).exists():
            raise corrupted(f"its file checksums {step_dir / _FILES} are missing (the write was interrupted)")

        problems = _mismatches(meta.get("model_config"), _config_dict(model_config), "model_config")
        problems += _mismatches(
            meta.get("train_config"), _config_dict(train_config), "train_config", ignore=ignore_fields
        )
        if problems:
            raise ValueError(
                f"checkpoint step {step} was written with a different configuration:\n  "
                + "\n  ".join(problems)
                + "\nUse the recorded configuration, or train from scratch in a new run directory."
            )

        like_model_leaves = _arrays(like_model)
        like_opt_leaves = _arrays(like_opt_state)
        try:
            item_meta = mngr.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            raise corrupted(f"its array metadata could not be read ({type(e).__name__})") from e
        if item_meta is not None:
            _check_like(list(item_meta["model"]), like_model_leaves, "model", step)
            _check_like(list(item_meta["opt_state"]), like_opt_leaves, "opt_state", step)
            key_shape = tuple(item_meta["key"].shape)
            key_dtype = np.dtype(item_meta["key"].dtype)
        else:
            raise corrupted("its array metadata is missing")
        target = {
            "model": _abstract(like_model_leaves),
            "opt_state": _abstract(like_opt_leaves),
            "key": jax.ShapeDtypeStruct(key_shape, key_dtype),
        }
        try:
            state = mngr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            ).state
        except Exception as e:  # noqa: BLE001
            raise corrupted(f"its arrays could not be read ({type(e).__name__}: {str(e)[:200]})") from e
    finally:
        mngr.close()

    host = {k: [np.asarray(x) for x in v] for k, v in (("model", state["model"]), ("opt_state", state["opt_state"]))}
    key_data = np.asarray(state["key"])
    sums = meta["checksums"]
    for what, leaves in (("model", host["model"]), ("opt_state", host["opt_state"]), ("key", [key_data])):
        if sha256_arrays(leaves) != sums.get(what):
            raise corrupted(f"the {what} arrays do not match the checksum recorded when it was written")

    def rebuild(like, leaves):
        params, static = eqx.partition(like, eqx.is_array)
        treedef = jax.tree_util.tree_structure(params)
        return eqx.combine(jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves]), static)

    model = rebuild(like_model, host["model"])
    opt_state = rebuild(like_opt_state, host["opt_state"])
    impl = meta.get("key_impl")
    key = key_from_parts(key_data, impl)
    return Checkpoint(model, opt_state, step, key, meta)
