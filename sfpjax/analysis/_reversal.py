"""Reversing emergent misalignment in a persona world: steering, ablation, LoRA geometry.

A persona world (``sfpjax.persona_world``) has leaves ``(a, d)``: persona sector ``a``
(aligned ``A``, misaligned ``M``) times domain sector ``d``. Its *leaf posterior* after a
context ``w`` is ``pi_w(a, d) = <<eta(w)| P_{(a, d)} |1>>`` (``leaf_posteriors``); its two
marginals are the persona belief ``pi_w(a)`` and the domain belief ``pi_w(d)``. Here the
leaf posterior plays the joint belief of ``sfpjax.belief_state_delta`` with
``factor_dims = (n_P, n_D)``: factor 0 is the persona, factor 1 the domain.

* ``leaf_belief_delta``: belief-state steering of one factor (seed 000, section 1): read
  the leaf posterior with a probe, replace the persona (or domain) marginal by a target,
  rebuild the product ``pi(a) pi(d)`` and map the change back to the residual stream
  through the probe's inverse or a generative map ``x ~ <<pi| A + c``.
* ``fold_steering``: the plain :class:`sfpjax.Transformer` that adds a fixed vector at a
  residual site at every position, exactly (the vector folded into a bias), so every
  metric that takes a ``Transformer`` (sampling, ``em_metrics``) runs on the steered model
  and a scale sweep is ``vmap`` over the scale.
* ``ablate_direction_weights``: directional ablation everywhere at once (Arditi et al.
  2024): every matrix and bias that writes to the residual stream is orthogonalized
  against ``u``, so the residual stream has no component along ``u`` at any layer or
  position, the form of ablation used in the EM literature (Soligo et al. 2025).
* ``reversal_metrics`` / ``reversal_sweep``: broad and narrow EM, coherence deficit and
  the domain factor's next-token KL (collateral) of a model, against a reference model
  and the exact process; the sweep steers with ``scale * v`` for every scale in one
  vmapped call.
* ``lora_residual_directions``: the directions of each rank-``r`` LoRA update that live in
  the residual basis (``A``'s columns for a matrix that reads the residual stream, ``B``'s
  rows for one that writes to it), for ``sfpjax.direction_overlaps``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ..inference._filter import filter_beliefs, next_token_probs
from ..model._lora import LoRATransformer
from ..model._transformer import Transformer
from ..processes._persona import PersonaWorld
from ..processes._structure import sector_weights
from ._em import EvalPrompts, em_metrics
from ._probes import LinearProbe
from ._steering import belief_state_delta
from ._steering_metrics import factor_token_marginals, kl_divergence

__all__ = [
    "leaf_posteriors",
    "leaf_belief_delta",
    "fold_steering",
    "ablate_direction_weights",
    "ReversalMetrics",
    "reversal_metrics",
    "reversal_sweep",
    "lora_residual_directions",
]

_FACTORS = {"persona": 0, "domain": 1}


def _check_world(world) -> None:
    if not isinstance(world, PersonaWorld):
        raise ValueError(f"expected a sfpjax.PersonaWorld; got {type(world).__name__}.")


def leaf_posteriors(world: PersonaWorld, tokens: Int[ArrayLike, "*batch L"]) -> Float[Array, "*batch L nL"]:
    """Exact leaf posterior ``pi_w(a, d) = <<eta(w)| P_{(a, d)} |1>>`` after every prefix.

    Entry ``t`` is the posterior after ``x_1 .. x_{t+1}`` (leaf ``l = a n_D + d`` on the
    last axis), the target of a leaf probe at model position ``t + use_bos``.

    >>> import jax.numpy as jnp, sfpjax
    >>> w = sfpjax.persona_world()
    >>> sfpjax.leaf_posteriors(w, jnp.zeros((3, 5), jnp.int32)).shape
    (3, 5, 4)
    """
    _check_world(world)
    tokens = jnp.asarray(tokens)
    if tokens.ndim < 1:
        raise ValueError(f"tokens must have shape (*batch, L), got {tokens.shape}.")
    res = filter_beliefs(world.process, tokens)
    post = sector_weights(res.beliefs, world.sectors, factor_dims=world.factor_dims, right=world.process.right)
    return post.reshape(post.shape[:-2] + (-1,))


def leaf_belief_delta(
    world: PersonaWorld,
    probe: LinearProbe,
    acts: Float[ArrayLike, "*batch d_act"],
    *,
    factor: str = "persona",
    target: str | int | None = None,
    decoder: LinearProbe | None = None,
) -> Float[Array, "*batch d_act"]:
    """Belief-state steering of the persona (or domain) belief of a persona world.

    ``belief_state_delta`` with the leaf posterior as the joint belief and
    ``factor_dims = (n_P, n_D)``: the probe reads ``pi_hat = L(x)``, its marginals
    ``pi_hat(a)``, ``pi_hat(d)`` are formed, the chosen factor's marginal is replaced by the
    one-hot belief in ``target`` and the product rebuilt; the change ``delta_pi`` goes back
    to the residual stream as ``delta_pi W^+`` (no decoder) or ``delta_pi A`` (a generative
    map ``x ~ <<pi| A + c`` fitted with ``fit_probe(leaf_posteriors, acts)``). The other
    factor's marginal of ``pi_hat + delta_pi`` is unchanged, exactly.

    Args:
        world: the persona world (gives ``n_P``, ``n_D`` and the sector names).
        probe: a probe from activations to leaf posteriors (``n_P n_D`` outputs).
        acts: activations ``x`` at the steering site, ``(*batch, d_act)``.
        factor: ``"persona"`` or ``"domain"``.
        target: the target sector (name or index); default the aligned persona for
            ``"persona"``, and the first domain other than the fine-tuning domain for
            ``"domain"``.
        decoder: optional generative map from leaf posteriors to activations.

    Returns:
        ``delta_x``, ``(*batch, d_act)``.

    >>> import jax.numpy as jnp, sfpjax
    >>> w = sfpjax.persona_world()
    >>> probe = sfpjax.LinearProbe(jnp.eye(4), jnp.zeros(4))     # activations are leaf posteriors
    >>> x = jnp.array([0.0, 0.0, 0.5, 0.5])                      # misaligned, domain D or O
    >>> sfpjax.leaf_belief_delta(w, probe, x).round(3)           # move to aligned
    Array([ 0.5,  0.5, -0.5, -0.5], dtype=float32)
    """
    _check_world(world)
    if factor not in _FACTORS:
        raise ValueError(f"factor must be 'persona' or 'domain', got {factor!r}.")
    f = _FACTORS[factor]
    names = world.persona_names if f == 0 else world.domain_names
    if target is None:
        target = world.aligned if f == 0 else next(d for d in range(world.n_domain) if d != world.finetune_domain)
    if isinstance(target, str):
        if target not in names:
            raise ValueError(f"target {target!r} is not a {factor} sector; the sectors are {names}.")
        target = names.index(target)
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= int(target) < len(names):
        raise ValueError(f"target must be a {factor} sector name in {names} or an index below {len(names)}, got {target!r}.")
    onehot = jnp.zeros((len(names),), probe.W.dtype).at[int(target)].set(1.0)
    return belief_state_delta(probe, acts, (world.n_persona, world.n_domain), f, onehot, decoder=decoder)


def _site_parts(model: Transformer, site: str):
    if site not in model.site_names:
        raise ValueError(f"Unknown site {site!r}; valid sites: {list(model.site_names)}.")
    if site.startswith("blocks."):
        layer, rest = int(site.split(".")[1]), site.split(".", 2)[2]
        return layer, rest
    return None, site


_FOLDABLE = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post", "mlp.hook_post")


def fold_steering(model: Transformer, site: str, vector: Float[ArrayLike, " width"]) -> Transformer:
    """The model that adds ``vector`` to the activation at ``site`` at every position.

    Exact, with no intervention needed: the addition is folded into a bias. Adding ``v`` at
    ``blocks.l.hook_resid_post`` or ``hook_mlp_out`` is ``b_out += v`` in block ``l``; at
    ``hook_resid_mid`` or ``hook_attn_out`` it is ``b_O += v``; at ``hook_resid_pre`` it
    is the previous block's ``b_out += v`` (every row of ``W_pos`` for block 0); at
    ``mlp.hook_post`` (width ``d_mlp``) it is ``b_out += v W_out``. The result computes the
    same logits as ``model(tokens, interventions={site: steer_add(vector)})`` (BOS
    position included) and is a plain :class:`Transformer`, so it samples, is scored by
    ``em_metrics``, and is vmappable over ``vector`` (a scale sweep).

    Args:
        model: a :class:`Transformer`.
        site: one of the sites above, e.g. ``"blocks.1.hook_resid_post"``.
        vector: the added vector ``(d_model,)`` (``(d_mlp,)`` at ``mlp.hook_post``).

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> m = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=4, n_ctx=8, d_model=16, d_mlp=32), key=jr.key(0))
    >>> v, t = jnp.ones(16), jnp.array([0, 1, 2])
    >>> a = sfpjax.fold_steering(m, "blocks.0.hook_resid_post", v)(t)
    >>> b = m(t, interventions={"blocks.0.hook_resid_post": sfpjax.steer_add(v)})
    >>> bool(jnp.allclose(a, b, atol=1e-5))
    True
    """
    if not isinstance(model, Transformer):
        raise ValueError(f"fold_steering needs a sfpjax.Transformer (merge a LoRATransformer first), got {type(model).__name__}.")
    layer, rest = _site_parts(model, site)
    if rest not in _FOLDABLE:
        raise ValueError(f"a constant vector can be folded into the weights at {_FOLDABLE} of a block, got {site!r}.")
    cfg = model.config
    width = cfg.d_mlp if rest == "mlp.hook_post" else cfg.d_model
    v = jnp.asarray(vector)
    if v.shape != (width,) or not jnp.issubdtype(v.dtype, jnp.floating):
        raise ValueError(f"vector at {site!r} must be a float array of shape ({width},), got {v.dtype}{list(v.shape)}.")
    if rest == "hook_resid_pre":
        if layer == 0:
            return eqx.tree_at(lambda m: m.W_pos, model, model.W_pos + v.astype(model.W_pos.dtype)[None])
        layer, rest = layer - 1, "hook_resid_post"
    block = model.blocks[layer]
    if rest in ("hook_attn_out", "hook_resid_mid"):
        return eqx.tree_at(lambda m: m.blocks[layer].b_O, model, block.b_O + v.astype(block.b_O.dtype))
    if rest == "mlp.hook_post":
        v = v.astype(block.W_out.dtype) @ block.W_out
    return eqx.tree_at(lambda m: m.blocks[layer].b_out, model, block.b_out + v.astype(block.b_out.dtype))


def ablate_direction_weights(
    model: Transformer, direction: Float[ArrayLike, " d_model"], *, value: float = 0.0
) -> Transformer:
    """Directional ablation at every layer and position by weight orthogonalization.

    With ``u = direction / |direction|`` and ``P = I - u u^T``, every write to the residual
    stream is projected: ``W_E P``, ``W_pos P``, ``W_O P``, ``b_O P``, ``W_out P``,
    ``b_out P``. The residual stream is a sum of these writes, so its component along
    ``u`` is zero at every ``hook_resid_*`` site, at every position: the same model as
    removing the projection on ``u`` after every write (Arditi et al. 2024; the EM
    ablations of Soligo et al. 2025).

    ``value`` sets that component to a constant instead of zero (mean ablation): after the
    projection, ``value * u`` is added to every row of ``W_pos``, so the residual stream's
    component along ``u`` is ``value`` at every site and position. Zero ablation assumes
    the activations' mean along ``u`` is near zero, as it is for the LLM directions of the
    literature; where it is not, zeroing moves every activation to an arbitrary point on
    the axis, and the mean projection over a reference set (``value = mean(acts @ u)``) is
    the ablation that removes the variation along ``u`` and nothing else.

    Args:
        model: a :class:`Transformer`.
        direction: ``(d_model,)``, nonzero.
        value: the component along ``direction / |direction|`` every residual-stream site
            gets (default 0: zero ablation).

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> m = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=4, n_ctx=8, d_model=16, d_mlp=32), key=jr.key(0))
    >>> u = jnp.zeros(16).at[3].set(1.0)
    >>> _, acts = sfpjax.ablate_direction_weights(m, u)(jnp.array([0, 1]), sites=["blocks.1.hook_resid_post"])
    >>> float(jnp.abs(acts["blocks.1.hook_resid_post"][:, 3]).max()) < 1e-6
    True
    """
    if not isinstance(model, Transformer):
        raise ValueError(f"ablate_direction_weights needs a sfpjax.Transformer, got {type(model).__name__}.")
    d = model.config.d_model
    u = np.asarray(direction, np.float64)
    if u.shape != (d,):
        raise ValueError(f"direction must have shape ({d},) (d_model), got {u.shape}.")
    norm = np.linalg.norm(u)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("direction must be finite and nonzero; a zero direction has nothing to ablate.")
    u = jnp.asarray(u / norm, jnp.float32)

    def proj(w):
        return (w - (w @ u)[..., None] * u.reshape((1,) * (w.ndim - 1) + (-1,))).astype(w.dtype)

    blocks = tuple(
        eqx.tree_at(lambda b: (b.W_O, b.b_O, b.W_out, b.b_out), b, (proj(b.W_O), proj(b.b_O), proj(b.W_out), proj(b.b_out)))
        for b in model.blocks
    )
    if not np.isfinite(value):
        raise ValueError(f"value must be finite, got {value!r}.")
    W_pos = proj(model.W_pos) + (value * u)[None, :].astype(model.W_pos.dtype)
    return eqx.tree_at(lambda m: (m.W_E, m.W_pos, m.blocks), model, (proj(model.W_E), W_pos, blocks))


class ReversalMetrics(NamedTuple):
    """EM and collateral metrics of one (steered) model; a sweep adds a leading scale axis.

    Attributes:
        broad: broad EM rate (``(M, d)`` dispositions after prompts of domains ``d != D``).
        narrow: narrow EM rate (``(M, D)`` after ``D`` prompts).
        aligned_share: share of continuations whose leaf has the aligned persona.
        coherence_deficit: nats per token by which the model out-scores the best leaf on
            its own continuations (``em_metrics``).
        impossible_rate: share of continuation tokens no leaf could have written.
        domain_kl_reference: ``KL(q_ref(x_D) || q(x_D))`` of the domain factor's next-token
            marginal after each prompt, averaged: the collateral change against the
            reference model (NaN without one).
        domain_kl_exact: ``KL(Pr(x_D | w) || q(x_D))`` against the exact process.
        persona_kl_exact: the same for the persona factor's marginal.
    """

    broad: Float[Array, "*n"]
    narrow: Float[Array, "*n"]
    aligned_share: Float[Array, "*n"]
    coherence_deficit: Float[Array, "*n"]
    impossible_rate: Float[Array, "*n"]
    domain_kl_reference: Float[Array, "*n"]
    domain_kl_exact: Float[Array, "*n"]
    persona_kl_exact: Float[Array, "*n"]


def _last_probs(model, toks):
    flat = toks.reshape(-1, toks.shape[-1])
    logits = model.batched(flat)[:, -1]
    return jax.nn.softmax(logits.astype(jnp.float32), -1)


def _check_prompts(world, prompts):
    if not isinstance(prompts, EvalPrompts):
        raise ValueError(f"prompts must be sfpjax.EvalPrompts (from sfpjax.eval_prompts), got {type(prompts).__name__}.")
    if prompts.tokens.shape[0] != world.n_domain:
        raise ValueError(f"prompts have {prompts.tokens.shape[0]} domains but the world has {world.n_domain}.")


def _exact_last_probs(world, prompts):
    res = filter_beliefs(world.process, prompts.tokens.reshape(-1, prompts.tokens.shape[-1]))
    return next_token_probs(world.process, res.beliefs[:, -1]).astype(jnp.float32)


def _metrics(model, world, prompts, key, length, glitch, exact, ref):
    m = em_metrics(model, world, prompts, key=key, length=length, glitch=glitch)
    sizes = (world.persona_vocab, world.domain_vocab)
    q = factor_token_marginals(_last_probs(model, prompts.tokens), sizes)
    ex = factor_token_marginals(exact, sizes)
    dkl_ref = (kl_divergence(factor_token_marginals(ref, sizes)[1], q[1]).mean() if ref is not None
               else jnp.asarray(jnp.nan, jnp.float32))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return ReversalMetrics(
        f32(m.rates.broad), f32(m.rates.narrow), f32(m.rates.aligned_share), f32(m.coherence_deficit),
        f32(m.impossible_rate), f32(dkl_ref), f32(kl_divergence(ex[1], q[1]).mean()),
        f32(kl_divergence(ex[0], q[0]).mean()),
    )


def reversal_metrics(
    model: Transformer,
    world: PersonaWorld,
    prompts: EvalPrompts,
    *,
    key: PRNGKeyArray,
    length: int,
    reference: Transformer | None = None,
    glitch: float = 1e-3,
) -> ReversalMetrics:
    """Broad / narrow EM, coherence and the collateral KLs of one model (``ReversalMetrics``).

    Args:
        model: the (steered, ablated or fine-tuned) :class:`Transformer`.
        world: the persona world.
        prompts: ``eval_prompts(world, ...)``.
        key: PRNG key of the continuations (the same key across models gives common
            random numbers).
        length: continuation length (prompt length + ``length`` at most ``n_ctx``).
        reference: the model the collateral KL is measured against (e.g. the pretrained
            one); ``None`` gives NaN there.
        glitch: as in ``em_metrics``.

    >>> import jax.random as jr, sfpjax
    >>> w = sfpjax.persona_world()
    >>> m = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=16, n_ctx=12, d_model=16, n_heads=2, d_mlp=32), key=jr.key(0))
    >>> pr = sfpjax.eval_prompts(w, key=jr.key(1), n=4, length=4)
    >>> r = sfpjax.reversal_metrics(m, w, pr, key=jr.key(2), length=6, reference=m)
    >>> float(r.domain_kl_reference)
    0.0
    """
    _check_world(world)
    _check_prompts(world, prompts)
    ref = None if reference is None else _last_probs(reference, prompts.tokens)
    return _metrics(model, world, prompts, key, int(length), float(glitch), _exact_last_probs(world, prompts), ref)


@eqx.filter_jit
def _sweep(model, world, prompts, site, vector, scales, key, length, glitch, exact, ref):
    def one(s):
        return _metrics(fold_steering(model, site, s * vector), world, prompts, key, length, glitch, exact, ref)

    return jax.vmap(one)(scales)


def reversal_sweep(
    model: Transformer,
    world: PersonaWorld,
    prompts: EvalPrompts,
    site: str,
    vector: Float[ArrayLike, " d_model"],
    scales: Float[ArrayLike, " n"],
    *,
    key: PRNGKeyArray,
    length: int,
    reference: Transformer | None = None,
    glitch: float = 1e-3,
) -> ReversalMetrics:
    """``reversal_metrics`` of the model steered by ``scale * vector`` at ``site``, every scale.

    The steered model is ``fold_steering(model, site, scale * vector)`` (the vector added
    at every position, also while the continuations are sampled); the sweep is one jitted
    call vmapped over ``scales``, every scale with the same sampling key. Every field of
    the result has shape ``(n_scales,)``; scale 0 is the unsteered model.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> w = sfpjax.persona_world()
    >>> m = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=16, n_ctx=12, d_model=16, n_heads=2, d_mlp=32), key=jr.key(0))
    >>> pr = sfpjax.eval_prompts(w, key=jr.key(1), n=4, length=4)
    >>> r = sfpjax.reversal_sweep(m, w, pr, "blocks.1.hook_resid_post", jnp.ones(16), jnp.array([0.0, 1.0]),
    ...                           key=jr.key(2), length=6, reference=m)
    >>> r.broad.shape, abs(float(r.domain_kl_reference[0])) < 1e-6
    ((2,), True)
    """
    _check_world(world)
    _check_prompts(world, prompts)
    if not isinstance(model, Transformer):
        raise ValueError(f"reversal_sweep needs a sfpjax.Transformer (merge a LoRATransformer first), got {type(model).__name__}.")
    fold_steering(model, site, vector)  # validates site and width before tracing
    scales = jnp.asarray(scales, jnp.float32)
    if scales.ndim != 1:
        raise ValueError(f"scales must be a 1-D array, got shape {scales.shape}.")
    ref = None if reference is None else _last_probs(reference, prompts.tokens)
    return _sweep(model, world, prompts, site, jnp.asarray(vector, jnp.float32), scales, key, int(length),
                  float(glitch), _exact_last_probs(world, prompts), ref)


def lora_residual_directions(model: LoRATransformer) -> dict[str, Float[np.ndarray, "d_model r"]]:
    """The directions of each LoRA update ``Delta W = A B`` that live in the residual basis.

    In the ``x -> x W`` layout of sfpjax, a matrix that reads the residual stream
    (``d_in = d_model``: ``W_Q/K/V``, ``W_in``, ``W_U``) sees only the projection of ``x``
    on the columns of ``A`` (``"<name>.A"``, shape ``(d_model, r)``: the PyTorch ``A``
    rows); one that writes to it (``d_out = d_model``: ``W_O``, ``W_out``, ``W_E``,
    ``W_pos``) writes within the rows of ``B`` (``"<name>.B"``, ``B^T`` of shape
    ``(d_model, r)``: the PyTorch ``B`` columns). Pass the result, with probe weights and
    steering vectors, to ``sfpjax.direction_overlaps``.

    >>> import jax.random as jr, sfpjax
    >>> base = sfpjax.Transformer(sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32), key=jr.key(0))
    >>> lora = sfpjax.LoRATransformer(base, rank=1, targets=("mlp.W_in", "mlp.W_out"), key=jr.key(1))
    >>> {k: v.shape for k, v in sfpjax.lora_residual_directions(lora).items()}
    {'blocks.0.mlp.W_in.A': (16, 1), 'blocks.0.mlp.W_out.B': (16, 1)}
    """
    if not isinstance(model, LoRATransformer):
        raise ValueError(f"lora_residual_directions needs a sfpjax.LoRATransformer, got {type(model).__name__}.")
    d = model.config.d_model
    out = {}
    for name, ad in model.adapters.items():
        A, B = np.asarray(ad.A, np.float64), np.asarray(ad.B, np.float64)
        if A.ndim != 2:
            raise ValueError(f"adapter {name} is stacked (A has shape {A.shape}); pass one model of the stack.")
        if A.shape[0] == d:
            out[f"{name}.A"] = A
        if B.shape[1] == d:
            out[f"{name}.B"] = B.T
    return out
