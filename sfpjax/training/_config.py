"""The configuration of a training run and the optimizer it implies.

``TrainConfig`` holds every hyperparameter. Its fields come in two kinds, marked on the
fields themselves (``dataclasses.field(metadata={"resumable": True})``): those that decide
the parameters a run reaches (steps, batch, optimizer) and bookkeeping that does not (how
often to log, evaluate or checkpoint); a resumed run may change only the latter
(:meth:`TrainConfig.resumable_fields`).

The optimizer of a config is AdamW with the config's schedule. ``make_optimizer`` returns an
``optax`` transformation whose ``init`` and ``update`` compare and hash by the
hyperparameters they were built from, so two runs with equal configs share one compiled
training step instead of compiling it again for a fresh optimizer object.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import optax

__all__ = ["TrainConfig", "make_optimizer", "make_schedule"]


def _resumable(default):
    return dataclasses.field(default=default, metadata={"resumable": True})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run.

    Args:
        steps: optimizer steps in the whole run.
        batch_size: sequences per step.
        seq_len: tokens per sequence ``L`` (at most the model's ``n_ctx``).
        learning_rate: peak learning rate of AdamW.
        warmup_steps: linear warm-up from 0 to ``learning_rate``.
        weight_decay: decoupled AdamW weight decay, applied to matrices (ndim >= 2) only.
        schedule: ``"cosine"`` (decay to ``min_lr_ratio * learning_rate`` at ``steps``) or
            ``"constant"`` (after warm-up).
        min_lr_ratio: final learning rate of the cosine schedule, relative to the peak.
        grad_clip: clip the global gradient norm to this; ``None`` for no clipping.
        eval_every: evaluate against the loss floor every this many steps (and at the end);
            0 turns evaluation off.
        eval_batch_size: sequences per evaluation.
        log_every: record the training loss every this many steps (and at the end).
        checkpoint_every: write a checkpoint every this many steps (and at the end) when
            training with a ``run_dir``; 0 writes only the final one.
        keep_checkpoints: keep the newest this many checkpoints; ``None`` keeps all.
        steps_per_call: optimizer steps run inside one compiled call (a ``lax.scan`` over
            their batches): the same updates as one call per step, with the per-call
            overhead paid once. Calls end early at evaluations, checkpoints and the last
            step; every step's loss is still logged.

    The last seven fields are bookkeeping: they do not change the parameters a run reaches,
    and a resumed run may change them (:meth:`resumable_fields`).

    >>> import sfpjax
    >>> sfpjax.TrainConfig(steps=100, batch_size=32, seq_len=8).schedule
    'cosine'
    >>> sfpjax.TrainConfig.resumable_fields()[:2]
    ('eval_every', 'eval_batch_size')
    """

    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    eval_every: int = _resumable(0)
    eval_batch_size: int = _resumable(256)
    log_every: int = _resumable(10)
    checkpoint_every: int = _resumable(0)
    keep_checkpoints: int | None = _resumable(3)
    steps_per_call: int = _resumable(16)

    @classmethod
    def resumable_fields(cls) -> tuple[str, ...]:
        """Names of the bookkeeping fields, which a resumed run may change."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable", False))

    def __post_init__(self):
        def need_int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"TrainConfig.{name} must be an int >= {lo}, got {v!r}.")

        def need_float(name, lo, hi=math.inf, *, open_lo=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if open_lo else v >= lo) and v <= hi
            if not ok:
                bound = f"{'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi < math.inf else "")
                raise ValueError(f"TrainConfig.{name} must be a finite number {bound}, got {v!r}.")

        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_batch_size", "steps_per_call"):
            need_int(name, 1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            need_int(name, 0)
        if self.keep_checkpoints is not None:
            need_int("keep_checkpoints", 1)
        need_float("learning_rate", 0.0, open_lo=True)
        need_float("weight_decay", 0.0)
        need_float("min_lr_ratio", 0.0, 1.0)
        if self.grad_clip is not None:
            need_float("grad_clip", 0.0, open_lo=True)
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}.")
        if self.warmup_steps >= self.steps and self.warmup_steps > 0:
            raise ValueError(
                f"TrainConfig.warmup_steps={self.warmup_steps} must be smaller than steps={self.steps}."
            )


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The learning-rate schedule of ``cfg``: linear warm-up, then cosine decay or constant.

    >>> import sfpjax
    >>> lr = sfpjax.make_schedule(sfpjax.TrainConfig(steps=10, batch_size=1, seq_len=2, warmup_steps=2))
    >>> float(lr(0)), round(float(lr(2)), 6)
    (0.0, 0.001)
    """
    peak = float(cfg.learning_rate)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=cfg.warmup_steps,
            decay_steps=cfg.steps,
            end_value=peak * cfg.min_lr_ratio,
        )
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, cfg.warmup_steps), optax.constant_schedule(peak)],
        [cfg.warmup_steps],
    )


def _decay_mask(params):
    return jax.tree.map(lambda x: x.ndim >= 2, params)


@dataclasses.dataclass(frozen=True)
class _ByValue:
    """``fn``, compared and hashed by ``recipe`` (the hyperparameters it was built from).

    JIT caches key static arguments by equality; an ``optax`` transformation built afresh
    holds fresh closures, which never compare equal. Wrapping them this way lets equal
    configs reuse the compiled step.
    """

    recipe: tuple
    fn: Callable[..., Any] = dataclasses.field(compare=False, repr=False)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def optimizer_and_schedule(cfg: TrainConfig) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """:func:`make_optimizer` and the schedule inside it, built once, for the training loop."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}.")
    schedule = make_schedule(cfg)
    adamw = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_decay_mask)
    opt = adamw if cfg.grad_clip is None else optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    skip = set(TrainConfig.resumable_fields())
    recipe = ("adamw",) + tuple(
        (f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in skip
    )
    wrapped = optax.GradientTransformationExtraArgs(
        _ByValue(recipe + ("init",), opt.init), _ByValue(recipe + ("update",), opt.update)
    )
    return wrapped, schedule


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """AdamW with the schedule of ``cfg``, global-norm clipping and decay on matrices only.

    Optimizers made from equal configs (bookkeeping fields aside) compare equal, so the
    training steps built from them share one compiled program.

    >>> import sfpjax
    >>> tc = sfpjax.TrainConfig(steps=10, batch_size=1, seq_len=2)
    >>> sfpjax.make_optimizer(tc) == sfpjax.make_optimizer(tc)
    True
    """
    return optimizer_and_schedule(cfg)[0]
