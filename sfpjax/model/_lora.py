"""Rank-r LoRA adapters over a frozen :class:`Transformer`.

A :class:`LoRATransformer` holds a base model and, for each chosen weight matrix ``W``
(viewed as ``(d_in, d_out)``), two factors ``A (d_in, r)`` and ``B (r, d_out)``. The model
it computes is the base with ``W + A @ B`` in place of ``W``: ``B`` starts at zero, so the
wrapped model starts as the base model exactly, and :meth:`LoRATransformer.merge` returns
that model as a plain :class:`Transformer`. The forward pass merges and runs the base
forward, so ``sites=`` and ``interventions=`` behave exactly as on a ``Transformer``; on the
small models this library trains, forming ``A @ B`` once per call costs less than the two
thin matrix products per token of the factored form.

Target names follow TransformerLens parameter names: ``embed.W_E``, ``pos_embed.W_pos``,
``unembed.W_U`` and, per block, ``blocks.{l}.attn.W_Q`` / ``W_K`` / ``W_V`` (each
``(d_model, n_heads * d_head)``), ``blocks.{l}.attn.W_O`` (``(n_heads * d_head,
d_model)``), ``blocks.{l}.mlp.W_in`` (``(d_model, d_mlp)``), ``blocks.{l}.mlp.W_out``
(``(d_mlp, d_model)``). A block name without the ``blocks.{l}.`` prefix (``"mlp.W_out"``)
means that matrix in every block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ._transformer import Transformer, TransformerConfig
from ._wrapped import WrappedTransformer

__all__ = ["LoRAAdapter", "LoRATransformer", "lora_target_names"]

_BLOCK_MATRICES = ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_out")
_TOP_MATRICES = ("embed.W_E", "pos_embed.W_pos", "unembed.W_U")
_QKV = {"attn.W_Q": 0, "attn.W_K": 1, "attn.W_V": 2}


def lora_target_names(config: TransformerConfig) -> tuple[str, ...]:
    """Every weight matrix of a model with this config that LoRA can adapt.

    >>> import sfpjax
    >>> sfpjax.lora_target_names(sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1))[:3]
    ('embed.W_E', 'pos_embed.W_pos', 'unembed.W_U')
    """
    return _TOP_MATRICES + tuple(
        f"blocks.{layer}.{m}" for layer in range(config.n_layers) for m in _BLOCK_MATRICES
    )


def _resolve(config: TransformerConfig, targets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    known = lora_target_names(config)
    out: list[str] = []
    for t in targets:
        names = [f"blocks.{layer}.{t}" for layer in range(config.n_layers)] if t in _BLOCK_MATRICES else [t]
        if not all(n in known for n in names):
            raise ValueError(
                f"unknown LoRA target {t!r}; valid targets are {list(_TOP_MATRICES + _BLOCK_MATRICES)} "
                f"(a block matrix without prefix means every block) or a per-block name such as "
                f"'blocks.0.mlp.W_out' (this model has {config.n_layers} blocks)."
            )
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("LoRA needs at least one target matrix.")
    return tuple(out)


def _matrix_shape(config: TransformerConfig, name: str) -> tuple[int, int]:
    d, hd, m = config.d_model, config.n_heads * config.d_head, config.d_mlp
    rest = name.split(".", 2)[2] if name.startswith("blocks.") else name
    return {
        "embed.W_E": (config.n_tokens, d),
        "pos_embed.W_pos": (config.n_positions, d),
        "unembed.W_U": (d, config.vocab_size),
        "attn.W_Q": (d, hd),
        "attn.W_K": (d, hd),
        "attn.W_V": (d, hd),
        "attn.W_O": (hd, d),
        "mlp.W_in": (d, m),
        "mlp.W_out": (m, d),
    }[rest]


def _add_delta(model: Transformer, name: str, delta: Float[Array, "d_in d_out"]) -> Transformer:
    """``model`` with ``delta`` added to the matrix ``name`` (in its own storage layout)."""
    if not name.startswith("blocks."):
        attr = name.split(".")[1]
        return eqx.tree_at(lambda m: getattr(m, attr), model, getattr(model, attr) + delta)
    layer, rest = int(name.split(".")[1]), name.split(".", 2)[2]
    block = model.blocks[layer]
    if rest in _QKV:
        j = _QKV[rest]
        new = block.W_QKV.at[:, j].add(delta.reshape(block.W_QKV.shape[0], *block.W_QKV.shape[2:]))
        return eqx.tree_at(lambda m: m.blocks[layer].W_QKV, model, new)
    attr = rest.split(".")[1]
    w = getattr(block, attr)
    return eqx.tree_at(lambda m: getattr(m.blocks[layer], attr), model, w + delta.reshape(w.shape))


class LoRAAdapter(eqx.Module):
    """The factors of one adapted matrix: ``W -> W + A @ B``.

    Attributes:
        A: ``(d_in, r)``, drawn ``normal(0, 1 / d_in)`` so that ``x @ A`` has the scale of ``x``.
        B: ``(r, d_out)``, zero at initialization.
    """

    A: Float[Array, "d_in r"]
    B: Float[Array, "r d_out"]

    @property
    def delta(self) -> Float[Array, "d_in d_out"]:
        return self.A @ self.B


class LoRATransformer(WrappedTransformer):
    """A frozen :class:`Transformer` with rank-``r`` adapters on chosen weight matrices.

    Args:
        base: the model to adapt (its arrays are kept, never changed by the adapters).
        rank: ``r``, at least 1 and at most ``min(d_in, d_out)`` of every target.
        targets: matrix names (see the module docstring); default every block's
            ``mlp.W_out``, the down-projection a rank-1 adapter suffices on to induce
            emergent misalignment (Turner et al. 2025).
        key: PRNG key for the ``A`` factors.

    Attributes:
        base: the frozen model.
        adapters: ``{target name: LoRAAdapter}``.

    Fine-tune it with :func:`sfpjax.finetune` and ``sfpjax.LoRA(rank, targets)``, which
    trains only the adapters. Call it like a ``Transformer`` (``sites=``, ``interventions=``
    included); :meth:`merge` gives the plain model it computes.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> base = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=3, n_ctx=8), key=jr.key(0))
    >>> lora = sfpjax.LoRATransformer(base, rank=1, targets=("attn.W_Q",), key=jr.key(1))
    >>> sorted(lora.adapters)
    ['blocks.0.attn.W_Q', 'blocks.1.attn.W_Q']
    >>> bool(jnp.all(lora(jnp.array([0, 1, 2])) == base(jnp.array([0, 1, 2]))))
    True
    """

    base: Transformer
    adapters: dict[str, LoRAAdapter]

    def __init__(
        self,
        base: Transformer,
        *,
        rank: int,
        targets: Sequence[str] = ("mlp.W_out",),
        key: PRNGKeyArray,
    ):
        if not isinstance(base, Transformer):
            raise ValueError(f"LoRATransformer adapts a sfpjax.Transformer, got {type(base).__name__}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}.")
        names = _resolve(base.config, targets)
        adapters = {}
        for name, k in zip(names, jr.split(key, len(names))):
            d_in, d_out = _matrix_shape(base.config, name)
            if rank > min(d_in, d_out):
                raise ValueError(
                    f"LoRA rank {rank} exceeds the rank of {name}, a ({d_in}, {d_out}) matrix; choose "
                    f"rank <= {min(d_in, d_out)} (or full fine-tuning of that matrix)."
                )
            a = jr.normal(k, (d_in, rank), jnp.float32) * jnp.float32(1.0 / math.sqrt(d_in))
            adapters[name] = LoRAAdapter(a, jnp.zeros((rank, d_out), jnp.float32))
        self.base = base
        self.adapters = dict(sorted(adapters.items()))  # the order pytrees give dicts

    @property
    def rank(self) -> int:
        return next(iter(self.adapters.values())).A.shape[-1]

    def merge(self) -> Transformer:
        """The plain :class:`Transformer` this model computes: ``W + A @ B`` at every target."""
        model = self.base
        for name, adapter in self.adapters.items():
            model = _add_delta(model, name, adapter.delta)
        return model

    def resolve(self, interventions):
        return self.merge(), interventions
