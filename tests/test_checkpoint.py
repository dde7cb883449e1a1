import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import sfpjax
from oracles import assert_trees_equal, tree_leaves_np
from sfpjax import CheckpointError, TrainConfig, Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=2, n_ctx=8, n_layers=1, d_model=16, n_heads=2, d_mlp=32)
TC = TrainConfig(steps=12, batch_size=16, seq_len=8, learning_rate=1e-2, log_every=2,
                 eval_every=6, eval_batch_size=32, checkpoint_every=4, keep_checkpoints=None)
OPT = sfpjax.make_optimizer(TC)




def _train(run_dir, *, resume=False, key=jr.key(1), cfg=TC, model_cfg=CFG, data=None):
    return sfpjax.train(Transformer(model_cfg, key=jr.key(0)), sfpjax.z1r() if data is None else data,
                        cfg, key=key, optimizer=OPT, run_dir=run_dir, resume=resume, progress=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    return run_dir, _train(run_dir)


def _copy(full_run, tmp_path) -> Path:
    src, _ = full_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _state_files(run_dir: Path, step: int) -> list[Path]:
    root = run_dir / "checkpoints" / str(step) / "state"
    return [p for p in root.rglob("*") if p.is_file() and p.parent.name == "d"]


def test_checkpoints_and_metrics_are_written(full_run):
    run_dir, out = full_run
    assert sfpjax.latest_checkpoint(run_dir) == 12
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [4, 8, 12]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == out.history
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "excess", "excess_pct", "excess_last"} <= set(rows[2])
    ck = sfpjax.restore_checkpoint(run_dir, Transformer(CFG, key=jr.key(5)), out.opt_state, CFG, TC)
    assert ck.step == 12 and ck.metadata["model_config"]["d_model"] == 16
    assert_trees_equal(ck.model, out.model)
    assert_trees_equal(ck.opt_state, out.opt_state)
    np.testing.assert_array_equal(jr.key_data(ck.key), jr.key_data(jr.key(1)))


def test_resume_after_a_stop_equals_the_uninterrupted_run(full_run, tmp_path):
    _, full = full_run
    run_dir = _copy(full_run, tmp_path)
    # The state of a run stopped between steps 4 and 8: checkpoint 4 only, log rows past it.
    shutil.rmtree(run_dir / "checkpoints" / "8")
    shutil.rmtree(run_dir / "checkpoints" / "12")
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n")
    resumed = _train(run_dir, resume=True)
    assert_trees_equal(resumed.model, full.model)
    assert_trees_equal(resumed.opt_state, full.opt_state)
    assert resumed.history == full.history
    assert sfpjax.latest_checkpoint(run_dir) == 12
    # Resuming a finished run does nothing and returns the final state.
    again = _train(run_dir, resume=True, cfg=dataclasses.replace(TC, log_every=3))
    assert_trees_equal(again.model, full.model)


def test_existing_run_is_never_overwritten(full_run, tmp_path):
    run_dir = _copy(full_run, tmp_path)
    with pytest.raises(ValueError, match="already holds checkpoints .*latest step 12.*resume=True"):
        _train(run_dir)
    with pytest.raises(CheckpointError, match="checkpoint for step 12 already exists"):
        sfpjax.save_checkpoint(run_dir, 12, model={"w": jnp.ones(2)}, opt_state=(), key=jr.key(0))


def test_resume_with_other_key_config_or_data_names_the_mismatch(full_run, tmp_path):
    run_dir = _copy(full_run, tmp_path)
    with pytest.raises(ValueError, match="key differs"):
        _train(run_dir, resume=True, key=jr.key(2))
    with pytest.raises(ValueError, match=r"train_config.learning_rate: checkpoint has 0.01, given 0.02"):
        _train(run_dir, resume=True, cfg=dataclasses.replace(TC, learning_rate=2e-2))
    with pytest.raises(ValueError, match=r"data source differs"):
        _train(run_dir, resume=True, data=sfpjax.z1r(0.3))
    other = dataclasses.replace(CFG, d_mlp=8, n_heads=4)
    with pytest.raises(ValueError) as err:
        sfpjax.restore_checkpoint(run_dir, Transformer(other, key=jr.key(0)), (), other, TC)
    assert "model_config.d_mlp: checkpoint has 32, given 8" in str(err.value)
    assert "model_config.n_heads: checkpoint has 2, given 4" in str(err.value)
    # Without configs to compare, a structural difference is still named.
    with pytest.raises(ValueError, match="model array .* has shape"):
        sfpjax.restore_checkpoint(run_dir, Transformer(other, key=jr.key(0)), _train_state_like())


def _train_state_like():
    model = Transformer(CFG, key=jr.key(0))
    return sfpjax.init_opt_state(OPT, model)


def test_missing_or_empty_run_dir(tmp_path):
    like = Transformer(CFG, key=jr.key(0))
    with pytest.raises(CheckpointError, match="does not exist"):
        sfpjax.restore_checkpoint(tmp_path / "nope", like, ())
    with pytest.raises(CheckpointError, match="does not exist"):
        sfpjax.latest_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        sfpjax.restore_checkpoint(tmp_path, like, ())
    assert sfpjax.latest_checkpoint(tmp_path) is None


# Orbax's reader leaves a warning from its event loop behind when a read fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip", "remove_record"])
def test_corrupted_checkpoint_is_reported_and_the_previous_one_survives(full_run, tmp_path, damage):
    run_dir = _copy(full_run, tmp_path)
    _, full = full_run
    if damage == "truncate":
        for f in _state_files(run_dir, 12):
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif damage == "flip":
        # One flipped bit. Where it lands in Orbax's files varies between runs (values,
        # index, padding), so try several offsets: each flip must either be reported or
        # leave the restored values bitwise intact, never return silently wrong numbers;
        # at least one must hit stored values and be caught.
        f = max(_state_files(run_dir, 12), key=lambda p: p.stat().st_size)
        clean = f.read_bytes()
        caught = None
        for offset in np.linspace(0, len(clean) - 1, 16).astype(int)[1:-1]:
            data = bytearray(clean)
            data[offset] ^= 0x01
            f.write_bytes(bytes(data))
            try:
                ck = sfpjax.restore_checkpoint(run_dir, full.model, full.opt_state)
            except CheckpointError as e:
                assert "step 12" in str(e)
                caught = offset
                continue
            assert_trees_equal(ck.model, full.model)
            assert_trees_equal(ck.opt_state, full.opt_state)
        assert caught is not None, "no flipped bit was detected"
        data = bytearray(clean)
        data[caught] ^= 0x01
        f.write_bytes(bytes(data))
    else:
        (run_dir / "checkpoints" / "12" / "meta" / "metadata").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint step 12 .* partial or corrupted.*step=8"):
        sfpjax.restore_checkpoint(run_dir, full.model, full.opt_state, CFG, TC)
    with pytest.raises(CheckpointError, match=r"step 12 .*corrupted"):
        _train(run_dir, resume=True)
    # Nothing was overwritten or deleted; the earlier checkpoint restores.
    assert sfpjax.latest_checkpoint(run_dir) == 12
    ck8 = sfpjax.restore_checkpoint(run_dir, full.model, full.opt_state, CFG, TC, step=8)
    assert ck8.step == 8
    # Moving the damaged step aside resumes from 8 to the same final parameters.
    shutil.move(run_dir / "checkpoints" / "12", tmp_path / "damaged-12")
    resumed = _train(run_dir, resume=True)
    assert_trees_equal(resumed.model, full.model)


def test_interrupted_write_is_invisible(full_run, tmp_path):
    run_dir = _copy(full_run, tmp_path)
    # Orbax writes into a temporary directory and renames it when the step is complete.
    partial = run_dir / "checkpoints" / "16.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    assert sfpjax.latest_checkpoint(run_dir) == 12
    assert sfpjax.restore_checkpoint(run_dir, full_run[1].model, full_run[1].opt_state).step == 12


def test_keep_checkpoints_and_stack_round_trip(tmp_path):
    models = eqx.filter_vmap(lambda k: Transformer(CFG, key=k))(jr.split(jr.key(0), 2))
    tc = dataclasses.replace(TC, eval_every=0, keep_checkpoints=2)
    keys = jr.split(jr.key(3), 2)
    out = sfpjax.train_stack(models, sfpjax.z1r(), tc, keys=keys, optimizer=OPT, run_dir=tmp_path,
                             progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [8, 12]
    ck = sfpjax.restore_checkpoint(tmp_path, models, out.opt_state, CFG, tc)
    assert_trees_equal(ck.model, out.model)
    np.testing.assert_array_equal(jr.key_data(ck.key), jr.key_data(keys))


_DAMAGED_RESTORE = """
import pathlib, sys
import jax.random as jr, sfpjax
run_dir = sys.argv[1]
model = {f"w{i}": jr.normal(jr.key(i), (20000,)) for i in range(60)}
for step in (1, 2):
    sfpjax.save_checkpoint(run_dir, step, model=model, opt_state=(), key=jr.key(0))
for f in (pathlib.Path(run_dir) / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d" and f.stat().st_size > 20000:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
for _ in range(4):
    try:
        sfpjax.restore_checkpoint(run_dir, model, ())
    except sfpjax.CheckpointError as e:
        print(e)
"""


def test_damaged_checkpoint_error_is_short_and_names_the_file(tmp_path):
    # Orbax reads arrays concurrently and closes its event loop at the first failed read;
    # every read still in flight then printed an "Event loop is closed" traceback.
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", _DAMAGED_RESTORE, str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Event loop is closed" not in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    messages = proc.stdout.strip().splitlines()
    assert len(messages) == 4
    assert all("checkpoint step 2" in m and "sha256sum -c files.sha256" in m and "step=1" in m for m in messages)
    assert "/state/" in messages[0]


def test_checkpoint_without_its_file_checksums_is_partial(full_run, tmp_path):
    run_dir = _copy(full_run, tmp_path)
    (run_dir / "checkpoints" / "12" / "files.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"step 12 .*files.sha256 are missing.*step=8"):
        sfpjax.restore_checkpoint(run_dir, full_run[1].model, full_run[1].opt_state)
