"""Composite-token encodings of factor-token tuples: the full mixed radix and explicit tables.

``encode_tokens`` (in `_compose`) is the full mixed-radix encoding, composite token ``x``
standing for the tuple ``decode_tokens(x)``. An explicit encoding lists only some tuples:
composite token ``x`` stands for row ``x`` of a ``(V, F)`` table of distinct rows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Union

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int

from .._numerics import is_traced as _is_traced
from ._compose import encode_tokens

__all__ = ["decode_tokens_explicit", "encode_tokens_explicit"]

Table = Union[Int[ArrayLike, "V F"], Sequence[Sequence[int]]]


def radix_table(vocab_sizes: Sequence[int]) -> np.ndarray:
    """Every tuple of the full product, composite token ``x`` at row ``x`` (``encode_tokens`` order)."""
    return np.array(list(itertools.product(*[range(v) for v in vocab_sizes])), np.int32).reshape(-1, len(vocab_sizes))


def is_radix(table: Array) -> bool:
    if _is_traced(table):
        return False
    t = np.asarray(table)
    sizes = tuple(int(m) + 1 for m in t.max(0))
    return t.shape[0] == math.prod(sizes) and np.array_equal(t, radix_table(sizes))


def check_table(token_to_tuple, vocab_sizes: Sequence[int] | None = None) -> np.ndarray:
    if _is_traced(token_to_tuple):
        raise ValueError("token_to_tuple must be concrete (it fixes the alphabet); build it outside jit/vmap.")
    t = np.asarray(token_to_tuple)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(
            "token_to_tuple must be an integer table of shape (V, F): row x lists the factor tokens "
            f"(x^0, ..., x^(F-1)) of composite token x; got shape {t.shape} and dtype {t.dtype}."
        )
    if (t < 0).any():
        r = int(np.argwhere(t < 0)[0][0])
        raise ValueError(f"token_to_tuple row {r} is {t[r].tolist()}: factor tokens must be non-negative.")
    if vocab_sizes is not None:
        if len(vocab_sizes) != t.shape[1]:
            raise ValueError(
                f"token_to_tuple has {t.shape[1]} columns but there are {len(vocab_sizes)} factors; "
                "give one column per factor."
            )
        over = np.argwhere(t >= np.asarray(vocab_sizes)[None, :])
        if over.size:
            r, f = (int(v) for v in over[0])
            raise ValueError(
                f"token_to_tuple row {r} is {t[r].tolist()}: token {int(t[r, f])} of factor {f} is outside its "
                f"alphabet of {vocab_sizes[f]} symbols."
            )
    _, first, counts = np.unique(t, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        row = t[first[np.argmax(counts > 1)]]
        dup = np.flatnonzero((t == row).all(1)).tolist()
        raise ValueError(
            f"token_to_tuple lists the tuple {row.tolist()} at rows {dup}; every tuple may have one "
            "composite token only (the encoding must be a bijection onto its tuples)."
        )
    return t.astype(np.int32)


def encode_tokens_explicit(
    factor_tokens: Sequence[Int[ArrayLike, "*shape"]], token_to_tuple: Table
) -> Int[Array, "*shape"]:
    """Composite tokens of per-factor tokens under an explicit (sparse) encoding.

    The explicit encoding lists the encoded tuples: composite token ``x`` stands for row
    ``x`` of ``token_to_tuple``. The inverse is ``decode_tokens_explicit``; the full
    mixed-radix encoding is ``encode_tokens`` (the table whose row ``x`` is
    ``decode_tokens(x)``).

    Args:
        factor_tokens: ``F`` integer arrays of one shape, the tokens of each factor.
        token_to_tuple: ``(V, F)`` integer table of distinct rows (concrete).

    Raises:
        ValueError: a malformed table (not 2-D integers, negative, repeated rows) or a
            number of token arrays other than ``F``; at run time (``eqx.error_if``) a tuple
            that the table does not list.

    >>> import jax.numpy as jnp, sfpjax
    >>> table = [[0, 0], [1, 0], [1, 1]]
    >>> sfpjax.encode_tokens_explicit([jnp.array([1, 0]), jnp.array([0, 0])], table)
    Array([1, 0], dtype=int32)
    """
    t = check_table(token_to_tuple)
    F = t.shape[1]
    if len(factor_tokens) != F:
        raise ValueError(f"give one token array per factor: the table has {F} columns, got {len(factor_tokens)} arrays.")
    toks = [jnp.asarray(x) for x in factor_tokens]
    if len({x.shape for x in toks}) != 1:
        raise ValueError(f"all factor token arrays must share one shape; got {[x.shape for x in toks]}.")
    for x in toks:
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"factor tokens must be integers, got dtype {x.dtype}.")
    sizes = tuple(int(m) + 1 for m in t.max(0))
    lookup = np.full(math.prod(sizes), -1, np.int32)
    lookup[np.asarray(encode_tokens([t[:, f] for f in range(F)], sizes))] = np.arange(t.shape[0], dtype=np.int32)
    inside = jnp.ones(toks[0].shape, bool)
    for x, v in zip(toks, sizes):
        inside = inside & (x >= 0) & (x < v)
    flat = encode_tokens([jnp.where(inside, x, 0) for x in toks], sizes)
    out = jnp.where(inside, jnp.asarray(lookup)[flat], -1)
    return eqx.error_if(
        out, (out < 0).any(),
        "encode_tokens_explicit: a tuple of factor tokens is not listed in token_to_tuple; only the listed "
        "tuples have composite tokens.",
    )


def decode_tokens_explicit(
    tokens: Int[ArrayLike, "*shape"], token_to_tuple: Table
) -> tuple[Int[Array, "*shape"], ...]:
    """Per-factor tokens of composite tokens under an explicit encoding: row ``x`` of the table.

    Raises:
        ValueError: a malformed table; at run time, a composite token outside ``[0, V)``.

    >>> import jax.numpy as jnp, sfpjax
    >>> sfpjax.decode_tokens_explicit(jnp.array([2, 0]), [[0, 0], [1, 0], [1, 1]])
    (Array([1, 0], dtype=int32), Array([1, 0], dtype=int32))
    """
    t = check_table(token_to_tuple)
    x = jnp.asarray(tokens)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {x.dtype}.")
    V = t.shape[0]
    x = eqx.error_if(
        x, ((x < 0) | (x >= V)).any(),
        f"decode_tokens_explicit: composite tokens must lie in [0, {V}), one per row of token_to_tuple.",
    )
    rows = jnp.asarray(t)[x.astype(jnp.int32)]
    return tuple(rows[..., f] for f in range(t.shape[1]))
