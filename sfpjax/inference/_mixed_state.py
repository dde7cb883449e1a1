"""Exact statistics over all words: myopic entropies, the mixed-state presentation, entropy rate.

The myopic entropy ``H(X_{n+1} | X_{1:n}) = sum_w Pr(w) H[Pr(. | w)]`` over words ``w`` of
length ``n`` is the lowest cross-entropy any predictor can reach at context position ``n``:
the loss floor a trained transformer is compared with. It decreases in ``n`` towards the
entropy rate ``h``.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._numerics import entropy
from ..processes._ghmm import GHMM, check_process
from ..processes._kernels import condition, every_symbol, next_token_law, normalizer, symbol_rows
from ._filter import filter_beliefs
from ._sampling import sample

__all__ = [
    "MixedStatePresentation",
    "belief_spread",
    "entropy_rate",
    "mixed_state_presentation",
    "myopic_entropies",
    "num_distinct_beliefs",
    "word_beliefs",
]

# Enumerating V**n words is exact but exponential; past this many rows use the merged
# mixed-state presentation instead.
_MAX_ENUMERATED_WORDS = 1 << 24
# myopic_entropies enumerates deep trees in blocks whose deepest level has at most this many
# words.
_WORDS_PER_BLOCK = 8192


def _extend(process: GHMM, unnorm: Float[Array, "d n"]) -> Float[Array, "d m"]:
    """Extend every word of a level by every symbol: column ``x * n + w`` of the result is
    ``<<eta(0)|T(w x)|`` for word column ``w`` of ``unnorm`` and symbol ``x``.

    Words are the minor axis, so a level is one ``(V d, d) x (d, n)`` product with a long
    ``n``, also under ``vmap`` over a parameter grid (measured on a 2-core CPU: 1.7x faster
    per Mess3 point at depth 10 than words as rows with unrolled state contractions).
    Words stay unnormalized so ``Pr(w) = <<eta(0)|T(w)|1>>`` is exact, up to the common
    per-level rescaling done by the callers.
    """
    return _extend_rows(symbol_rows(process.T), unnorm)


def _extend_rows(Tm: Float[Array, "Vd d"], unnorm: Float[Array, "d n"]) -> Float[Array, "d m"]:
    """:func:`_extend` from ``Tm = symbol_rows(T)``."""
    return jnp.swapaxes(every_symbol(Tm, unnorm), 0, 1).reshape(unnorm.shape[0], -1)


def _word_columns(process: GHMM, length: int) -> Float[Array, "d n"]:
    """``<<eta(0)|T(w)|`` for all ``V**length`` words as columns, word ``x_1..x_n`` at
    column ``sum_t x_t V**(t - 1)`` (last symbol most significant)."""
    unnorm = process.eta0[:, None]
    for _ in range(length):
        unnorm = _extend(process, unnorm)
    return unnorm


def _word_column_beliefs(process: GHMM, length: int) -> tuple[Float[Array, "d n"], Float[Array, " n"]]:
    """Beliefs ``(d, n)`` and probabilities of all words in :func:`_word_columns` order;
    impossible words get probability 0 and a zero belief."""
    unnorm = _word_columns(process, length)
    probs = normalizer(unnorm, process.right)
    ok = probs > 0
    beliefs = condition(unnorm, probs, jnp.zeros_like(unnorm), ok)
    return beliefs, jnp.where(ok, probs, 0.0)


def _check_depth(process: GHMM, depth: int, name: str) -> int:
    depth = int(depth)
    if depth < 0:
        raise ValueError(f"{name} must be >= 0, got {depth}.")
    if process.vocab_size ** depth > _MAX_ENUMERATED_WORDS:
        raise ValueError(
            f"{name}={depth} would enumerate {process.vocab_size}**{depth} words (more than "
            f"{_MAX_ENUMERATED_WORDS}); use mixed_state_presentation(process, depth), which merges "
            "equal beliefs, or a smaller depth."
        )
    return depth


def word_beliefs(process: GHMM, length: int) -> tuple[Float[Array, "n d"], Float[Array, " n"]]:
    """Beliefs after, and probabilities of, all ``V**length`` words of a given length.

    Word ``w = x_1..x_n`` sits at row ``sum_t x_t V**(n - t)`` (first symbol most
    significant). Impossible words get probability 0 and an all-zero belief row.
    Jittable and vmappable over stacked processes (``length`` static).

    >>> import sfpjax
    >>> b, p = sfpjax.word_beliefs(sfpjax.mess3(), 2)
    >>> b.shape, float(p.sum())
    ((9, 3), 1.0...)
    """
    check_process(process)
    length = _check_depth(process, length, "length")
    V = process.vocab_size
    # Reverse the digits of the column index: row sum_t x_t V**(n - t), first symbol most significant.
    rows = np.arange(V**length).reshape((V,) * length).transpose().ravel()
    beliefs, probs = _word_column_beliefs(process, length)
    return beliefs[:, rows].T, probs[rows]


@eqx.filter_jit
def myopic_entropies(process: GHMM, max_depth: int) -> Float[Array, " depth"]:
    """``H(X_{n+1} | X_{1:n})`` in nats for ``n = 0..max_depth``, exactly, by enumeration.

    Entry 0 is the entropy of the first symbol drawn from ``<<eta(0)|``. Level by level the
    ``V**n`` words are extended with one batched contraction; past 8192 words at the last
    level the tree is walked depth-first in blocks that stay in cache. Jitted, and
    vmappable over a stack of processes, so a parameter grid is one call.

    Args:
        process: a GHMM.
        max_depth: the largest context length ``n`` (static).

    >>> import sfpjax
    >>> h = sfpjax.myopic_entropies(sfpjax.coin(), 3)
    >>> [round(float(v), 4) for v in h]
    [0.6931, 0.6931, 0.6931, 0.6931]
    """
    check_process(process)
    return _myopic_entropies(process, _check_depth(process, max_depth, "max_depth"), _WORDS_PER_BLOCK)


def _myopic_entropies(process: GHMM, D: int, words_per_block: int) -> Float[Array, " depth"]:
    Tm = symbol_rows(process.T)  # (V d, d)
    V = process.vocab_size
    # Words of length n hold Pr(w) (the GHMM is normalized, so each level sums to 1).
    # H(X_{1:n+1}) = -sum p log p over the joint Pr(w x), and the myopic entropy is
    # H(X_{n+1} | X_{1:n}) = H(X_{1:n+1}) - H(X_{1:n}): one log per word.
    levels_per_block = 0  # the most levels whose deepest one, from V words, has <= words_per_block
    while V > 1 and V ** (levels_per_block + 1) <= words_per_block:
        levels_per_block += 1
    if V ** D <= words_per_block or levels_per_block < 1:
        h, c, _ = _level_sums(process, Tm, process.eta0[:, None], D + 1)
    else:
        # Deep trees go depth-first in blocks: the words of length `split` are cut into
        # blocks of V words, and a scan extends one block at a time down to length D, so the
        # working set stays in cache, also under vmap over a parameter grid (2.5x faster per
        # Mess3 point at depth 10 than whole levels, 64 points vmapped, 2-core CPU).
        split = D + 1 - levels_per_block
        h_top, c_top, deepest = _level_sums(process, Tm, process.eta0[:, None], split)
        words = _extend_rows(Tm, deepest)  # the words of length `split`
        blocks = jnp.moveaxis(words.reshape(words.shape[0], -1, V), 1, 0)

        def block(total, unnorm):
            return jax.tree.map(jnp.add, total, _level_sums(process, Tm, unnorm, D + 1 - split)[:2]), None

        zeros = jnp.zeros(D + 1 - split, words.dtype)
        (h_low, c_low), _ = jax.lax.scan(block, (zeros, zeros), blocks)
        h, c = jnp.concatenate([h_top, h_low]), jnp.concatenate([c_top, c_low])
    # Normalize by the level's computed total: exact in exact arithmetic, and it removes the
    # drift of long products in float32.
    h_words = h / c + jnp.log(c)
    return jnp.diff(h_words, prepend=jnp.zeros((1,), h_words.dtype))


def _level_sums(
    process: GHMM, Tm: Float[Array, "Vd d"], unnorm: Float[Array, "d n"], levels: int
) -> tuple[Float[Array, " levels"], Float[Array, " levels"], Float[Array, "d m"]]:
    """For the words in ``unnorm``'s columns and the next ``levels - 1`` lengths below them:
    ``-sum p log p`` and ``sum p`` over ``p = <<eta|T(w x)|1>>`` for every word ``w`` of
    that length and symbol ``x``; and the words of the last of those lengths."""
    h, c = [], []
    for k in range(levels):
        if k:
            unnorm = _extend_rows(Tm, unnorm)
        joint = next_token_law(process.T, process.right, unnorm.T).reshape(-1)
        h.append(entropy(joint))
        c.append(joint.sum())
    return jnp.stack(h), jnp.stack(c), unnorm


def _round_key(beliefs: np.ndarray, decimals: int) -> np.ndarray:
    r = np.round(beliefs, decimals)
    return r + 0.0  # turn -0.0 into 0.0 so equal beliefs share a key


@eqx.filter_jit
def num_distinct_beliefs(process: GHMM, depth: int, *, decimals: int = 6) -> Int[Array, ""]:
    """Number of distinct beliefs (rounded to ``decimals``) after words of length ``depth``.

    Counts only words of positive probability. Jittable and vmappable (for sweeps).

    >>> import sfpjax
    >>> int(sfpjax.num_distinct_beliefs(sfpjax.coin(), 4))
    1
    """
    check_process(process)
    beliefs, probs = _word_column_beliefs(process, _check_depth(process, depth, "depth"))
    valid = probs > 0
    keys = jnp.round(beliefs * 10.0**decimals)
    keys = jnp.where(keys == 0, 0.0, keys)  # -0.0 and 0.0 are the same rounded coordinate
    # Impossible words all get the key (inf, ..., inf), which no belief has; it is counted
    # once below and taken off.
    keys = jnp.where(valid[None, :], keys, jnp.inf)
    # Only equality matters, so the keys are sorted as the integers with their bits: XLA's
    # integer comparator is 1.5x faster than its float one (6,561 Mess3 beliefs, 2-core CPU).
    ints = jax.lax.bitcast_convert_type(keys, jnp.dtype(f"int{8 * keys.dtype.itemsize}"))
    s = jnp.stack(jax.lax.sort(tuple(ints), num_keys=ints.shape[0]))
    new = jnp.concatenate([jnp.ones((1,), bool), jnp.any(s[:, 1:] != s[:, :-1], axis=0)])
    count = jnp.sum(new)
    return count - jnp.any(~valid).astype(count.dtype)


@eqx.filter_jit
def belief_spread(process: GHMM, depth: int) -> Float[Array, ""]:
    """How spread out the beliefs are after ``depth`` symbols, as one number.

    The probability-weighted RMS distance of ``<<eta(w)|`` to its mean over all words ``w``
    of length ``depth``: ``sqrt(sum_w Pr(w) ||eta(w) - sum_v Pr(v) eta(v)||^2)``. Zero for
    a process whose belief does not depend on the past. Jittable and vmappable (sweeps).

    >>> import sfpjax
    >>> float(sfpjax.belief_spread(sfpjax.coin(), 3))
    0.0
    """
    check_process(process)
    beliefs, probs = _word_column_beliefs(process, _check_depth(process, depth, "depth"))
    mean = beliefs @ probs
    return jnp.sqrt(((beliefs - mean[:, None]) ** 2).sum(0) @ probs)


class MixedStatePresentation(NamedTuple):
    """The mixed-state presentation (belief-state machine) explored to a finite depth.

    Attributes:
        beliefs: ``(S, d)`` the distinct beliefs (mixed states), state 0 is ``<<eta(0)|``.
        depth_first_seen: ``(S,)`` the word length at which each belief first appears.
        transitions: ``(S, V)`` index of the belief reached from each state on each symbol
            (-1 for a zero-probability symbol, or for states at the last explored depth).
        transition_probs: ``(S, V)`` ``Pr(x | state)``.
        level_probs: list over ``n = 0..depth`` of ``(S,)`` arrays: the probability of being
            in each mixed state after ``n`` symbols (sums to 1).
    """

    beliefs: np.ndarray
    depth_first_seen: np.ndarray
    transitions: np.ndarray
    transition_probs: np.ndarray
    level_probs: list

    def myopic_entropies(self) -> np.ndarray:
        """``H(X_{n+1} | X_{1:n})`` for ``n = 0..depth`` from the merged level distributions."""
        h = entropy(jnp.asarray(self.transition_probs))
        return np.asarray([float(np.asarray(h) @ p) for p in self.level_probs])


def mixed_state_presentation(process: GHMM, depth: int, *, decimals: int = 8) -> MixedStatePresentation:
    """Explore the mixed-state presentation to ``depth`` symbols, merging equal beliefs.

    Level by level: all frontier beliefs are updated on all symbols in one batched call,
    rounded to ``decimals`` and merged with the beliefs seen so far, so a process with few
    belief states (Z1R, even process) stays small at any depth while the transition
    structure is recorded. Runs on the host (NumPy float64 after the batched update).

    >>> import sfpjax
    >>> msp = sfpjax.mixed_state_presentation(sfpjax.z1r(), 6)
    >>> msp.beliefs.shape[1]
    3
    """
    check_process(process)
    depth = int(depth)
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}.")
    T = np.asarray(process.T, np.float64)
    r = np.asarray(process.right, np.float64)
    Tm = symbol_rows(T)
    V = T.shape[0]
    beliefs = [np.asarray(process.eta0, np.float64)]
    first_seen = [0]
    index = {_round_key(beliefs[0], decimals).tobytes(): 0}
    rows: dict[int, np.ndarray] = {}
    frontier = [0]
    for n in range(1, depth + 1):
        if not frontier:
            break
        # (d, V, n): every symbol's update of every frontier belief, in float64 on the host
        unnorm = np.swapaxes(every_symbol(Tm, np.stack([beliefs[i] for i in frontier], axis=1)), 0, 1)
        norm = normalizer(unnorm, r)
        ok = norm > 0
        child = condition(unnorm, norm, unnorm, ok).transpose(2, 1, 0)  # (n, V, d)
        ok = ok.T
        keys = _round_key(child, decimals)
        new_frontier = []
        for a, s in enumerate(frontier):
            row = np.full(V, -1)
            for x in np.flatnonzero(ok[a]):
                k = keys[a, x].tobytes()
                if k not in index:
                    index[k] = len(beliefs)
                    beliefs.append(child[a, x])
                    first_seen.append(n)
                    new_frontier.append(index[k])
                row[x] = index[k]
            rows[s] = row
        frontier = new_frontier
    B = np.stack(beliefs)
    S = len(beliefs)
    transitions = np.full((S, V), -1)
    for s, row in rows.items():
        transitions[s] = row
    px = next_token_law(T, r, B)
    transition_probs = px / px.sum(-1, keepdims=True)
    # Mass at level n - 1 < depth sits only on states first seen before depth, whose
    # transitions were explored, so pushing it through the table is exact.
    level_probs = [np.eye(S)[0]]
    for _ in range(depth):
        p = level_probs[-1][:, None] * transition_probs
        nxt = np.zeros(S)
        valid = transitions >= 0
        np.add.at(nxt, transitions[valid], p[valid])
        level_probs.append(nxt)
    return MixedStatePresentation(B, np.asarray(first_seen), transitions, transition_probs, level_probs)


def entropy_rate(
    process: GHMM,
    *,
    key: PRNGKeyArray,
    num_sequences: int = 64,
    seq_len: int = 4096,
    burn_in: int = 256,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Monte-Carlo estimate of the entropy rate ``h = lim_n H(X_{n+1} | X_{1:n})`` in nats.

    Samples ``num_sequences`` sequences from ``process`` and averages
    ``-log Pr(x_{t+1} | x_{1:t})`` after ``burn_in`` steps (exact conditional probabilities from
    the filter, so the only error is sampling error). Returns ``(estimate, standard_error)``,
    the standard error taken across sequences. For an exact upper bound use the last entry
    of :func:`myopic_entropies`, which decreases to ``h``.

    >>> import sfpjax, jax.random as jr
    >>> h, se = sfpjax.entropy_rate(sfpjax.coin(), key=jr.key(0), num_sequences=4, seq_len=64, burn_in=0)
    >>> round(float(h), 4)
    0.6931
    """
    if burn_in < 0 or seq_len <= burn_in or num_sequences < 2:
        raise ValueError(
            f"need num_sequences >= 2 and 0 <= burn_in < seq_len; got num_sequences={num_sequences}, "
            f"seq_len={seq_len}, burn_in={burn_in}."
        )
    tokens = sample(process, key=key, batch_size=num_sequences, seq_len=seq_len)
    lognorm = filter_beliefs(process, tokens).log_normalizers[:, burn_in:]
    per_seq = -lognorm.mean(-1)
    return per_seq.mean(), per_seq.std(ddof=1) / jnp.sqrt(num_sequences)
