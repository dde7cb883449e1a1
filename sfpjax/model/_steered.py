"""A :class:`Transformer` with one trainable vector added at a named activation site.

The vector is added through the intervention API (every position, every sequence), so a
:class:`SteeredTransformer` is the base model plus an :class:`Intervention` that is part
of the model: fine-tuning the vector alone (``sfpjax.finetune`` with
``sfpjax.SteeringVector(site)``) trains a steering vector against a loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._interventions import Intervention
from ._transformer import Transformer
from ._wrapped import WrappedTransformer

__all__ = ["SteeredTransformer"]


@dataclasses.dataclass(frozen=True)
class _AddThen:
    """Add the vector at every position, then run the caller's intervention at the same site (if any)."""

    then: Callable[[Array, Array, Any], Array] | None

    def __call__(self, activation, position_mask, params):
        vector, inner = params
        activation = activation + vector[None, :].astype(activation.dtype)
        return activation if self.then is None else self.then(activation, position_mask, inner)


class SteeredTransformer(WrappedTransformer):
    """``base`` with ``vector`` added to the activation at ``site`` at every position.

    Args:
        base: the model (kept unchanged).
        site: a site of ``base`` whose activation has one vector per position: a
            residual-stream site such as ``"blocks.0.hook_resid_post"`` (width ``d_model``)
            or ``"blocks.{l}.mlp.hook_post"`` (width ``d_mlp``); not ``attn.hook_pattern``.
        vector: the added vector; default zeros (the model starts as ``base``).

    Calls take ``sites=`` and ``interventions=`` as a ``Transformer`` does; an intervention
    at ``site`` itself sees the activation with the vector already added.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> base = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=3, n_ctx=8), key=jr.key(0))
    >>> steered = sfpjax.SteeredTransformer(base, "blocks.0.hook_resid_post")
    >>> steered.vector.shape
    (64,)
    """

    base: Transformer
    vector: Float[Array, " width"]
    site: str = eqx.field(static=True)

    def __init__(self, base: Transformer, site: str, vector: Float[Array, " width"] | None = None):
        if not isinstance(base, Transformer):
            raise ValueError(f"SteeredTransformer wraps a sfpjax.Transformer, got {type(base).__name__}.")
        if site not in base.site_names or site.endswith("attn.hook_pattern"):
            choices = [s for s in base.site_names if not s.endswith("attn.hook_pattern")]
            raise ValueError(f"a steering vector needs a site with one vector per position, one of {choices}; got {site!r}.")
        width = base.config.d_mlp if site.endswith("mlp.hook_post") else base.config.d_model
        if vector is None:
            vector = jnp.zeros((width,), jnp.float32)
        vector = jnp.asarray(vector)
        if vector.shape != (width,):
            raise ValueError(f"the vector at {site!r} must have shape ({width},), got {vector.shape}.")
        self.base = base
        self.site = site
        self.vector = vector

    def _interventions(self, interventions):
        interventions = {} if interventions is None else dict(interventions)
        inner = interventions.get(self.site)
        if inner is not None and not isinstance(inner, Intervention):
            raise ValueError(f"interventions[{self.site!r}] must be an sfpjax.Intervention, got {type(inner).__name__}.")
        interventions[self.site] = Intervention(
            _AddThen(None if inner is None else inner.fn),
            (self.vector, None if inner is None else inner.params),
            None if inner is None else inner.position_mask,
        )
        return interventions

    def resolve(self, interventions):
        return self.base, self._interventions(interventions)
