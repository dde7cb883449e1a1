"""The training loop, for one model (:func:`train`) or a stack of ``K`` (:func:`train_stack`).

Both run :func:`run_training`. A run is described by functions of one run (initialize the
optimizer state, split the key, compute the loss floor, evaluate, take a step); a stack of
``K`` runs applies the same functions under ``eqx.filter_vmap`` (:class:`Runs`), so the
stacked loop is the single loop with every per-run function vmapped.

Determinism: the batch of step ``s`` is drawn with ``fold_in(data_key, s)`` and evaluation
at step ``s`` with ``fold_in(eval_key, s)``, where ``data_key, eval_key = split(key)``, so
a run is a function of ``key`` alone and a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Int, Key, PRNGKeyArray, UInt32

from ..processes._conditional import ConditionalProcess
from ..processes._ghmm import GHMM, validate_ghmm
from ._checkpoint import restore_checkpoint, save_checkpoint
from ._config import TrainConfig, optimizer_and_schedule
from ._data import ArraySource, ConditionalSource, ProcessSource, as_source
from ._loss import evaluate_sample, loss_floor
from ._protocol import SequenceModel, check_model
from ._rundir import MetricsLog, fingerprint, key_data, open_run_dir, read_rows, to_json, write_rows
from ._shard import gather_rows, gather_shares, process_share, shard_stack, stack_mesh, take_share
from ._step import init_opt_state, make_step

__all__ = ["TrainResult", "train", "train_stack"]


class TrainResult(NamedTuple):
    """What :func:`train` returns: the final model and optimizer state, and the log rows."""

    model: Any
    opt_state: Any
    history: list[dict]


@dataclasses.dataclass(frozen=True)
class Runs:
    """How a function of one run applies: to one run, or vmapped over a stack of ``K``."""

    stacked: bool

    def __call__(self, fn: Callable, *in_axes) -> Callable:
        return eqx.filter_vmap(fn, in_axes=in_axes) if self.stacked else fn


@eqx.filter_jit
def _fold_in(runs: Runs, key, steps):
    # keys[i] = fold_in(key, steps[i]) for every run
    return jax.vmap(lambda s: runs(jr.fold_in, 0, None)(key, s))(steps)


@eqx.filter_jit
def _evaluate(runs: Runs, process_axis, model, process, key, floor, batch_size: int, seq_len: int):
    def one(m, p, k, f):
        return evaluate_sample(m, p, k, f, batch_size, seq_len)

    return runs(one, 0, process_axis, 0, 0)(model, process, key, floor)


def _check_inputs(model, cfg: TrainConfig, source) -> None:
    check_model(model)
    config = model.config
    if cfg.seq_len > config.n_ctx:
        raise ValueError(
            f"TrainConfig.seq_len={cfg.seq_len} exceeds the model's n_ctx={config.n_ctx}; lower seq_len or "
            "build the model with a larger n_ctx."
        )
    source.check(config.vocab_size, cfg.seq_len)
    if not config.use_bos and cfg.seq_len < 2:
        raise ValueError("TrainConfig.seq_len must be >= 2 without BOS (one prediction needs two tokens).")


def _source_is_stacked(source) -> bool:
    return getattr(source, "stacked", True)


def _process_is_stacked(process) -> bool:
    if isinstance(process, ConditionalProcess):
        return process.token_to_tuple.ndim == 3
    return process.T.ndim == 4


def run_training(
    model,
    data,
    cfg: TrainConfig,
    *,
    key,
    runs: Runs,
    optimizer: optax.GradientTransformation | None = None,
    trainable=None,
    run_dir=None,
    resume: bool = False,
    eval_process: GHMM | ConditionalProcess | None = None,
    progress: bool = True,
    fingerprints: dict[str, str] | None = None,
) -> TrainResult:
    """The loop behind :func:`train`, :func:`train_stack` and :func:`sfpjax.finetune`.

    ``fingerprints`` names more things (besides the data source) a resumed run must share
    with the recorded one, as ``{name: digest}``; they are stored in the checkpoints.
    """
    if isinstance(data, GHMM):
        # A concrete process is checked before the first step (a traced one carries its checks).
        data = validate_ghmm(data)
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}.")
    source = as_source(data)
    source_axis = 0 if runs.stacked and _source_is_stacked(source) else None
    _check_inputs(model, cfg, source)
    if eval_process is None and isinstance(source, (ProcessSource, ConditionalSource)):
        eval_process = source.process
    if eval_process is not None and not isinstance(eval_process, (GHMM, ConditionalProcess)):
        raise ValueError(
            f"eval_process must be a sfpjax.GHMM or a sfpjax.ConditionalProcess, got {type(eval_process).__name__}."
        )
    process_axis = 0 if runs.stacked and eval_process is not None and _process_is_stacked(eval_process) else None
    multiprocess = runs.stacked and jax.process_count() > 1
    if multiprocess:
        # Each process trains its share of the K runs on its own devices; gathered at the end.
        lo, hi = process_share(key.shape[0])
        model, key = take_share(model, lo, hi), take_share(key, lo, hi)
        if source_axis == 0:
            source = take_share(source, lo, hi)
        if process_axis == 0:
            eval_process = take_share(eval_process, lo, hi)
        if run_dir is not None:
            run_dir = os.path.join(os.fspath(run_dir), f"process_{jax.process_index():03d}")
        progress = progress and jax.process_index() == 0

    schedule = None
    if optimizer is None:
        optimizer, schedule = optimizer_and_schedule(cfg)
    opt_state = runs(lambda m: init_opt_state(optimizer, m, trainable=trainable), 0)(model)
    data_key, eval_key = runs(lambda k: tuple(jr.split(k)), 0)(key)

    def step_keys(base, start, stop):
        return _fold_in(runs, base, jnp.arange(start, stop))

    use_bos = model.config.use_bos
    floor = None
    if eval_process is not None and cfg.eval_every > 0:
        def one_floor(p, k):
            # Evaluations use fold_in(eval_key, n) for n >= 1, so n = 0 is free for the floor.
            return loss_floor(p, cfg.seq_len, use_bos=use_bos, key=jr.fold_in(k, 0))

        floor = runs(one_floor, process_axis, 0)(eval_process, eval_key)

    model_config = model.config if dataclasses.is_dataclass(model.config) else None
    # extra-record name -> (what it identifies, SHA-256), compared on resume
    identity = {"source_fingerprint": ("data source", fingerprint(source))}
    for name, digest in (fingerprints or {}).items():
        identity[f"{name}_fingerprint"] = (name.replace("_", " "), digest)
    record_fingerprints = {name: digest for name, (_, digest) in identity.items()}
    start = 0
    rows: list[dict] = []
    metrics_path = None
    if run_dir is not None:
        run_dir, metrics_path, last = open_run_dir(run_dir, resume)
        if resume and last is not None:
            ck = restore_checkpoint(
                run_dir, model, opt_state, model_config, cfg, ignore_fields=TrainConfig.resumable_fields()
            )
            if not np.array_equal(key_data(ck.key), key_data(key)):
                raise ValueError(
                    f"the key differs from the key of the run in {run_dir}; resume with the same key "
                    "(the run is a function of its key) or start a new run_dir."
                )
            recorded = ck.metadata.get("extra", {})
            for name, (what, digest) in identity.items():
                if recorded.get(name) != digest:
                    raise ValueError(
                        f"the {what} differs from the one the run in {run_dir} was trained with; "
                        "resume with the same one or start a new run_dir."
                    )
            model, opt_state, start = ck.model, ck.opt_state, ck.step
            rows = [r for r in read_rows(metrics_path) if r.get("step", 0) <= start]
            write_rows(metrics_path, rows)
        elif metrics_path.exists():
            write_rows(metrics_path, [])

    if start == 0:
        # The step donates its inputs; copy once so the caller's model stays usable.
        model = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)
    if runs.stacked:
        # The K runs split over the local devices: a placement, the values stay those of one device.
        mesh = stack_mesh(data_key.shape[0])
        model, opt_state, data_key, eval_key, floor = shard_stack(
            (model, opt_state, data_key, eval_key, floor), mesh, stacked=True)
        source = shard_stack(source, mesh, stacked=source_axis == 0)
        eval_process = shard_stack(eval_process, mesh, stacked=process_axis == 0)
    step = make_step(optimizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len, trainable=trainable)
    if runs.stacked:
        step = step.vmap(shared_source=source_axis is None)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or None, dynamic_ncols=True, desc="train")
    log = MetricsLog(metrics_path, rows)
    last_eval = None

    def loss_row(t, loss):
        # The log row after optimizer step t (0-based), i.e. at step count t + 1.
        row = {"step": t + 1, "loss": to_json(loss)}
        if schedule is not None:
            with jax.numpy_dtype_promotion("standard"):
                row["lr"] = float(schedule(t))
        return row

    try:
        s = start
        while s < cfg.steps:
            # A call covers steps s .. stop-1 and ends at the next multiple of steps_per_call,
            # evaluation, checkpoint or the last step, where the model itself is needed.
            stop = min(cfg.steps, (s // cfg.steps_per_call + 1) * cfg.steps_per_call)
            for every in (cfg.eval_every if floor is not None else 0,
                          cfg.checkpoint_every if run_dir is not None else 0):
                if every:
                    stop = min(stop, (s // every + 1) * every)
            keys = step_keys(data_key, s, stop)
            if stop - s == 1:
                model, opt_state, loss = step(model, opt_state, source, keys[0])
                losses = [loss]
            else:
                model, opt_state, losses = step.many(model, opt_state, source, keys)
            for t in range(s, stop - 1):
                if (t + 1) % cfg.log_every == 0:
                    log.record(loss_row(t, losses[t - s]))
            n = stop
            final = n == cfg.steps
            row = loss_row(n - 1, losses[-1]) if n % cfg.log_every == 0 or final else None
            if floor is not None and (n % cfg.eval_every == 0 or final):
                ev = _evaluate(runs, process_axis, model, eval_process, step_keys(eval_key, n, n + 1)[0],
                               floor, cfg.eval_batch_size, cfg.seq_len)
                row = row or {"step": n}
                row.update(
                    eval_loss=to_json(ev.mean_loss),
                    floor=to_json(ev.floor.mean(-1)),
                    excess=to_json(ev.excess_mean),
                    excess_pct=to_json(ev.excess_pct),
                    excess_last=to_json(ev.excess_last),
                    excess_last_pct=to_json(ev.excess_last_pct),
                    excess_per_position=to_json(ev.excess),
                )
                last_eval = (np.mean(row["excess"]), np.mean(row["excess_pct"]))
            if row is not None:
                log.record(row)
                post = {"loss": f"{np.mean(row['loss']):.4f}"} if "loss" in row else {}
                if last_eval is not None:
                    post["excess"] = f"{last_eval[0]:.4f} ({last_eval[1]:.1f}%)"
                bar.set_postfix(post, refresh=False)
            bar.update(stop - s)
            if run_dir is not None and (final or (cfg.checkpoint_every and n % cfg.checkpoint_every == 0)):
                save_checkpoint(
                    run_dir,
                    n,
                    model=model,
                    opt_state=opt_state,
                    key=key,
                    model_config=model_config,
                    train_config=cfg,
                    extra={**record_fingerprints, "stacked": runs.stacked},
                    keep=cfg.keep_checkpoints,
                )
            s = stop
    finally:
        bar.close()
        log.close()
    if multiprocess:
        return TrainResult(gather_shares(model), gather_shares(opt_state), gather_rows(log.rows))
    return TrainResult(model, opt_state, log.rows)


def train(
    model: SequenceModel,
    data: GHMM | ConditionalProcess | ProcessSource | ConditionalSource | ArraySource | Int[Array, "N L"],
    cfg: TrainConfig,
    *,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation | None = None,
    trainable=None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    eval_process: GHMM | ConditionalProcess | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on next-token cross-entropy, drawing a fresh batch every step.

    Args:
        model: a :class:`Transformer` (or any :class:`SequenceModel`), freshly initialized
            or pretrained (for fine-tuning methods see :func:`finetune`).
        data: a process, GHMM or ``ConditionalProcess`` (fresh samples every step), a fixed
            token array ``(N, L_max)`` (random rows), or a :class:`ProcessSource` /
            :class:`ConditionalSource` / :class:`ArraySource`.
        cfg: a :class:`TrainConfig`.
        key: PRNG key; the whole run is a function of it.
        optimizer: an Optax optimizer; default :func:`make_optimizer` of ``cfg`` (equal
            configs reuse one compiled step).
        trainable: an Equinox filter of the parameters to train (see :func:`make_step`);
            the rest stay frozen. ``None`` trains every floating-point array.
        run_dir: where ``metrics.jsonl`` and Orbax checkpoints go; ``None`` writes nothing.
        resume: continue the run in ``run_dir`` from its latest checkpoint; the continued
            run reaches exactly the parameters of an uninterrupted one. The model and train
            configs (bookkeeping fields aside: :meth:`TrainConfig.resumable_fields`), key
            and data must be the run's own.
        eval_process: the process whose exact loss floor evaluation compares with; default
            the training process when ``data`` is one. Evaluation runs every
            ``cfg.eval_every`` steps.
        progress: show a progress bar with the loss and the excess loss.

    Returns:
        :class:`TrainResult` ``(model, opt_state, history)``; ``history`` holds the rows of
        ``metrics.jsonl``: ``step``, ``loss``, ``lr`` and, at evaluations, ``eval_loss``,
        ``floor`` (mean over positions), ``excess``/``excess_pct`` (mean) and
        ``excess_last``/``excess_last_pct`` (last position), ``excess_per_position``.

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> tc = sfpjax.TrainConfig(steps=20, batch_size=16, seq_len=8, eval_every=20, eval_batch_size=64)
    >>> out = sfpjax.train(model, sfpjax.mess3(), tc, key=jr.key(1), progress=False)
    >>> sorted(out.history[-1])[:3]
    ['eval_loss', 'excess', 'excess_last']
    """
    return run_training(
        model, data, cfg, key=key, runs=Runs(stacked=False), optimizer=optimizer, trainable=trainable,
        run_dir=run_dir, resume=resume, eval_process=eval_process, progress=progress,
    )


def check_stack(models, keys) -> jax.Array:
    """``keys`` as an array of ``K`` keys, after checking that ``models`` is a stack of ``K``."""
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if keys.ndim != (1 if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else 2):
        raise ValueError(f"keys must be a stack of K PRNG keys (e.g. jr.split(key, K)), got shape {keys.shape}.")
    K = keys.shape[0]
    sizes = {x.shape[0] if x.ndim else None for x in jax.tree_util.tree_leaves(eqx.filter(models, eqx.is_array))}
    if sizes != {K}:
        raise ValueError(
            f"models must be a stack of K={K} models (every array with leading axis {K}, one per key); "
            f"found leading axes {sorted(sizes, key=str)}."
        )
    return keys


def train_stack(
    models: SequenceModel,
    data: GHMM | ConditionalProcess | ProcessSource | ConditionalSource | ArraySource | Int[Array, "... L"],
    cfg: TrainConfig,
    *,
    keys: Key[Array, " K"] | UInt32[Array, "K 2"],
    optimizer: optax.GradientTransformation | None = None,
    trainable=None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    eval_process: GHMM | ConditionalProcess | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a stack of ``K`` models (one pytree, leading axis ``K``) in one compiled step.

    Model ``k`` trains exactly as ``train(model_k, data_k, cfg, key=keys[k])`` would: the
    stack is the vmapped run of ``K`` independent ones (K seeds, K processes or both).

    On ``D`` local devices the ``K`` axis is split over a one-axis ``Mesh`` (``K / D`` runs
    per device, stacked data split alike, shared data replicated), with the results of one
    device up to float rounding. ``K`` need not divide evenly: the mesh uses the largest
    number of devices that divides ``K`` (no padding), so choose ``K`` a multiple of ``D``
    to use them all. The returned arrays keep that placement.

    Under ``jax.distributed`` with ``P`` processes (call ``jax.distributed.initialize`` on
    every host and run the same script), each process trains its contiguous share of
    ``K / P`` runs on its own devices and every process returns all ``K`` runs, gathered
    at the end; ``K`` must be a multiple of ``P``. A ``run_dir`` then gets one folder per
    process (``process_000``, ...), each with the checkpoints and log of its share.

    Args:
        models: e.g. ``eqx.filter_vmap(lambda k: Transformer(config, key=k))(jr.split(key, K))``.
        data: one source shared by all models, or a stacked one: a GHMM whose arrays have a
            leading ``K`` axis (``T`` of shape ``(K, V, d, d)``) or tokens ``(K, N, L)``.
        keys: ``K`` PRNG keys, one per model.
        The rest as in :func:`train`; ``history`` values are lists over the ``K`` models.

    >>> import equinox as eqx, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> models = eqx.filter_vmap(lambda k: sfpjax.Transformer(cfg, key=k))(jr.split(jr.key(0), 2))
    >>> tc = sfpjax.TrainConfig(steps=5, batch_size=8, seq_len=8)
    >>> out = sfpjax.train_stack(models, sfpjax.mess3(), tc, keys=jr.split(jr.key(1), 2), progress=False)
    >>> len(out.history[-1]["loss"])
    2
    """
    keys = check_stack(models, keys)
    return run_training(
        models, data, cfg, key=keys, runs=Runs(stacked=True), optimizer=optimizer, trainable=trainable,
        run_dir=run_dir, resume=resume, eval_process=eval_process, progress=progress,
    )
