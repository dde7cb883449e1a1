"""Interventions on a transformer's activations, as values rather than hooks.

An :class:`Intervention` is a pure function ``fn(activation, position_mask, params)``
together with its array arguments. It is passed into the forward call
(``model(tokens, interventions={"blocks.1.hook_resid_post": iv})``) and replaces the
activation at that site by ``fn``'s result for this one call: nothing is registered,
nothing has to be removed afterwards, and since ``params`` and ``position_mask`` are
ordinary arrays, ``jax.vmap`` over a sweep of steering scales is one compiled call and
``jax.grad`` flows into them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, PyTree

__all__ = ["Intervention"]


class Intervention(eqx.Module):
    """A pure replacement of one activation: ``a -> fn(a, position_mask, params)``.

    Args:
        fn: ``fn(activation, position_mask, params) -> activation``. ``activation`` is the
            value at the site for one sequence (e.g. ``(seq, d_model)`` for the residual
            stream, ``(n_heads, seq, seq)`` for ``attn.hook_pattern``); ``position_mask`` is
            a boolean ``(seq,)`` array saying which positions to change (``fn`` decides how
            to use it; all ``True`` when not given); ``params`` is the pytree below. ``fn``
            must return an array of the same shape and dtype. It is a static field, so
            define it once (a module-level function) rather than as a fresh lambda per call,
            or every call retraces.
        params: a pytree of arrays (a steering vector, a scale, a projection matrix...).
            They are traced arguments: vmap over them, differentiate through them.
        position_mask: boolean ``(seq,)`` over the positions the model processes (with a
            BOS token that includes it at position 0), or ``None`` for every position.

    >>> import jax.numpy as jnp
    >>> import sfpjax
    >>> def add(a, mask, params):
    ...     vector, scale = params
    ...     return a + jnp.where(mask[:, None], (scale * vector)[None, :], 0.0)
    >>> iv = sfpjax.Intervention(add, (jnp.ones(4), jnp.float32(2.0)))
    >>> iv.apply("blocks.0.hook_resid_post", jnp.zeros((3, 4)))[0]
    Array([2., 2., 2., 2.], dtype=float32)
    """

    fn: Callable[[Array, Array, Any], Array] = eqx.field(static=True)
    params: PyTree[Any] = None
    position_mask: Bool[Array, " seq"] | None = None

    def __check_init__(self):
        if not callable(self.fn):
            raise ValueError(
                f"Intervention fn must be callable as fn(activation, position_mask, params), "
                f"got {type(self.fn).__name__}."
            )

    def apply(self, site: str, activation: Array, position_axis: int = 0) -> Array:
        """Run ``fn`` on ``activation`` at ``site``, checking what comes back.

        ``position_axis`` is the axis of ``activation`` indexed by sequence position (the
        query axis for an attention pattern); it fixes the expected mask length.
        """
        n_pos = activation.shape[position_axis]
        if self.position_mask is None:
            mask = jnp.ones((n_pos,), dtype=bool)
        else:
            mask = jnp.asarray(self.position_mask)
            if mask.shape != (n_pos,) or mask.dtype != jnp.bool_:
                raise ValueError(
                    f"Intervention at {site!r}: position_mask must be a bool array of shape "
                    f"({n_pos},) (one entry per position the model processes), got "
                    f"{mask.dtype}{list(mask.shape)}."
                )
        out = self.fn(activation, mask, self.params)
        out_shape = getattr(out, "shape", None)
        out_dtype = getattr(out, "dtype", None)
        if out_shape != activation.shape or out_dtype != activation.dtype:
            raise ValueError(
                f"Intervention at {site!r} must return an activation of the same shape and "
                f"dtype as it received, {activation.dtype}{list(activation.shape)}; got "
                f"{out_dtype}{list(out_shape) if out_shape is not None else type(out).__name__}."
            )
        return out

