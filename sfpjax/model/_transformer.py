"""A small decoder-only transformer whose every activation site has a name.

The model reads one token sequence ``x_1 .. x_L`` drawn from a process (see ``GHMM``) and
predicts, at every position, the distribution of the next token. It is an ``eqx.Module``
pytree of float32 arrays: batch with ``jax.vmap(model)``, build a stack of ``K`` models with
``eqx.filter_vmap(lambda k: Transformer(config, key=k))(keys)`` and run or train the stack
under ``eqx.filter_vmap`` as well.

Activation sites follow TransformerLens names (``blocks.1.hook_resid_post``). Ask for
any of them with ``sites=``; change any of them for one call with ``interventions=``
(a mapping from site name to :class:`sfpjax.Intervention`).

Belief alignment (the one place this is fixed for models):

* Without BOS (``use_bos=False``) model position ``t`` (0-indexed) has read
  ``x_1 .. x_{t+1}``. Its belief is ``filter_beliefs(process, tokens).beliefs[t]`` and its
  next-token loss floor is ``myopic_entropies(process, L)[t + 1]``. The output has ``L``
  positions; the prediction at position ``L-1`` is for a token not in the input.
* With BOS (``use_bos=True``) the model prepends the token ``vocab_size`` itself, so the
  output has ``L + 1`` positions: position 0 has read nothing (belief ``<<eta(0)|``,
  floor ``myopic_entropies[0]``) and position ``t`` has read ``x_1 .. x_t`` (belief
  ``beliefs[t - 1]``, floor ``myopic_entropies[t]``). Logits are over the ``vocab_size``
  real tokens only; BOS is never predicted. ``position_mask`` arrays of interventions
  then have ``L + 1`` entries, BOS first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._interventions import Intervention

__all__ = ["Transformer", "TransformerConfig"]

_ACTS = ("gelu", "relu")
_LN_EPS = 1e-5
_ONE_HOT_MAX_VOCAB = 256


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of a :class:`Transformer`.

    Args:
        vocab_size: number ``V`` of process symbols; tokens are ``0 .. V-1``.
        n_ctx: longest input sequence, not counting the BOS token the model prepends.
        n_layers: number of (attention, MLP) blocks.
        d_model: width of the residual stream.
        n_heads: attention heads per block.
        d_head: width of each head; ``None`` means ``d_model // n_heads`` (then ``d_model``
            must be divisible by ``n_heads``).
        d_mlp: hidden width of each MLP.
        act: MLP nonlinearity, ``"gelu"`` (exact, erf-based, as TransformerLens
            ``"gelu"`` and ``torch.nn.functional.gelu``) or ``"relu"``.
        use_bos: prepend a BOS token (id ``vocab_size``; the embedding then has ``V + 1``
            rows) so that position 0 has read nothing; see the module docstring for the
            belief alignment this implies.
        init_std: standard deviation of the normal initialization of every weight matrix
            and embedding (GPT-2 style); biases start at 0, LayerNorm scales at 1.

    >>> import sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=16)
    >>> cfg.d_head, cfg.n_positions
    (32, 16)
    """

    vocab_size: int
    n_ctx: int
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 2
    d_head: int | None = None
    d_mlp: int = 256
    act: str = "gelu"
    use_bos: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_layers", "d_model", "n_heads", "d_mlp"):
            _check_positive_int(name, getattr(self, name))
        if self.d_head is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    f"choose n_heads dividing d_model or give d_head explicitly."
                )
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        else:
            _check_positive_int("d_head", self.d_head)
        if self.act not in _ACTS:
            raise ValueError(f"act must be one of {_ACTS}, got {self.act!r}.")
        if not isinstance(self.use_bos, bool):
            raise ValueError(f"use_bos must be a bool, got {self.use_bos!r}.")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ValueError(f"init_std must be a positive number, got {self.init_std!r}.")

    @property
    def n_tokens(self) -> int:
        """Rows of the token embedding: ``vocab_size``, plus one for BOS."""
        return self.vocab_size + int(self.use_bos)

    @property
    def n_positions(self) -> int:
        """Rows of the positional embedding: ``n_ctx``, plus one for BOS."""
        return self.n_ctx + int(self.use_bos)

    @property
    def bos_token(self) -> int | None:
        """The BOS token id (``vocab_size``), or ``None`` without BOS."""
        return self.vocab_size if self.use_bos else None


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def site_names(config: TransformerConfig) -> tuple[str, ...]:
    """Every activation site of a model with this config, in forward order."""
    names = ["hook_embed", "hook_pos_embed"]
    for layer in range(config.n_layers):
        p = f"blocks.{layer}."
        names += [
            p + "hook_resid_pre",
            p + "attn.hook_pattern",
            p + "hook_attn_out",
            p + "hook_resid_mid",
            p + "mlp.hook_post",
            p + "hook_mlp_out",
            p + "hook_resid_post",
        ]
    names.append("ln_final.hook_normalized")
    return tuple(names)


def _layer_norm(x, w, b):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + _LN_EPS) * w[None, :] + b[None, :]


def _gelu(x):
    # erf rather than jax.nn.gelu(approximate=False), which goes through erfc: the same
    # function, at a fraction of the cost on CPU.
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.float32(1.0 / math.sqrt(2.0))))


class _Sites:
    """Per-call bookkeeping: apply the intervention at a site and record it if asked.

    Activations carry a leading batch axis; interventions are written for one sequence,
    so they are vmapped over it (their params are shared by every sequence).
    """

    def __init__(self, wanted, interventions):
        self.wanted = wanted
        self.interventions = interventions
        self.cache = {}

    def __call__(self, name, x, position_axis=0):
        iv = self.interventions.get(name)
        if iv is not None:
            x = jax.vmap(lambda a: iv.apply(name, a, position_axis))(x)
        if name in self.wanted:
            self.cache[name] = x
        return x


class TransformerBlock(eqx.Module):
    """Pre-LayerNorm block: ``r + Attn(LN(r))`` then ``+ MLP(LN(.))``.

    Weights are stored in the layout the forward pass multiplies with: ``W_QKV`` holds
    ``W_Q, W_K, W_V`` side by side (one matmul for all three); ``W_Q`` etc. give the
    TransformerLens ``(n_heads, d_model, d_head)`` views.
    """

    ln1_w: Float[Array, " d_model"]
    ln1_b: Float[Array, " d_model"]
    W_QKV: Float[Array, "d_model 3 n_heads d_head"]
    b_QKV: Float[Array, "3 n_heads d_head"]
    W_O: Float[Array, "n_heads d_head d_model"]
    b_O: Float[Array, " d_model"]
    ln2_w: Float[Array, " d_model"]
    ln2_b: Float[Array, " d_model"]
    W_in: Float[Array, "d_model d_mlp"]
    b_in: Float[Array, " d_mlp"]
    W_out: Float[Array, "d_mlp d_model"]
    b_out: Float[Array, " d_model"]

    @property
    def W_Q(self) -> Float[Array, "n_heads d_model d_head"]:
        return jnp.moveaxis(self.W_QKV[:, 0], 0, 1)

    @property
    def W_K(self) -> Float[Array, "n_heads d_model d_head"]:
        return jnp.moveaxis(self.W_QKV[:, 1], 0, 1)

    @property
    def W_V(self) -> Float[Array, "n_heads d_model d_head"]:
        return jnp.moveaxis(self.W_QKV[:, 2], 0, 1)


def _init_block(config: TransformerConfig, key) -> TransformerBlock:
    d, h, dh, m = config.d_model, config.n_heads, config.d_head, config.d_mlp
    f32 = jnp.float32
    kqkv, ko, kin, kout = jr.split(key, 4)
    std = config.init_std
    return TransformerBlock(
        ln1_w=jnp.ones((d,), f32),
        ln1_b=jnp.zeros((d,), f32),
        W_QKV=std * jr.normal(kqkv, (d, 3, h, dh), f32),
        b_QKV=jnp.zeros((3, h, dh), f32),
        W_O=std * jr.normal(ko, (h, dh, d), f32),
        b_O=jnp.zeros((d,), f32),
        ln2_w=jnp.ones((d,), f32),
        ln2_b=jnp.zeros((d,), f32),
        W_in=std * jr.normal(kin, (d, m), f32),
        b_in=jnp.zeros((m,), f32),
        W_out=std * jr.normal(kout, (m, d), f32),
        b_out=jnp.zeros((d,), f32),
    )


class Transformer(eqx.Module):
    """Decoder-only transformer: embeddings, ``n_layers`` pre-LN blocks, final LN, unembed.

    Token and learned positional embeddings; each block applies causal multi-head
    attention and then an MLP to the LayerNorm-ed residual stream and adds the results
    back; a final LayerNorm and an affine unembedding give next-token logits over the
    ``vocab_size`` process symbols. All parameters are float32, drawn from
    ``normal(0, init_std)`` (biases 0, LayerNorm scales 1).

    Args:
        config: a :class:`TransformerConfig`.
        key: PRNG key for the initialization.

    >>> import jax.numpy as jnp, jax.random as jr
    >>> import sfpjax
    >>> model = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=3, n_ctx=8), key=jr.key(0))
    >>> model(jnp.array([0, 2, 1])).shape
    (3, 3)
    """

    config: TransformerConfig = eqx.field(static=True)
    W_E: Float[Array, "n_tokens d_model"]
    W_pos: Float[Array, "n_positions d_model"]
    blocks: tuple[TransformerBlock, ...]
    ln_final_w: Float[Array, " d_model"]
    ln_final_b: Float[Array, " d_model"]
    W_U: Float[Array, "d_model vocab"]
    b_U: Float[Array, " vocab"]

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}.")
        embed_key, pos_key, unembed_key, blocks_key = jr.split(key, 4)
        f32 = jnp.float32
        d, std = config.d_model, config.init_std
        self.config = config
        self.W_E = std * jr.normal(embed_key, (config.n_tokens, d), f32)
        self.W_pos = std * jr.normal(pos_key, (config.n_positions, d), f32)
        self.blocks = tuple(
            _init_block(config, k) for k in jr.split(blocks_key, config.n_layers)
        )
        self.ln_final_w = jnp.ones((d,), f32)
        self.ln_final_b = jnp.zeros((d,), f32)
        self.W_U = std * jr.normal(unembed_key, (d, config.vocab_size), f32)
        self.b_U = jnp.zeros((config.vocab_size,), f32)

    @property
    def site_names(self) -> tuple[str, ...]:
        """Every activation site, in forward order (TransformerLens names)."""
        return site_names(self.config)

    def __call__(
        self,
        tokens: Int[Array, " seq"],
        *,
        sites: Sequence[str] = (),
        interventions: Mapping[str, Intervention] | None = None,
    ) -> Float[Array, "seq_out vocab"] | tuple[Float[Array, "seq_out vocab"], dict[str, Array]]:
        """Next-token logits for one sequence ``x_1 .. x_L`` (batch with ``jax.vmap``).

        Args:
            tokens: int array ``(L,)`` of symbols in ``0 .. vocab_size-1``, ``L <= n_ctx``.
                With ``use_bos`` the model prepends BOS itself; do not include it.
            sites: names from :attr:`site_names` whose activations to return. Nothing is
                recorded when empty.
            interventions: mapping from site name to :class:`Intervention`; the
                intervention's result replaces the activation there for this call (and is
                what ``sites`` records). Positions are those the model processes:
                ``L + 1`` with BOS (BOS first), ``L`` otherwise.

        Returns:
            ``logits`` of shape ``(L + use_bos, vocab_size)`` where row ``t`` predicts the
            token after the ones read at position ``t``; with ``sites`` non-empty,
            ``(logits, {site: activation})``. Activations are per sequence:
            ``(seq_out, d_model)`` for residual-stream sites, ``(seq_out, d_mlp)`` for
            ``mlp.hook_post``, ``(n_heads, seq_out, seq_out)`` (query, key) for
            ``attn.hook_pattern``.

        >>> import jax, jax.numpy as jnp, jax.random as jr
        >>> import sfpjax
        >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, use_bos=True)
        >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
        >>> logits, acts = model(jnp.array([0, 2]), sites=["blocks.1.hook_resid_post"])
        >>> logits.shape, acts["blocks.1.hook_resid_post"].shape
        ((3, 3), (3, 64))
        >>> jax.vmap(model)(jnp.zeros((5, 8), jnp.int32)).shape
        (5, 9, 3)
        """
        if tokens.ndim != 1:
            raise ValueError(
                f"tokens must be one sequence of shape (seq,), got shape {tokens.shape}; "
                f"batch with jax.vmap(model)(tokens) or model.batched(tokens)."
            )
        out = self.batched(tokens[None], sites=sites, interventions=interventions)
        if not isinstance(out, tuple):
            return out[0]
        logits, cache = out
        return logits[0], {name: act[0] for name, act in cache.items()}

    def batched(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        sites: Sequence[str] = (),
        interventions: Mapping[str, Intervention] | None = None,
    ) -> (
        Float[Array, "batch seq_out vocab"]
        | tuple[Float[Array, "batch seq_out vocab"], dict[str, Array]]
    ):
        """``jax.vmap(model)(tokens, ...)``, computed on the whole batch at once.

        Same arguments and results as :meth:`__call__` with a leading batch axis on
        ``tokens``, the logits and every recorded activation; interventions are still
        written for one sequence and applied to each. The dense layers multiply the
        flattened ``(batch * seq, d_model)`` activations, whose gradients with respect to
        the weights are single matrix products; under ``jax.vmap`` they become contractions
        over two axes that XLA on CPU computes through a transpose, so training through
        this method is several times faster there. Use it in training loops.

        >>> import jax.numpy as jnp, jax.random as jr
        >>> import sfpjax
        >>> model = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=3, n_ctx=8), key=jr.key(0))
        >>> model.batched(jnp.zeros((5, 8), jnp.int32)).shape
        (5, 8, 3)
        """
        cfg = self.config
        if isinstance(sites, str):
            sites = (sites,)
        interventions = {} if interventions is None else dict(interventions)
        self._check_call(tokens, sites, interventions)

        tokens = eqx.error_if(
            tokens,
            jnp.any((tokens < 0) | (tokens >= cfg.vocab_size)),
            f"tokens must lie in 0 .. vocab_size-1 = {cfg.vocab_size - 1}.",
        )
        batch = tokens.shape[0]
        if cfg.use_bos:
            bos = jnp.full((batch, 1), cfg.vocab_size, dtype=tokens.dtype)
            tokens = jnp.concatenate([bos, tokens], axis=1)
        seq = tokens.shape[1]
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
        rows = batch * seq
        site = _Sites(frozenset(sites), interventions)

        def flat(x):
            return x.reshape(rows, x.shape[-1])

        def unflat(x):
            return x.reshape(batch, seq, x.shape[-1])

        if cfg.n_tokens <= _ONE_HOT_MAX_VOCAB:
            # The gradient of a gather is a scatter-add, slow on CPU; for a small alphabet
            # a one-hot product gives the same rows (exactly) and a matmul as gradient.
            one_hot = jax.nn.one_hot(tokens.reshape(rows), cfg.n_tokens, dtype=jnp.float32)
            embed = unflat(one_hot @ self.W_E)
        else:
            embed = jnp.take(self.W_E, tokens, axis=0)
        embed = site("hook_embed", embed)
        pos_embed = jnp.broadcast_to(self.W_pos[None, :seq], (batch, seq, d))
        pos_embed = site("hook_pos_embed", pos_embed)
        resid = flat(embed + pos_embed)
        causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None]
        scale = jnp.float32(1.0 / math.sqrt(dh))
        for layer, block in enumerate(self.blocks):
            p = f"blocks.{layer}."
            resid = flat(site(p + "hook_resid_pre", unflat(resid)))

            x = _layer_norm(resid, block.ln1_w, block.ln1_b)
            qkv = x @ block.W_QKV.reshape(d, 3 * h * dh) + block.b_QKV.reshape(1, 3 * h * dh)
            qkv = qkv.reshape(batch, seq, 3, h, dh)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            scores = jnp.einsum("bqhe,bkhe->bhqk", q * scale, k)
            scores = jnp.where(causal, scores, -jnp.inf)
            pattern = jax.nn.softmax(scores, axis=-1)
            pattern = site(p + "attn.hook_pattern", pattern, position_axis=1)
            z = jnp.einsum("bhqk,bkhe->bqhe", pattern, v).reshape(rows, h * dh)
            attn_out = z @ block.W_O.reshape(h * dh, d) + block.b_O[None, :]
            attn_out = flat(site(p + "hook_attn_out", unflat(attn_out)))
            resid = flat(site(p + "hook_resid_mid", unflat(resid + attn_out)))

            x = _layer_norm(resid, block.ln2_w, block.ln2_b)
            pre = x @ block.W_in + block.b_in[None, :]
            post = _gelu(pre) if cfg.act == "gelu" else jax.nn.relu(pre)
            post = flat(site(p + "mlp.hook_post", unflat(post)))
            mlp_out = post @ block.W_out + block.b_out[None, :]
            mlp_out = flat(site(p + "hook_mlp_out", unflat(mlp_out)))
            resid = flat(site(p + "hook_resid_post", unflat(resid + mlp_out)))

        normalized = _layer_norm(resid, self.ln_final_w, self.ln_final_b)
        normalized = flat(site("ln_final.hook_normalized", unflat(normalized)))
        logits = unflat(normalized @ self.W_U + self.b_U[None, :])
        if not sites:
            return logits
        return logits, site.cache

    def _check_call(self, tokens, sites, interventions):
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must be a batch of sequences of shape (batch, seq), got shape "
                f"{tokens.shape}."
            )
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array, got dtype {tokens.dtype}.")
        if tokens.shape[1] > cfg.n_ctx or tokens.shape[1] + int(cfg.use_bos) == 0:
            raise ValueError(
                f"tokens must have length 1 .. n_ctx={cfg.n_ctx}"
                f"{' (0 allowed with BOS)' if cfg.use_bos else ''}, got {tokens.shape[1]}."
            )
        known = set(self.site_names)
        for what, names in (("sites", sites), ("interventions", interventions)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(
                    f"Unknown site name(s) in {what}: {unknown}. Valid sites for this "
                    f"{cfg.n_layers}-layer model: {list(self.site_names)}."
                )
        for name, iv in interventions.items():
            if not isinstance(iv, Intervention):
                raise ValueError(
                    f"interventions[{name!r}] must be an sfpjax.Intervention, "
                    f"got {type(iv).__name__}."
                )
