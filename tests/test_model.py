import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import sfpjax
from sfpjax import Intervention, Transformer, TransformerConfig

TINY = dict(vocab_size=3, n_ctx=6, n_layers=2, d_model=8, n_heads=2, d_mlp=16)
LAST_RESID = "blocks.1.hook_resid_post"


def _identity(a, mask, params):
    return a


def _add_scaled(a, mask, params):
    vector, scale = params
    return a + jnp.where(mask[:, None], (scale * vector)[None, :], jnp.zeros_like(a))


def _add_one_row(a, mask, params):
    return jnp.concatenate([a, a[:1]], axis=0)


def _to_float64(a, mask, params):
    return a.astype(jnp.float64)


def _model(getkey, **overrides):
    # A larger init scale than the default makes every layer matter in the oracle check.
    cfg = TransformerConfig(**{**TINY, "init_std": 0.3, **overrides})
    return Transformer(cfg, key=getkey())


def _tokens(getkey, n, vocab=3):
    return jr.randint(getkey(), (n,), 0, vocab, dtype=jnp.int32)


def _numpy_forward(model, tokens):
    """Float64 reference written independently of the JAX code path."""
    cfg = model.config
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), model)
    toks = np.asarray(tokens)
    if cfg.use_bos:
        toks = np.concatenate([[cfg.vocab_size], toks])
    s = len(toks)

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w + b

    r = p.W_E[toks] + p.W_pos[:s]
    for blk in p.blocks:
        x = ln(r, blk.ln1_w, blk.ln1_b)
        heads = []
        for h in range(cfg.n_heads):
            q = x @ blk.W_QKV[:, 0, h] + blk.b_QKV[0, h]
            k = x @ blk.W_QKV[:, 1, h] + blk.b_QKV[1, h]
            v = x @ blk.W_QKV[:, 2, h] + blk.b_QKV[2, h]
            sc = q @ k.T / math.sqrt(cfg.d_head)
            sc[np.triu_indices(s, 1)] = -np.inf
            w = np.exp(sc - sc.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            heads.append(w @ v @ blk.W_O[h])
        r = r + sum(heads) + blk.b_O
        x = ln(r, blk.ln2_w, blk.ln2_b)
        pre = x @ blk.W_in + blk.b_in
        if cfg.act == "gelu":
            from math import erf

            post = pre * 0.5 * (1 + np.vectorize(erf)(pre / math.sqrt(2)))
        else:
            post = np.maximum(pre, 0)
        r = r + post @ blk.W_out + blk.b_out
    return ln(r, p.ln_final_w, p.ln_final_b) @ p.W_U + p.b_U


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("use_bos", [False, True])
def test_forward_matches_float64_reference(getkey, act, use_bos):
    model = _model(getkey, act=act, use_bos=use_bos)
    tokens = _tokens(getkey, 5)
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    assert logits.shape == (5 + use_bos, 3)
    np.testing.assert_allclose(logits, _numpy_forward(model, tokens), rtol=1e-4, atol=1e-5)


def test_parameters_are_float32_and_shaped(getkey):
    model = _model(getkey, use_bos=True)
    leaves = jax.tree.leaves(model)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert model.W_E.shape == (4, 8)
    assert model.W_pos.shape == (7, 8)
    assert model.W_U.shape == (8, 3)
    assert model.blocks[0].W_Q.shape == (2, 8, 4)
    default = Transformer(TransformerConfig(vocab_size=3, n_ctx=4), key=getkey())
    assert 0.015 < float(jnp.std(default.blocks[0].W_in)) < 0.025


def test_batched_shapes(getkey):
    model = _model(getkey)
    tokens = jr.randint(getkey(), (4, 6), 0, 3, dtype=jnp.int32)
    out = jax.vmap(model)(tokens)
    assert out.shape == (4, 6, 3)
    np.testing.assert_allclose(out[2], model(tokens[2]), rtol=1e-6, atol=1e-6)


def test_causality(getkey):
    model = _model(getkey)
    tokens = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    changed = tokens.at[3].set(1)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(a[:3], b[:3])
    assert not np.allclose(a[3:], b[3:])


def test_shorter_prefix_gives_same_logits(getkey):
    model = _model(getkey)
    tokens = _tokens(getkey, 6)
    np.testing.assert_allclose(model(tokens[:4]), model(tokens)[:4], rtol=1e-5, atol=1e-6)


def test_all_sites_have_documented_shapes(getkey):
    model = _model(getkey, d_mlp=12)
    tokens = _tokens(getkey, 5)
    logits, acts = model(tokens, sites=model.site_names)
    np.testing.assert_array_equal(logits, model(tokens))
    assert set(acts) == set(model.site_names)
    assert len(model.site_names) == 2 + 7 * 2 + 1
    for name, act in acts.items():
        if name.endswith("hook_pattern"):
            assert act.shape == (2, 5, 5), name
            np.testing.assert_allclose(act.sum(-1), 1.0, rtol=1e-5)
            assert float(jnp.abs(jnp.triu(act, 1)).max()) == 0.0
        elif name.endswith("mlp.hook_post"):
            assert act.shape == (5, 12), name
        else:
            assert act.shape == (5, 8), name
    # The residual stream is the sum of what was written into it.
    resid = acts["hook_embed"] + acts["hook_pos_embed"]
    np.testing.assert_allclose(acts["blocks.0.hook_resid_pre"], resid)
    for layer in range(2):
        p = f"blocks.{layer}."
        resid = resid + acts[p + "hook_attn_out"]
        np.testing.assert_allclose(acts[p + "hook_resid_mid"], resid, rtol=1e-6, atol=1e-6)
        resid = resid + acts[p + "hook_mlp_out"]
        np.testing.assert_allclose(acts[p + "hook_resid_post"], resid, rtol=1e-6, atol=1e-6)


def test_single_site_string_and_no_sites_returns_array(getkey):
    model = _model(getkey)
    tokens = _tokens(getkey, 3)
    assert isinstance(model(tokens), jax.Array)
    _, acts = model(tokens, sites="hook_embed")
    assert list(acts) == ["hook_embed"]


def test_identity_intervention_changes_nothing(getkey):
    model = _model(getkey)
    tokens = _tokens(getkey, 6)
    ivs = {name: Intervention(_identity) for name in model.site_names}
    np.testing.assert_array_equal(model(tokens, interventions=ivs), model(tokens))


def test_add_vector_at_last_resid_post_changes_logits_as_predicted(getkey):
    model = _model(getkey)
    tokens = _tokens(getkey, 6)
    vector = jr.normal(getkey(), (8,), jnp.float32)
    mask = jnp.array([False, True, False, False, True, True])
    iv = Intervention(_add_scaled, (vector, jnp.float32(1.5)), position_mask=mask)
    logits, acts = model(tokens, sites=[LAST_RESID], interventions={LAST_RESID: iv})
    _, clean = model(tokens, sites=[LAST_RESID])
    resid = clean[LAST_RESID] + jnp.where(mask[:, None], (1.5 * vector)[None, :], 0.0)
    np.testing.assert_allclose(acts[LAST_RESID], resid, rtol=1e-6, atol=1e-6)
    mean = resid.mean(-1, keepdims=True)
    var = ((resid - mean) ** 2).mean(-1, keepdims=True)
    normed = (resid - mean) / jnp.sqrt(var + 1e-5) * model.ln_final_w[None] + model.ln_final_b[None]
    np.testing.assert_allclose(logits, normed @ model.W_U + model.b_U[None], rtol=1e-5, atol=1e-5)
    base = model(tokens)
    np.testing.assert_array_equal(logits[~np.asarray(mask)], base[~np.asarray(mask)])
    assert not np.allclose(logits[np.asarray(mask)], base[np.asarray(mask)])


def test_intervention_on_attention_pattern_uses_query_positions(getkey):
    model = _model(getkey)
    tokens = _tokens(getkey, 4)

    def uniform_on_masked_queries(a, mask, params):
        causal = jnp.tril(jnp.ones(a.shape[1:], a.dtype))
        uniform = causal / causal.sum(-1, keepdims=True)
        return jnp.where(mask[None, :, None], uniform, a)

    mask = jnp.array([False, False, True, False])
    iv = Intervention(uniform_on_masked_queries, position_mask=mask)
    site = "blocks.0.attn.hook_pattern"
    _, acts = model(tokens, sites=[site], interventions={site: iv})
    np.testing.assert_allclose(acts[site][:, 2, :3], 1.0 / 3.0, rtol=1e-6)


def test_vmap_over_scales_equals_loop(getkey):
    model = _model(getkey)
    tokens = _tokens(getkey, 6)
    vector = jr.normal(getkey(), (8,), jnp.float32)
    scales = jnp.array([-2.0, 0.0, 0.5, 3.0], jnp.float32)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(model, scale):
        return model(tokens, interventions={LAST_RESID: Intervention(_add_scaled, (vector, scale))})

    swept = jax.vmap(run, in_axes=(None, 0))(model, scales)
    looped = jnp.stack([model(tokens, interventions={LAST_RESID: Intervention(_add_scaled, (vector, s))}) for s in scales])
    np.testing.assert_allclose(swept, looped, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(looped[1], model(tokens))


def test_grad_flows_through_intervention_params(getkey):
    model = _model(getkey)
    tokens = _tokens(getkey, 5)
    vector = jr.normal(getkey(), (8,), jnp.float32)
    site = "ln_final.hook_normalized"

    def total_logit(scale, vector):
        iv = Intervention(_add_scaled, (vector, scale))
        return model(tokens, interventions={site: iv}).sum()

    g_scale, g_vector = jax.grad(total_logit, argnums=(0, 1))(jnp.float32(0.7), vector)
    # logits = (n + s v) W_U + b_U, so d sum / d s = seq * sum(v W_U), d sum / d v = seq * s * W_U 1.
    np.testing.assert_allclose(g_scale, 5 * (vector @ model.W_U).sum(), rtol=1e-5)
    np.testing.assert_allclose(g_vector, 5 * 0.7 * model.W_U.sum(-1), rtol=1e-5)

    g_mid = jax.grad(
        lambda s: model(tokens, interventions={LAST_RESID: Intervention(_add_scaled, (vector, s))})[:, 0].sum()
    )(jnp.float32(0.3))
    eps = 1e-2
    fd = (
        model(tokens, interventions={LAST_RESID: Intervention(_add_scaled, (vector, jnp.float32(0.3 + eps)))})[:, 0].sum()
        - model(tokens, interventions={LAST_RESID: Intervention(_add_scaled, (vector, jnp.float32(0.3 - eps)))})[:, 0].sum()
    ) / (2 * eps)
    np.testing.assert_allclose(g_mid, fd, rtol=2e-2, atol=1e-3)


def test_unknown_site_raises(getkey):
    model = _model(getkey)
    tokens = _tokens(getkey, 3)
    with pytest.raises(ValueError, match=r"Unknown site name\(s\) in sites: \['blocks.2.hook_resid_post'\]"):
        model(tokens, sites=["blocks.2.hook_resid_post"])
    with pytest.raises(ValueError, match=r"Unknown site name\(s\) in interventions: \['resid_post'\]"):
        model(tokens, interventions={"resid_post": Intervention(_identity)})
    # The runtime type checks of the test suite get there before the model's own ValueError.
    with pytest.raises((ValueError, TypeError), match="Intervention"):
        model(tokens, interventions={LAST_RESID: _identity})


def test_shape_or_dtype_changing_intervention_raises(getkey):
    model = _model(getkey)
    tokens = _tokens(getkey, 3)
    with pytest.raises(ValueError, match=r"Intervention at 'blocks.0.hook_mlp_out' must return .* same shape"):
        model(tokens, interventions={"blocks.0.hook_mlp_out": Intervention(_add_one_row)})
    with pytest.raises(ValueError, match=r"Intervention at 'hook_embed' .* got float64"):
        model(tokens, interventions={"hook_embed": Intervention(_to_float64)})
    with pytest.raises(ValueError, match=r"position_mask must be a bool array of shape \(3,\)"):
        model(tokens, interventions={"hook_embed": Intervention(_identity, position_mask=jnp.ones(4, bool))})
    with pytest.raises((ValueError, TypeError), match="fn"):
        Intervention(3)
    # Raised at trace time, also under jit.
    with pytest.raises(ValueError, match="blocks.0.hook_mlp_out"):
        jax.jit(lambda t: model(t, interventions={"blocks.0.hook_mlp_out": Intervention(_add_one_row)}))(tokens)


def test_bos_handling(getkey):
    model = _model(getkey, use_bos=True)
    assert model.config.bos_token == 3
    assert model.W_E.shape == (4, 8)
    a = model(jnp.array([0, 1, 2], jnp.int32))
    b = model(jnp.array([2, 2], jnp.int32))
    assert a.shape == (4, 3) and b.shape == (3, 3)
    # Position 0 has read only BOS: the same prediction whatever follows.
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(model(jnp.zeros((0,), jnp.int32)), a[:1], rtol=1e-6, atol=1e-6)
    _, acts = model(jnp.array([1, 0], jnp.int32), sites=["hook_embed"])
    np.testing.assert_array_equal(acts["hook_embed"][0], model.W_E[3])
    # Interventions see BOS as position 0.
    iv = Intervention(_add_scaled, (jr.normal(getkey(), (8,), jnp.float32), jnp.float32(1.0)),
                      position_mask=jnp.array([True, False, False]))
    steered = model(jnp.array([1, 0], jnp.int32), interventions={"hook_embed": iv})
    base = model(jnp.array([1, 0], jnp.int32))
    assert not np.allclose(steered[0], base[0])
    np.testing.assert_allclose(model(jnp.full((6,), 2, jnp.int32)).shape, (7, 3))


def test_bad_tokens_raise(getkey):
    model = _model(getkey)
    with pytest.raises(ValueError, match=r"length 1 .. n_ctx=6, got 7"):
        model(jnp.zeros((7,), jnp.int32))
    with pytest.raises((ValueError, TypeError), match="tokens"):
        model(jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"length 1 .. n_ctx"):
        model(jnp.zeros((0,), jnp.int32))
    with pytest.raises(Exception, match=r"tokens must lie in 0 .. vocab_size-1 = 2"):
        jax.block_until_ready(jax.jit(lambda t: model(t))(jnp.array([0, 3], jnp.int32)))


def test_stack_of_models_under_vmap(getkey):
    cfg = TransformerConfig(**TINY)
    keys = jr.split(getkey(), 3)
    stack = eqx.filter_jit(eqx.filter_vmap(lambda k: Transformer(cfg, key=k)))(keys)
    assert stack.W_E.shape == (3, 3, 8)
    tokens = jr.randint(getkey(), (3, 4, 6), 0, 3, dtype=jnp.int32)
    out = eqx.filter_jit(eqx.filter_vmap(lambda m, t: jax.vmap(m)(t)))(stack, tokens)
    batched = eqx.filter_jit(lambda m, t: jax.vmap(m)(t))
    for i, k in enumerate(keys):
        single = Transformer(cfg, key=k)
        np.testing.assert_allclose(single.W_E, stack.W_E[i], rtol=1e-6)
        np.testing.assert_allclose(out[i], batched(single, tokens[i]), rtol=1e-5, atol=1e-6)


def _loss(model, tokens):
    logits = jax.vmap(model)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def test_training_a_stack_under_vmap_matches_separate_training(getkey):
    cfg = TransformerConfig(**TINY)
    keys = jr.split(getkey(), 2)
    opt = optax.adamw(1e-2)
    tokens = jr.randint(getkey(), (2, 4, 7), 0, 3, dtype=jnp.int32)

    def step(model, state, toks):
        loss, grads = eqx.filter_value_and_grad(_loss)(model, toks)
        updates, state = opt.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    # optax's bias correction mixes int32 step counts with Python floats.
    with jax.numpy_dtype_promotion("standard"):
        stack = eqx.filter_vmap(lambda k: Transformer(cfg, key=k))(keys)
        states = eqx.filter_vmap(lambda m: opt.init(m))(stack)
        stepped = eqx.filter_jit(eqx.filter_vmap(step))
        for _ in range(3):
            stack, states, losses = stepped(stack, states, tokens)
        single_step = eqx.filter_jit(step)
        for i, k in enumerate(keys):
            model = Transformer(cfg, key=k)
            state = opt.init(model)
            for _ in range(3):
                model, state, loss = single_step(model, state, tokens[i])
        np.testing.assert_allclose(losses[i], loss, rtol=1e-5)
        np.testing.assert_allclose(stack.blocks[1].W_in[i], model.blocks[1].W_in, rtol=1e-4, atol=1e-6)


def test_training_reduces_loss(getkey):
    model = _model(getkey, init_std=0.02)
    opt = optax.adamw(3e-2)
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(model)
    # A deterministic process: the next token is the current one plus 1 mod 3.
    start = jr.randint(getkey(), (16, 1), 0, 3, dtype=jnp.int32)
    tokens = (start + jnp.arange(7, dtype=jnp.int32)[None, :]) % 3

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(_loss)(model, tokens)
        updates, state = opt.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    first = None
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(40):
            model, state, loss = step(model, state)
            first = loss if first is None else first
    assert float(loss) < 0.1 * float(first)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=10, n_heads=3), "d_model=10 is not divisible by n_heads=3"),
        (dict(vocab_size=0), "vocab_size must be a positive int, got 0"),
        (dict(n_ctx=-1), "n_ctx must be a positive int"),
        (dict(n_layers=0), "n_layers must be a positive int, got 0"),
        (dict(d_head=0), "d_head must be a positive int"),
        (dict(act="tanh"), r"act must be one of \('gelu', 'relu'\), got 'tanh'"),
        (dict(d_mlp=-3), "d_mlp must be a positive int, got -3"),
        (dict(init_std=0.0), "init_std must be a positive number"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**TINY, **kwargs})


def test_explicit_d_head_and_config_is_static(getkey):
    cfg = TransformerConfig(**{**TINY, "d_head": 3})
    model = Transformer(cfg, key=getkey())
    assert model.blocks[0].W_O.shape == (2, 3, 8)
    assert model(_tokens(getkey, 4)).shape == (4, 3)
    assert TransformerConfig(**TINY) == TransformerConfig(**TINY) and hash(cfg)
    with pytest.raises((ValueError, TypeError), match="config"):
        Transformer(dict(TINY), key=getkey())
    assert sfpjax.TransformerConfig is TransformerConfig


def test_batched_equals_vmap_with_sites_and_interventions(getkey):
    model = _model(getkey, use_bos=True)
    tokens = jr.randint(getkey(), (3, 5), 0, 3, dtype=jnp.int32)
    vector = jr.normal(getkey(), (8,), jnp.float32)
    mask = jnp.array([True, False, True, True, False, False])
    ivs = {
        LAST_RESID: Intervention(_add_scaled, (vector, jnp.float32(2.0)), position_mask=mask),
        "hook_pos_embed": Intervention(_add_scaled, (vector, jnp.float32(-1.0))),
    }
    names = ("hook_pos_embed", "blocks.0.attn.hook_pattern", LAST_RESID)
    logits, acts = model.batched(tokens, sites=names, interventions=ivs)
    v_logits, v_acts = jax.vmap(lambda t: model(t, sites=names, interventions=ivs))(tokens)
    np.testing.assert_allclose(logits, v_logits, rtol=1e-5, atol=1e-6)
    assert logits.shape == (3, 6, 3)
    for name in names:
        assert acts[name].shape == v_acts[name].shape
        np.testing.assert_allclose(acts[name], v_acts[name], rtol=1e-5, atol=1e-6)
    with pytest.raises((ValueError, TypeError), match="tokens"):
        model.batched(tokens[0])
    with pytest.raises(ValueError, match=r"length 1 .. n_ctx=6 \(0 allowed with BOS\), got 7"):
        model.batched(jnp.zeros((2, 7), jnp.int32))


def test_large_vocabulary_embedding_path_matches_reference(getkey):
    # Above 256 symbols the embedding is a gather instead of a one-hot product.
    model = _model(getkey, vocab_size=300)
    tokens = jr.randint(getkey(), (5,), 0, 300, dtype=jnp.int32)
    np.testing.assert_allclose(model(tokens), _numpy_forward(model, tokens), rtol=1e-4, atol=1e-5)
