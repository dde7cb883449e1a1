"""The training step: draw a batch, loss and gradients of the trainable part, the update.

One step of one model is a pure function (:meth:`TrainStep.update`). A stack of ``K``
models trains with the same function under ``eqx.filter_vmap`` (:meth:`TrainStep.vmap`);
nothing else about the step changes. Every call runs one compiled region at module level
(``_step_once``, ``_step_many``) whose cache is keyed by the step's value: steps built from
equal optimizers (see :func:`sfpjax.make_optimizer`), filters, losses and shapes share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optax
from jaxtyping import Array, Float, Int, PyTree

from ._loss import next_token_loss

__all__ = ["TrainStep", "init_opt_state", "make_step"]


def trainable_mask(model, trainable) -> PyTree[bool]:
    """A pytree of bools like ``model``: the floating-point arrays that ``trainable`` selects."""
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


def init_opt_state(optimizer: optax.GradientTransformation, model, *, trainable=None) -> PyTree:
    """``optimizer.init`` of the trainable part of ``model``.

    The frozen part gets no optimizer state. For a stack of models, vmap it:
    ``eqx.filter_vmap(lambda m: init_opt_state(optimizer, m))(models)``.

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=2, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> tc = sfpjax.TrainConfig(steps=10, batch_size=4, seq_len=8)
    >>> state = sfpjax.init_opt_state(sfpjax.make_optimizer(tc), model)
    """
    # Optax mixes Python scalars with int32 counts, which strict dtype promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        return optimizer.init(eqx.filter(model, trainable_mask(model, trainable)))


class TrainStep(eqx.Module):
    """A jitted training step (see :func:`make_step`); call it, or :meth:`many` for a scan.

    Attributes:
        optimizer: the Optax optimizer.
        trainable: the Equinox filter of the parameters that train (``None``: all).
        loss_fn: ``loss_fn(model, tokens)``, a scalar.
        batch_size, seq_len: the batch drawn every step.
        in_axes: ``None`` for one model; for a stack of models, the ``eqx.filter_vmap``
            axes of ``(model, opt_state, source, key)`` (see :meth:`vmap`).
    """

    optimizer: optax.GradientTransformation
    trainable: Any
    loss_fn: Callable[[Any, Int[Array, "B L"]], Float[Array, ""]]
    batch_size: int
    seq_len: int
    in_axes: tuple | None = eqx.field(static=True, default=None)

    def update(self, model, opt_state, source, key):
        """One step of one model, traceable: ``(model, opt_state, loss)`` after the batch of ``key``."""
        tokens = source.batch(key, self.batch_size, self.seq_len)
        params, frozen = eqx.partition(model, trainable_mask(model, self.trainable))

        def objective(p):
            return self.loss_fn(eqx.combine(p, frozen), tokens)

        loss, grads = eqx.filter_value_and_grad(objective)(params)
        # Optax mixes Python scalars with int32 step counts (bias correction, schedules), which
        # strict dtype promotion rejects; the parameters and updates keep their own dtype.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = eqx.apply_updates(params, updates)
        return eqx.combine(params, frozen), opt_state, loss

    def vmap(self, *, shared_source: bool = False) -> TrainStep:
        """The same step for a stack of models: ``model``, ``opt_state`` and ``key`` carry a
        leading axis ``K``; ``source`` does too unless ``shared_source`` (then every model
        draws from the one source, with its own key)."""
        if self.in_axes is not None:
            raise ValueError("this step is already vmapped over a stack of models.")
        return dataclasses.replace(self, in_axes=(0, 0, None if shared_source else 0, 0))

    def apply(self, model, opt_state, source, key):
        """:meth:`update`, vmapped when the step is (traceable)."""
        if self.in_axes is None:
            return self.update(model, opt_state, source, key)
        return eqx.filter_vmap(self.update, in_axes=self.in_axes)(model, opt_state, source, key)

    def __call__(self, model, opt_state, source, key):
        """One step: ``(model, opt_state, loss)``. ``model`` and ``opt_state`` are donated."""
        return _step_once((self, source, key), model, opt_state)

    def many(self, model, opt_state, source, keys):
        """One step per key (stacked along axis 0) in one compiled ``lax.scan``:
        ``(model, opt_state, losses)``, the same updates as separate calls."""
        return _step_many((self, source, keys), model, opt_state)


# The first argument (step, source, key) is not donated; the model and optimizer state are.
@eqx.filter_jit(donate="all-except-first")
def _step_once(data, model, opt_state):
    step, source, key = data
    return step.apply(model, opt_state, source, key)


@eqx.filter_jit(donate="all-except-first")
def _step_many(data, model, opt_state):
    step, source, keys = data
    params, static = eqx.partition((model, opt_state), eqx.is_array)

    def body(carry, key):
        model, opt_state = eqx.combine(carry, static)
        model, opt_state, loss = step.apply(model, opt_state, source, key)
        return eqx.filter((model, opt_state), eqx.is_array), loss

    params, losses = jax.lax.scan(body, params, keys)
    model, opt_state = eqx.combine(params, static)
    return model, opt_state, losses


def make_step(
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    seq_len: int,
    trainable=None,
    loss_fn: Callable[[Any, Int[Array, "B L"]], Float[Array, ""]] = next_token_loss,
) -> TrainStep:
    """One jitted training step: draw a batch, loss and gradients, the optimizer update.

    Returns a :class:`TrainStep` ``step``; ``step(model, opt_state, source, key) -> (model,
    opt_state, loss)`` is a single ``eqx.filter_jit`` region in which the batch is drawn on
    device with ``source.batch(key, batch_size, seq_len)``. The buffers of ``model`` and
    ``opt_state`` are donated (do not use the old ones after the call); ``source`` and
    ``key`` are not. ``step.many(model, opt_state, source, keys) -> (model, opt_state,
    losses)`` runs one step per key (stacked along axis 0) inside one compiled
    ``lax.scan``: the same updates, with the per-call overhead paid once.
    ``step.vmap()`` is the step of a stack of models (leading axis ``K``), trained
    independently in the one compiled program.

    Args:
        optimizer: an Optax optimizer; ``opt_state`` is :func:`init_opt_state` of it.
        batch_size, seq_len: the batch drawn every step.
        trainable: which parameters train; ``None`` for every floating-point array, else an
            Equinox filter (a pytree of bools shaped like the model, or a callable on
            leaves). The others are frozen and carry no optimizer state. A callable is part
            of the compiled step's identity: define it once, not as a fresh lambda per call.
        loss_fn: ``loss_fn(model, tokens)``, a scalar; default :func:`next_token_loss`.

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> opt = sfpjax.make_optimizer(sfpjax.TrainConfig(steps=10, batch_size=8, seq_len=8))
    >>> step = sfpjax.make_step(opt, batch_size=8, seq_len=8)
    >>> state = sfpjax.init_opt_state(opt, model)
    >>> model, state, loss = step(model, state, sfpjax.ProcessSource(sfpjax.mess3()), jr.key(1))
    """
    return TrainStep(optimizer, trainable, loss_fn, int(batch_size), int(seq_len))
