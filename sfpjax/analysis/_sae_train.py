"""Training sparse autoencoders on cached activations, one or a stack in one compiled program.

The loss, the AuxK term, the decoder-gradient projection and the unit-norm renormalization
are described in `sfpjax.analysis._sae` (the SAE module docstring).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, ArrayLike, Float, Key, PRNGKeyArray, UInt32

from ._sae import SAE, SAEConfig, n_keys, positive_float, positive_int, threshold_step

__all__ = ["SAETrainConfig", "SAETrainResult", "train_sae", "train_sae_stack"]


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    """How to train an SAE on cached activations.

    Args:
        steps: Adam steps.
        batch_size: rows per step, drawn uniformly with replacement from the cached rows
            (batch of step ``s`` from ``fold_in(key, s)``).
        learning_rate: Adam learning rate (constant).
        init_b_dec: ``"mean"`` starts ``b_dec`` at the mean of the cached rows (SAELens'
            option of that name), ``"zeros"`` leaves it at 0.

    >>> import sfpjax
    >>> sfpjax.SAETrainConfig(steps=100, batch_size=64).learning_rate
    0.001
    """

    steps: int = 1000
    batch_size: int = 256
    learning_rate: float = 1e-3
    init_b_dec: str = "mean"

    def __post_init__(self):
        positive_int("steps", self.steps)
        positive_int("batch_size", self.batch_size)
        positive_float("learning_rate", self.learning_rate)
        if self.init_b_dec not in ("mean", "zeros"):
            raise ValueError(f"init_b_dec must be 'mean' or 'zeros', got {self.init_b_dec!r}.")


class SAETrainResult(NamedTuple):
    """A trained SAE (or stack) and its per-step training curves (shape ``(*K, steps)``).

    Attributes:
        sae: the trained SAE.
        loss: total loss of each step's batch (reconstruction + auxiliary terms).
        mse: ``mean_rows ||x - x_hat||^2`` of each step's batch.
        aux_loss: AuxK loss (TopK / BatchTopK) or ``L0`` of the batch (JumpReLU), before its
            coefficient.
        dead_fraction: fraction of the latents in use that were dead (not fired for
            ``dead_window`` steps) at each step.
    """

    sae: SAE
    loss: Float[Array, "*K steps"]
    mse: Float[Array, "*K steps"]
    aux_loss: Float[Array, "*K steps"]
    dead_fraction: Float[Array, "*K steps"]


def _batch_topk(sae: SAE, H):
    """Training-mode BatchTopK latents of ``H`` ``(n, d_sae)`` and the batch threshold."""
    n = H.shape[0]
    R = jnp.where(sae.latent_mask[None, :], jax.nn.relu(H), 0.0)
    vals = jax.lax.top_k(R.reshape(-1), n * sae.config.k)[0]
    kept = jnp.arange(n * sae.config.k, dtype=jnp.int32) < n * sae.k
    kth = jnp.take(vals, n * sae.k - 1)
    z = jnp.where((R >= kth) & (R > 0), R, 0.0).astype(H.dtype)
    smallest = jnp.min(jnp.where(kept & (vals > 0), vals, jnp.inf))
    return z, smallest


def _latents_train(sae: SAE, H):
    if sae.config.kind == "batchtopk":
        return _batch_topk(sae, H)
    return sae._sigma_rows(H), jnp.zeros((), H.dtype)


def _auxk(sae: SAE, H, residual, dead):
    cfg = sae.config
    n_dead = jnp.sum(dead)
    vals = jax.lax.top_k(jnp.where(dead[None, :], H, -jnp.inf), cfg.aux_k)[0]
    kth = jnp.take(vals, jnp.clip(jnp.minimum(cfg.aux_k, n_dead), 1) - 1, axis=1)[:, None]
    z_aux = jnp.where(dead[None, :] & (H >= kth), H, 0.0).astype(H.dtype)
    err = residual - z_aux @ sae.W_dec
    scale = jnp.minimum(n_dead / cfg.aux_k, 1.0).astype(H.dtype)
    return scale * jnp.mean(jnp.sum(err * err, axis=-1))


def _loss(sae: SAE, X, dead):
    cfg = sae.config
    H = sae._pre_rows(X)
    z, smallest = _latents_train(sae, H)
    X_hat = z @ sae.W_dec + sae.b_dec[None, :]
    err = X - X_hat
    mse = jnp.mean(jnp.sum(err * err, axis=-1))
    if cfg.kind == "jumprelu":
        theta = jnp.broadcast_to(jnp.exp(sae.log_threshold)[None, :], H.shape)
        on = jnp.where(sae.latent_mask[None, :], threshold_step(H, theta, cfg.bandwidth), 0.0)
        aux = jnp.mean(jnp.sum(on, axis=-1))
        total = mse + cfg.l0_coef * aux
    else:
        aux = _auxk(sae, H, jax.lax.stop_gradient(err), dead)
        total = mse + cfg.aux_coef * aux
    fired = jnp.any(z > 0, axis=0)
    return total, (mse, aux, fired, smallest)


def _train_one(sae: SAE, acts, key, tcfg: SAETrainConfig):
    cfg = sae.config
    dtype = sae.W_dec.dtype
    X_all = acts.astype(dtype)
    if tcfg.init_b_dec == "mean":
        sae = eqx.tree_at(lambda s: s.b_dec, sae, jnp.mean(X_all, axis=0))
    params, static = eqx.partition(sae, eqx.is_inexact_array)
    optimizer = optax.adam(tcfg.learning_rate)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(params)
    n_rows = X_all.shape[0]
    n_used = jnp.maximum(jnp.sum(sae.latent_mask), 1)

    def step(carry, s):
        params, opt_state, since = carry
        batch_key = jr.fold_in(key, s)
        X = X_all[jr.randint(batch_key, (tcfg.batch_size,), 0, n_rows)]
        dead = (since >= cfg.dead_window) & sae.latent_mask

        def objective(p):
            return _loss(eqx.combine(p, static), X, dead)

        (total, (mse, aux, fired, smallest)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        W = params.W_dec
        g = grads.W_dec
        grads = eqx.tree_at(lambda t: t.W_dec, grads, g - jnp.sum(g * W, axis=-1, keepdims=True) * W)
        grads = eqx.tree_at(lambda t: t.batch_threshold, grads, jnp.zeros_like(grads.batch_threshold))
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        W = params.W_dec
        params = eqx.tree_at(lambda t: t.W_dec, params, W / jnp.linalg.norm(W, axis=-1, keepdims=True))
        if cfg.kind == "batchtopk":
            old = params.batch_threshold
            ema = cfg.threshold_decay * old + (1.0 - cfg.threshold_decay) * smallest
            new = jnp.where(jnp.isfinite(smallest), jnp.where(s == 0, smallest, ema), old).astype(dtype)
            params = eqx.tree_at(lambda t: t.batch_threshold, params, new)
        since = jnp.where(fired, 0, since + 1)
        dead_fraction = jnp.sum(dead) / n_used
        return (params, opt_state, since), (total, mse, aux, dead_fraction.astype(dtype))

    since0 = jnp.zeros((cfg.d_sae,), jnp.int32)
    (params, _, _), curves = jax.lax.scan(step, (params, opt_state, since0), jnp.arange(tcfg.steps))
    return SAETrainResult(eqx.combine(params, static), *curves)


def _check_acts(acts, config: SAEConfig, stacked_K: int | None, fn: str):
    acts = jnp.asarray(acts)
    ok_ndim = (2,) if stacked_K is None else (2, 3)
    if acts.ndim not in ok_ndim or acts.shape[-1] != config.d_in:
        want = "(n, d_in)" if stacked_K is None else "(n, d_in) shared or (K, n, d_in) one set per SAE"
        raise ValueError(
            f"{fn}: activations must have shape {want} with d_in={config.d_in} (the SAE's input width), got "
            f"{acts.shape}; flatten (batch, seq, d) activations with site_activations or reshape(-1, d)."
        )
    if acts.ndim == 3 and acts.shape[0] != stacked_K:
        raise ValueError(f"{fn}: per-SAE activations need a leading axis of K={stacked_K}, got {acts.shape}.")
    if acts.shape[-2] == 0:
        raise ValueError(f"{fn}: got no activation rows.")
    if not jnp.issubdtype(acts.dtype, jnp.floating):
        raise ValueError(f"{fn}: activations must be a float array, got {acts.dtype}.")
    return acts


@eqx.filter_jit
def _train_jit(sae, acts, key, tcfg):
    return _train_one(sae, acts, key, tcfg)


@eqx.filter_jit
def _train_stack_jit(saes, acts, keys, tcfg, per_sae_acts):
    one = lambda s, a, k: _train_one(s, a, k, tcfg)  # noqa: E731
    return eqx.filter_vmap(one, in_axes=(0, 0 if per_sae_acts else None, 0))(saes, acts, keys)


def train_sae(
    sae: SAE,
    acts: Float[ArrayLike, "n d_in"],
    config: SAETrainConfig,
    *,
    key: PRNGKeyArray,
) -> SAETrainResult:
    """Train one SAE with Adam on cached activation rows, in one compiled ``lax.scan``.

    Args:
        sae: the initial :class:`SAE`.
        acts: cached activations ``(n, d_in)`` of one site (``site_activations``).
        config: an :class:`SAETrainConfig`.
        key: PRNG key for the batches.

    Returns:
        :class:`SAETrainResult` with the trained SAE and per-step curves.

    >>> import jax.random as jr, sfpjax
    >>> sae = sfpjax.SAE(sfpjax.SAEConfig(d_in=4, d_sae=16, k=2), key=jr.key(0))
    >>> acts = jr.normal(jr.key(1), (128, 4))
    >>> res = sfpjax.train_sae(sae, acts, sfpjax.SAETrainConfig(steps=20, batch_size=32), key=jr.key(2))
    >>> res.loss.shape
    (20,)
    """
    if not isinstance(sae, SAE):
        raise ValueError(f"sae must be an sfpjax.SAE, got {type(sae).__name__}.")
    if sae.W_dec.ndim != 2:
        raise ValueError(f"sae is a stack of {sae.W_dec.shape[0]} SAEs; train it with train_sae_stack.")
    if not isinstance(config, SAETrainConfig):
        raise ValueError(f"config must be an SAETrainConfig, got {type(config).__name__}.")
    acts = _check_acts(acts, sae.config, None, "train_sae")
    return _train_jit(sae, acts, key, config)


def train_sae_stack(
    saes: SAE,
    acts: Float[ArrayLike, "n d_in"] | Float[ArrayLike, "K n d_in"],
    config: SAETrainConfig,
    *,
    keys: Key[Array, " K"] | UInt32[Array, "K 2"],
) -> SAETrainResult:
    """Train a stack of ``K`` SAEs (``sae_stack``) in one compiled program (``vmap`` of ``train_sae``).

    Entry ``i`` of the result equals ``train_sae(saes[i], acts(_i), config, key=keys[i])``.

    Args:
        saes: a stack from :func:`sae_stack`.
        acts: ``(n, d_in)`` rows shared by every SAE, or ``(K, n, d_in)`` one set per SAE
            (e.g. the same site of K models).
        config: an :class:`SAETrainConfig` (shared).
        keys: ``(K,)`` PRNG keys for the batches, one per SAE.

    >>> import jax.random as jr, sfpjax
    >>> stack = sfpjax.sae_stack(sfpjax.SAEConfig(d_in=4, d_sae=16, k=2), jr.split(jr.key(0), 3))
    >>> acts = jr.normal(jr.key(1), (128, 4))
    >>> res = sfpjax.train_sae_stack(stack, acts, sfpjax.SAETrainConfig(steps=20, batch_size=32),
    ...                              keys=jr.split(jr.key(2), 3))
    >>> res.mse.shape
    (3, 20)
    """
    if not isinstance(saes, SAE) or saes.W_dec.ndim != 3:
        raise ValueError("saes must be a stack of SAEs from sae_stack (W_dec of shape (K, d_sae, d_in)).")
    if not isinstance(config, SAETrainConfig):
        raise ValueError(f"config must be an SAETrainConfig, got {type(config).__name__}.")
    K = saes.W_dec.shape[0]
    if n_keys(keys, "train_sae_stack") != K:
        raise ValueError(f"train_sae_stack: keys must hold {K} PRNG keys, one per SAE (jr.split(key, {K})).")
    acts = _check_acts(acts, saes.config, K, "train_sae_stack")
    return _train_stack_jit(saes, acts, keys, config, acts.ndim == 3)

