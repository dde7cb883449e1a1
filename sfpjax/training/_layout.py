"""Sequence layout for training data: caller-chosen BOS, EOS and PAD ids around process tokens.

A framed sequence is ``[BOS, x_1, ..., x_n, EOS, PAD, ..., PAD]`` of total length ``L``
(each frame optional), the layout of the public generative-process specification v1.0
(section 6.2): the process always runs for exactly ``n`` body steps, the frame ids lie
outside the process alphabet ``[0, V)``, and they never update the process state.

Belief alignment (``filter_beliefs``'s convention, extended to the frame). Position ``p``
of a framed sequence is aligned with the belief after the body tokens read up to and
including ``p``; ``tokens_read[p]`` counts them:

* BOS (position 0): nothing read, the initial belief ``<<eta(0)|`` (entry 0 of
  ``beliefs_with_initial``);
* body token ``x_t`` (position ``t - 1``, or ``t`` after a BOS): the belief after
  ``x_1..x_t`` (``filter_beliefs(...).beliefs[t - 1]``);
* EOS: the frame does not update the state, so the belief after all ``n`` body tokens;
* PAD: the same belief as EOS, and ``is_real`` is ``False`` there: leave PAD positions out
  of probes and losses.

The model at position ``p`` predicts framed token ``p + 1``. Where that is a body token
``x_{t+1}`` (``predicts_body[p]``), its loss floor is the myopic entropy
``H(X_{t+1} | X_{1:t})`` with ``t = tokens_read[p]``; EOS and PAD follow from the position
alone, so their floor is 0. This is the ``use_bos=False`` reading of a model: with a BOS in
the layout, build the model with ``use_bos=False`` and ``vocab_size =
layout.vocab_size(V)`` (the model's own ``use_bos`` prepends the id ``V`` instead, which is
the layout ``SequenceLayout(bos=V)``).

This module lives in ``training`` because it shapes training data and needs both the
sampler and the filter of ``inference`` (an import that runs down the stages only).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from ..inference._conditional import filter_conditional, sample_conditional
from ..inference._filter import filter_beliefs
from ..inference._sampling import sample
from ..processes._conditional import ConditionalProcess
from ..processes._ghmm import GHMM

__all__ = ["LayoutBatch", "SequenceLayout", "layout_beliefs", "layout_floor", "layout_tokens", "sample_layout"]


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Where the frame tokens go: ``[BOS, x_1..x_n, EOS, PAD...]`` padded to ``total_len``.

    Attributes:
        bos: id of the beginning-of-sequence token, or ``None`` for no BOS.
        eos: id of the end-of-sequence token, or ``None`` for no EOS.
        pad: id of the padding token, or ``None`` for no padding.
        total_len: length of every framed sequence (``None``: exactly what the frame and
            the body need). With ``pad`` it may exceed that; PAD fills the rest.

    Frame ids must lie outside the process alphabet (checked against ``V`` when the layout
    is applied); ids may coincide (e.g. ``eos == pad``).

    >>> import sfpjax
    >>> lay = sfpjax.SequenceLayout(bos=3, eos=4, pad=5, total_len=8)
    >>> lay.length(4), lay.vocab_size(3)
    (8, 6)
    """

    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    total_len: int | None = None

    def __post_init__(self):
        for name in ("bos", "eos", "pad", "total_len"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
                raise ValueError(f"SequenceLayout.{name} must be a non-negative int or None; got {v!r}.")
        if self.pad is not None and self.total_len is None:
            raise ValueError("SequenceLayout: a pad id needs total_len (the length PAD fills the sequences up to).")

    def length(self, body_len: int) -> int:
        """The framed length ``L`` for ``body_len`` process tokens."""
        body_len = int(body_len)
        need = body_len + (self.bos is not None) + (self.eos is not None)
        if self.total_len is None:
            return need
        if self.total_len < need:
            raise ValueError(
                f"total_len={self.total_len} is shorter than the {need} positions the frame needs "
                f"({body_len} body tokens{', BOS' if self.bos is not None else ''}"
                f"{', EOS' if self.eos is not None else ''}); raise total_len or shorten the body."
            )
        if self.total_len > need and self.pad is None:
            raise ValueError(
                f"total_len={self.total_len} exceeds the {need} positions of the frame and body; give a pad id "
                "to fill the rest, or set total_len to exactly the length needed."
            )
        return int(self.total_len)

    def vocab_size(self, process_vocab_size: int) -> int:
        """The model's alphabet: the process's ``V`` and every frame id."""
        ids = [i for i in (self.bos, self.eos, self.pad) if i is not None]
        return max([int(process_vocab_size)] + [int(i) + 1 for i in ids])

    def check(self, process_vocab_size: int) -> None:
        """Raise ``ValueError`` if a frame id lies inside the process alphabet ``[0, V)``."""
        for name in ("bos", "eos", "pad"):
            v = getattr(self, name)
            if v is not None and v < process_vocab_size:
                raise ValueError(
                    f"the {name.upper()} id {v} lies inside the process alphabet [0, {process_vocab_size}); frame "
                    f"ids must be >= {process_vocab_size} so that they never read as process tokens."
                )

    def positions(self, body_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens_read, predicts_body, is_real)``, each of length ``L`` (see the module docstring).

        ``tokens_read[p]``: body tokens read up to and including position ``p``;
        ``predicts_body[p]``: whether framed token ``p + 1`` is a body token;
        ``is_real[p]``: whether position ``p`` holds BOS, a body token or EOS (not PAD).

        >>> import sfpjax
        >>> read, pred, real = sfpjax.SequenceLayout(bos=3, eos=4, pad=5, total_len=7).positions(3)
        >>> read.tolist(), pred.tolist(), real.tolist()
        ([0, 1, 2, 3, 3, 3, 3], [True, True, True, False, False, False, False], [True, True, True, True, True, False, False])
        """
        n = int(body_len)
        L = self.length(n)
        b = int(self.bos is not None)
        real_len = n + b + int(self.eos is not None)
        p = np.arange(L)
        read = np.clip(p + 1 - b, 0, n)
        predicts = (p + 1 >= b) & (p + 1 < n + b)
        return read.astype(np.int32), predicts, p < real_len


def layout_tokens(
    body: Int[ArrayLike, "*batch n"], layout: SequenceLayout, *, vocab_size: int
) -> Int[Array, "*batch L"]:
    """Frame process tokens: ``[BOS, x_1..x_n, EOS, PAD...]`` along the last axis.

    Args:
        body: process tokens ``(*batch, n)`` in ``[0, V)``.
        layout: the frame.
        vocab_size: the process alphabet ``V`` (frame ids must be ``>= V``).

    Raises:
        ValueError: a frame id inside ``[0, V)``, a ``total_len`` that does not fit, a
            non-integer body.

    >>> import jax.numpy as jnp, sfpjax
    >>> lay = sfpjax.SequenceLayout(bos=99, eos=100, pad=101, total_len=7)
    >>> sfpjax.layout_tokens(jnp.array([5, 2, 8]), lay, vocab_size=9).tolist()
    [99, 5, 2, 8, 100, 101, 101]
    """
    layout.check(vocab_size)
    body = jnp.asarray(body)
    if not jnp.issubdtype(body.dtype, jnp.integer) or body.ndim < 1:
        raise ValueError(f"body must be an integer array (*batch, n); got shape {body.shape}, dtype {body.dtype}.")
    body = body.astype(jnp.int32)
    n = body.shape[-1]
    L = layout.length(n)
    batch = body.shape[:-1]
    parts = []
    if layout.bos is not None:
        parts.append(jnp.full(batch + (1,), layout.bos, jnp.int32))
    parts.append(body)
    if layout.eos is not None:
        parts.append(jnp.full(batch + (1,), layout.eos, jnp.int32))
    rest = L - n - (layout.bos is not None) - (layout.eos is not None)
    if rest:
        parts.append(jnp.full(batch + (rest,), layout.pad, jnp.int32))
    return jnp.concatenate(parts, axis=-1)


def layout_beliefs(
    beliefs: Float[Array, "*batch n d"], initial: Float[ArrayLike, "*#batch d"], layout: SequenceLayout
) -> Float[Array, "*batch L d"]:
    """Beliefs aligned with framed positions: entry ``p`` is the belief after ``tokens_read[p]`` tokens.

    Args:
        beliefs: ``filter_beliefs(process, body).beliefs`` (or the ``.beliefs`` of
            ``filter_conditional``), shape ``(*batch, n, d)``.
        initial: the belief before any token (``process.eta0``, or
            ``ConditionalProcess.initial_belief()``), ``(d,)`` or per sequence.
        layout: the frame.

    >>> import jax.numpy as jnp, sfpjax
    >>> p = sfpjax.mess3()
    >>> lay = sfpjax.SequenceLayout(bos=3, eos=4)
    >>> res = sfpjax.filter_beliefs(p, jnp.array([[0, 1]]))
    >>> sfpjax.layout_beliefs(res.beliefs, p.eta0, lay).shape  # BOS, x_1, x_2, EOS
    (1, 4, 3)
    """
    beliefs = jnp.asarray(beliefs)
    if beliefs.ndim < 2:
        raise ValueError(f"beliefs must have shape (*batch, n, d); got {beliefs.shape}.")
    n, d = beliefs.shape[-2:]
    initial = jnp.asarray(initial, beliefs.dtype)
    if initial.shape[-1:] != (d,):
        raise ValueError(f"initial must end in the state dimension {d}; got shape {initial.shape}.")
    init = jnp.broadcast_to(initial[..., None, :], beliefs.shape[:-2] + (1, d))
    full = jnp.concatenate([init, beliefs], axis=-2)  # entry t: after t tokens
    read, _, _ = layout.positions(n)
    return full[..., jnp.asarray(read), :]


def layout_floor(myopic: Float[ArrayLike, " depth"], layout: SequenceLayout, body_len: int) -> Float[Array, " Lm1"]:
    """The loss floor of every scored position ``p = 0..L-2`` (predicting framed token ``p + 1``).

    ``myopic[tokens_read[p]]`` where the next token is a body token, 0 where it is EOS or
    PAD (fixed by the position). ``myopic`` is ``myopic_entropies(process, n)`` (or
    ``myopic_entropies_conditional``), at least ``n`` entries. Aligned with
    ``per_position_loss`` of a model with ``use_bos=False`` on the framed tokens.

    >>> import sfpjax
    >>> h = sfpjax.myopic_entropies(sfpjax.coin(), 3)
    >>> [round(float(v), 4) for v in sfpjax.layout_floor(h, sfpjax.SequenceLayout(bos=2, eos=3), 3)]
    [0.6931, 0.6931, 0.6931, 0.0]
    """
    myopic = jnp.asarray(myopic)
    n = int(body_len)
    if myopic.ndim != 1 or myopic.shape[0] < n:
        raise ValueError(f"myopic must hold H(X_(t+1) | X_(1:t)) for t = 0..{n - 1} (at least {n} entries); "
                         f"got shape {myopic.shape}.")
    read, predicts, _ = layout.positions(n)
    read, predicts = read[:-1], predicts[:-1]
    return jnp.where(jnp.asarray(predicts), myopic[jnp.asarray(np.minimum(read, max(n - 1, 0)))], 0)


class LayoutBatch(NamedTuple):
    """Framed training sequences with their aligned exact beliefs.

    Attributes:
        tokens: ``(B, L)`` framed tokens.
        beliefs: ``(B, L, d)``: entry ``p`` the belief after the body tokens read at ``p``.
        log_prob: ``(B,)``: ``log Pr(x_1..x_n)`` of each body.
        tokens_read, predicts_body, is_real: ``(L,)`` position tables of
            ``SequenceLayout.positions``.
    """

    tokens: Int[Array, "B L"]
    beliefs: Float[Array, "B L d"]
    log_prob: Float[Array, " B"]
    tokens_read: Int[np.ndarray, " L"]
    predicts_body: Bool[np.ndarray, " L"]
    is_real: Bool[np.ndarray, " L"]


def sample_layout(
    process: Union[GHMM, ConditionalProcess],
    layout: SequenceLayout,
    *,
    key: PRNGKeyArray,
    batch_size: int,
    body_len: int,
) -> LayoutBatch:
    """Sample ``body_len`` tokens per sequence, frame them, and align their exact beliefs.

    Args:
        process: a ``GHMM`` or a ``ConditionalProcess`` (joint Kronecker beliefs).
        layout: the frame; its ids must be ``>= process.vocab_size``.
        key: PRNG key.
        batch_size, body_len: ``B`` sequences of ``n`` process tokens.

    >>> import jax.random as jr, sfpjax
    >>> lay = sfpjax.SequenceLayout(bos=3, eos=4, pad=5, total_len=10)
    >>> batch = sfpjax.sample_layout(sfpjax.mess3(), lay, key=jr.key(0), batch_size=2, body_len=6)
    >>> batch.tokens.shape, batch.beliefs.shape
    ((2, 10), (2, 10, 3))
    """
    layout.check(process.vocab_size)
    layout.length(body_len)
    if isinstance(process, ConditionalProcess):
        body = sample_conditional(process, key=key, batch_size=batch_size, seq_len=body_len)
        res = filter_conditional(process, body)
        initial = process.initial_belief()
    elif isinstance(process, GHMM):
        body = sample(process, key=key, batch_size=batch_size, seq_len=body_len)
        res = filter_beliefs(process, body)
        initial = process.eta0
    else:
        raise ValueError(f"expected a sfpjax.GHMM or ConditionalProcess, got {type(process).__name__}.")
    read, predicts, real = layout.positions(body_len)
    return LayoutBatch(
        tokens=layout_tokens(body, layout, vocab_size=process.vocab_size),
        beliefs=layout_beliefs(res.beliefs, initial, layout),
        log_prob=res.log_prob,
        tokens_read=read,
        predicts_body=predicts,
        is_real=real,
    )
