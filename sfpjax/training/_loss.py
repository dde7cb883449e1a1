"""Next-token losses, the exact loss floor and evaluation against it.

Alignment of losses with the process (the model module fixes the belief alignment):

* without BOS, position ``t`` (0-indexed) has read ``x_1 .. x_{t+1}`` and predicts
  ``x_{t+2}``, so positions ``0 .. L-2`` are scored and position ``t``'s floor is the myopic
  entropy ``H(X_{t+2} | X_{1:t+1}) = myopic_entropies[t + 1]``;
* with BOS, position ``t`` has read ``x_1 .. x_t`` and predicts ``x_{t+1}``, so all ``L``
  positions are scored and the floor at ``t`` is ``myopic_entropies[t]``.

A conditional factored process (``sfpjax.ConditionalProcess``) is accepted wherever a GHMM
is (``loss_floor``, ``evaluate``): its floor is ``sfpjax.myopic_entropies_conditional``,
which follows the factor states, so it is exact for every coupling, GHMM or not.

The excess loss ``loss - floor`` (in nats, and in % of the floor) is how far a model is from
the Bayes-optimal predictor; it is what the training log reports.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..inference._conditional import filter_conditional, myopic_entropies_conditional, sample_conditional
from ..inference._filter import filter_beliefs, next_token_probs
from ..inference._mixed_state import myopic_entropies
from ..inference._sampling import sample
from ..processes._conditional import ConditionalProcess
from ..processes._ghmm import GHMM
from .._numerics import entropy as _entropy
from ._protocol import SequenceModel, check_model

__all__ = ["EvalResult", "evaluate", "loss_floor", "next_token_loss", "per_position_loss"]


def _check_batch(tokens) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"tokens must be an integer batch of shape (batch, seq_len), got shape {tokens.shape} "
            f"and dtype {tokens.dtype}."
        )


def _check_pad(pad) -> None:
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or pad < 0):
        raise ValueError(f"pad must be a non-negative int token id (SequenceLayout.pad) or None; got {pad!r}.")


def _targets(model: SequenceModel, tokens):
    """Logits of the scored positions and the tokens they predict (the module's alignment)."""
    check_model(model)
    _check_batch(tokens)
    logits = model.batched(tokens)
    if model.config.use_bos:
        return logits[:, :-1], tokens
    if tokens.shape[1] < 2:
        raise ValueError("without BOS a sequence needs at least 2 tokens to score a prediction.")
    return logits[:, :-1], tokens[:, 1:]


@eqx.filter_jit
def per_position_loss(
    model: SequenceModel, tokens: Int[Array, "B L"], *, pad: int | None = None
) -> Float[Array, "B P"]:
    """Cross-entropy ``-log q(x_next | context)`` of every scored position of every sequence.

    ``P = L - 1`` without BOS (position ``t`` predicts ``tokens[:, t + 1]``) and ``P = L``
    with BOS (position ``t`` predicts ``tokens[:, t]``); see the module docstring.

    Args:
        model: a single model.
        tokens: ``(B, L)`` token ids.
        pad: the PAD id of a :class:`sfpjax.SequenceLayout` (or ``None``): a position whose
            target is PAD is not scored, its entry is 0 (as ``ignore_index`` does
            elsewhere). The scored positions are ``targets != pad``; with ``eos == pad``
            the EOS target is left out too.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> sfpjax.per_position_loss(model, jnp.zeros((2, 5), jnp.int32)).shape
    (2, 4)
    >>> loss = sfpjax.per_position_loss(model, jnp.array([[0, 1, 2, 2]]), pad=2)
    >>> (loss[0] == 0).tolist()  # the targets of positions 1 and 2 are PAD
    [False, True, True]
    """
    _check_pad(pad)
    logits, targets = _targets(model, tokens)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if pad is None:
        return nll
    return jnp.where(targets != pad, nll, 0)


@eqx.filter_jit
def next_token_loss(model: SequenceModel, tokens: Int[Array, "B L"], *, pad: int | None = None) -> Float[Array, ""]:
    """Mean next-token cross-entropy in nats over all scored positions of a batch.

    With ``pad``, the mean over the positions whose target is not PAD (0 if there are
    none), so trailing padding neither dilutes nor steers the loss: train on padded rows
    with ``make_step(..., loss_fn=functools.partial(sfpjax.next_token_loss, pad=PAD))``.

    >>> import math, jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> loss = sfpjax.next_token_loss(model, jnp.zeros((2, 5), jnp.int32))
    >>> abs(float(loss) - math.log(3)) < 0.2  # near-uniform predictions at initialization
    True
    """
    losses = per_position_loss(model, tokens, pad=pad)
    if pad is None:
        return losses.mean()
    targets = tokens if model.config.use_bos else tokens[:, 1:]
    scored = (targets != pad).sum()
    return losses.sum() / jnp.maximum(scored, 1).astype(losses.dtype)


def _draw(process, key, batch_size: int, seq_len: int):
    if isinstance(process, ConditionalProcess):
        return sample_conditional(process, key=key, batch_size=batch_size, seq_len=seq_len)
    return sample(process, key=key, batch_size=batch_size, seq_len=seq_len)


def _vocab_size(process) -> int:
    if isinstance(process, ConditionalProcess):
        return process.vocab_size
    if isinstance(process, GHMM):
        return int(process.T.shape[-3])
    raise ValueError(
        f"expected a sfpjax.GHMM or a sfpjax.ConditionalProcess, got {type(process).__name__}."
    )


def _sampled_next_entropies(process, key, num_samples: int, depth: int):
    """``H[P(. | x_1..x_n)]`` averaged over sampled contexts, for ``n = 1..depth``."""
    tokens = _draw(process, key, num_samples, depth)
    if isinstance(process, ConditionalProcess):
        states = filter_conditional(process, tokens).factor_beliefs  # per factor (N, depth, d_i)
        probs = jax.vmap(jax.vmap(lambda *etas: process.observation_probs(etas)))(*states)
    else:
        beliefs = filter_beliefs(process, tokens).beliefs  # belief after x_1..x_{n}, n = 1..depth
        probs = next_token_probs(process, beliefs)
    return _entropy(probs).mean(0)


def loss_floor(
    process: GHMM | ConditionalProcess,
    seq_len: int,
    *,
    use_bos: bool,
    key: PRNGKeyArray | None = None,
    num_samples: int = 4096,
    max_exact_words: int = 1 << 20,
) -> Float[Array, " P"]:
    """The lowest achievable loss at every scored position: myopic entropies, aligned.

    Entry ``t`` is ``myopic_entropies[t + 1]`` without BOS (``P = L - 1``) and
    ``myopic_entropies[t]`` with BOS (``P = L``). Depths ``n`` with ``V**n <=
    max_exact_words`` are exact (enumeration of all words); deeper ones, if any, are
    estimated as the mean entropy of the exact next-token law ``<<eta(w)|T(x)|1>>`` over
    ``num_samples`` sampled contexts ``w`` (this needs ``key``).

    Args:
        process: a GHMM (``myopic_entropies``), or a ``ConditionalProcess`` (its myopic
            entropies by ``myopic_entropies_conditional``, exact for every coupling; for one
            with a ``joint_ghmm`` the floor equals that GHMM's).
        seq_len: ``L``, the training sequence length.
        use_bos: whether the model reads a BOS token (the alignment above).

    >>> import sfpjax
    >>> [round(float(v), 4) for v in sfpjax.loss_floor(sfpjax.coin(), 4, use_bos=False)]
    [0.6931, 0.6931, 0.6931]
    """
    seq_len = int(seq_len)
    if seq_len < 1 or (seq_len < 2 and not use_bos):
        raise ValueError(
            f"seq_len must be >= {1 if use_bos else 2} to score a prediction "
            f"({'with' if use_bos else 'without'} BOS), got {seq_len}."
        )
    first = 0 if use_bos else 1
    depth = seq_len - 1
    V = _vocab_size(process)
    exact_depth = depth
    while exact_depth > 0 and V**exact_depth > max_exact_words:
        exact_depth -= 1
    if isinstance(process, ConditionalProcess):
        exact = myopic_entropies_conditional(process, exact_depth)
    else:
        exact = myopic_entropies(process, exact_depth)
    if exact_depth == depth:
        return exact[first:]
    if key is None:
        raise ValueError(
            f"the floor to depth {depth} would enumerate {V}**{depth} words (more than "
            f"max_exact_words={max_exact_words}); pass key= to estimate the deeper positions "
            "from sampled contexts, or raise max_exact_words."
        )
    est = _sampled_next_entropies(process, key, int(num_samples), depth)  # H(X_{n+1} | X_{1:n})
    full = jnp.concatenate([exact, est[exact_depth:].astype(exact.dtype)])
    return full[first:]


class EvalResult(NamedTuple):
    """Loss of a model against the exact floor (arrays; stacked under vmap).

    Attributes:
        loss: mean loss at every scored position ``(P,)``.
        floor: the floor at every position ``(P,)``, see :func:`loss_floor`.
        excess: ``loss - floor`` ``(P,)`` in nats.
        mean_loss: loss averaged over positions.
        excess_mean: ``mean(loss) - mean(floor)`` in nats.
        excess_pct: ``excess_mean`` in % of ``mean(floor)`` (nan for a zero floor).
        excess_last: excess at the last position, in nats.
        excess_last_pct: ``excess_last`` in % of the last floor.
    """

    loss: Float[Array, " P"]
    floor: Float[Array, " P"]
    excess: Float[Array, " P"]
    mean_loss: Float[Array, ""]
    excess_mean: Float[Array, ""]
    excess_pct: Float[Array, ""]
    excess_last: Float[Array, ""]
    excess_last_pct: Float[Array, ""]


def _pct(excess, floor):
    return jnp.where(floor > 0, 100.0 * excess / jnp.where(floor > 0, floor, 1.0), jnp.nan)


def evaluate_sample(model, process, key, floor, batch_size: int, seq_len: int) -> EvalResult:
    """The evaluation of one model on a fresh sample drawn with ``key`` (traceable; the loop vmaps it)."""
    tokens = _draw(process, key, batch_size, seq_len)
    loss = per_position_loss(model, tokens).mean(0)
    dtype = jnp.promote_types(loss.dtype, floor.dtype)
    loss, floor = loss.astype(dtype), floor.astype(dtype)
    excess = loss - floor
    excess_mean = loss.mean() - floor.mean()
    return EvalResult(
        loss=loss,
        floor=floor,
        excess=excess,
        mean_loss=loss.mean(),
        excess_mean=excess_mean,
        excess_pct=_pct(excess_mean, floor.mean()),
        excess_last=excess[-1],
        excess_last_pct=_pct(excess[-1], floor[-1]),
    )


def evaluate(
    model: SequenceModel,
    process: GHMM | ConditionalProcess,
    *,
    key: PRNGKeyArray,
    batch_size: int,
    seq_len: int,
    floor: Float[Array, " P"] | None = None,
) -> EvalResult:
    """Per-position loss of ``model`` on fresh samples of ``process`` against the exact floor.

    Args:
        model: a single model (``eqx.filter_vmap`` this function over a stack).
        process: the process the sequences are drawn from (a GHMM or a ``ConditionalProcess``).
        key: PRNG key for the sample (and for the floor, if it must be estimated).
        batch_size, seq_len: the evaluation sample.
        floor: a precomputed :func:`loss_floor` (saves recomputing it at every evaluation).

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=2, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> res = sfpjax.evaluate(model, sfpjax.coin(), key=jr.key(1), batch_size=64, seq_len=8)
    >>> res.loss.shape, res.floor.shape
    ((7,), (7,))
    """
    check_model(model)
    _vocab_size(process)
    sample_key, floor_key = jr.split(key)
    if floor is None:
        floor = loss_floor(process, seq_len, use_bos=model.config.use_bos, key=floor_key)
    return _evaluate(model, process, sample_key, floor, int(batch_size), int(seq_len))


_evaluate = eqx.filter_jit(evaluate_sample)
