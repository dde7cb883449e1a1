"""Training a transformer on a process: next-token loss, the exact loss floor, the step, the loop.

Alignment of losses with the process (the model module fixes the belief alignment):

* without BOS, position ``t`` (0-indexed) has read ``x_1 .. x_{t+1}`` and predicts
  ``x_{t+2}``, so positions ``0 .. L-2`` are scored and position ``t``'s floor is the myopic
  entropy ``H(X_{t+2} | X_{1:t+1}) = myopic_entropies[t + 1]``;
* with BOS, position ``t`` has read ``x_1 .. x_t`` and predicts ``x_{t+1}``, so all ``L``
  positions are scored and the floor at ``t`` is ``myopic_entropies[t]``.

The excess loss ``loss - floor`` (in nats, and in % of the floor) is how far a model is from
the Bayes-optimal predictor; it is what the training log reports.

Determinism: the batch of step ``s`` is drawn with ``fold_in(data_key, s)`` and evaluation
at step ``s`` with ``fold_in(eval_key, s)``, where ``data_key, eval_key = split(key)``, so
a run is a function of ``key`` alone and a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray, PyTree, UInt32

from .._io import atomic_write, key_parts, sha256_tree
from ..inference._filter import filter_beliefs, next_token_probs
from ._checkpoint import _manager, latest_checkpoint, restore_checkpoint, save_checkpoint
from ._data import ArraySource, ProcessSource, as_source
from ..processes._ghmm import GHMM
from ..inference._mixed_state import myopic_entropies
from ..inference._sampling import sample
from ..processes._structure import _entropy

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "init_opt_state",
    "loss_floor",
    "make_optimizer",
    "make_schedule",
    "make_step",
    "next_token_loss",
    "per_position_loss",
    "train",
    "train_stack",
]

# Training bookkeeping that does not change the parameters; a resumed run may change these.
_BOOKKEEPING = ("eval_every", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "steps_per_call")


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

    >>> import sfpjax
    >>> sfpjax.TrainConfig(steps=100, batch_size=32, seq_len=8).schedule
    'cosine'
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
    eval_every: int = 0
    eval_batch_size: int = 256
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int | None = 3
    steps_per_call: int = 16

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


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the schedule of ``cfg``, global-norm clipping and decay on matrices only.

    >>> import sfpjax
    >>> opt = sfpjax.make_optimizer(sfpjax.TrainConfig(steps=10, batch_size=1, seq_len=2))
    """
    adamw = optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay, mask=_decay_mask)
    if cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def _use_bos(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "use_bos", False))


def _check_batch(tokens) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be an integer batch of shape (batch, seq_len), got shape {tokens.shape} "
            f"and dtype {tokens.dtype}."
        )


@eqx.filter_jit
def per_position_loss(model, tokens: Int[Array, "B L"]) -> Float[Array, "B P"]:
    """Cross-entropy ``-log q(x_next | context)`` of every scored position of every sequence.

    ``P = L - 1`` without BOS (position ``t`` predicts ``tokens[:, t + 1]``) and ``P = L``
    with BOS (position ``t`` predicts ``tokens[:, t]``); see the module docstring.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> sfpjax.per_position_loss(model, jnp.zeros((2, 5), jnp.int32)).shape
    (2, 4)
    """
    _check_batch(tokens)
    # Transformer.batched is jax.vmap(model) on the flattened batch: several times faster
    # weight gradients on CPU. Other models (wrappers) are batched with vmap.
    batched = getattr(model, "batched", None)
    logits = batched(tokens) if batched is not None else jax.vmap(model)(tokens)
    if _use_bos(model):
        logits, targets = logits[:, :-1], tokens
    else:
        if tokens.shape[1] < 2:
            raise ValueError("without BOS a sequence needs at least 2 tokens to score a prediction.")
        logits, targets = logits[:, :-1], tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


@eqx.filter_jit
def next_token_loss(model, tokens: Int[Array, "B L"]) -> Float[Array, ""]:
    """Mean next-token cross-entropy in nats over all scored positions of a batch.

    >>> import math, jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> loss = sfpjax.next_token_loss(model, jnp.zeros((2, 5), jnp.int32))
    >>> abs(float(loss) - math.log(3)) < 0.2  # near-uniform predictions at initialization
    True
    """
    return per_position_loss(model, tokens).mean()


def loss_floor(
    process: GHMM,
    seq_len: int,
    *,
    use_bos: bool,
    key: PRNGKeyArray | None = None,
    num_samples: int = 4096,
    max_exact_words: int = 1 << 20,
) -> Float[Array, " P"]:
    """The lowest achievable loss at every scored position: myopic entropies, aligned.

    Entry ``t`` is ``myopic_entropies[t + 1]`` without BOS (``P = L - 1``) and
    ``myopic_entropies[t]`` with BOS (``P = L``). Depths ``n`` with ``V**n <=
    max_exact_words`` are exact (enumeration of all words); deeper ones, if any, are
    estimated as the mean entropy of the exact next-token law ``<<eta(w)|T(x)|1>>`` over
    ``num_samples`` sampled contexts ``w`` (this needs ``key``).

    >>> import sfpjax
    >>> [round(float(v), 4) for v in sfpjax.loss_floor(sfpjax.coin(), 4, use_bos=False)]
    [0.6931, 0.6931, 0.6931]
    """
    seq_len = int(seq_len)
    if seq_len < 1 or (seq_len < 2 and not use_bos):
        raise ValueError(
            f"seq_len must be >= {1 if use_bos else 2} to score a prediction "
            f"({'with' if use_bos else 'without'} BOS), got {seq_len}."
        )
    first = 0 if use_bos else 1
    depth = seq_len - 1
    V = int(process.T.shape[-3])
    exact_depth = depth
    while exact_depth > 0 and V**exact_depth > max_exact_words:
        exact_depth -= 1
    exact = myopic_entropies(process, exact_depth)
    if exact_depth == depth:
        return exact[first:]
    if key is None:
        raise ValueError(
            f"the floor to depth {depth} would enumerate {V}**{depth} words (more than "
            f"max_exact_words={max_exact_words}); pass key= to estimate the deeper positions "
            "from sampled contexts, or raise max_exact_words."
        )
    tokens = sample(process, key=key, batch_size=num_samples, seq_len=depth)
    beliefs = filter_beliefs(process, tokens).beliefs  # belief after x_1..x_{n}, n = 1..depth
    est = _entropy(next_token_probs(process, beliefs)).mean(0)  # H(X_{n+1} | X_{1:n})
    full = jnp.concatenate([exact, est[exact_depth:].astype(exact.dtype)])
    return full[first:]


class EvalResult(NamedTuple):
    """Loss of a model against the exact floor (arrays; stacked under vmap).

    Attributes:
        loss: mean loss at every scored position ``(P,)``.
        floor: the floor at every position ``(P,)``, see :func:`loss_floor`.
        excess: ``loss - floor`` ``(P,)`` in nats.
        mean_loss: loss averaged over positions.
        excess_mean: ``mean(loss) - mean(floor)`` in nats.
        excess_pct: ``excess_mean`` in % of ``mean(floor)`` (nan for a zero floor).
        excess_last: excess at the last position, in nats.
        excess_last_pct: ``excess_last`` in % of the last floor.
    """

    loss: Float[Array, " P"]
    floor: Float[Array, " P"]
    excess: Float[Array, " P"]
    mean_loss: Float[Array, ""]
    excess_mean: Float[Array, ""]
    excess_pct: Float[Array, ""]
    excess_last: Float[Array, ""]
    excess_last_pct: Float[Array, ""]


def _pct(excess, floor):
    return jnp.where(floor > 0, 100.0 * excess / jnp.where(floor > 0, floor, 1.0), jnp.nan)


@eqx.filter_jit
def _evaluate(model, process, key, floor, batch_size: int, seq_len: int) -> EvalResult:
    tokens = sample(process, key=key, batch_size=batch_size, seq_len=seq_len)
    loss = per_position_loss(model, tokens).mean(0)
    dtype = jnp.promote_types(loss.dtype, floor.dtype)
    loss, floor = loss.astype(dtype), floor.astype(dtype)
    excess = loss - floor
    excess_mean = loss.mean() - floor.mean()
    return EvalResult(
        loss=loss,
        floor=floor,
        excess=excess,
        mean_loss=loss.mean(),
        excess_mean=excess_mean,
        excess_pct=_pct(excess_mean, floor.mean()),
        excess_last=excess[-1],
        excess_last_pct=_pct(excess[-1], floor[-1]),
    )


@eqx.filter_jit
def _evaluate_stack(model, process, key, floor, batch_size: int, seq_len: int, shared: bool) -> EvalResult:
    def one(m, p, k, f):
        return _evaluate(m, p, k, f, batch_size, seq_len)

    return eqx.filter_vmap(one, in_axes=(0, None if shared else 0, 0, 0))(model, process, key, floor)


_fold_in_stack = jax.jit(jax.vmap(jr.fold_in, in_axes=(0, None)))


def evaluate(
    model,
    process: GHMM,
    *,
    key: PRNGKeyArray,
    batch_size: int,
    seq_len: int,
    floor: Float[Array, " P"] | None = None,
) -> EvalResult:
    """Per-position loss of ``model`` on fresh samples of ``process`` against the exact floor.

    Args:
        model: a single model (``eqx.filter_vmap`` this function over a stack).
        process: the process the sequences are drawn from.
        key: PRNG key for the sample (and for the floor, if it must be estimated).
        batch_size, seq_len: the evaluation sample.
        floor: a precomputed :func:`loss_floor` (saves recomputing it at every evaluation).

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=2, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> res = sfpjax.evaluate(model, sfpjax.coin(), key=jr.key(1), batch_size=64, seq_len=8)
    >>> res.loss.shape, res.floor.shape
    ((7,), (7,))
    """
    sample_key, floor_key = jr.split(key)
    if floor is None:
        floor = loss_floor(process, seq_len, use_bos=_use_bos(model), key=floor_key)
    return _evaluate(model, process, sample_key, floor, int(batch_size), int(seq_len))


def _trainable_mask(model, trainable) -> PyTree[bool]:
    chosen = model if trainable is None else eqx.filter(model, trainable)
    chosen = eqx.filter(chosen, eqx.is_inexact_array)
    mask = jax.tree.map(lambda x: x is not None, chosen, is_leaf=lambda x: x is None)
    if not any(jax.tree_util.tree_leaves(mask)):
        raise ValueError(
            "trainable selects no floating-point parameters of the model; pass a filter that "
            "returns True for at least one array (a pytree of bools like the model, or a "
            "callable on leaves)."
        )
    return mask


def init_opt_state(
    optimizer: optax.GradientTransformation, model, *, trainable=None, stacked: bool = False
) -> PyTree:
    """``optimizer.init`` of the trainable part of ``model`` (of each model of a stack).

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=2, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> tc = sfpjax.TrainConfig(steps=10, batch_size=4, seq_len=8)
    >>> state = sfpjax.init_opt_state(sfpjax.make_optimizer(tc), model)
    """

    def init(m):
        with jax.numpy_dtype_promotion("standard"):
            return optimizer.init(eqx.filter(m, _trainable_mask(m, trainable)))

    return eqx.filter_vmap(init)(model) if stacked else init(model)


def make_step(
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    seq_len: int,
    trainable=None,
    loss_fn: Callable[[Any, Int[Array, "B L"]], Float[Array, ""]] = next_token_loss,
    stacked: bool = False,
    shared_source: bool = False,
) -> Callable:
    """One jitted training step: draw a batch, loss and gradients, the optimizer update.

    Returns ``step(model, opt_state, source, key) -> (model, opt_state, loss)``, a single
    ``eqx.filter_jit`` region in which the batch is drawn on device with
    ``source.batch(key, batch_size, seq_len)``. The buffers of ``model`` and ``opt_state``
    are donated (do not use the old ones after the call); ``source`` and ``key`` are not.
    ``step.many(model, opt_state, source, keys) -> (model, opt_state, losses)`` runs one
    step per key (stacked along axis 0) inside one compiled ``lax.scan``: the same updates,
    with the per-call overhead paid once.

    Args:
        optimizer: an Optax optimizer; ``opt_state`` is :func:`init_opt_state` of it.
        batch_size, seq_len: the batch drawn every step.
        trainable: which parameters train; ``None`` for every floating-point array, else an
            Equinox filter (a pytree of bools shaped like the model, or a callable on
            leaves). The others are frozen and carry no optimizer state.
        loss_fn: ``loss_fn(model, tokens)``, a scalar; default :func:`next_token_loss`.
        stacked: ``model``, ``opt_state`` and ``key`` carry a leading axis of ``K`` models
            that train independently in the one compiled step (``eqx.filter_vmap``).
        shared_source: with ``stacked``, all models read from one unstacked ``source``
            (still with their own keys); otherwise the source is stacked as well.

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> opt = sfpjax.make_optimizer(sfpjax.TrainConfig(steps=10, batch_size=8, seq_len=8))
    >>> step = sfpjax.make_step(opt, batch_size=8, seq_len=8)
    >>> state = sfpjax.init_opt_state(opt, model)
    >>> model, state, loss = step(model, state, sfpjax.ProcessSource(sfpjax.mess3()), jr.key(1))
    """
    spec = _StepSpec(optimizer, trainable, loss_fn, int(batch_size), int(seq_len), bool(stacked), bool(shared_source))

    def step(model, opt_state, source, key):
        return _train_step((spec, source, key), model, opt_state)

    def many(model, opt_state, source, keys):
        return _train_steps((spec, source, keys), model, opt_state)

    step.many = many
    return step


class _StepSpec(NamedTuple):
    optimizer: Any
    trainable: Any
    loss_fn: Any
    batch_size: int
    seq_len: int
    stacked: bool
    shared_source: bool


def _single_step(spec: _StepSpec, model, opt_state, source, key):
    tokens = source.batch(key, spec.batch_size, spec.seq_len)
    params, frozen = eqx.partition(model, _trainable_mask(model, spec.trainable))

    def objective(p):
        return spec.loss_fn(eqx.combine(p, frozen), tokens)

    loss, grads = eqx.filter_value_and_grad(objective)(params)
    # Optax mixes Python scalars with int32 step counts (bias correction, schedules), which
    # strict dtype promotion rejects; the parameters and updates keep their own dtype.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = spec.optimizer.update(grads, opt_state, params)
    params = eqx.apply_updates(params, updates)
    return eqx.combine(params, frozen), opt_state, loss


# One module-level jit region: steps built from the same optimizer object and shapes share
# the compiled program. The first argument (spec, source, key) is not donated; the model and
# optimizer state are.
@eqx.filter_jit(donate="all-except-first")
def _train_step(data, model, opt_state):
    spec, source, key = data
    if spec.stacked:
        body = eqx.filter_vmap(
            lambda m, o, src, k: _single_step(spec, m, o, src, k),
            in_axes=(0, 0, None if spec.shared_source else 0, 0),
        )
        return body(model, opt_state, source, key)
    return _single_step(spec, model, opt_state, source, key)


@eqx.filter_jit(donate="all-except-first")
def _train_steps(data, model, opt_state):
    """``len(keys)`` steps of :func:`_train_step` in one call, returning every step's loss."""
    spec, source, keys = data
    params, static = eqx.partition((model, opt_state), eqx.is_array)

    def body(carry, key):
        model, opt_state = eqx.combine(carry, static)
        if spec.stacked:
            model, opt_state, loss = eqx.filter_vmap(
                lambda m, o, src, k: _single_step(spec, m, o, src, k),
                in_axes=(0, 0, None if spec.shared_source else 0, 0),
            )(model, opt_state, source, key)
        else:
            model, opt_state, loss = _single_step(spec, model, opt_state, source, key)
        return eqx.filter((model, opt_state), eqx.is_array), loss

    params, losses = jax.lax.scan(body, params, keys)
    model, opt_state = eqx.combine(params, static)
    return model, opt_state, losses


class TrainResult(NamedTuple):
    """What :func:`train` returns: the final model and optimizer state, and the log rows."""

    model: Any
    opt_state: Any
    history: list[dict]


def _to_json(x):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()


def _check_model(model, cfg: TrainConfig, source, stacked: bool) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    n_ctx = getattr(config, "n_ctx", None)
    if n_ctx is not None and cfg.seq_len > n_ctx:
        raise ValueError(
            f"TrainConfig.seq_len={cfg.seq_len} exceeds the model's n_ctx={n_ctx}; lower seq_len or "
            "build the model with a larger n_ctx."
        )
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None:
        source.check(vocab, cfg.seq_len)
    if not _use_bos(model) and cfg.seq_len < 2:
        raise ValueError("TrainConfig.seq_len must be >= 2 without BOS (one prediction needs two tokens).")


def _source_is_stacked(source) -> bool:
    if isinstance(source, ProcessSource):
        return source.process.T.ndim == 4
    if isinstance(source, ArraySource):
        return source.tokens.ndim == 3
    return True


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _run(
    model,
    data,
    cfg: TrainConfig,
    *,
    key,
    optimizer,
    trainable,
    run_dir,
    resume: bool,
    eval_process,
    progress: bool,
    stacked: bool,
) -> TrainResult:
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}.")
    source = as_source(data)
    shared = stacked and not _source_is_stacked(source)
    _check_model(model, cfg, source, stacked)
    if eval_process is None and isinstance(source, ProcessSource):
        eval_process = source.process
    if eval_process is not None and not isinstance(eval_process, GHMM):
        raise ValueError(f"eval_process must be a sfpjax.GHMM, got {type(eval_process).__name__}.")
    eval_shared = stacked and eval_process is not None and eval_process.T.ndim == 3

    schedule = make_schedule(cfg) if optimizer is None else None
    optimizer = make_optimizer(cfg) if optimizer is None else optimizer
    opt_state = init_opt_state(optimizer, model, trainable=trainable, stacked=stacked)

    if stacked:
        split = jax.vmap(jr.split)(key)
        data_key, eval_key = split[:, 0], split[:, 1]
    else:
        data_key, eval_key = jr.split(key)

    def step_key(base, s):
        return _fold_in_stack(base, s) if stacked else jr.fold_in(base, s)

    use_bos = _use_bos(model)
    floor = None
    if eval_process is not None and cfg.eval_every > 0:
        def one_floor(p, k):
            # Evaluations use fold_in(eval_key, n) for n >= 1, so n = 0 is free for the floor.
            return loss_floor(p, cfg.seq_len, use_bos=use_bos, key=jr.fold_in(k, 0))

        if stacked:
            floor = eqx.filter_vmap(one_floor, in_axes=(None if eval_shared else 0, 0))(eval_process, eval_key)
        else:
            floor = one_floor(eval_process, eval_key)

    def run_eval(m, s):
        k = step_key(eval_key, s)
        if stacked:
            return _evaluate_stack(m, eval_process, k, floor, cfg.eval_batch_size, cfg.seq_len, eval_shared)
        return _evaluate(m, eval_process, k, floor, cfg.eval_batch_size, cfg.seq_len)

    model_config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(model_config):
        model_config = None
    fingerprint = sha256_tree(source)
    start = 0
    rows: list[dict] = []
    metrics_path = None
    manager = None
    if run_dir is not None:
        run_dir = Path(run_dir).expanduser()
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = run_dir / "metrics.jsonl"
        last = latest_checkpoint(run_dir)
        if last is not None and not resume:
            raise ValueError(
                f"{run_dir} already holds checkpoints (latest step {last}); pass resume=True to "
                "continue that run, or choose a new run_dir (existing checkpoints are never overwritten)."
            )
        if resume and last is not None:
            ck = restore_checkpoint(
                run_dir, model, opt_state, model_config, cfg, ignore_fields=_BOOKKEEPING
            )
            if not np.array_equal(key_parts(ck.key)[0], key_parts(key)[0]):
                raise ValueError(
                    f"the key differs from the key of the run in {run_dir}; resume with the same key "
                    "(the run is a function of its key) or start a new run_dir."
                )
            if ck.metadata.get("extra", {}).get("source_fingerprint") != fingerprint:
                raise ValueError(
                    f"the data source differs from the one the run in {run_dir} was trained on "
                    "(another process or token array); resume with the same source or start a new run_dir."
                )
            model, opt_state, start = ck.model, ck.opt_state, ck.step
            rows = [r for r in _read_rows(metrics_path) if r.get("step", 0) <= start]
            atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        elif metrics_path.exists():
            atomic_write(metrics_path, b"")
        manager = _manager(run_dir, keep=cfg.keep_checkpoints, create=True)

    if start == 0:
        # The step donates its inputs; copy once so the caller's model stays usable.
        model = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)
    step_fn = make_step(
        optimizer,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        trainable=trainable,
        stacked=stacked,
        shared_source=shared,
    )

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or None, dynamic_ncols=True, desc="train")
    metrics_file = open(metrics_path, "a") if metrics_path is not None else None
    last_eval = None

    def loss_row(t, loss):
        # The log row after optimizer step t (0-based), i.e. at step count t + 1.
        row = {"step": t + 1, "loss": _to_json(loss)}
        if schedule is not None:
            with jax.numpy_dtype_promotion("standard"):
                row["lr"] = float(schedule(t))
        return row

    def record(row):
        rows.append(row)
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    try:
        s = start
        while s < cfg.steps:
            # A call covers steps s .. stop-1 and ends at the next multiple of steps_per_call,
            # evaluation, checkpoint or the last step, where the model itself is needed.
            stop = min(cfg.steps, (s // cfg.steps_per_call + 1) * cfg.steps_per_call)
            for every in (cfg.eval_every if floor is not None else 0,
                          cfg.checkpoint_every if manager is not None else 0):
                if every:
                    stop = min(stop, (s // every + 1) * every)
            if stop - s == 1:
                model, opt_state, loss = step_fn(model, opt_state, source, step_key(data_key, s))
                losses = [loss]
            else:
                keys = jnp.stack([step_key(data_key, t) for t in range(s, stop)])
                model, opt_state, losses = step_fn.many(model, opt_state, source, keys)
            for t in range(s, stop - 1):
                if (t + 1) % cfg.log_every == 0:
                    record(loss_row(t, losses[t - s]))
            n = stop
            final = n == cfg.steps
            row = loss_row(n - 1, losses[-1]) if n % cfg.log_every == 0 or final else None
            if floor is not None and (n % cfg.eval_every == 0 or final):
                ev = run_eval(model, n)
                row = row or {"step": n}
                row.update(
                    eval_loss=_to_json(ev.mean_loss),
                    floor=_to_json(ev.floor.mean(-1)),
                    excess=_to_json(ev.excess_mean),
                    excess_pct=_to_json(ev.excess_pct),
                    excess_last=_to_json(ev.excess_last),
                    excess_last_pct=_to_json(ev.excess_last_pct),
                    excess_per_position=_to_json(ev.excess),
                )
                last_eval = (np.mean(row["excess"]), np.mean(row["excess_pct"]))
            if row is not None:
                record(row)
                post = {"loss": f"{np.mean(row['loss']):.4f}"} if "loss" in row else {}
                if last_eval is not None:
                    post["excess"] = f"{last_eval[0]:.4f} ({last_eval[1]:.1f}%)"
                bar.set_postfix(post, refresh=False)
            bar.update(stop - s)
            if manager is not None and (final or (cfg.checkpoint_every and n % cfg.checkpoint_every == 0)):
                save_checkpoint(
                    run_dir,
                    n,
                    model=model,
                    opt_state=opt_state,
                    key=key,
                    model_config=model_config,
                    train_config=cfg,
                    extra={"source_fingerprint": fingerprint, "stacked": stacked},
                    _manager_=manager,
                )
            s = stop
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if manager is not None:
            manager.close()
    return TrainResult(model, opt_state, rows)


def train(
    model,
    data: GHMM | ProcessSource | ArraySource | Int[Array, "N L"],
    cfg: TrainConfig,
    *,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation | None = None,
    trainable=None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    eval_process: GHMM | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on next-token cross-entropy, drawing a fresh batch every step.

    Args:
        model: a :class:`Transformer` (or any model with the same call signature), freshly
            initialized or pretrained (fine-tuning).
        data: a process (fresh samples every step), a fixed token array ``(N, L_max)``
            (random rows), or a :class:`ProcessSource` / :class:`ArraySource`.
        cfg: a :class:`TrainConfig`.
        key: PRNG key; the whole run is a function of it.
        optimizer: an Optax optimizer; default :func:`make_optimizer` of ``cfg``.
        trainable: an Equinox filter of the parameters to train (see :func:`make_step`);
            the rest stay frozen. ``None`` trains every floating-point array.
        run_dir: where ``metrics.jsonl`` and Orbax checkpoints go; ``None`` writes nothing.
        resume: continue the run in ``run_dir`` from its latest checkpoint; the continued
            run reaches exactly the parameters of an uninterrupted one. The model and train
            configs (bookkeeping fields aside), key and data must be the run's own.
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
    return _run(
        model, data, cfg, key=key, optimizer=optimizer, trainable=trainable, run_dir=run_dir,
        resume=resume, eval_process=eval_process, progress=progress, stacked=False,
    )


def train_stack(
    models,
    data: GHMM | ProcessSource | ArraySource | Int[Array, "... L"],
    cfg: TrainConfig,
    *,
    keys: Key[Array, " K"] | UInt32[Array, "K 2"],
    optimizer: optax.GradientTransformation | None = None,
    trainable=None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    eval_process: GHMM | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a stack of ``K`` models (one pytree, leading axis ``K``) in one compiled step.

    Model ``k`` trains exactly as ``train(model_k, data_k, cfg, key=keys[k])`` would: the
    stack is the vmapped run of ``K`` independent ones (K seeds, K processes or both).

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
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if keys.ndim != (1 if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else 2):
        raise ValueError(f"keys must be a stack of K PRNG keys (e.g. jr.split(key, K)), got shape {keys.shape}.")
    K = keys.shape[0]
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(eqx.filter(models, eqx.is_array))}
    if sizes != {K}:
        raise ValueError(
            f"models must be a stack of K={K} models (every array with leading axis {K}, one per key); "
            f"found leading axes {sorted(sizes)}."
        )
    return _run(
        models, data, cfg, key=keys, optimizer=optimizer, trainable=trainable, run_dir=run_dir,
        resume=resume, eval_process=eval_process, progress=progress, stacked=True,
    )
