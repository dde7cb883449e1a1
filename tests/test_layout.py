"""Sequence layout: frame tokens, aligned beliefs and loss floors."""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import sfpjax
from oracles import word_prob_and_belief


def test_spec_generation_layout_vectors():
    body = jnp.array([5, 2, 8])
    lay = sfpjax.SequenceLayout(bos=99, eos=100, pad=101, total_len=7)
    assert sfpjax.layout_tokens(body, lay, vocab_size=9).tolist() == [99, 5, 2, 8, 100, 101, 101]
    lay = sfpjax.SequenceLayout(bos=99, eos=100, pad=101, total_len=5)
    assert sfpjax.layout_tokens(body, lay, vocab_size=9).tolist() == [99, 5, 2, 8, 100]


@pytest.mark.parametrize(
    "layout, expected",
    [
        (sfpjax.SequenceLayout(), [5, 2, 8]),
        (sfpjax.SequenceLayout(bos=9), [9, 5, 2, 8]),
        (sfpjax.SequenceLayout(eos=9, pad=10, total_len=6), [5, 2, 8, 9, 10, 10]),
        (sfpjax.SequenceLayout(pad=9, total_len=5), [5, 2, 8, 9, 9]),
        (sfpjax.SequenceLayout(bos=9, eos=9), [9, 5, 2, 8, 9]),
    ],
)
def test_layouts_and_their_position_tables(layout, expected):
    body = jnp.array([[5, 2, 8], [1, 1, 1]])
    out = sfpjax.layout_tokens(body, layout, vocab_size=9)
    assert out.shape == (2, len(expected)) and out[0].tolist() == expected
    read, predicts, real = layout.positions(3)
    framed = np.array(expected)
    b = int(layout.bos is not None)
    for p in range(len(expected)):
        # tokens_read counts the body tokens at positions <= p
        assert read[p] == min(max(p + 1 - b, 0), 3)
        assert predicts[p] == (p + 1 < len(expected) and b <= p + 1 < 3 + b)
        assert real[p] == (p < 3 + b + int(layout.eos is not None))
        if real[p] and b <= p < 3 + b:
            assert framed[p] == [5, 2, 8][p - b]


@pytest.mark.parametrize("process", ["ghmm", "chain_joint_ghmm"])
def test_framed_beliefs_match_brute_force(process, getkey):
    lay = sfpjax.SequenceLayout(bos=9, eos=10, pad=11, total_len=9)
    n = 5
    if process == "ghmm":
        p = sfpjax.mess3(dtype=jnp.float64)
    else:
        p = sfpjax.sequential_chain(
            [sfpjax.mess3(dtype=jnp.float64), [sfpjax.z1r(dtype=jnp.float64), sfpjax.z1r(0.2, dtype=jnp.float64)]],
            [None, [0, 1, 1]], eta0=[None, jnp.ones(3, jnp.float64) / 3]).joint_ghmm()
        lay = sfpjax.SequenceLayout(bos=6, eos=7, pad=8, total_len=9)
    batch = sfpjax.sample_layout(p, lay, key=getkey(), batch_size=3, body_len=n)
    assert batch.tokens.shape == (3, 9) and batch.beliefs.shape == (3, 9, p.num_states)
    T, eta0, right = (np.asarray(a, np.float64) for a in (p.T, p.eta0, p.right))
    for toks, bel, lp in zip(np.asarray(batch.tokens), np.asarray(batch.beliefs), np.asarray(batch.log_prob)):
        body = toks[1:1 + n]
        assert toks[0] == lay.bos and toks[1 + n] == lay.eos and (toks[2 + n:] == lay.pad).all()
        for pos in range(9):
            t = int(batch.tokens_read[pos])
            if t == 0:
                np.testing.assert_allclose(bel[pos], eta0, atol=1e-12)
            else:
                _, ref = word_prob_and_belief(T, eta0, right, body[:t])
                np.testing.assert_allclose(bel[pos], ref, atol=1e-10)
        np.testing.assert_allclose(np.exp(lp), word_prob_and_belief(T, eta0, right, body)[0], rtol=1e-10)


def test_conditional_process_layout_uses_the_joint_belief(getkey):
    a = [sfpjax.coin(0.4, dtype=jnp.float64), sfpjax.coin(0.9, dtype=jnp.float64)]
    b = [sfpjax.z1r(dtype=jnp.float64), sfpjax.z1r(0.1, dtype=jnp.float64)]
    p = sfpjax.product_of_experts([a, b], [[0, 1], [1, 0]], eta0=[[1.0], jnp.ones(3, jnp.float64) / 3])
    lay = sfpjax.SequenceLayout(bos=4, eos=5)
    batch = sfpjax.sample_layout(p, lay, key=getkey(), batch_size=2, body_len=4)
    res = sfpjax.filter_conditional(p, batch.tokens[:, 1:5])
    np.testing.assert_allclose(batch.beliefs[:, 1:5], res.beliefs, atol=1e-12)
    np.testing.assert_allclose(batch.beliefs[:, 0], jnp.broadcast_to(p.initial_belief(), (2, 3)), atol=1e-12)
    np.testing.assert_allclose(batch.beliefs[:, 5], res.beliefs[:, -1], atol=1e-12)


def test_floor_matches_the_training_convention():
    p = sfpjax.z1r(dtype=jnp.float64)
    n = 6
    h = sfpjax.myopic_entropies(p, n)
    no_frame = sfpjax.layout_floor(h, sfpjax.SequenceLayout(), n)
    np.testing.assert_allclose(no_frame, sfpjax.loss_floor(p, n, use_bos=False), atol=1e-12)
    bos = sfpjax.layout_floor(h, sfpjax.SequenceLayout(bos=2), n)
    np.testing.assert_allclose(bos, sfpjax.loss_floor(p, n, use_bos=True), atol=1e-12)
    framed = sfpjax.layout_floor(h, sfpjax.SequenceLayout(bos=2, eos=3, pad=4, total_len=n + 4), n)
    np.testing.assert_allclose(framed[:n], h[:n], atol=1e-12)
    np.testing.assert_allclose(framed[n:], 0.0)


def test_layout_errors():
    with pytest.raises(ValueError, match="inside the process alphabet"):
        sfpjax.layout_tokens(jnp.array([0, 1]), sfpjax.SequenceLayout(bos=1), vocab_size=3)
    with pytest.raises(ValueError, match="shorter than the 4 positions"):
        sfpjax.layout_tokens(jnp.array([0, 1]), sfpjax.SequenceLayout(bos=3, eos=4, pad=5, total_len=3), vocab_size=3)
    with pytest.raises(ValueError, match="give a pad id"):
        sfpjax.layout_tokens(jnp.array([0, 1]), sfpjax.SequenceLayout(bos=3, total_len=5), vocab_size=3)
    with pytest.raises(ValueError, match="needs total_len"):
        sfpjax.SequenceLayout(pad=3)
    with pytest.raises(ValueError, match="non-negative int"):
        sfpjax.SequenceLayout(bos=-1)
    with pytest.raises(Exception, match="initial"):  # the signature's shapes already disagree
        sfpjax.layout_beliefs(jnp.zeros((1, 2, 3)), jnp.zeros(2), sfpjax.SequenceLayout())
    assert sfpjax.SequenceLayout(bos=3, eos=7).vocab_size(3) == 8


def test_pad_targets_are_not_scored(getkey):
    lay = sfpjax.SequenceLayout(bos=3, eos=4, pad=5, total_len=9)
    batch = sfpjax.sample_layout(sfpjax.mess3(), lay, key=getkey(), batch_size=4, body_len=5)
    framed = batch.tokens  # 7 real positions, then 2 PAD
    cfg = sfpjax.TransformerConfig(vocab_size=lay.vocab_size(3), n_ctx=9, n_layers=1, d_model=16, d_mlp=32)
    model = sfpjax.Transformer(cfg, key=getkey())
    full = sfpjax.per_position_loss(model, framed)
    masked = sfpjax.per_position_loss(model, framed, pad=5)
    is_pad = np.asarray(framed[:, 1:] == 5)
    np.testing.assert_array_equal(np.asarray(masked)[is_pad], 0)
    np.testing.assert_array_equal(np.asarray(masked)[~is_pad], np.asarray(full)[~is_pad])
    # Trailing PAD changes nothing: the loss and its gradient are those of the unpadded rows.
    real = framed[:, :7]
    np.testing.assert_allclose(sfpjax.next_token_loss(model, framed, pad=5), sfpjax.next_token_loss(model, real),
                               rtol=1e-6)
    g_pad = eqx.filter_grad(lambda m: sfpjax.next_token_loss(m, framed, pad=5))(model)
    g_real = eqx.filter_grad(lambda m: sfpjax.next_token_loss(m, real))(model)
    np.testing.assert_allclose(g_pad.W_U, g_real.W_U, atol=1e-6)
    # Rows padded differently: the mean over the scored positions of the whole batch.
    ragged = jnp.array([[0, 1, 2, 5, 5, 5], [2, 2, 1, 0, 1, 5], [5, 5, 5, 5, 5, 5]], jnp.int32)
    per = np.asarray(sfpjax.per_position_loss(model, ragged))
    keep = np.asarray(ragged[:, 1:] != 5)
    np.testing.assert_allclose(sfpjax.next_token_loss(model, ragged, pad=5), per[keep].mean(), rtol=1e-6)
    assert float(sfpjax.next_token_loss(model, ragged[2:], pad=5)) == 0.0  # nothing scored
    # With the model's own BOS every token is a target.
    bos_model = sfpjax.Transformer(dataclasses.replace(cfg, use_bos=True), key=getkey())
    out = sfpjax.per_position_loss(bos_model, ragged, pad=5)
    assert out.shape == ragged.shape
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(ragged == 5)], 0)
    assert np.all(np.asarray(out)[np.asarray(ragged != 5)] > 0)
    with pytest.raises(ValueError, match="pad must be a non-negative int"):
        sfpjax.next_token_loss(model, ragged, pad=-1)
