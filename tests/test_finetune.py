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

CFG = TransformerConfig(vocab_size=2, n_ctx=8, n_layers=2, d_model=16, n_heads=2, d_mlp=32)
TC = TrainConfig(steps=4, batch_size=16, seq_len=8, learning_rate=1e-2, log_every=2,
                 checkpoint_every=2, keep_checkpoints=None)
BASE = Transformer(CFG, key=jr.key(0))
TOKENS = sfpjax.sample(sfpjax.z1r(), key=jr.key(3), batch_size=4, seq_len=8)
forward = eqx.filter_jit(lambda m, t, **kw: m.batched(t, **kw))


def _add(a, mask, params):
    return a + jnp.where(mask[:, None], params[None, :], 0.0)


def test_zero_initialized_lora_is_the_base_model():
    lora = sfpjax.LoRATransformer(BASE, rank=2, targets=("attn.W_Q", "attn.W_V", "mlp.W_out", "unembed.W_U"),
                                  key=jr.key(1))
    assert sorted(lora.adapters)[:2] == ["blocks.0.attn.W_Q", "blocks.0.attn.W_V"]
    assert_trees_equal(lora.merge(), BASE)
    np.testing.assert_array_equal(np.asarray(forward(lora, TOKENS)), np.asarray(forward(BASE, TOKENS)))


def test_merge_adds_the_low_rank_product_and_equals_the_wrapped_forward():
    lora = sfpjax.LoRATransformer(BASE, rank=2, targets=("blocks.1.attn.W_K", "mlp.W_in", "embed.W_E"),
                                  key=jr.key(1))
    # Nonzero B everywhere, as after training.
    lora = eqx.tree_at(lambda m: [a.B for a in m.adapters.values()], lora,
                       [jr.normal(jr.fold_in(jr.key(2), i), a.B.shape, jnp.float32) for i, a in enumerate(lora.adapters.values())])
    merged = lora.merge()
    ad = lora.adapters["blocks.1.attn.W_K"]
    delta = (np.asarray(ad.A, np.float64) @ np.asarray(ad.B, np.float64)).reshape(16, 2, 8)
    np.testing.assert_allclose(np.asarray(merged.blocks[1].W_QKV[:, 1]),
                               np.asarray(BASE.blocks[1].W_QKV[:, 1]) + delta, rtol=1e-5, atol=1e-6)
    # W_Q and W_V of block 1 and all of block 0's attention are untouched.
    np.testing.assert_array_equal(np.asarray(merged.blocks[1].W_QKV[:, [0, 2]]),
                                  np.asarray(BASE.blocks[1].W_QKV[:, [0, 2]]))
    np.testing.assert_array_equal(np.asarray(merged.blocks[0].W_QKV), np.asarray(BASE.blocks[0].W_QKV))
    ad = lora.adapters["blocks.0.mlp.W_in"]
    np.testing.assert_allclose(np.asarray(merged.blocks[0].W_in),
                               np.asarray(BASE.blocks[0].W_in) + np.asarray(ad.A) @ np.asarray(ad.B), rtol=1e-5,
                               atol=1e-6)
    # The wrapped forward is the merged model's, sites and interventions included.
    iv = {"blocks.0.hook_resid_post": sfpjax.Intervention(_add, jnp.ones(16, jnp.float32))}
    site = ["blocks.1.hook_resid_mid"]
    got, acts = forward(lora, TOKENS, sites=site, interventions=iv)
    want, want_acts = forward(merged, TOKENS, sites=site, interventions=iv)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(acts[site[0]]), np.asarray(want_acts[site[0]]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(forward(BASE, TOKENS, interventions=iv)), atol=1e-3)


def test_bad_lora_rank_or_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rank 3 exceeds the rank of unembed.W_U, a \(16, 2\) matrix"):
        sfpjax.LoRATransformer(BASE, rank=3, targets=("unembed.W_U",), key=jr.key(0))
    with pytest.raises(ValueError, match=r"unknown LoRA target 'mlp.W_up'.*valid targets"):
        sfpjax.LoRATransformer(BASE, rank=1, targets=("mlp.W_up",), key=jr.key(0))
    with pytest.raises(ValueError, match=r"unknown LoRA target 'blocks.2.mlp.W_in'.*2 blocks"):
        sfpjax.finetune(BASE, sfpjax.z1r(), TC, method=sfpjax.LoRA(1, ("blocks.2.mlp.W_in",)), key=jr.key(0),
                        progress=False)
    with pytest.raises(ValueError, match="positive int"):
        sfpjax.LoRA(rank=0).wrap(BASE, key=jr.key(0))
    with pytest.raises(ValueError, match="one vector per position"):
        sfpjax.SteeredTransformer(BASE, "blocks.0.attn.hook_pattern")


def test_head_only_changes_only_the_unembedding():
    out = sfpjax.finetune(BASE, sfpjax.z1r(), TC, method=sfpjax.HeadOnly(), key=jr.key(1), progress=False)
    assert isinstance(out.model, Transformer)
    changed = eqx.tree_at(lambda m: (m.W_U, m.b_U), out.model, (BASE.W_U, BASE.b_U))
    assert_trees_equal(changed, BASE)
    assert not np.array_equal(np.asarray(out.model.W_U), np.asarray(BASE.W_U))
    # Optimizer state (Adam mu and nu) only for W_U and b_U.
    sizes = sorted(x.size for x in tree_leaves_np(out.opt_state) if x.ndim > 0)
    assert sizes == sorted([BASE.W_U.size, BASE.b_U.size] * 2)


def test_lora_and_steering_train_only_their_parameters():
    lora = sfpjax.finetune(BASE, sfpjax.z1r(), TC, method=sfpjax.LoRA(rank=1, targets=("attn.W_V",)),
                           key=jr.key(1), progress=False)
    assert_trees_equal(lora.model.base, BASE)
    assert all(np.any(np.asarray(a.B) != 0) for a in lora.model.adapters.values())
    assert np.isfinite(lora.history[-1]["loss"])
    steer = sfpjax.finetune(BASE, sfpjax.z1r(), TC, method=sfpjax.SteeringVector("blocks.1.hook_resid_mid"),
                            key=jr.key(1), progress=False)
    assert_trees_equal(steer.model.base, BASE)
    vec = steer.model.vector
    assert vec.shape == (16,) and np.any(np.asarray(vec) != 0)
    # The trained vector acts through the intervention API: adding it by hand is the same model.
    by_hand = forward(BASE, TOKENS, interventions={"blocks.1.hook_resid_mid": sfpjax.Intervention(_add, vec)})
    np.testing.assert_allclose(np.asarray(forward(steer.model, TOKENS)), np.asarray(by_hand), rtol=1e-6, atol=1e-6)


def test_resumed_lora_finetune_is_bit_identical(tmp_path):
    method = sfpjax.LoRA(rank=1, targets=("mlp.W_out", "attn.W_Q"))
    full = sfpjax.finetune(BASE, sfpjax.z1r(), TC, method=method, key=jr.key(4), run_dir=tmp_path / "full",
                           progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir()) == [2, 4]
    run_dir = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "4")
    resumed = sfpjax.finetune(BASE, sfpjax.z1r(), TC, method=method, key=jr.key(4), run_dir=run_dir, resume=True,
                              progress=False)
    assert_trees_equal(resumed.model, full.model)
    assert_trees_equal(resumed.opt_state, full.opt_state)
    assert resumed.history == full.history
    # A checkpoint restores into the wrapped structure.
    like = method.wrap(BASE, key=jr.key(0))
    ck = sfpjax.restore_checkpoint(tmp_path / "full", like, full.opt_state, step=2)
    assert ck.step == 2 and isinstance(ck.model, sfpjax.LoRATransformer)
    # Another base model is refused.
    shutil.rmtree(run_dir / "checkpoints" / "4")
    with pytest.raises(ValueError, match="base model differs"):
        sfpjax.finetune(Transformer(CFG, key=jr.key(9)), sfpjax.z1r(), TC, method=method, key=jr.key(4),
                        run_dir=run_dir, resume=True, progress=False)


def test_stacked_finetunes_equal_separate_ones():
    method = sfpjax.LoRA(rank=1, targets=("attn.W_Q",))
    keys = jr.split(jr.key(5), 2)
    procs = [sfpjax.z1r(0.5), sfpjax.z1r(0.9)]
    stacked = sfpjax.finetune_stack(BASE, jax.tree.map(lambda *xs: jnp.stack(xs), *procs), TC, method=method,
                                    keys=keys, progress=False)
    assert_trees_equal(jax.tree.map(lambda x: x[1], stacked.model.base), BASE)
    for k in range(2):
        single = sfpjax.finetune(BASE, procs[k], TC, method=method, key=keys[k], progress=False)
        mine = jax.tree.map(lambda x: x[k], stacked.model)
        np.testing.assert_allclose(np.asarray(forward(mine, TOKENS)), np.asarray(forward(single.model, TOKENS)),
                                   atol=1e-5)
        np.testing.assert_allclose(stacked.history[-1]["loss"][k], single.history[-1]["loss"], rtol=1e-5)
