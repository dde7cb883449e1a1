"""Invalid input is refused, never turned into a plausible number.

One section per class of failure: the |1>> of non-ergodic processes, invalid parameters
under jit/vmap, inputs that would quietly change the answer, and errors that bury their
message.
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax

# A failed eqx.error_if surfaces as EquinoxRuntimeError when run eagerly (vmap outside jit)
# and as JaxRuntimeError (ValueError from a cached jitted call) from inside jax.jit; every
# test below also matches the message.
RUNTIME = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError, ValueError)

BLOCK_T = np.array([np.diag([0.1, 0.9]), np.diag([0.9, 0.1])])  # two one-state HMMs side by side
BLOCK_ETA0 = np.array([0.3, 0.7])


def _word_prob_oracle(T, eta0, right, word):
    v = np.asarray(eta0, np.float64)
    for x in word:
        v = v @ np.asarray(T, np.float64)[x]
    return float(v @ np.asarray(right, np.float64))


# --------------------------------------------------------------------------------------
# 1. |1>> of non-ergodic processes
# --------------------------------------------------------------------------------------


def test_non_ergodic_hmm_gets_all_ones_right():
    p = sfpjax.GHMM(BLOCK_T, BLOCK_ETA0, dtype=jnp.float64)
    np.testing.assert_array_equal(p.right, [1.0, 1.0])
    assert float(jnp.exp(sfpjax.sequence_log_prob(p, jnp.array([1])))) == pytest.approx(0.34, abs=1e-12)
    # Every word of length 3 against the mixture of the two coins it is.
    for word in itertools.product(range(2), repeat=3):
        mixture = sum(w * np.prod([BLOCK_T[x, i, i] for x in word]) for i, w in enumerate(BLOCK_ETA0))
        got = float(jnp.exp(sfpjax.sequence_log_prob(p, jnp.array(word))))
        assert got == pytest.approx(mixture, abs=1e-12)


def test_non_ergodic_hmm_gets_all_ones_right_under_jit_and_without_eta0():
    p = jax.jit(lambda T, e: sfpjax.GHMM(T, e))(BLOCK_T, BLOCK_ETA0)
    np.testing.assert_array_equal(p.right, [1.0, 1.0])
    # An absorbing state next to a 2-cycle (partitioned Z1R's dynamics), eta0 left to default.
    q = sfpjax.GHMM(np.asarray(sfpjax.partitioned_z1r().T))
    np.testing.assert_array_equal(q.right, [1.0, 1.0, 1.0])
    assert sfpjax.is_hmm(q)


def _similar_block_ghmm():
    S = np.array([[1.0, 0.5], [0.2, 1.0]])
    return np.einsum("ij,xjk,kl->xil", np.linalg.inv(S), BLOCK_T, S), BLOCK_ETA0 @ S, np.linalg.inv(S) @ np.ones(2)


def test_ghmm_with_repeated_eigenvalue_one_needs_explicit_right():
    Tg, eta0, right = _similar_block_ghmm()
    with pytest.raises(ValueError, match=r"eigenvalue 1 more than once.*right=.*direct_sum.*multiplicity 2"):
        sfpjax.GHMM(Tg, eta0)
    with pytest.raises(RUNTIME, match=r"eigenvalue 1 more than once"):
        jax.jit(lambda T, e: sfpjax.GHMM(T, e).right)(Tg, eta0).block_until_ready()
    p = sfpjax.GHMM(Tg, eta0, right, dtype=jnp.float64)  # explicit |1>>: the same law as the HMM
    for word in itertools.product(range(2), repeat=3):
        assert _word_prob_oracle(p.T, p.eta0, p.right, word) == pytest.approx(
            _word_prob_oracle(BLOCK_T, BLOCK_ETA0, np.ones(2), word), abs=1e-12)


def test_is_hmm_needs_all_ones_right():
    # A valid GHMM with non-negative, row-stochastic T but another |1>> is not the HMM.
    p = sfpjax.GHMM(BLOCK_T, BLOCK_ETA0, right=np.array([0.5, 1.2142857142857142]), dtype=jnp.float64)
    assert not sfpjax.is_hmm(p)
    assert sfpjax.is_hmm(sfpjax.GHMM(BLOCK_T, BLOCK_ETA0))


# --------------------------------------------------------------------------------------
# 2. Invalid parameters under jit and vmap
# --------------------------------------------------------------------------------------

BAD_PARAMETERS = [
    (sfpjax.coin, (0.5,), (1.5,), "coin probability p must lie in"),
    (sfpjax.z1r, (0.5,), (-0.1,), "z1r probability p must lie in"),
    (sfpjax.mess3, (0.15, 0.6), (0.7, 0.6), "mess3 x must lie in"),
    (sfpjax.mess3, (0.15, 0.6), (0.15, 1.2), "mess3 a must lie in"),
    (sfpjax.mess3, (0.15, 0.6), (np.nan, 0.6), "mess3 x must lie in"),
    (sfpjax.rrxor, (0.5, 0.5), (1.2, 0.5), "rrxor p1 must lie in"),
    (sfpjax.even_process, (0.5,), (-1.0,), "even_process p must lie in"),
    (sfpjax.golden_mean, (0.5,), (2.0,), "golden_mean p must lie in"),
    (sfpjax.noisy_and, (0.1,), (1.5,), "noisy_and eps must lie in"),
    (sfpjax.noisy_not, (0.1,), (np.nan,), "noisy_not eps must lie in"),
    (sfpjax.tom_quantum, (1.0, 0.5), (0.0, 0.0), "tom_quantum needs alpha"),
    (sfpjax.post_quantum, (1.5, 0.5), (0.9, 0.5), "post_quantum needs alpha > 1 > beta > 0"),
]


@pytest.mark.parametrize("make, good, bad, match", BAD_PARAMETERS)
def test_zoo_refuses_invalid_parameters_under_vmap(make, good, bad, match):
    columns = [jnp.array([g, b], jnp.float32) for g, b in zip(good, bad)]
    with pytest.raises(RUNTIME, match=match):
        jax.block_until_ready(jax.vmap(make)(*columns))


@pytest.mark.parametrize("make, good, bad, match", [BAD_PARAMETERS[i] for i in (0, 2, 4, 10)])
def test_zoo_refuses_invalid_parameters_under_jit(make, good, bad, match):
    with pytest.raises(RUNTIME, match=match):
        jax.jit(lambda *a: make(*a).T)(*[jnp.float32(b) for b in bad]).block_until_ready()


def test_nan_parameter_is_an_invalid_process_not_an_impossible_sequence():
    toks = jnp.array([[0, 1, 2, 1]])

    def log_prob(x):
        return sfpjax.filter_beliefs(sfpjax.mess3(x, 0.6), toks).log_prob

    with pytest.raises(RUNTIME, match="invalid process parameter: mess3 x"):
        jax.jit(log_prob)(jnp.float32(jnp.nan)).block_until_ready()
    # A NaN entry reached by any other route is named as such.
    T = jnp.asarray(sfpjax.mess3().T)
    with pytest.raises(RUNTIME, match="NaN or infinite entry"):
        jax.jit(lambda t: sfpjax.GHMM(t, right=jnp.ones(3)).T)(T.at[0, 0, 0].set(jnp.nan)).block_until_ready()


def test_filtering_and_sampling_never_see_an_invalid_traced_process(getkey):
    toks = jnp.array([[0, 1, 2, 2, 1]])
    with pytest.raises(RUNTIME, match="mess3 x must lie in"):
        jax.jit(lambda x: sfpjax.filter_beliefs(sfpjax.mess3(x, 0.6), toks).beliefs)(0.7).block_until_ready()
    with pytest.raises(RUNTIME, match="mess3 x must lie in"):
        key = getkey()
        jax.jit(lambda x: sfpjax.sample(sfpjax.mess3(x, 0.6), key=key, batch_size=4, seq_len=5))(
            0.7).block_until_ready()


def test_ghmm_conditions_checked_under_jit():
    T = np.asarray(sfpjax.mess3().T, np.float64)
    with pytest.raises(RUNTIME, match="not a right eigenvector"):
        jax.jit(lambda t: sfpjax.GHMM(t, jnp.ones(3) / 3, jnp.ones(3)).T)(T * 1.1).block_until_ready()
    with pytest.raises(RUNTIME, match="must be non-negative"):
        bad = T.copy()
        bad[0, 0, 1] -= 0.1
        bad[1, 0, 1] += 0.1
        jax.jit(lambda t: sfpjax.GHMM(t, jnp.ones(3) / 3, hmm=True).T)(bad).block_until_ready()
    with pytest.raises(RUNTIME, match=r"<<eta0\|1>> is not 1"):
        jax.jit(lambda e: sfpjax.mess3().with_initial(e).eta0)(jnp.array([0.5, 0.5, 0.5])).block_until_ready()


def test_validate_ghmm_on_traced_process_checks_at_run_time():
    p = sfpjax.mess3()
    edited = jax.jit(lambda s: sfpjax.validate_ghmm(eqx.tree_at(lambda q: q.T, p, p.T * s)).T.sum())
    assert float(edited(1.0)) == pytest.approx(3.0, abs=1e-5)
    with pytest.raises(RUNTIME, match="not a right eigenvector"):
        edited(2.0).block_until_ready()


def test_compositions_refuse_invalid_inputs_under_jit():
    z = sfpjax.partitioned_z1r()
    sectors = [[[0], [1, 2]]] * 2
    cases = [
        (lambda w: sfpjax.direct_sum([sfpjax.coin(), sfpjax.coin(0.2)], w).eta0,
         jnp.array([0.7, 0.7]), "direct_sum weights must be non-negative and sum to 1"),
        (lambda prior: sfpjax.semi_factored([z, z], sectors, prior).process.eta0,
         jnp.array([[0.6, 0.0], [0.0, 0.6]]), "sector_prior must be non-negative and sum to 1"),
        (lambda t: sfpjax.semi_factored([sfpjax.GHMM(t, jnp.ones(3) / 3, hmm=True), z], sectors,
                                        np.eye(2) / 2).process.T,
         jnp.asarray(sfpjax.z1r().T), "factor 0 does not preserve its sectors"),
        (lambda e: sfpjax.semi_factored([z.with_initial(e), z], sectors, np.eye(2) / 2).process.eta0,
         jnp.array([0.0, 0.5, 0.5]), "has prior mass but zero weight"),
        (lambda p: sfpjax.partitioned_z1r_sfp(p).process.eta0, jnp.float32(1.5), "p_matched must lie in"),
        (lambda eps: sfpjax.with_token_noise(sfpjax.mess3(), eps).T, jnp.float32(1.5), "eps must lie in"),
        (lambda x: sfpjax.product(sfpjax.mess3(x, 0.6), sfpjax.coin()).T, jnp.float32(0.7), "mess3 x must lie in"),
    ]
    for fn, arg, match in cases:
        with pytest.raises(RUNTIME, match=match):
            jax.block_until_ready(jax.jit(fn)(arg))


def test_train_validates_a_concrete_process(getkey):
    good = sfpjax.mess3()
    bad = sfpjax.GHMM(good.T * 1.1, good.eta0, good.right, validate=False)
    cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=4, n_layers=1, d_model=16, d_mlp=16, n_heads=1)
    model = sfpjax.Transformer(cfg, key=getkey())
    tc = sfpjax.TrainConfig(steps=1, batch_size=2, seq_len=4)
    with pytest.raises(ValueError, match="not a right eigenvector"):
        sfpjax.train(model, bad, tc, key=getkey(), progress=False)


def test_sweep_names_the_invalid_grid_point(tmp_path):
    toks = jnp.array([0, 1, 2, 1])

    def fn(point):
        return {"log_prob": sfpjax.sequence_log_prob(sfpjax.mess3(point["x"], point["a"]), toks)}

    grid = sfpjax.grid(x=[0.05, 0.1, 0.7, 0.2], a=[0.6])
    with pytest.raises(ValueError, match=r"grid point 2 \(x=0.7, a=0.6\).*mess3 x must lie in \[0.0, 0.5\]"):
        sfpjax.run_sweep(fn, grid, out_dir=tmp_path / "bad", chunk_size=4, progress=False)
    res = sfpjax.run_sweep(fn, sfpjax.grid(x=[0.05, 0.1], a=[0.6]), out_dir=tmp_path / "ok", progress=False)
    assert np.isfinite(res.table["log_prob"]).all()


# --------------------------------------------------------------------------------------
# 3. Inputs that would quietly change the answer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sfpjax.encode_tokens([jnp.array([0, 2]), jnp.array([1, 0])], (2, 3)), r"factor 0 tokens must lie in \[0, 2\); entry \(1,\) is 2"),
        (lambda: sfpjax.encode_tokens([jnp.array([0, 1]), jnp.array([-1, 0])], (2, 3)), r"factor 1 tokens must lie in \[0, 3\); entry \(0,\) is -1"),
        (lambda: sfpjax.decode_tokens(jnp.array([[0, 6]]), (2, 3)), r"joint tokens must lie in \[0, 6\); entry \(0, 1\) is 6"),
        (lambda: sfpjax.decode_tokens(jnp.array([-1]), (2, 3)), r"joint tokens must lie in \[0, 6\)"),
    ],
)
def test_token_codes_refuse_out_of_range_symbols(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_token_codes_refuse_out_of_range_symbols_under_jit():
    with pytest.raises(RUNTIME, match=r"joint tokens outside \[0, 6\)"):
        jax.block_until_ready(jax.jit(lambda t: sfpjax.decode_tokens(t, (2, 3)))(jnp.array([7])))
    with pytest.raises(RUNTIME, match=r"factor 1 tokens outside \[0, 3\)"):
        jax.jit(lambda a, b: sfpjax.encode_tokens([a, b], (2, 3)))(jnp.array([1]), jnp.array([3])).block_until_ready()
    tokens = jnp.arange(6)
    np.testing.assert_array_equal(sfpjax.encode_tokens(sfpjax.decode_tokens(tokens, (2, 3)), (2, 3)), tokens)


def test_filter_refuses_unnormalized_initial():
    p = sfpjax.mess3()
    toks = jnp.array([[0, 1, 2], [2, 2, 1]])
    with pytest.raises(ValueError, match=r"initial must be normalized.*it is 1\.2"):
        sfpjax.filter_beliefs(p, toks, initial=jnp.array([0.4, 0.4, 0.4]))
    per_sequence = jnp.array([[0.2, 0.3, 0.5], [0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match=r"it is 1\.5 for sequence \(1,\)"):
        sfpjax.filter_beliefs(p, toks, initial=per_sequence)
    with pytest.raises(RUNTIME, match="initial belief not normalized"):
        jax.jit(lambda i: sfpjax.filter_beliefs(p, toks, initial=i).beliefs)(jnp.array([0.4, 0.4, 0.4])).block_until_ready()
    with pytest.raises(ValueError, match="initial must be normalized"):
        sfpjax.sample(p, key=jr.key(0), batch_size=2, seq_len=3, initial=jnp.array([1.0, 1.0, 0.0]))
    # Normalized initial vectors still filter, one per sequence included.
    ok = sfpjax.filter_beliefs(p, toks, initial=per_sequence.at[1].set(jnp.array([0.2, 0.2, 0.6])))
    assert bool(ok.is_possible.all())


def test_ghmm_refuses_eta0_not_normalized_against_ones():
    with pytest.raises(ValueError, match=r"<<eta0\|1>> must equal 1, got 1.2"):
        sfpjax.GHMM(BLOCK_T, np.array([0.5, 0.7]))
    mess3_T = np.asarray(sfpjax.mess3().T, np.float64)
    with pytest.raises(ValueError, match=r"<<eta0\|1>> must equal 1, got 1.2"):
        sfpjax.GHMM(mess3_T, np.full(3, 0.4))
    with pytest.raises(RUNTIME, match=r"<<eta0\|1>> is not 1"):
        jax.jit(lambda e: sfpjax.GHMM(mess3_T, e).eta0)(jnp.full(3, 0.4)).block_until_ready()


def test_float64_without_x64_is_refused():
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="needs JAX's 64-bit mode.*jax_enable_x64"):
            sfpjax.mess3(dtype=jnp.float64)
        with pytest.raises(ValueError, match="needs JAX's 64-bit mode"):
            sfpjax.GHMM(BLOCK_T, dtype=jnp.float64)
    assert sfpjax.mess3(dtype=jnp.float64).dtype == jnp.float64  # fine with x64 on


# --------------------------------------------------------------------------------------
# 4. Errors that lead with their message
# --------------------------------------------------------------------------------------


def test_out_of_range_tokens_raise_a_short_value_error():
    p = sfpjax.mess3()
    for call in (lambda t: sfpjax.filter_beliefs(p, t), lambda t: sfpjax.sequence_log_prob(p, t)):
        with pytest.raises(ValueError) as info:
            call(jnp.array([[0, 1, 2], [0, 5, -1]]))
        msg = str(info.value)
        assert msg.startswith("tokens outside the alphabet")
        assert "tokens[1, 1] is 5 (2 of 6 tokens are out of range)" in msg
        assert len(msg) < 400
    with pytest.raises(ValueError, match=r"tokens\[2\] is 3"):
        sfpjax.filter_beliefs(p, jnp.array([0, 1, 3]))  # no batch axis


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_processes_are_refused_with_advice(dtype):
    with pytest.raises(ValueError, match=r"Use dtype=jnp.float32"):
        sfpjax.mess3(dtype=dtype)
    with pytest.raises(ValueError, match=r"Use dtype=jnp.float32"):
        sfpjax.GHMM(BLOCK_T, dtype=dtype)
    with pytest.raises(ValueError, match=r"Use dtype=jnp.float32"):
        sfpjax.mess3().astype(dtype)
    cast = jax.tree.map(lambda a: a.astype(dtype), sfpjax.mess3())
    with pytest.raises(ValueError, match=r"astype\(jnp.float32\)"):
        sfpjax.filter_beliefs(cast, jnp.array([0, 1]))


def test_messages_show_plain_integers():
    T = np.asarray(sfpjax.mess3().T, np.float64)
    T[0, 2, 1] = np.nan
    with pytest.raises(ValueError) as info:
        sfpjax.GHMM(T, np.ones(3) / 3, np.ones(3))
    assert "at index (0, 2, 1)" in str(info.value) and "np.int64" not in str(info.value)
    with pytest.raises(ValueError) as info:
        sfpjax.GHMM(BLOCK_T, np.array([1.5, -0.5]), hmm=True)
    assert "entry (1,) is -0.5" in str(info.value) and "np.int64" not in str(info.value)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), sfpjax.mess3(), sfpjax.mess3())
    stacked = eqx.tree_at(lambda q: q.eta0, stacked, stacked.eta0.at[1, 0].set(-0.5))
    with pytest.raises(ValueError) as info:
        sfpjax.validate_ghmm(stacked)
    assert "(process (1,) of the stack)" in str(info.value) and "np.int64" not in str(info.value)
