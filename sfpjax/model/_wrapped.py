"""The shared forward of models that wrap a :class:`Transformer` (LoRA, steering vector).

A wrapper states, in :meth:`WrappedTransformer.resolve`, which plain ``Transformer`` it
computes and which interventions it adds to the caller's; ``__call__``, ``batched``,
``config`` and ``site_names`` then behave exactly as on a ``Transformer``, so every trainer,
metric and intervention that takes a ``Transformer`` takes a wrapper too.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import equinox as eqx
from jaxtyping import Array, Float, Int

from ._interventions import Intervention
from ._transformer import Transformer, TransformerConfig

__all__ = ["WrappedTransformer"]


class WrappedTransformer(eqx.Module):
    """A model computed by a plain :class:`Transformer` plus interventions (package-internal base)."""

    base: eqx.AbstractVar[Transformer]

    @abc.abstractmethod
    def resolve(
        self, interventions: Mapping[str, Intervention] | None
    ) -> tuple[Transformer, Mapping[str, Intervention] | None]:
        """The plain model this one computes, and the interventions to run it with."""

    @property
    def config(self) -> TransformerConfig:
        """The base model's config."""
        return self.base.config

    @property
    def site_names(self) -> tuple[str, ...]:
        return self.base.site_names

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        sites: Sequence[str] = (),
        interventions: Mapping[str, Intervention] | None = None,
    ) -> Float[Array, "seq_out vocab"] | tuple[Float[Array, "seq_out vocab"], dict[str, Array]]:
        """As :meth:`Transformer.__call__` on the model this one computes."""
        model, interventions = self.resolve(interventions)
        return model(tokens, sites=sites, interventions=interventions)

    def batched(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        sites: Sequence[str] = (),
        interventions: Mapping[str, Intervention] | None = None,
    ) -> (
        Float[Array, "batch seq_out vocab"]
        | tuple[Float[Array, "batch seq_out vocab"], dict[str, Array]]
    ):
        """As :meth:`Transformer.batched` on the model this one computes."""
        model, interventions = self.resolve(interventions)
        return model.batched(tokens, sites=sites, interventions=interventions)
