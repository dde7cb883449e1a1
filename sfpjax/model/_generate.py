"""Autoregressive sampling from a transformer, with log-probabilities under a reference model.

A *rollout* extends each prompt ``x_1 .. x_P`` by ``N`` new tokens ``y_1 .. y_N`` drawn one at
a time from the policy ``pi_tau(y | h) = softmax(logits(h) / tau)``, where ``h`` is the prompt
followed by the tokens drawn so far and ``tau`` the temperature. The model reads a fixed
buffer of ``P + N`` tokens at every draw: causal attention makes the logits at a position
independent of the (not yet drawn) tokens after it, so the buffer's tail is never read.

Which logit row predicts which token follows the model's belief alignment (see
``Transformer``): with BOS, row ``t`` has read ``x_1 .. x_t`` and predicts token ``t + 1``,
so a prompt may be empty; without BOS, row ``t`` has read ``x_1 .. x_{t+1}``, so the prompt
needs at least one token.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

__all__ = ["Rollout", "completion_log_probs", "generate", "sample_completions"]


class Rollout(NamedTuple):
    """Prompts, the drawn completions and their log-probabilities (one row per sequence).

    Attributes:
        prompts: ``(B, P)`` the prompts ``x_1 .. x_P``.
        completions: ``(B, N)`` the drawn tokens ``y_1 .. y_N``.
        log_probs: ``(B, N)`` ``log pi_tau(y_n | x, y_<n)`` under the policy.
        ref_log_probs: ``(B, N)`` the same under the reference model (same temperature), or
            ``None`` without a reference.
        entropy: ``(B, N)`` the entropy ``H(pi_tau(. | x, y_<n))`` of each draw's law, nats.
    """

    prompts: Int[Array, "B P"]
    completions: Int[Array, "B N"]
    log_probs: Float[Array, "B N"]
    ref_log_probs: Float[Array, "B N"] | None
    entropy: Float[Array, "B N"]


def _config(model):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise ValueError(
            f"the model must carry a TransformerConfig as .config (a sfpjax.Transformer or a "
            f"wrapper exposing one); got {type(model).__name__}."
        )
    return config


def _logits(model, tokens):
    batched = getattr(model, "batched", None)
    return batched(tokens) if batched is not None else jax.vmap(model)(tokens)


def _check(model, reference, prompt_len: int, n_new: int):
    cfg = _config(model)
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise ValueError(f"n_new must be a positive int (tokens to draw per prompt), got {n_new!r}.")
    if prompt_len < (0 if cfg.use_bos else 1):
        raise ValueError(
            "without BOS a prompt needs at least one token (the first prediction is made after "
            "reading x_1); give a non-empty prompt or build the model with use_bos=True."
        )
    if prompt_len + n_new > cfg.n_ctx:
        raise ValueError(
            f"prompt length {prompt_len} + n_new {n_new} exceeds the model's n_ctx={cfg.n_ctx}; "
            "shorten the prompt, draw fewer tokens or build the model with a larger n_ctx."
        )
    if reference is not None:
        rcfg = _config(reference)
        if rcfg.vocab_size != cfg.vocab_size:
            raise ValueError(
                f"the reference model has vocab_size={rcfg.vocab_size} but the policy has "
                f"vocab_size={cfg.vocab_size}; the KL between them needs one alphabet. Use a "
                "reference trained on the policy's process."
            )
        if rcfg.use_bos != cfg.use_bos:
            raise ValueError(
                f"the reference model has use_bos={rcfg.use_bos} but the policy has "
                f"use_bos={cfg.use_bos}; both must read sequences the same way."
            )
        if prompt_len + n_new > rcfg.n_ctx:
            raise ValueError(
                f"prompt length {prompt_len} + n_new {n_new} exceeds the reference model's "
                f"n_ctx={rcfg.n_ctx}."
            )
    return cfg


def _check_prompts(prompts) -> None:
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(
            f"prompts must be an integer array of shape (batch, prompt_len), got shape "
            f"{prompts.shape} and dtype {prompts.dtype}; a single prompt is prompts[None]."
        )


def completion_log_probs(
    model,
    sequences: Int[Array, "B L"],
    *,
    prompt_len: int,
    temperature: Float[ArrayLike, ""] = 1.0,
) -> Float[Array, "B N V"]:
    """The policy's next-token laws ``log pi_tau(. | x, y_<n)`` at every completion position.

    Args:
        model: a ``Transformer`` (or a wrapper with ``.config`` and the same call).
        sequences: prompts followed by completions, ``(B, P + N)``.
        prompt_len: ``P``; the laws returned are those of tokens ``P + 1 .. P + N``.
        temperature: ``tau > 0``; the logits are divided by it.

    Returns:
        Log-probabilities ``(B, N, V)`` over the ``V = vocab_size`` symbols; entry
        ``[b, n, y]`` is ``log pi_tau(y | sequences[b, :P + n])``. Differentiable in the model.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> sfpjax.completion_log_probs(model, jnp.zeros((2, 5), jnp.int32), prompt_len=3).shape
    (2, 2, 3)
    """
    cfg = _config(model)
    if sequences.ndim != 2 or not jnp.issubdtype(sequences.dtype, jnp.integer):
        raise ValueError(
            f"sequences must be an integer array (batch, prompt_len + n_new), got shape "
            f"{sequences.shape} and dtype {sequences.dtype}."
        )
    n_new = sequences.shape[1] - int(prompt_len)
    _check(model, None, int(prompt_len), n_new)
    logits = _logits(model, sequences)
    # Row of the logits that predicts token index j (0-based) of the sequence.
    first = int(prompt_len) - (0 if cfg.use_bos else 1)
    logits = logits[:, first:first + n_new]
    tau = jnp.asarray(temperature, logits.dtype)
    return jax.nn.log_softmax(logits / tau, axis=-1)


@eqx.filter_jit
def _draw(model, prompts, key, temperature, n_new: int):
    cfg = _config(model)
    B, P = prompts.shape
    tau = jnp.asarray(temperature, jnp.float32)
    tau = eqx.error_if(tau, ~(tau > 0), "temperature must be positive.")
    buffer = jnp.concatenate([prompts.astype(jnp.int32), jnp.zeros((B, n_new), jnp.int32)], axis=1)
    shift = 0 if cfg.use_bos else 1

    def draw(buffer, xs):
        n, k = xs
        logits = _logits(model, buffer)
        row = jax.lax.dynamic_index_in_dim(logits, P + n - shift, axis=1, keepdims=False)
        y = jr.categorical(k, row / tau, axis=-1).astype(jnp.int32)
        return jax.lax.dynamic_update_index_in_dim(buffer, y, P + n, axis=1), None

    buffer, _ = jax.lax.scan(draw, buffer, (jnp.arange(n_new), jr.split(key, n_new)))
    return jax.lax.stop_gradient(buffer[:, P:])


def sample_completions(
    model,
    prompts: Int[ArrayLike, "B P"],
    *,
    key: PRNGKeyArray,
    n_new: int,
    temperature: Float[ArrayLike, ""] = 1.0,
) -> Int[Array, "B N"]:
    """The completions of :func:`generate` alone (no scoring passes): ``(B, N)`` tokens.

    Same arguments and the same draws as :func:`generate` with the same key.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> sfpjax.sample_completions(model, jnp.zeros((4, 2), jnp.int32), key=jr.key(1), n_new=3).shape
    (4, 3)
    """
    prompts = jnp.asarray(prompts)
    _check_prompts(prompts)
    _check(model, None, prompts.shape[1], n_new)
    return _draw(model, prompts, key, temperature, int(n_new))


@eqx.filter_jit
def _generate(model, reference, prompts, key, temperature, n_new: int) -> Rollout:
    P = prompts.shape[1]
    tau = jnp.asarray(temperature, jnp.float32)
    completions = _draw(model, prompts, key, tau, n_new)
    buffer = jnp.concatenate([prompts.astype(jnp.int32), completions], axis=1)
    logp = jax.lax.stop_gradient(completion_log_probs(model, buffer, prompt_len=P, temperature=tau))
    taken = jnp.take_along_axis(logp, completions[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    ref_taken = None
    if reference is not None:
        ref = jax.lax.stop_gradient(completion_log_probs(reference, buffer, prompt_len=P, temperature=tau))
        ref_taken = jnp.take_along_axis(ref, completions[..., None], axis=-1)[..., 0]
    return Rollout(prompts, completions, taken, ref_taken, entropy)


def generate(
    model,
    prompts: Int[ArrayLike, "B P"],
    *,
    key: PRNGKeyArray,
    n_new: int,
    temperature: Float[ArrayLike, ""] = 1.0,
    reference=None,
) -> Rollout:
    """Extend every prompt by ``n_new`` tokens drawn from ``pi_tau = softmax(logits / tau)``.

    Args:
        model: the policy, a ``Transformer`` (or a wrapper with ``.config`` and the same
            call, e.g. a LoRA-wrapped one).
        prompts: ``(B, P)`` prompts ``x_1 .. x_P`` (symbols of the model's alphabet), e.g.
            ``sfpjax.sample(process, key=..., batch_size=B, seq_len=P)``. ``P = 0`` is
            allowed for models with BOS.
        key: PRNG key of the draws.
        n_new: ``N``, tokens drawn per prompt (``P + N <= n_ctx``).
        temperature: ``tau > 0`` (an array scalar works, so ``vmap`` over temperatures does).
        reference: a frozen model with the policy's alphabet and BOS setting whose
            log-probabilities of the drawn tokens are returned too (for the KL penalty).

    Returns:
        A :class:`Rollout`. One compiled program per shape; ``vmap`` it over a stack of
        models and keys with ``eqx.filter_vmap``.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> out = sfpjax.generate(model, jnp.zeros((4, 2), jnp.int32), key=jr.key(1), n_new=3, reference=model)
    >>> out.completions.shape, bool(jnp.allclose(out.log_probs, out.ref_log_probs))
    ((4, 3), True)
    """
    prompts = jnp.asarray(prompts)
    _check_prompts(prompts)
    _check(model, reference, prompts.shape[1], n_new)
    return _generate(model, reference, prompts, key, temperature, int(n_new))
