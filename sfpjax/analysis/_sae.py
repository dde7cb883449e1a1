"""Sparse autoencoders (SAEs) on cached activations of one site of a transformer.

An SAE rewrites an activation ``x`` (a row of the residual stream at one site, width
``d_in``) as a sparse non-negative combination of ``d_sae`` dictionary atoms:

* pre-activations ``h = (x - b_dec) W_enc + b_enc`` (``b_dec`` is the pre-encoder bias:
  it is subtracted before encoding and added back after decoding);
* latents ``z = sigma(h)``, sparse and non-negative (``sigma`` below);
* reconstruction ``x_hat = z W_dec + b_dec``; the rows of ``W_dec`` (the decoder columns
  in the ``x = D z`` convention) are the dictionary atoms, kept at unit Euclidean norm
  throughout training.

Activations ``sigma`` (``SAEConfig.kind``), as in SAELens and dictionary_learning:

* ``"topk"`` (Gao et al. 2024): the ``k`` largest pre-activations of each row, ReLU-ed;
  all others 0.
* ``"batchtopk"`` (Bussmann et al. 2024): in training, the ``batch * k`` largest ReLU-ed
  pre-activations of the whole batch (so ``k`` per row on average); at inference a
  single threshold ``theta``, ``z_i = h_i [h_i > theta]``, with ``theta`` the running
  mean (decay ``threshold_decay``) over training steps of the smallest positive
  activation the batch kept (0 before training: every positive pre-activation fires).
* ``"jumprelu"`` (Rajamanoharan et al. 2024): ``z_i = h_i [h_i > theta_i]`` with one
  learned threshold per latent (stored as ``log theta``), trained through
  straight-through estimators with a rectangle kernel of width ``bandwidth``, and an
  ``L0`` penalty ``l0_coef * sum_i [h_i > theta_i]`` instead of a fixed ``k``.

Training loss per batch of ``n`` rows: ``mean_rows ||x - x_hat||^2`` (squared error summed
over the ``d_in`` dimensions) plus, for TopK and BatchTopK, ``aux_coef`` times the AuxK
loss of Gao et al.: latents that have not fired for ``dead_window`` steps are *dead*;
the ``k_aux = min(aux_k, #dead)`` largest dead pre-activations of each row reconstruct the
residual ``e = x - x_hat`` (held fixed), ``||e - z_aux W_dec||^2``, scaled by
``min(#dead / aux_k, 1)`` (SAELens). Before every Adam update the component of each
decoder gradient row parallel to its atom is removed, and after it each atom is
renormalized to unit norm.

Stacks of ``K`` SAEs train as one compiled program (``train_sae_stack``): they share the
static config (``d_sae`` is the widest dictionary, ``k`` the largest k) and differ in
arrays: their initialization and training keys, their active ``k`` (an array field) and
their ``latent_mask`` (a narrower dictionary is the wide one with latents masked off).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Key, PRNGKeyArray, UInt32

from ..model._transformer import Transformer

__all__ = [
    "SAE",
    "SAEConfig",
    "sae_stack",
    "site_activations",
]

_KINDS = ("topk", "batchtopk", "jumprelu")


def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Shape and training objective of an :class:`SAE` (static: shared by a whole stack).

    Args:
        d_in: width of the activations (``d_model`` for residual-stream sites).
        d_sae: number of latents (dictionary atoms); in a stack, the widest dictionary.
        kind: ``"topk"``, ``"batchtopk"`` or ``"jumprelu"`` (module docstring).
        k: active latents per row for TopK / BatchTopK; in a stack, the largest ``k`` (each
            SAE's own ``k`` is an array field, at most this). Ignored by JumpReLU.
        aux_k: latents used by the AuxK loss; ``None`` means ``d_in // 2`` (Gao et al.,
            SAELens), capped at ``d_sae``.
        aux_coef: weight of the AuxK loss (Gao et al. use 1/32); 0 turns it off.
        dead_window: a latent that has not fired in this many training steps is dead.
        l0_coef: JumpReLU sparsity coefficient ``lambda`` of ``lambda * L0``.
        bandwidth: JumpReLU straight-through kernel width ``epsilon``.
        init_threshold: JumpReLU initial threshold ``theta``. These three depend on the
            scale of the activations; the defaults suit rows of norm about 1 (on synthetic
            data with 3 active atoms of 32 they give ``L0`` about 5). Gemma Scope uses
            ``epsilon = 0.001`` on activations normalized to norm ``sqrt(d_in)``.
        threshold_decay: BatchTopK: decay of the running mean giving the inference threshold.

    >>> import sfpjax
    >>> sfpjax.SAEConfig(d_in=16, d_sae=64, k=4).aux_k
    8
    """

    d_in: int
    d_sae: int
    kind: str = "topk"
    k: int = 8
    aux_k: int | None = None
    aux_coef: float = 1.0 / 32.0
    dead_window: int = 100
    l0_coef: float = 0.05
    bandwidth: float = 0.1
    init_threshold: float = 0.2
    threshold_decay: float = 0.99

    def __post_init__(self):
        for name in ("d_in", "d_sae", "k", "dead_window"):
            positive_int(name, getattr(self, name))
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}.")
        if self.k > self.d_sae:
            raise ValueError(
                f"k={self.k} is larger than the dictionary (d_sae={self.d_sae}); a TopK SAE keeps at most "
                f"d_sae latents per row: lower k or widen d_sae."
            )
        if self.aux_k is None:
            object.__setattr__(self, "aux_k", max(1, min(self.d_in // 2, self.d_sae)))
        positive_int("aux_k", self.aux_k)
        if self.aux_k > self.d_sae:
            raise ValueError(f"aux_k={self.aux_k} is larger than the dictionary (d_sae={self.d_sae}).")
        if isinstance(self.aux_coef, bool) or not isinstance(self.aux_coef, (int, float)) or self.aux_coef < 0:
            raise ValueError(f"aux_coef must be a non-negative number, got {self.aux_coef!r}.")
        if isinstance(self.l0_coef, bool) or not isinstance(self.l0_coef, (int, float)) or self.l0_coef < 0:
            raise ValueError(f"l0_coef must be a non-negative number, got {self.l0_coef!r}.")
        positive_float("bandwidth", self.bandwidth)
        positive_float("init_threshold", self.init_threshold)
        if not (isinstance(self.threshold_decay, (int, float)) and 0.0 <= self.threshold_decay < 1.0):
            raise ValueError(f"threshold_decay must lie in [0, 1), got {self.threshold_decay!r}.")


# ---------------------------------------------------------------------------------------
# JumpReLU with straight-through gradients for the threshold (Rajamanoharan et al. 2024)


def _rectangle(u):
    return jnp.where(jnp.abs(u) < 0.5, 1.0, 0.0).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _jumprelu(h, theta, bandwidth):
    return jnp.where(h > theta, h, 0.0).astype(h.dtype)


def _jumprelu_fwd(h, theta, bandwidth):
    return _jumprelu(h, theta, bandwidth), (h, theta)


def _jumprelu_bwd(bandwidth, res, g):
    h, theta = res
    dh = jnp.where(h > theta, g, 0.0).astype(g.dtype)
    dtheta = -(theta / bandwidth) * _rectangle((h - theta) / bandwidth) * g
    return dh, dtheta


_jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def threshold_step(h, theta, bandwidth):
    return jnp.where(h > theta, 1.0, 0.0).astype(h.dtype)


def _step_fwd(h, theta, bandwidth):
    return threshold_step(h, theta, bandwidth), (h, theta)


def _step_bwd(bandwidth, res, g):
    h, theta = res
    return jnp.zeros_like(h), -(1.0 / bandwidth) * _rectangle((h - theta) / bandwidth) * g


threshold_step.defvjp(_step_fwd, _step_bwd)


# ---------------------------------------------------------------------------------------
# The module


class SAE(eqx.Module):
    """A sparse autoencoder ``x -> z -> x_hat`` (module docstring for the maths).

    Args:
        config: an :class:`SAEConfig`.
        key: PRNG key for the initialization: atoms (rows of ``W_dec``) drawn uniformly on
            the unit sphere, ``W_enc = W_dec^T`` (tied initialization), biases 0, JumpReLU
            thresholds ``init_threshold``.
        k: this SAE's active ``k`` (``1 .. config.k``); ``None`` means ``config.k``.
        n_latents: use only the first ``n_latents`` latents (the rest are masked off and
            never fire); ``None`` means all ``d_sae``. Lets SAEs of several sizes share one
            stack.
        dtype: float dtype of the parameters (float32 by default).

    Attributes:
        W_enc: ``(d_in, d_sae)`` encoder.
        b_enc: ``(d_sae,)`` encoder bias.
        W_dec: ``(d_sae, d_in)`` decoder; row ``i`` is atom ``i`` (unit norm).
        b_dec: ``(d_in,)`` pre-encoder / decoder bias.
        log_threshold: ``(d_sae,)`` JumpReLU ``log theta_i`` (unused by the other kinds).
        batch_threshold: BatchTopK inference threshold (unused by the other kinds).
        k: active latents per row (TopK / BatchTopK), an int array so stacks may differ.
        latent_mask: ``(d_sae,)`` bool, the latents in use.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> sae = sfpjax.SAE(sfpjax.SAEConfig(d_in=4, d_sae=16, k=2), key=jr.key(0))
    >>> z = sae.encode(jnp.ones((3, 4)))
    >>> z.shape, int((z[0] > 0).sum()) <= 2, sae.decode(z).shape
    ((3, 16), True, (3, 4))
    """

    config: SAEConfig = eqx.field(static=True)
    W_enc: Float[Array, "d_in d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_in"]
    b_dec: Float[Array, " d_in"]
    log_threshold: Float[Array, " d_sae"]
    batch_threshold: Float[Array, ""]
    k: Int[Array, ""]
    latent_mask: Bool[Array, " d_sae"]

    def __init__(
        self,
        config: SAEConfig,
        *,
        key: PRNGKeyArray,
        k: int | Int[ArrayLike, ""] | None = None,
        n_latents: int | Int[ArrayLike, ""] | None = None,
        dtype=jnp.float32,
    ):
        if not isinstance(config, SAEConfig):
            raise ValueError(f"config must be an SAEConfig, got {type(config).__name__}.")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"dtype must be a float dtype, got {dtype}.")
        k = config.k if k is None else k
        n_latents = config.d_sae if n_latents is None else n_latents
        if not isinstance(k, jax.core.Tracer) and not isinstance(n_latents, jax.core.Tracer):
            _check_sizes(config, np.asarray(k), np.asarray(n_latents))
        arrays = _init_arrays(config, key, jnp.asarray(k, jnp.int32), jnp.asarray(n_latents, jnp.int32), dtype)
        self.config = config
        (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.log_threshold, self.batch_threshold,
         self.k, self.latent_mask) = arrays

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    def _check_input(self, x, fn):
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.config.d_in:
            raise ValueError(
                f"SAE.{fn}: activations must have shape (..., d_in={self.config.d_in}) (the width the SAE "
                f"was built for), got {x.shape}; encode activations of the site the SAE was trained on."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"SAE.{fn}: activations must be a float array, got {x.dtype}.")
        return x.astype(self.W_enc.dtype)

    def _pre_rows(self, X):
        return (X - self.b_dec[None, :]) @ self.W_enc + self.b_enc[None, :]

    def pre_activations(self, x: Float[ArrayLike, "*batch d_in"]) -> Float[Array, "*batch d_sae"]:
        """``h = (x - b_dec) W_enc + b_enc`` for activations of any leading shape."""
        x = self._check_input(x, "pre_activations")
        return _pre_jit(self, x)

    def _sigma_rows(self, H):
        """Inference-mode latents of pre-activations ``H`` ``(n, d_sae)``."""
        kind = self.config.kind
        mask = self.latent_mask[None, :]
        if kind == "topk":
            vals = jax.lax.top_k(jnp.where(mask, H, -jnp.inf), self.config.k)[0]
            kth = jnp.take(vals, self.k - 1, axis=1)[:, None]
            z = jnp.where(mask & (H >= kth), jax.nn.relu(H), 0.0)
        elif kind == "batchtopk":
            z = jnp.where(mask & (H > self.batch_threshold), jax.nn.relu(H), 0.0)
        else:
            theta = jnp.broadcast_to(jnp.exp(self.log_threshold)[None, :], H.shape)
            z = jnp.where(mask, _jumprelu(H, theta, self.config.bandwidth), 0.0)
        return z.astype(H.dtype)

    def encode(self, x: Float[ArrayLike, "*batch d_in"]) -> Float[Array, "*batch d_sae"]:
        """Latents ``z`` of activations of any leading shape (inference mode).

        TopK keeps each row's ``k`` largest pre-activations; BatchTopK applies its learned
        threshold (so a row may have more or fewer than ``k`` active latents); JumpReLU its
        per-latent thresholds. Masked-off latents are 0.
        """
        x = self._check_input(x, "encode")
        return _encode_jit(self, x)

    def decode(self, z: Float[ArrayLike, "*batch d_sae"]) -> Float[Array, "*batch d_in"]:
        """``x_hat = z W_dec + b_dec``."""
        z = jnp.asarray(z)
        if z.ndim < 1 or z.shape[-1] != self.d_sae:
            raise ValueError(f"SAE.decode: latents must have shape (..., d_sae={self.d_sae}), got {z.shape}.")
        return _decode_jit(self, z.astype(self.W_dec.dtype))

    def __call__(self, x: Float[ArrayLike, "*batch d_in"]) -> Float[Array, "*batch d_in"]:
        """The reconstruction ``x_hat = decode(encode(x))``."""
        return self.decode(self.encode(x))


# Jitted at the public boundary: eager, every operation would compile on its own.
@eqx.filter_jit
def _pre_jit(sae: SAE, x):
    lead = x.shape[:-1]
    return sae._pre_rows(x.reshape(-1, sae.d_in)).reshape(*lead, sae.d_sae)


@eqx.filter_jit
def _encode_jit(sae: SAE, x):
    lead = x.shape[:-1]
    return sae._sigma_rows(sae._pre_rows(x.reshape(-1, sae.d_in))).reshape(*lead, sae.d_sae)


@eqx.filter_jit
def _decode_jit(sae: SAE, z):
    lead = z.shape[:-1]
    out = z.reshape(-1, sae.d_sae) @ sae.W_dec + sae.b_dec[None, :]
    return out.reshape(*lead, sae.d_in)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _init_arrays(config: SAEConfig, key, k, n_latents, dtype):
    atoms = jr.normal(key, (config.d_sae, config.d_in), dtype)
    atoms = atoms / jnp.linalg.norm(atoms, axis=-1, keepdims=True)
    return (
        atoms.T,
        jnp.zeros((config.d_sae,), dtype),
        atoms,
        jnp.zeros((config.d_in,), dtype),
        jnp.full((config.d_sae,), math.log(config.init_threshold), dtype),
        jnp.zeros((), dtype),
        k,
        jnp.arange(config.d_sae, dtype=jnp.int32) < n_latents,
    )


def _check_sizes(config: SAEConfig, k: np.ndarray, n_latents: np.ndarray):
    for name, v in (("k", k), ("n_latents", n_latents)):
        if not np.issubdtype(v.dtype, np.integer) or np.any(v < 1):
            raise ValueError(f"{name} must be positive integers, got {v.tolist()}.")
    if np.any(n_latents > config.d_sae):
        raise ValueError(f"n_latents {n_latents.tolist()} exceeds the dictionary width d_sae={config.d_sae}.")
    if config.kind != "jumprelu":
        if np.any(k > config.k):
            raise ValueError(
                f"k {k.tolist()} exceeds config.k={config.k}, the largest k the config compiles for; raise "
                f"config.k."
            )
        if np.any(k > n_latents):
            raise ValueError(
                f"k {k.tolist()} is larger than the dictionary ({n_latents.tolist()} latents in use); lower k "
                f"or use more latents."
            )


def n_keys(keys, fn: str) -> int:
    keys = jnp.asarray(keys)
    typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if (typed and keys.ndim != 1) or (not typed and (keys.ndim != 2 or keys.shape[-1] != 2)):
        raise ValueError(f"{fn}: keys must be a stack of K PRNG keys (jr.split(key, K)), got shape {keys.shape}.")
    return int(keys.shape[0])


def sae_stack(
    config: SAEConfig,
    keys: Key[Array, " K"] | UInt32[Array, "K 2"],
    *,
    k: Int[ArrayLike, " K"] | Sequence[int] | None = None,
    n_latents: Int[ArrayLike, " K"] | Sequence[int] | None = None,
    dtype=jnp.float32,
) -> SAE:
    """``K`` SAEs stacked along a leading axis (one per key): train them with ``train_sae_stack``.

    Entry ``i`` equals ``SAE(config, key=keys[i], k=k[i], n_latents=n_latents[i])``.

    Args:
        config: shared static config (``d_sae`` the widest dictionary, ``k`` the largest k).
        keys: ``(K,)`` PRNG keys, e.g. ``jr.split(key, K)``.
        k: ``(K,)`` active k of each SAE; ``None`` gives every SAE ``config.k``.
        n_latents: ``(K,)`` dictionary size of each SAE; ``None`` gives every SAE ``d_sae``.
        dtype: parameter dtype.

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.SAEConfig(d_in=4, d_sae=32, k=4)
    >>> stack = sfpjax.sae_stack(cfg, jr.split(jr.key(0), 3), k=[1, 2, 4], n_latents=[8, 16, 32])
    >>> stack.W_dec.shape, stack.latent_mask.sum(-1).tolist()
    ((3, 32, 4), [8, 16, 32])
    """
    K = n_keys(keys, "sae_stack")
    ks = np.full((K,), config.k) if k is None else np.asarray(k)
    ns = np.full((K,), config.d_sae) if n_latents is None else np.asarray(n_latents)
    for name, v in (("k", ks), ("n_latents", ns)):
        if v.shape != (K,):
            raise ValueError(f"{name} must have one entry per key, shape ({K},), got {v.shape}.")
    _check_sizes(config, ks, ns)
    build = lambda key, kk, nn: SAE(config, key=key, k=kk, n_latents=nn, dtype=dtype)  # noqa: E731
    return eqx.filter_vmap(build)(keys, jnp.asarray(ks, jnp.int32), jnp.asarray(ns, jnp.int32))


# ---------------------------------------------------------------------------------------
# Activations of a site


def site_activations(
    model: Transformer,
    tokens: Int[ArrayLike, "batch seq"],
    site: str,
    *,
    position_mask: Bool[ArrayLike, " seq_out"] | None = None,
) -> Float[Array, "rows d_site"]:
    """The activations of ``site`` for every sequence and position, one row each.

    Runs ``model.batched(tokens, sites=[site])`` and flattens ``(batch, seq_out, d)`` into
    ``(batch * n_positions, d)`` rows (sequence-major), keeping only the positions where
    ``position_mask`` is ``True`` (``seq_out = seq + use_bos`` entries, BOS first; e.g.
    drop the BOS position, whose activation is the same in every sequence).

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> model = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, d_model=16), key=jr.key(0))
    >>> sfpjax.site_activations(model, jnp.zeros((5, 8), jnp.int32), "blocks.0.hook_resid_post").shape
    (40, 16)
    """
    _check_site(model, site)
    tokens = jnp.asarray(tokens)
    _, acts = _run_sites(model, tokens, (site,))
    a = acts[site]
    if a.ndim != 3:
        raise ValueError(
            f"site {site!r} has activations of shape {a.shape[1:]} per sequence; SAEs read (seq, width) sites "
            f"such as hook_resid_post, hook_mlp_out or mlp.hook_post."
        )
    if position_mask is not None:
        m = np.asarray(position_mask)
        if m.shape != (a.shape[1],) or m.dtype != np.bool_:
            raise ValueError(
                f"position_mask must be a bool array of shape ({a.shape[1]},) (one entry per model position), "
                f"got {m.dtype}{list(m.shape)}."
            )
        a = a[:, np.flatnonzero(m)]
    return a.reshape(-1, a.shape[-1])


@eqx.filter_jit
def _run_sites(model, tokens, sites):
    return model.batched(tokens, sites=sites)


def _check_site(model, site):
    if not isinstance(model, Transformer):
        raise ValueError(f"model must be an sfpjax.Transformer, got {type(model).__name__}.")
    if not isinstance(site, str) or site not in model.site_names:
        raise ValueError(
            f"Unknown site {site!r}; valid sites of this {model.config.n_layers}-layer model: "
            f"{list(model.site_names)}."
        )
