import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sfpjax
from _env import subprocess_env
from sfpjax.sweep import _engine as _sweep

sys.path.insert(0, os.path.dirname(__file__))
import _sweep_worker as worker  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_sweep_worker.py")
KEY = jax.random.key(7)


def _env(**extra):
    return subprocess_env(JAX_ENABLE_X64="1", **extra)


def _assert_same(a, b):
    assert list(a.table) == list(b.table)
    for name in a.table:
        assert a.table[name].dtype == b.table[name].dtype, name
        np.testing.assert_array_equal(a.table[name], b.table[name], err_msg=name)
    assert list(a.arrays) == list(b.arrays)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)


# ---------------------------------------------------------------------------- grids


def test_grid_orders_points_like_itertools_product():
    axes = dict(x=[0.1, 0.2], n=[1, 2, 3], flag=[True, False])
    g = sfpjax.grid(**axes)
    assert len(g) == 12 and g.shape == (2, 3, 2) and g.names == ("x", "n", "flag")
    expected = list(itertools.product(*axes.values()))
    assert [tuple(g.point(i).values()) for i in range(len(g))] == expected
    cols = g.columns(5, 9)
    np.testing.assert_array_equal(cols["n"], [e[1] for e in expected[5:9]])
    assert cols["x"].dtype == np.float64 and cols["n"].dtype == np.int64 and cols["flag"].dtype == bool


def test_points_from_rows_and_columns_agree():
    rows = [{"x": 0.1, "seed": 3}, {"seed": 4, "x": 0.5}]
    a = sfpjax.points(rows)
    b = sfpjax.points({"x": [0.1, 0.5], "seed": [3, 4]})
    assert len(a) == len(b) == 2 and a.point(1) == b.point(1) == {"x": 0.5, "seed": 4}


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: sfpjax.grid(), "Empty grid"),
        (lambda: sfpjax.grid(x=[]), "Empty grid: axis 'x'"),
        (lambda: sfpjax.points([]), "Empty grid"),
        (lambda: sfpjax.grid(x=np.ones((1, 2))), "one-dimensional"),
        (lambda: sfpjax.grid(name=np.array(["a", "b"])), "bools, integers or floats"),
        (lambda: sfpjax.grid(index=[1, 2]), "reserved"),
        (lambda: sfpjax.points({"x": [1.0, 2.0], "y": [1.0]}), "same length"),
        (lambda: sfpjax.points([{"x": 1.0}, {"y": 2.0}]), "same names"),
    ],
)
def test_bad_grids_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------------------- values


def test_sweep_matches_per_point_evaluation(tmp_path):
    g = sfpjax.grid(**worker.SHARD_GRID)
    res = sfpjax.run_sweep(worker.point_fn, g, out_dir=tmp_path, key=KEY, chunk_size=5, progress=False)
    assert res.complete and len(res) == len(g) and res.chunk_size == 5
    assert list(res.table) == ["index", "a", "b", "seed", "trace", "frob", "argmax", "positive"]
    assert set(res.arrays) == {"cube", "scaled"} and res.arrays["cube"].shape == (12, 4, 4)
    np.testing.assert_array_equal(res.table["index"], np.arange(12))
    assert res.table["positive"].dtype == bool and res.table["argmax"].dtype == np.int64
    for i in (0, 7, 11):
        p = g.point(i)
        point = {k: jnp.asarray(v) for k, v in p.items()}
        point["key"] = jax.random.fold_in(KEY, i)
        want = jax.jit(worker.point_fn)(point)
        for name in ("a", "b", "seed"):
            assert res.table[name][i] == p[name]
        np.testing.assert_allclose(res.table["trace"][i], want["trace"], rtol=1e-12)
        np.testing.assert_allclose(res.arrays["cube"][i], want["cube"], rtol=1e-12)
        assert res.table["argmax"][i] == want["argmax"]


def test_chunking_and_memory_budget_do_not_change_results(tmp_path):
    g = sfpjax.grid(**worker.SHARD_GRID)
    runs = [
        sfpjax.run_sweep(worker.point_fn, g, out_dir=tmp_path / "a", key=KEY, chunk_size=12, progress=False),
        sfpjax.run_sweep(worker.point_fn, g, out_dir=tmp_path / "b", key=KEY, chunk_size=7, progress=False),
        sfpjax.run_sweep(
            worker.point_fn, g, out_dir=tmp_path / "c", key=KEY, memory_budget_bytes=3000, progress=False
        ),
    ]
    assert 1 <= runs[2].chunk_size < 12
    for r in runs[1:]:
        _assert_same(runs[0], r)
    with open(tmp_path / "c" / "manifest.json") as f:
        assert json.load(f)["num_chunks"] == -(-12 // runs[2].chunk_size)


def test_memory_budget_too_small_raises(tmp_path):
    with pytest.raises(ValueError, match="smaller than one point's working set"):
        sfpjax.run_sweep(
            worker.point_fn, sfpjax.grid(**worker.SHARD_GRID), out_dir=tmp_path, key=KEY,
            memory_budget_bytes=8, progress=False,
        )


def test_scalar_complex_metric_goes_to_arrays_and_no_key_without_base_key(tmp_path):
    def fn(p):
        assert "key" not in p
        return {"z": jax.lax.complex(p["x"], p["x"] * 2), "sq": p["x"] ** 2}

    res = sfpjax.run_sweep(fn, sfpjax.points({"x": [1.0, 3.0]}), out_dir=tmp_path, progress=False)
    assert list(res.table) == ["index", "x", "sq"]
    np.testing.assert_array_equal(res.arrays["z"], [1 + 2j, 3 + 6j])


# ---------------------------------------------------------------------------- resume


def test_crash_inside_a_chunk_then_resume_equals_uninterrupted(tmp_path):
    g = sfpjax.grid(**worker.SLOW_GRID)  # a = 0.25, 0.5, 0.75 (4 points each), chunk 2

    def failing(p):
        out = worker.point_fn(p)
        return {**out, "trace": eqx.error_if(out["trace"], p["a"] > 0.6, "simulated crash")}

    with pytest.raises(Exception, match="simulated crash"):
        sfpjax.run_sweep(failing, g, out_dir=tmp_path / "r", key=KEY, chunk_size=2, progress=False)
    chunks = tmp_path / "r" / "chunks"
    finished = sorted(p.name for p in chunks.iterdir())
    assert finished == [f"chunk_{c:06d}.{ext}" for c in range(4) for ext in ("csv", "npz", "sha256")]
    partial = sfpjax.load_sweep(tmp_path / "r")
    assert not partial.complete and len(partial) == 8 and partial.arrays["cube"].shape == (8, 4, 4)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in chunks.iterdir()}

    resumed = sfpjax.run_sweep(worker.point_fn, g, out_dir=tmp_path / "r", key=KEY, progress=False)
    fresh = sfpjax.run_sweep(worker.point_fn, g, out_dir=tmp_path / "f", key=KEY, chunk_size=2, progress=False)
    for name, (data, mtime) in before.items():
        assert (chunks / name).read_bytes() == data and (chunks / name).stat().st_mtime_ns == mtime
    assert resumed.complete
    assert (tmp_path / "r" / "results.csv").read_bytes() == (tmp_path / "f" / "results.csv").read_bytes()
    _assert_same(resumed, fresh)


def test_killed_subprocess_resumes_to_the_same_table(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, WORKER, "slow", str(out)], env=_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = list((out / "chunks").glob("chunk_*.csv")) if (out / "chunks").exists() else []
            if len(done) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert not (out / "results.csv").exists()
    partial = sfpjax.load_sweep(out)
    assert not partial.complete and 2 <= len(partial) < 12

    g = sfpjax.grid(**worker.SLOW_GRID)
    resumed = sfpjax.run_sweep(worker.point_fn, g, out_dir=out, key=KEY, progress=False)
    fresh = sfpjax.run_sweep(
        worker.point_fn, g, out_dir=tmp_path / "fresh", key=KEY, chunk_size=worker.SLOW_CHUNK, progress=False
    )
    assert (out / "results.csv").read_bytes() == (tmp_path / "fresh" / "results.csv").read_bytes()
    _assert_same(resumed, fresh)
    assert not [p for p in (out / "chunks").iterdir() if p.name.endswith(".tmp")]


def test_finished_sweep_reloads_without_running_fn(tmp_path):
    g = sfpjax.points({"x": [1.0, 2.0]})
    first = sfpjax.run_sweep(lambda p: {"y": p["x"] * 3}, g, out_dir=tmp_path, progress=False)

    def never(p):
        out = {"y": p["x"] * 3}
        jax.debug.callback(lambda: pytest.fail("fn ran on a finished sweep"))
        return out

    again = sfpjax.run_sweep(never, g, out_dir=tmp_path, progress=False)
    _assert_same(first, again)
    _assert_same(first, sfpjax.load_sweep(tmp_path))


# ---------------------------------------------------------------------------- errors


def test_different_sweep_in_same_folder_raises(tmp_path):
    fn = lambda p: {"y": p["x"] * 2}  # noqa: E731
    sfpjax.run_sweep(fn, sfpjax.grid(x=[1.0, 2.0, 3.0]), out_dir=tmp_path, key=KEY, chunk_size=2, progress=False)
    # Same size, one value changed: the message shows the value, not two equal summaries.
    with pytest.raises(ValueError, match=r"(?s)its grid differs.*'x' differs at 1 of 3 values: \[1\] recorded 2\.0, given 2\.5"):
        sfpjax.run_sweep(fn, sfpjax.grid(x=[1.0, 2.5, 3.0]), out_dir=tmp_path, key=KEY, progress=False)
    with pytest.raises(ValueError, match=r"grid axes: recorded \['x'\], given \['x', 'n'\]"):
        sfpjax.run_sweep(fn, sfpjax.grid(x=[1.0, 2.0, 3.0], n=[1]), out_dir=tmp_path, key=KEY, progress=False)
    with pytest.raises(ValueError, match=r"'x': recorded \[1\.0, 2\.0, 3\.0\] \(3 values\), given \[1\.0, 2\.0\]"):
        sfpjax.run_sweep(fn, sfpjax.grid(x=[1.0, 2.0]), out_dir=tmp_path, key=KEY, progress=False)
    with pytest.raises(ValueError, match=r"(?s)its key differs.*key: recorded .*data \[0, 7\], given .*data \[0, 8\]"):
        sfpjax.run_sweep(fn, sfpjax.grid(x=[1.0, 2.0, 3.0]), out_dir=tmp_path, key=jax.random.key(8), progress=False)
    with pytest.raises(ValueError, match="started with chunk_size=2"):
        sfpjax.run_sweep(fn, sfpjax.grid(x=[1.0, 2.0, 3.0]), out_dir=tmp_path, key=KEY, chunk_size=3, progress=False)
    with pytest.raises(ValueError, match=r"metrics were different:\n  y: recorded shape \(\) dtype float\d+, fn returns nothing\n  z: recorded nothing"):
        sfpjax.run_sweep(
            lambda p: {"z": p["x"]}, sfpjax.grid(x=[1.0, 2.0, 3.0]), out_dir=tmp_path, key=KEY, progress=False
        )


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda p: p["x"] * 2, "must return a dict"),
        (lambda p: (p["x"], p["x"]), "must return a dict"),
        (lambda p: {}, "empty dict"),
        (lambda p: {"outer": {"inner": p["x"]}}, "flatten nested metrics"),
        (lambda p: {"x": p["x"]}, "clashes"),
        (lambda p: {"bad name": p["x"]}, "identifiers"),
        (lambda p: {"k": jax.random.key(0)}, "PRNG key"),
        (lambda p: {"s": "text"}, "must return a dict mapping metric names to arrays"),
    ],
)
def test_bad_fn_raises(tmp_path, fn, match):
    with pytest.raises(ValueError, match=match):
        sfpjax.run_sweep(fn, sfpjax.grid(x=[1.0, 2.0]), out_dir=tmp_path, progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_bad_arguments_raise(tmp_path):
    g = sfpjax.grid(x=[1.0, 2.0])
    fn = lambda p: {"y": p["x"]}  # noqa: E731
    with pytest.raises(ValueError, match="not both"):
        sfpjax.run_sweep(fn, g, out_dir=tmp_path, chunk_size=1, memory_budget_bytes=100)
    with pytest.raises(ValueError, match="positive integer"):
        sfpjax.run_sweep(fn, g, out_dir=tmp_path, chunk_size=0)
    with pytest.raises(ValueError, match="clashes with the per-point key"):
        sfpjax.run_sweep(fn, sfpjax.grid(key=[1, 2]), out_dir=tmp_path, key=KEY)
    with pytest.raises(ValueError, match="process_index < process_count"):
        sfpjax.run_sweep(fn, g, out_dir=tmp_path, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="holds no sweep"):
        sfpjax.load_sweep(tmp_path / "nothing")


# ---------------------------------------------------------------------------- hosts


def test_process_slices_cover_chunks_and_process_zero_assembles(tmp_path):
    g = sfpjax.grid(**worker.SLOW_GRID)  # 12 points, chunk 2: 6 chunks
    kw = dict(out_dir=tmp_path / "m", key=KEY, chunk_size=2, progress=False, process_count=3)
    r2 = sfpjax.run_sweep(worker.point_fn, g, process_index=2, **kw)
    assert not r2.complete
    np.testing.assert_array_equal(r2.table["index"], [4, 5, 10, 11])  # chunks 2 and 5
    r1 = sfpjax.run_sweep(worker.point_fn, g, process_index=1, **kw)
    np.testing.assert_array_equal(r1.table["index"], [2, 3, 4, 5, 8, 9, 10, 11])
    np.testing.assert_array_equal(r1.arrays["cube"][2:4], r2.arrays["cube"][:2])
    r0 = sfpjax.run_sweep(worker.point_fn, g, process_index=0, **kw)
    assert r0.complete
    fresh = sfpjax.run_sweep(worker.point_fn, g, out_dir=tmp_path / "f", key=KEY, chunk_size=2, progress=False)
    assert (tmp_path / "m" / "results.csv").read_bytes() == (tmp_path / "f" / "results.csv").read_bytes()
    _assert_same(r0, fresh)


def test_process_chunk_assignment_is_round_robin():
    assert _sweep._my_chunks(7, 0, 3) == [0, 3, 6]
    assert _sweep._my_chunks(7, 2, 3) == [2, 5]
    assert sorted(sum((_sweep._my_chunks(10, i, 4) for i in range(4)), [])) == list(range(10))


def test_eight_device_sharded_sweep_equals_single_device(tmp_path):
    proc = subprocess.run(
        [sys.executable, WORKER, "shard", str(tmp_path / "eight")],
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert jax.local_device_count() == 1
    eight = sfpjax.load_sweep(tmp_path / "eight")
    assert eight.complete and eight.chunk_size == worker.SHARD_CHUNK
    g = sfpjax.grid(**worker.SHARD_GRID)
    # Chunks of 5 padded to 8 put one point on each of the 8 devices; a single device
    # running chunks of 1 compiles the same per-device program, so the bits must agree.
    one = sfpjax.run_sweep(worker.point_fn, g, out_dir=tmp_path / "one", key=KEY, chunk_size=1, progress=False)
    assert (tmp_path / "eight" / "results.csv").read_bytes() == (tmp_path / "one" / "results.csv").read_bytes()
    _assert_same(one, eight)
    # A different per-device batch may reorder matmul sums in XLA: equal up to rounding.
    five = sfpjax.run_sweep(
        worker.point_fn, g, out_dir=tmp_path / "five", key=KEY, chunk_size=worker.SHARD_CHUNK, progress=False
    )
    for name in ("index", "a", "b", "seed", "argmax", "positive"):
        np.testing.assert_array_equal(five.table[name], eight.table[name])
    np.testing.assert_array_equal(five.arrays["scaled"], eight.arrays["scaled"])
    np.testing.assert_allclose(five.table["frob"], eight.table["frob"], rtol=1e-13)
    np.testing.assert_allclose(five.arrays["cube"], eight.arrays["cube"], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", ["distributed", "chunked"])
def test_two_distributed_processes_split_chunks_and_agree(tmp_path, mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist"
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, mode, str(out), str(port), str(i)],
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    fresh = sfpjax.run_sweep(
        worker.point_fn, sfpjax.grid(**worker.SLOW_GRID), out_dir=tmp_path / "fresh", key=KEY,
        chunk_size=worker.SLOW_CHUNK, progress=False,
    )
    assert (out / "results.csv").read_bytes() == (tmp_path / "fresh" / "results.csv").read_bytes()
    _assert_same(sfpjax.load_sweep(out), fresh)


def _digit_changed(path):
    text = path.read_text()
    i = max(i for i, ch in enumerate(text) if ch.isdigit() and ch != "9")
    path.write_text(text[:i] + str(int(text[i]) + 1) + text[i + 1:])


def _square(p):
    return {"y": p["x"] ** 2, "cube": jnp.stack([p["x"]] * 3)}


def test_changed_digit_in_a_chunk_csv_is_named_and_recomputed_once_deleted(tmp_path):
    g = sfpjax.grid(x=[1.0, 2.0, 3.0, 4.0, 5.0])
    out = tmp_path / "s"
    fresh = sfpjax.run_sweep(_square, g, out_dir=out, chunk_size=2, progress=False)
    (out / "results.csv").unlink()
    chunk = out / "chunks" / "chunk_000001.csv"
    good = chunk.read_text()
    _digit_changed(chunk)
    named = r"chunk_000001\.csv' does not match the SHA-256.*sha256sum -c chunk_000001\.sha256.*chunk_000001\.\*"
    with pytest.raises(ValueError, match=named):
        sfpjax.load_sweep(out)
    with pytest.raises(ValueError, match=named):  # on resume, before any result is assembled
        sfpjax.run_sweep(_square, g, out_dir=out, progress=False)
    assert not (out / "results.csv").exists()
    for f in (out / "chunks").glob("chunk_000001.*"):
        f.unlink()
    res = sfpjax.run_sweep(_square, g, out_dir=out, progress=False)
    assert res.complete and chunk.read_text() == good
    _assert_same(res, fresh)


def test_changed_digit_in_results_csv_is_named_and_rebuilt_once_deleted(tmp_path):
    g = sfpjax.grid(x=[1.0, 2.0, 3.0])
    out = tmp_path / "s"
    fresh = sfpjax.run_sweep(_square, g, out_dir=out, chunk_size=2, progress=False)
    _digit_changed(out / "results.csv")
    with pytest.raises(ValueError, match=r"results\.csv' does not match the SHA-256.*rebuilt from the chunk"):
        sfpjax.load_sweep(out)
    with pytest.raises(ValueError, match=r"results\.csv' does not match the SHA-256"):
        sfpjax.run_sweep(_square, g, out_dir=out, progress=False)
    (out / "results.csv").unlink()
    _assert_same(sfpjax.run_sweep(_square, g, out_dir=out, progress=False), fresh)


def test_damaged_npz_is_named_on_load_and_on_resume(tmp_path):
    g = sfpjax.grid(x=[1.0, 2.0, 3.0, 4.0])
    out = tmp_path / "s"
    fresh = sfpjax.run_sweep(_square, g, out_dir=out, chunk_size=2, progress=False)
    npz = out / "chunks" / "chunk_000000.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    res = sfpjax.load_sweep(out, arrays=False)  # the table needs no array file
    assert res.table["y"].tolist() == fresh.table["y"].tolist() and res.arrays == {}
    with pytest.raises(ValueError, match=r"chunk_000000\.npz' does not match the SHA-256.*chunk_000000\.\*"):
        sfpjax.load_sweep(out)
    with pytest.raises(ValueError, match=r"names \['nope'\].*array metrics are \['cube'"):
        sfpjax.load_sweep(out, arrays=["nope"])
    (out / "results.csv").unlink()
    with pytest.raises(ValueError, match=r"chunk_000000\.npz' does not match the SHA-256"):
        sfpjax.run_sweep(_square, g, out_dir=out, progress=False)
    for f in (out / "chunks").glob("chunk_000000.*"):
        f.unlink()
    _assert_same(sfpjax.run_sweep(_square, g, out_dir=out, progress=False), fresh)


def test_truncated_manifest_is_named_and_rebuilt_by_the_same_call(tmp_path):
    g = sfpjax.grid(x=[1.0, 2.0, 3.0])
    out = tmp_path / "s"
    fresh = sfpjax.run_sweep(_square, g, out_dir=out, chunk_size=2, progress=False)
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    for call in (lambda: sfpjax.load_sweep(out),
                 lambda: sfpjax.run_sweep(_square, g, out_dir=out, chunk_size=2, progress=False)):
        with pytest.raises(ValueError, match=r"manifest\.json' cannot be read \(JSONDecodeError.*same fn, grid, key and chunk_size"):
            call()
    manifest.unlink()
    (out / "results.csv").unlink()

    def never(p):
        jax.debug.callback(lambda: pytest.fail("a finished chunk was recomputed"))
        return _square(p)

    _assert_same(sfpjax.run_sweep(never, g, out_dir=out, chunk_size=2, progress=False), fresh)


def test_unchecksummed_folder_still_loads_and_names_structural_damage(tmp_path):
    # A folder written before chunks carried checksums (manifest version 1) loads and
    # resumes, with the structural checks as its only protection.
    g = sfpjax.grid(x=[1.0, 2.0, 3.0, 4.0, 5.0])

    def fn(p):
        return {"y": p["x"] ** 2}

    out = tmp_path / "s"
    fresh = sfpjax.run_sweep(fn, g, out_dir=out, chunk_size=2, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["checksums"]
    manifest["version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    for f in [*(out / "chunks").glob("*.sha256"), out / "results.sha256", out / "results.csv"]:
        f.unlink()
    _assert_same(sfpjax.load_sweep(out), fresh)
    chunk = out / "chunks" / "chunk_000001.csv"
    good = chunk.read_text()
    lines = good.splitlines()

    chunk.write_text("\n".join(lines[:-1]) + "\n")  # a lost row
    with pytest.raises(ValueError, match=r"chunk_000001\.csv' has 1 rows, expected 2.*delete it"):
        sfpjax.load_sweep(out)
    with pytest.raises(ValueError, match=r"chunk_000001\.csv' is not a whole chunk.*delete it"):
        sfpjax.run_sweep(fn, g, out_dir=out, progress=False)

    chunk.write_text("\n".join([*lines[:-1], lines[-1].rsplit(",", 1)[0] + ",abc"]) + "\n")
    with pytest.raises(ValueError, match="not a number.*delete results.csv and the damaged"):
        sfpjax.load_sweep(out)

    chunk.write_text("\n".join([*lines[:-1], lines[-1] + ",7"]) + "\n")
    with pytest.raises(ValueError, match=r"line 3 has 4 fields, expected 3"):
        sfpjax.load_sweep(out)

    chunk.write_text("x,index,y\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="does not start with the header 'index,x,y'"):
        sfpjax.load_sweep(out)

    chunk.unlink()
    res = sfpjax.run_sweep(fn, g, out_dir=out, progress=False)
    assert res.complete and chunk.read_text() == good
    _assert_same(res, fresh)


@pytest.mark.parametrize("x64", [True, False])
def test_returned_table_is_what_the_files_read_back_as(tmp_path, x64):
    # A sweep computed in one call returns its table from memory; it must equal, value for
    # value and dtype for dtype, what load_sweep parses from the files.
    g = sfpjax.grid(x=np.linspace(0.1, 0.9, 7), n=[1, 2, 3])

    def fn(p):
        y = p["x"] * p["n"].astype(p["x"].dtype) / 3.0
        return {"y": y, "k": p["n"] * 2, "big": y > 0.5, "cube": jnp.ones((2,), y.dtype) * y}

    with jax.enable_x64(x64):
        res = sfpjax.run_sweep(fn, g, out_dir=tmp_path / "s", chunk_size=5, progress=False)
    back = sfpjax.load_sweep(tmp_path / "s")
    assert list(res.table) == list(back.table) == ["index", "x", "n", "y", "k", "big"]
    for name in res.table:
        assert res.table[name].dtype == back.table[name].dtype, name
        np.testing.assert_array_equal(res.table[name], back.table[name])
    assert res.table["y"].dtype == (np.float64 if x64 else np.float32)
    np.testing.assert_array_equal(res.arrays["cube"], back.arrays["cube"])
