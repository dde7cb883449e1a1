"""What the trainer needs of a model: the :class:`SequenceModel` protocol.

Training, evaluation and the losses rely on three things only: the model's config (its
alphabet size, longest context and whether it prepends BOS, which fixes the alignment of
the loss with the process) and a ``batched`` forward pass. :class:`sfpjax.Transformer`
and the fine-tuning wrappers (:class:`sfpjax.LoRATransformer`,
:class:`sfpjax.SteeredTransformer`) satisfy it; so does any model that provides the same.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from jaxtyping import Array, Float, Int

__all__ = ["ModelConfig", "SequenceModel"]


@runtime_checkable
class ModelConfig(Protocol):
    """The part of a model's configuration the trainer reads.

    Attributes:
        vocab_size: number ``V`` of process symbols; inputs and predictions are ``0 .. V-1``.
        n_ctx: longest input sequence (BOS not counted).
        use_bos: whether the model prepends a BOS token. Without BOS, position ``t`` has
            read ``x_1 .. x_{t+1}`` and predicts ``x_{t+2}``; with BOS it has read
            ``x_1 .. x_t`` and predicts ``x_{t+1}`` (see :func:`sfpjax.per_position_loss`).
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def use_bos(self) -> bool: ...


@runtime_checkable
class SequenceModel(Protocol):
    """A next-token model the training loop can train and evaluate.

    Attributes:
        config: a :class:`ModelConfig` (a static field: it must not hold arrays).

    Methods:
        batched: ``batched(tokens) -> logits``: logits ``(B, L + use_bos, vocab_size)`` for
            a batch of sequences ``(B, L)``; row ``t`` predicts the token after those read
            at position ``t``.

    >>> import jax.random as jr, sfpjax
    >>> model = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=3, n_ctx=8), key=jr.key(0))
    >>> isinstance(model, sfpjax.SequenceModel)
    True
    """

    @property
    def config(self) -> ModelConfig: ...

    def batched(self, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq_out vocab"]: ...


def check_model(model) -> None:
    """Raise ``ValueError`` naming what is missing unless ``model`` is a :class:`SequenceModel`."""
    if not isinstance(model, SequenceModel):
        raise ValueError(
            f"the model ({type(model).__name__}) must provide a `config` and a `batched(tokens)` "
            "forward pass (the sfpjax.SequenceModel protocol), as sfpjax.Transformer does."
        )
    if not isinstance(model.config, ModelConfig):
        raise ValueError(
            f"the model's config ({type(model.config).__name__}) must have vocab_size, n_ctx and "
            "use_bos (the sfpjax.ModelConfig protocol), as sfpjax.TransformerConfig does."
        )
