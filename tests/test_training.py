import dataclasses
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax
from oracles import assert_trees_equal, tree_leaves_np
from sfpjax import TrainConfig, Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=2, n_ctx=8, n_layers=1, d_model=16, n_heads=2, d_mlp=32)
TC = TrainConfig(steps=8, batch_size=16, seq_len=8, learning_rate=1e-2, log_every=4)
# One optimizer object for the whole file: steps built from it share one compiled program.
OPT = sfpjax.make_optimizer(TC)


def _model(seed=0, cfg=CFG):
    return Transformer(cfg, key=jr.key(seed))


def test_loss_decreases_towards_the_floor_on_z1r():
    tc = TrainConfig(steps=60, batch_size=32, seq_len=8, learning_rate=1e-2, log_every=10,
                     eval_every=60, eval_batch_size=256)
    model = _model()
    before = sfpjax.evaluate(model, sfpjax.z1r(), key=jr.key(5), batch_size=256, seq_len=8)
    out = sfpjax.train(model, sfpjax.z1r(), tc, key=jr.key(1), progress=False)
    losses = [r["loss"] for r in out.history if "loss" in r]
    assert losses[-1] < losses[0] - 0.1
    last = out.history[-1]
    assert last["step"] == 60 and {"excess", "excess_pct", "excess_last", "floor", "lr"} <= set(last)
    assert last["excess"] < float(before.excess_mean) - 0.1
    assert np.isclose(last["floor"], float(before.floor.mean()))
    assert np.isclose(last["excess_pct"], 100 * last["excess"] / last["floor"], rtol=1e-4)
    # The caller's model is not consumed by the donated step.
    assert_trees_equal(model, _model())


def test_training_is_a_function_of_the_key():
    proc = sfpjax.z1r()
    a = sfpjax.train(_model(), proc, TC, key=jr.key(1), optimizer=OPT, progress=False)
    b = sfpjax.train(_model(), proc, TC, key=jr.key(1), optimizer=OPT, progress=False)
    c = sfpjax.train(_model(), proc, TC, key=jr.key(2), optimizer=OPT, progress=False)
    assert_trees_equal(a.model, b.model)
    assert_trees_equal(a.opt_state, b.opt_state)
    assert a.history == b.history
    assert not np.array_equal(np.asarray(a.model.W_U), np.asarray(c.model.W_U))


def test_frozen_parameters_do_not_change():
    model = _model()
    only_unembed = jax.tree.map(lambda _: False, model)
    only_unembed = eqx.tree_at(lambda m: (m.W_U, m.b_U), only_unembed, replace=(True, True))
    out = sfpjax.train(model, sfpjax.z1r(), TC, key=jr.key(1), optimizer=OPT,
                       trainable=only_unembed, progress=False)
    assert not np.array_equal(np.asarray(out.model.W_U), np.asarray(model.W_U))
    frozen_before = eqx.filter(model, only_unembed, inverse=True)
    frozen_after = eqx.filter(out.model, only_unembed, inverse=True)
    assert_trees_equal(frozen_before, frozen_after)
    # Optimizer state only for the trainable part: adam mu and nu of W_U and b_U.
    sizes = sorted(x.size for x in tree_leaves_np(out.opt_state) if x.ndim > 0)
    assert sizes == sorted([model.W_U.size, model.b_U.size] * 2)

    # A callable filter on leaves works too (here: only matrices train).
    out2 = sfpjax.train(model, sfpjax.z1r(), TC, key=jr.key(1), optimizer=OPT,
                        trainable=lambda x: eqx.is_array(x) and x.ndim >= 2, progress=False)
    np.testing.assert_array_equal(np.asarray(out2.model.b_U), np.asarray(model.b_U))
    assert not np.array_equal(np.asarray(out2.model.W_E), np.asarray(model.W_E))


def test_trainable_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match="selects no floating-point parameters"):
        sfpjax.train(_model(), sfpjax.z1r(), TC, key=jr.key(1), optimizer=OPT,
                     trainable=lambda x: False, progress=False)


def test_array_source_training_and_errors():
    data = sfpjax.sample(sfpjax.z1r(), key=jr.key(3), batch_size=64, seq_len=10)
    out = sfpjax.train(_model(), data, TC, key=jr.key(1), optimizer=OPT, progress=False)
    assert np.isfinite(out.history[-1]["loss"])
    assert "excess" not in out.history[-1]  # no process to compare with
    src = sfpjax.ArraySource(data)
    batch = src.batch(jr.key(0), 5, 8)
    rows = {tuple(r) for r in np.asarray(data[:, :8])}
    assert batch.shape == (5, 8) and all(tuple(r) in rows for r in np.asarray(batch))

    with pytest.raises(ValueError, match="shorter than seq_len=8"):
        sfpjax.train(_model(), data[:, :5], TC, key=jr.key(1), progress=False)
    with pytest.raises(ValueError, match=r"must lie in 0 \.\. 1 .* from 0 to 2"):
        sfpjax.train(_model(), data.at[0, 0].set(2), TC, key=jr.key(1), progress=False)
    with pytest.raises(ValueError, match="must be integers"):
        sfpjax.ArraySource(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="process emits 3 symbols but the model's vocab_size is 2"):
        sfpjax.train(_model(), sfpjax.mess3(), TC, key=jr.key(1), progress=False)
    with pytest.raises(ValueError, match="seq_len=9 exceeds the model's n_ctx=8"):
        sfpjax.train(_model(), sfpjax.z1r(), dataclasses.replace(TC, seq_len=9), key=jr.key(1),
                     progress=False)
    with pytest.raises(ValueError, match="expected a GHMM, a token array"):
        sfpjax.as_source([[0, 1]])


def test_per_position_loss_alignment_without_and_with_bos():
    tokens = sfpjax.sample(sfpjax.z1r(), key=jr.key(0), batch_size=3, seq_len=6)
    for use_bos in (False, True):
        model = _model(cfg=dataclasses.replace(CFG, use_bos=use_bos))
        logp = jax.nn.log_softmax(eqx.filter_jit(lambda m, t: jax.vmap(m)(t))(model, tokens), axis=-1)
        loss = sfpjax.per_position_loss(model, tokens)
        if use_bos:  # position t has read x_1..x_t and predicts x_{t+1} = tokens[:, t]
            want = -jnp.stack([logp[:, t, :][jnp.arange(3), tokens[:, t]] for t in range(6)], 1)
        else:  # position t has read x_1..x_{t+1} and predicts tokens[:, t + 1]
            want = -jnp.stack([logp[:, t, :][jnp.arange(3), tokens[:, t + 1]] for t in range(5)], 1)
        np.testing.assert_allclose(np.asarray(loss), np.asarray(want), rtol=1e-6)
        np.testing.assert_allclose(float(sfpjax.next_token_loss(model, tokens)), float(want.mean()), rtol=1e-6)


def test_loss_floor_is_the_aligned_myopic_entropy():
    p = sfpjax.z1r()
    h = np.asarray(sfpjax.myopic_entropies(p, 7))
    np.testing.assert_allclose(np.asarray(sfpjax.loss_floor(p, 8, use_bos=False)), h[1:8])
    np.testing.assert_allclose(np.asarray(sfpjax.loss_floor(p, 8, use_bos=True)), h[0:8])
    # Z1R: the first symbol is a fair bit; after x_1 the phase is not yet known.
    assert np.isclose(h[0], np.log(2), atol=1e-6)
    # A Bayes-optimal predictor (the exact next-token law) scores the floor at every position.
    toks = sfpjax.sample(p, key=jr.key(0), batch_size=20000, seq_len=8)
    lognorm = np.asarray(sfpjax.filter_beliefs(p, toks).log_normalizers)  # -log Pr(x_{t+1}|x_1..x_t)
    np.testing.assert_allclose(-lognorm.mean(0), h[:8], atol=0.02)
    # Deeper positions estimated from samples agree with the exact values.
    est = sfpjax.loss_floor(sfpjax.mess3(), 6, use_bos=True, key=jr.key(1), max_exact_words=9,
                            num_samples=20000)
    exact = sfpjax.loss_floor(sfpjax.mess3(), 6, use_bos=True)
    np.testing.assert_allclose(np.asarray(est)[:3], np.asarray(exact)[:3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(est), np.asarray(exact), atol=0.01)
    with pytest.raises(ValueError, match="pass key= to estimate"):
        sfpjax.loss_floor(sfpjax.mess3(), 6, use_bos=True, max_exact_words=9)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        sfpjax.loss_floor(p, 1, use_bos=False)


def test_evaluate_reports_excess_against_the_floor():
    model = _model(cfg=dataclasses.replace(CFG, use_bos=True))
    res = sfpjax.evaluate(model, sfpjax.z1r(), key=jr.key(0), batch_size=64, seq_len=8)
    assert res.loss.shape == res.floor.shape == (8,)
    np.testing.assert_allclose(np.asarray(res.floor), np.asarray(sfpjax.myopic_entropies(sfpjax.z1r(), 7)))
    np.testing.assert_allclose(np.asarray(res.excess), np.asarray(res.loss - res.floor))
    assert np.isclose(float(res.excess_last), float(res.excess[-1]))
    assert np.isclose(float(res.excess_pct), 100 * float(res.excess_mean) / float(res.floor.mean()), rtol=1e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "TrainConfig.steps must be an int >= 1"),
        ("batch_size", True, "TrainConfig.batch_size must be an int"),
        ("learning_rate", -1.0, "TrainConfig.learning_rate must be a finite number > 0"),
        ("schedule", "linear", "TrainConfig.schedule must be 'cosine' or 'constant'"),
        ("warmup_steps", 8, "TrainConfig.warmup_steps=8 must be smaller than steps=8"),
        ("grad_clip", 0.0, "TrainConfig.grad_clip must be"),
        ("keep_checkpoints", 0, "TrainConfig.keep_checkpoints must be an int >= 1"),
        ("min_lr_ratio", 2.0, "TrainConfig.min_lr_ratio must be a finite number >= 0.0 and <= 1.0"),
    ],
)
def test_train_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TC, **{field: value})


def test_schedule_warmup_then_cosine_or_constant():
    tc = TrainConfig(steps=100, batch_size=1, seq_len=2, learning_rate=1.0, warmup_steps=10)
    lr = sfpjax.make_schedule(tc)
    assert float(lr(0)) == 0.0 and np.isclose(float(lr(10)), 1.0) and np.isclose(float(lr(100)), 0.1)
    const = sfpjax.make_schedule(dataclasses.replace(tc, schedule="constant"))
    assert np.isclose(float(const(5)), 0.5) and np.isclose(float(const(90)), 1.0)


def test_stack_of_two_models_equals_two_separate_runs():
    keys = jr.split(jr.key(7), 2)
    init_keys = jr.split(jr.key(8), 2)
    procs = [sfpjax.z1r(0.5), sfpjax.z1r(0.9)]
    stacked_proc = jax.tree.map(lambda *xs: jnp.stack(xs), *procs)
    models = eqx.filter_vmap(lambda k: Transformer(CFG, key=k))(init_keys)
    tc = dataclasses.replace(TC, eval_every=8, eval_batch_size=256)
    out = sfpjax.train_stack(models, stacked_proc, tc, keys=keys, optimizer=OPT, progress=False)
    assert len(out.history[-1]["loss"]) == 2 and len(out.history[-1]["excess"]) == 2
    singles = []
    for k in range(2):
        single = sfpjax.train(Transformer(CFG, key=init_keys[k]), procs[k], tc, key=keys[k],
                              optimizer=OPT, progress=False)
        singles.append(single)
        mine = jax.tree.map(lambda x: x[k], out.model)
        # The key bias gets a gradient that is exactly zero up to rounding, which differs
        # between the vmapped and the plain program and which Adam scales up to steps of
        # size ~lr; so parameters agree to a small fraction of the distance travelled
        # (8 steps of lr 1e-2), and the function the models compute agrees closely.
        for x, y in zip(tree_leaves_np(mine), tree_leaves_np(single.model)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-4)
        toks = sfpjax.sample(procs[k], key=jr.key(0), batch_size=4, seq_len=8)
        logits = eqx.filter_jit(lambda m, t: jax.vmap(m)(t))
        np.testing.assert_allclose(np.asarray(logits(mine, toks)), np.asarray(logits(single.model, toks)),
                                   atol=1e-5)
        np.testing.assert_allclose(out.history[-1]["loss"][k], single.history[-1]["loss"], rtol=1e-5)
        np.testing.assert_allclose(out.history[-1]["excess"][k], single.history[-1]["excess"], atol=1e-5)
    # K seeds on one shared process (evaluation does not change the parameters, so the
    # first separate run is the reference).
    shared = sfpjax.train_stack(models, procs[0], TC, keys=keys, optimizer=OPT, progress=False)
    np.testing.assert_allclose(np.asarray(shared.model.W_U[0]), np.asarray(singles[0].model.W_U),
                               rtol=1e-4, atol=2e-4)
    with pytest.raises(ValueError, match="stack of K=3 models"):
        sfpjax.train_stack(models, procs[0], TC, keys=jr.split(jr.key(0), 3), progress=False)


class _CountCompiles:
    """Counts XLA compilations while active."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_make_step_compiles_once_and_donates():
    model = _model()
    opt_state = sfpjax.init_opt_state(OPT, model)
    step = sfpjax.make_step(OPT, batch_size=4, seq_len=8)
    src = sfpjax.ProcessSource(sfpjax.z1r())
    for i in range(3):
        model, opt_state, loss = step(model, opt_state, src, jr.fold_in(jr.key(0), i))
    assert np.isfinite(float(loss))
    old_model = model
    with _CountCompiles() as compiles:
        model, opt_state, loss = step(model, opt_state, src, jr.key(9))
        # A step made again from an equal optimizer is the same compiled program.
        step2 = sfpjax.make_step(sfpjax.make_optimizer(TC), batch_size=4, seq_len=8)
        model, opt_state, loss = step2(model, opt_state, src, jr.key(10))
    assert compiles.count == 0
    assert step2 == step
    assert old_model.W_U.is_deleted()  # donated


def test_equal_configs_reuse_the_compiled_training_step():
    # A fresh optimizer (from the config) every call; only bookkeeping fields differ.
    tc = dataclasses.replace(TC, eval_every=4, eval_batch_size=32)
    first = sfpjax.train(_model(), sfpjax.z1r(), tc, key=jr.key(1), progress=False)
    with _CountCompiles() as compiles:
        again = sfpjax.train(_model(), sfpjax.z1r(), dataclasses.replace(tc, log_every=2), key=jr.key(1),
                             progress=False)
    assert compiles.count == 0
    assert_trees_equal(first.model, again.model)
    assert sfpjax.make_optimizer(tc) == sfpjax.make_optimizer(dataclasses.replace(tc, log_every=3))
    assert sfpjax.make_optimizer(tc) != sfpjax.make_optimizer(dataclasses.replace(tc, learning_rate=2e-2))


def test_resumable_fields_are_marked_on_the_config():
    assert sfpjax.TrainConfig.resumable_fields() == (
        "eval_every", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "steps_per_call")


def test_model_protocol_is_checked():
    assert isinstance(_model(), sfpjax.SequenceModel)
    with pytest.raises(ValueError, match="must provide a `config` and a `batched"):
        sfpjax.training._protocol.check_model(lambda tokens: tokens)


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    tc = dataclasses.replace(TC, checkpoint_every=4, keep_checkpoints=None, log_every=2)
    full = sfpjax.train(_model(), sfpjax.z1r(), tc, key=jr.key(1), run_dir=tmp_path / "full", progress=False)
    run_dir = tmp_path / "torn"
    run_dir.mkdir()
    # A run killed while writing the row of step 6: checkpoint 4, rows 2 and 4, half of row 6.
    shutil.copytree(tmp_path / "full" / "checkpoints" / "4", run_dir / "checkpoints" / "4")
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    with pytest.warns(UserWarning, match="torn last line"):
        resumed = sfpjax.train(_model(), sfpjax.z1r(), tc, key=jr.key(1), run_dir=run_dir, resume=True,
                               progress=False)
    assert resumed.history == full.history
    assert_trees_equal(resumed.model, full.model)
    # Damage before the last line is not a crash's: it is named, with the fix.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0][:5]] + lines[1:]) + "\n")
    shutil.rmtree(run_dir / "checkpoints" / "8")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 1 is not valid JSON.*Delete that line"):
        sfpjax.train(_model(), sfpjax.z1r(), tc, key=jr.key(1), run_dir=run_dir, resume=True, progress=False)


def test_several_steps_per_call_make_the_same_updates():
    z1r = sfpjax.z1r()
    base = dataclasses.replace(TC, steps=11, log_every=2, eval_every=5, eval_batch_size=32)
    one = sfpjax.train(_model(), z1r, dataclasses.replace(base, steps_per_call=1), key=jr.key(3), progress=False)
    many = sfpjax.train(_model(), z1r, dataclasses.replace(base, steps_per_call=4), key=jr.key(3), progress=False)
    for a, b in zip(tree_leaves_np(one.model), tree_leaves_np(many.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in one.history] == [r["step"] for r in many.history]
    for r1, r2 in zip(one.history, many.history):
        assert set(r1) == set(r2)
        if "loss" in r1:
            np.testing.assert_allclose(r1["loss"], r2["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="steps_per_call"):
        dataclasses.replace(base, steps_per_call=0)
