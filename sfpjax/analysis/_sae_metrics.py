"""The standard SAE metrics: sparsity, reconstruction, and the loss when spliced into the model.

Definitions (names as in SAELens and dictionary_learning), over ``n`` activation rows
``x`` with reconstructions ``x_hat`` and latents ``z``:

* ``l0``: mean number of non-zero latents per row, ``mean_rows #{i : z_i > 0}``;
* ``mse``: mean squared error over rows and dimensions, ``mean_{rows, dims} (x - x_hat)^2``;
* ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``
  (the mean is over the same rows); ``1 - fvu`` is the explained variance;
* ``frequency``: per latent, the fraction of rows on which it fires (``z_i > 0``);
* ``dead_fraction``: fraction of the latents in use with frequency 0 on these rows;
* ``dense_fraction``: fraction of the latents in use with frequency above
  ``dense_threshold`` (0.1 by default).

Spliced (downstream) metrics replace the activation at the SAE's site by its
reconstruction for one forward pass (an :class:`sfpjax.Intervention`) and compare the
next-token cross-entropy over the scored positions (``sfpjax.per_position_loss``):

* ``ce_loss_recovered = (ce_zero_ablation - ce_spliced) / (ce_zero_ablation - ce_clean)``:
  1 when the reconstruction is perfect, 0 when it is as bad as setting the activation to
  zero (NaN when zero-ablation does not change the loss);
* ``kl_spliced``, ``kl_zero_ablation``: ``KL(clean || intervened)`` of the next-token
  distributions, in nats, averaged over the scored positions.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ..model._interventions import Intervention
from ..model._transformer import Transformer
from ..training._loss import per_position_loss
from ._sae import SAE
from ._steering_metrics import kl_divergence

__all__ = [
    "SAEMetrics",
    "SpliceMetrics",
    "sae_intervention",
    "sae_metrics",
    "splice_metrics",
    "zero_ablation",
]


class SAEMetrics(NamedTuple):
    """Reconstruction and sparsity metrics of an SAE on activation rows (module docstring).

    Attributes:
        l0: mean number of active latents per row.
        mse: mean squared error per entry.
        fvu: fraction of variance unexplained.
        dead_fraction: fraction of latents in use that never fire on these rows.
        dense_fraction: fraction of latents in use firing on more than ``dense_threshold``
            of the rows.
        frequency: ``(d_sae,)`` firing frequency of each latent (0 for masked latents).
    """

    l0: Float[Array, ""]
    mse: Float[Array, ""]
    fvu: Float[Array, ""]
    dead_fraction: Float[Array, ""]
    dense_fraction: Float[Array, ""]
    frequency: Float[Array, " d_sae"]


def sae_metrics(
    sae: SAE,
    acts: Float[ArrayLike, "*batch d_in"],
    *,
    dense_threshold: float = 0.1,
) -> SAEMetrics:
    """L0, MSE, FVU, dead and dense fractions of ``sae`` on activations ``acts``.

    Pure JAX: jit it, or ``eqx.filter_vmap(lambda s: sae_metrics(s, acts))(stack)`` for a
    stack of SAEs. Latents are computed in inference mode (``SAE.encode``).

    Args:
        sae: an :class:`SAE`.
        acts: activations of the SAE's site, any leading shape, width ``d_in``.
        dense_threshold: firing frequency above which a latent counts as dense.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> sae = sfpjax.SAE(sfpjax.SAEConfig(d_in=4, d_sae=16, k=2), key=jr.key(0))
    >>> m = sfpjax.sae_metrics(sae, jr.normal(jr.key(1), (64, 4)))
    >>> float(m.l0)
    2.0
    """
    if not 0.0 <= dense_threshold <= 1.0:
        raise ValueError(f"dense_threshold must lie in [0, 1], got {dense_threshold}.")
    x = jnp.asarray(acts)
    if x.ndim < 1 or x.shape[-1] != sae.d_in:
        raise ValueError(f"sae_metrics: activations must have shape (..., d_in={sae.d_in}), got {x.shape}.")
    if x.size == 0:
        raise ValueError("sae_metrics: got no activation rows.")
    return _metrics(sae, x.reshape(-1, sae.d_in), float(dense_threshold))


@eqx.filter_jit
def _metrics(sae, x, dense_threshold):
    z = sae.encode(x)
    x = x.astype(z.dtype)
    err = x - sae.decode(z)
    active = z > 0
    l0 = jnp.mean(jnp.sum(active, axis=-1).astype(z.dtype))
    mse = jnp.mean(err * err)
    centred = x - jnp.mean(x, axis=0)[None, :]
    fvu = jnp.sum(err * err) / jnp.sum(centred * centred)
    frequency = jnp.mean(active.astype(z.dtype), axis=0)
    used = sae.latent_mask
    n_used = jnp.sum(used).astype(z.dtype)
    dead = jnp.sum(used & (frequency == 0)).astype(z.dtype) / n_used
    dense = jnp.sum(used & (frequency > dense_threshold)).astype(z.dtype) / n_used
    return SAEMetrics(l0, mse, fvu, dead, dense, frequency)


def _splice(activation, position_mask, sae):
    return jnp.where(position_mask[:, None], sae(activation), activation).astype(activation.dtype)


def _zero(activation, position_mask, params):
    return jnp.where(position_mask[:, None], jnp.zeros_like(activation), activation)


def _check_mask(position_mask):
    if position_mask is None:
        return None
    m = jnp.asarray(position_mask)
    if m.ndim != 1 or m.dtype != jnp.bool_:
        raise ValueError(f"position_mask must be a bool array of shape (seq,), got {m.dtype}{list(m.shape)}.")
    return m


def sae_intervention(sae: SAE, *, position_mask: Bool[ArrayLike, " seq"] | None = None) -> Intervention:
    """An intervention replacing the activation by its SAE reconstruction ``x_hat``.

    Args:
        sae: an :class:`SAE` whose ``d_in`` is the site's width.
        position_mask: boolean ``(seq_out,)``, the positions to splice (BOS first when the
            model uses one); ``None`` splices every position.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> sae = sfpjax.SAE(sfpjax.SAEConfig(d_in=16, d_sae=32, k=4), key=jr.key(1))
    >>> iv = sfpjax.sae_intervention(sae)
    >>> model(jnp.array([0, 1, 2]), interventions={"blocks.0.hook_resid_post": iv}).shape
    (3, 3)
    """
    if not isinstance(sae, SAE) or sae.W_dec.ndim != 2:
        raise ValueError("sae must be one sfpjax.SAE (vmap over a stack rather than passing it whole).")
    return Intervention(_splice, sae, _check_mask(position_mask))


def zero_ablation(*, position_mask: Bool[ArrayLike, " seq"] | None = None) -> Intervention:
    """An intervention setting the activation to 0 at the masked positions (all by default).

    >>> import jax.numpy as jnp, sfpjax
    >>> sfpjax.zero_ablation().apply("blocks.0.hook_resid_post", jnp.ones((2, 3))).tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    return Intervention(_zero, None, _check_mask(position_mask))


class _Logits(eqx.Module):
    """Precomputed logits posing as a model, so ``per_position_loss`` scores them."""

    logits: Array
    config: object = eqx.field(static=True)

    def batched(self, tokens):
        return self.logits


class SpliceMetrics(NamedTuple):
    """Downstream metrics of splicing an SAE into the forward pass (module docstring).

    Attributes:
        ce_clean: mean next-token cross-entropy of the unmodified model (nats).
        ce_spliced: the same with the SAE reconstruction spliced in.
        ce_zero_ablation: the same with the site's activation set to 0.
        ce_loss_recovered: ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)``.
        kl_spliced: mean ``KL(clean || spliced)`` of the next-token distributions.
        kl_zero_ablation: mean ``KL(clean || zero-ablated)``.
    """

    ce_clean: Float[Array, ""]
    ce_spliced: Float[Array, ""]
    ce_zero_ablation: Float[Array, ""]
    ce_loss_recovered: Float[Array, ""]
    kl_spliced: Float[Array, ""]
    kl_zero_ablation: Float[Array, ""]


def splice_metrics(
    model: Transformer,
    sae: SAE,
    tokens: Int[ArrayLike, "batch seq"],
    site: str,
    *,
    position_mask: Bool[ArrayLike, " seq_out"] | None = None,
) -> SpliceMetrics:
    """Cross-entropy loss recovered and KL to the clean model when ``sae`` is spliced in at ``site``.

    Scored positions and losses are those of training (``per_position_loss``): the mean
    over every sequence of ``tokens`` and every position that predicts a token of the
    input. The reconstruction (and the zero-ablation baseline) replace the activation at
    the positions of ``position_mask`` (all by default); the KL is averaged over the same
    scored positions as the loss.

    Args:
        model: a :class:`Transformer`.
        sae: an :class:`SAE` trained on ``site`` (``d_in`` = the site's width).
        tokens: ``(batch, L)`` evaluation sequences.
        site: the activation site, e.g. ``"blocks.0.hook_resid_post"``.
        position_mask: boolean ``(seq_out,)`` of positions to splice (BOS first).

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> sae = sfpjax.SAE(sfpjax.SAEConfig(d_in=16, d_sae=32, k=4), key=jr.key(1))
    >>> m = sfpjax.splice_metrics(model, sae, jnp.zeros((2, 6), jnp.int32), "blocks.0.hook_resid_post")
    >>> m.ce_clean.shape
    ()
    """
    if not isinstance(model, Transformer):
        raise ValueError(f"model must be an sfpjax.Transformer, got {type(model).__name__}.")
    if not isinstance(site, str) or site not in model.site_names:
        raise ValueError(
            f"Unknown site {site!r}; valid sites of this {model.config.n_layers}-layer model: "
            f"{list(model.site_names)}."
        )
    if not isinstance(sae, SAE) or sae.W_dec.ndim != 2:
        raise ValueError("sae must be one sfpjax.SAE (vmap over a stack rather than passing it whole).")
    width = model.config.d_mlp if site.endswith("mlp.hook_post") else model.config.d_model
    if site.endswith("attn.hook_pattern"):
        raise ValueError(f"site {site!r} is an attention pattern; splice SAEs into residual or MLP sites.")
    if sae.d_in != width:
        raise ValueError(
            f"the SAE reads activations of width d_in={sae.d_in} but site {site!r} has width {width}; train the "
            f"SAE on this site's activations."
        )
    tokens = jnp.asarray(tokens)
    return _splice_metrics(model, sae, tokens, site, _check_mask(position_mask))


@eqx.filter_jit
def _splice_metrics(model, sae, tokens, site, position_mask):
    variants = {
        "clean": {},
        "spliced": {site: sae_intervention(sae, position_mask=position_mask)},
        "zero": {site: zero_ablation(position_mask=position_mask)},
    }
    logits = {name: model.batched(tokens, interventions=ivs) for name, ivs in variants.items()}
    ce = {name: jnp.mean(per_position_loss(_Logits(lg, model.config), tokens)) for name, lg in logits.items()}
    # The scored positions: every output position but the last (it predicts past the input).
    probs = {name: jax.nn.softmax(lg[:, :-1], axis=-1) for name, lg in logits.items()}
    kl_spliced = jnp.mean(kl_divergence(probs["clean"], probs["spliced"]))
    kl_zero = jnp.mean(kl_divergence(probs["clean"], probs["zero"]))
    recovered = (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"])
    return SpliceMetrics(ce["clean"], ce["spliced"], ce["zero"], recovered, kl_spliced, kl_zero)
