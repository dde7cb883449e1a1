"""Chunk-level sweeps: a function of a whole chunk (training included), resumable chunk by chunk."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax

KEY = jr.key(7)


def _square_point(p):
    return {"y": p["x"] ** 2, "noise": jr.normal(p["key"], (3,)), "big": p["x"] > 2.5}


def test_a_vectorized_chunk_function_gives_the_vmapped_sweep(tmp_path):
    g = sfpjax.grid(x=[1.0, 2.0, 3.0, 4.0, 5.0])
    def chunk(points):
        out = jax.vmap(_square_point)(points)
        return {k: out[k] for k in ("y", "noise", "big")}  # vmap returns the names sorted

    chunked = sfpjax.run_chunked_sweep(chunk, g, out_dir=tmp_path / "c", chunk_size=2, key=KEY, progress=False)
    vmapped = sfpjax.run_sweep(_square_point, g, out_dir=tmp_path / "v", chunk_size=2, key=KEY, progress=False)
    assert (tmp_path / "c" / "results.csv").read_bytes() == (tmp_path / "v" / "results.csv").read_bytes()
    np.testing.assert_array_equal(chunked.arrays["noise"], vmapped.arrays["noise"])
    assert list(chunked.table) == ["index", "x", "y", "big"]
    assert sfpjax.load_sweep(tmp_path / "c").complete


def test_an_interrupted_sweep_resumes_with_the_missing_chunks_only(tmp_path):
    g = sfpjax.grid(x=[1.0, 2.0, 3.0, 4.0, 5.0])
    calls = []

    def fn(points, fail_at=None):
        xs = np.asarray(points["x"]).tolist()  # plain Python: nothing here is traceable
        calls.append(xs)
        if fail_at in xs:
            raise RuntimeError("interrupted")
        return {"y": np.array([x ** 2 for x in xs])}

    with pytest.raises(RuntimeError, match="interrupted"):
        sfpjax.run_chunked_sweep(lambda p: fn(p, fail_at=3.0), g, out_dir=tmp_path, chunk_size=2, progress=False)
    partial = sfpjax.load_sweep(tmp_path)
    assert not partial.complete and partial.table["y"].tolist() == [1.0, 4.0]
    calls.clear()
    res = sfpjax.run_chunked_sweep(fn, g, out_dir=tmp_path, chunk_size=2, progress=False)
    assert calls == [[3.0, 4.0], [5.0]] and res.complete
    assert res.table["y"].tolist() == [1.0, 4.0, 9.0, 16.0, 25.0]
    with pytest.raises(ValueError, match="chunk_size=2"):
        sfpjax.run_chunked_sweep(fn, g, out_dir=tmp_path, chunk_size=3, progress=False)
    with pytest.raises(ValueError, match="different sweep"):
        sfpjax.run_chunked_sweep(fn, sfpjax.grid(x=[1.0, 2.0]), out_dir=tmp_path, chunk_size=2, progress=False)


def test_bad_chunk_functions_are_named(tmp_path):
    g = sfpjax.grid(x=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="expected 2 rows"):
        sfpjax.run_chunked_sweep(lambda p: {"y": jnp.zeros(5)}, g, out_dir=tmp_path / "a", chunk_size=2,
                                 progress=False)
    with pytest.raises(ValueError, match="metrics were different"):
        sfpjax.run_chunked_sweep(lambda p: {"y": p["x"] if p["x"].shape[0] == 2 else p["x"].astype(jnp.int32)},
                                 g, out_dir=tmp_path / "b", chunk_size=2, progress=False)
    with pytest.raises(ValueError, match="positive int"):
        sfpjax.run_chunked_sweep(lambda p: {"y": p["x"]}, g, out_dir=tmp_path / "c", chunk_size=0)


def test_each_chunk_trains_a_stack_equal_to_separate_runs(tmp_path):
    """One row per (point, seed): pre-training as one stacked program per chunk."""
    cfg = sfpjax.TrainConfig(steps=6, batch_size=4, seq_len=6, learning_rate=1e-2, warmup_steps=0, log_every=1)
    mcfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=6, n_layers=1, d_model=8, n_heads=1, d_mlp=16)

    def init_and_train_keys(k):
        return jr.split(k)

    def chunk(points):
        keys = jax.vmap(init_and_train_keys)(points["key"])
        processes = jax.vmap(lambda x: sfpjax.mess3(x, 0.6))(points["x"])
        models = eqx.filter_vmap(lambda k: sfpjax.Transformer(mcfg, key=k))(keys[:, 0])
        out = sfpjax.train_stack(models, processes, cfg, keys=keys[:, 1], progress=False)
        return {"final_loss": jnp.asarray(out.history[-1]["loss"], jnp.float32)}

    g = sfpjax.grid(x=[0.1, 0.2], seed=[0, 1])
    res = sfpjax.run_chunked_sweep(chunk, g, out_dir=tmp_path, chunk_size=2, key=KEY, progress=False)
    assert len(res) == 4
    for i in range(4):
        init_key, train_key = init_and_train_keys(jr.fold_in(KEY, i))
        x = float(g.point(i)["x"])
        one = sfpjax.train(sfpjax.Transformer(mcfg, key=init_key), sfpjax.mess3(x, 0.6), cfg, key=train_key,
                           progress=False)
        np.testing.assert_allclose(res.table["final_loss"][i], one.history[-1]["loss"], rtol=1e-5)
