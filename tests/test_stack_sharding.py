"""Stacked training and fine-tuning split their K axis over the local devices, with one device's results."""

import os
import subprocess
import sys

from _env import subprocess_env

_SCRIPT = r"""
import sys, tempfile
import jax, jax.numpy as jnp, jax.random as jr, numpy as np, equinox as eqx
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_numpy_dtype_promotion", "strict")
import sfpjax
from sfpjax.training import _loop

assert jax.local_device_count() == 2
cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
tc = sfpjax.TrainConfig(steps=4, batch_size=8, seq_len=8, eval_every=2, eval_batch_size=16, steps_per_call=2)
# Per-device programs may round differently; Adam turns a sign flip of a near-zero gradient
# into a step of ~lr, so parameters agree to float32 rounding times the step count.
close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
one_device = lambda K: None
on_mesh = _loop.stack_mesh

def both(fn):
    _loop.stack_mesh = on_mesh
    split = fn()
    _loop.stack_mesh = one_device
    ref = fn()
    _loop.stack_mesh = on_mesh
    for a, b in zip(jax.tree.leaves(eqx.filter(split.model, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(ref.model, eqx.is_array))):
        close(a, b)
    for r, q in zip(split.history, ref.history):
        assert r.keys() == q.keys()
        for name in ("loss", "excess"):
            if name in r:
                close(r[name], q[name])
    return split

def devices_of(tree):
    return {len(x.sharding.device_set) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))}

K = 4
models = eqx.filter_vmap(lambda k: sfpjax.Transformer(cfg, key=k))(jr.split(jr.key(0), K))
keys = jr.split(jr.key(1), K)
# one shared process
out = both(lambda: sfpjax.train_stack(models, sfpjax.mess3(), tc, keys=keys, progress=False))
assert devices_of(out.model) == {2}, devices_of(out.model)
assert out.model.W_E.sharding.spec[0] == "stack", out.model.W_E.sharding
assert len(out.model.W_E.addressable_shards) == 2 and out.model.W_E.addressable_shards[0].data.shape[0] == 2
# stacked LoRA fine-tuning from the stacked models, on K processes split with the models
procs = jax.tree.map(lambda *x: jnp.stack(x), *[sfpjax.mess3(0.05 + 0.05 * i, 0.6) for i in range(K)])
ft = tc
out = both(lambda: sfpjax.finetune_stack(models, procs, ft, method=sfpjax.LoRA(rank=2), keys=keys, progress=False))
assert devices_of(out.model) == {2}
# K = 3 does not divide over 2 devices: it runs on one
three = jax.tree.map(lambda x: x[:3] if eqx.is_array(x) else x, models)
out = sfpjax.train_stack(three, sfpjax.mess3(), tc, keys=keys[:3], progress=False)
assert devices_of(out.model) == {1}
# the split run checkpoints and resumes (from a copy of its step-2 checkpoint) to its own result
import shutil, pathlib
with tempfile.TemporaryDirectory() as d:
    d = pathlib.Path(d)
    ck = sfpjax.TrainConfig(**{**tc.__dict__, "checkpoint_every": 2, "keep_checkpoints": None})
    full = sfpjax.train_stack(models, sfpjax.mess3(), ck, keys=keys, run_dir=d / "full", progress=False)
    shutil.copytree(d / "full" / "checkpoints" / "2", d / "cut" / "checkpoints" / "2")
    resumed = sfpjax.train_stack(models, sfpjax.mess3(), ck, keys=keys, run_dir=d / "cut", resume=True, progress=False)
    close(resumed.model.W_U, full.model.W_U)
    assert devices_of(resumed.model) == {2}
print("ok")
"""


def test_stacked_runs_split_over_two_devices_match_one_device():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")


def test_stack_mesh_uses_the_largest_dividing_device_count():
    import jax

    from sfpjax.training._shard import stack_mesh

    devices = jax.local_devices()
    assert stack_mesh(1) is None
    fake = devices * 4  # the rule only counts devices
    assert stack_mesh(6, fake).devices.size == 3
    assert stack_mesh(8, fake).devices.size == 4
    assert stack_mesh(7, fake) is None


def test_a_stack_split_over_two_distributed_processes_matches_one_process(tmp_path):
    import socket

    import jax
    import numpy as np

    from _stack_case import stack_case

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "_stack_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(tmp_path), str(port), str(i)], env=subprocess_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for e in errors]
    one = stack_case()
    want = [np.asarray(x) for x in jax.tree.leaves(one.model)]
    want_loss = np.asarray([r["loss"] for r in one.history if "loss" in r])
    for pid in range(2):  # every process returns all K runs
        got = np.load(tmp_path / f"result_{pid}.npz")
        for i, w in enumerate(want):
            np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-5)
    # Each process checkpoints its own share of the runs.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["process_000", "process_001"]
