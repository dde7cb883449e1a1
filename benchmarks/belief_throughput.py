"""All-prefix belief throughput: ``sfpjax.filter_beliefs`` against common baselines.

Processes: Mess3(0.15, 0.6) (d = 3, V = 3) and the product Mess3 x Mess3 (d = 9, V = 9).
For the product, sfpjax gets ``sfpjax.product(mess3, mess3)`` (so ``filter_beliefs`` takes
its factored path: one 3-state belief per factor, the joint belief written as their
Kronecker product) and every baseline gets the joint 9-state matrices.
Batch sizes B = 4096 and 16384, L = 256, float32. Methods, timed in one process and
interleaved within every round after compiling (each timed call right after at least
``--warmup`` seconds, default 0.05, of untimed calls of the same method, so that none pays
for another's still-spinning worker threads and every one runs on a machine that has
reached full speed):

* ``sfpjax``      the public ``sfpjax.filter_beliefs`` (beliefs and log normalizers) with
                  ``out=`` the previous round's result, so its output buffers are reused
                  round to round, as the numba kernel's preallocated output is, and the
                  process placed on the tokens' mesh once with ``sfpjax.replicate``;
* ``sfpjax_fresh`` the same call without ``out=`` (fresh output buffers every call);
* ``sfpjax_copy`` the ``out=`` call with a process left on one device, which
                  ``filter_beliefs`` then copies to every device on every call;
* ``sfpjax_1dev`` the ``out=`` call with the tokens on one device (JAX's default placement);
* ``baseline``    with ``--baseline REV``: the ``sfpjax`` call of sfpjax as of git revision
                  ``REV`` (loaded from ``git archive`` as the package ``sfpjax_baseline``),
                  on a process built by that version, so a change is measured against the
                  code before it in the same process;
* ``numpy``       a float64 NumPy loop over time, vectorized over the batch (the reference);
* ``dynamax``     ``dynamax.hidden_markov_model.hmm_filter`` under ``jax.vmap``;
* ``vmap_scan``   ``jax.vmap`` of ``sfpjax.filter_beliefs_reference`` (a per-sequence
                  ``lax.scan`` of ``sfpjax.belief_update``, with its token range check);
* ``numba``       a ``numba`` ``prange`` kernel writing into a preallocated output.

JAX starts with one CPU device per core (``--devices``, default ``os.cpu_count()``) and the
tokens are split over them along the batch axis, so ``filter_beliefs`` filters every
device's sequences at once; ``dynamax`` and ``vmap_scan`` get the same split tokens (XLA
partitions their batch the same way) and numba's ``prange`` uses every core itself.

Every method is checked against the float64 reference first (on a slice of the batch).
Reported: updates/s (one update = one token of one sequence), compile time, the median
over rounds of the per-round ratio sfpjax / method, and the fraction of the output-write
bandwidth limit: a NumPy fill of a preallocated float32 buffer, measured in this script,
bounds how fast ``(B, L, d)`` beliefs plus ``(B, L)`` log normalizers can be written.

Run (numba and dynamax come with the ``bench`` extra)::

    python benchmarks/belief_throughput.py            # full run
    python benchmarks/belief_throughput.py --quick    # B = 4096 only, fewer rounds
    python benchmarks/belief_throughput.py --quick --baseline main   # also time sfpjax at main
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import pathlib
import platform
import subprocess
import sys
import tarfile
import tempfile
import time

import jax

if __name__ == "__main__":
    # The device count must be set before any JAX work, including what the imports below do.
    _early = argparse.ArgumentParser(add_help=False)
    _early.add_argument("--devices", type=int, default=os.cpu_count())
    jax.config.update("jax_num_cpu_devices", _early.parse_known_args()[0].devices)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sfpjax  # noqa: E402

try:
    import numba
except ImportError:  # the comparison still runs without it
    numba = None
try:
    from dynamax.hidden_markov_model import hmm_filter
except ImportError:
    hmm_filter = None


# ----------------------------------------------------------------------------- baselines


def numpy_filter(T, right, eta0, tokens):
    """Float64 reference: a loop over time, vectorized over the batch."""
    T, right, eta0 = (np.asarray(a, np.float64) for a in (T, right, eta0))
    B, L = tokens.shape
    d = T.shape[1]
    beliefs = np.empty((B, L, d))
    lognorm = np.empty((B, L))
    eta = np.broadcast_to(eta0, (B, d)).copy()
    for t in range(L):
        unnorm = np.einsum("bi,bij->bj", eta, T[tokens[:, t]])
        norm = unnorm @ right
        ok = norm > 0
        eta = np.where(ok[:, None], unnorm / np.where(ok, norm, 1.0)[:, None], eta)
        beliefs[:, t] = eta
        lognorm[:, t] = np.where(ok, np.log(np.where(ok, norm, 1.0)), -np.inf)
    return beliefs, lognorm


def make_vmap_scan(process):
    return jax.jit(jax.vmap(lambda seq: sfpjax.filter_beliefs_reference(process, seq)))


def make_dynamax(process):
    # An edge-emitting HMM as dynamax's filter: a time-varying "transition" T(x_{t+1}) and
    # flat log-likelihoods; the filter's normalizer is then Pr(x_{t+1} | x_1..x_t).
    T, eta0 = process.T, process.eta0

    @jax.jit
    def run(tokens):
        def one(seq):
            L = seq.shape[0]
            post = hmm_filter(
                eta0 @ T[seq[0]],
                None,
                jnp.zeros((L, T.shape[1]), T.dtype),
                transition_fn=lambda t: T[seq[jnp.minimum(t + 1, L - 1)]],
            )
            return post.filtered_probs, post.marginal_loglik

        return jax.vmap(one)(tokens)

    return run


if numba is not None:

    @numba.njit(parallel=True, cache=False)
    def _numba_kernel(T, right, eta0, tokens, beliefs, lognorm):
        B, L = tokens.shape
        d = T.shape[1]
        for b in numba.prange(B):
            eta = eta0.copy()
            new = np.empty(d, T.dtype)
            for t in range(L):
                x = tokens[b, t]
                norm = T.dtype.type(0.0)
                for j in range(d):
                    acc = T.dtype.type(0.0)
                    for i in range(d):
                        acc += eta[i] * T[x, i, j]
                    new[j] = acc
                    norm += acc * right[j]
                if norm > 0:
                    inv = T.dtype.type(1.0) / norm
                    for j in range(d):
                        eta[j] = new[j] * inv
                    lognorm[b, t] = np.log(norm)
                else:
                    lognorm[b, t] = -np.inf
                for j in range(d):
                    beliefs[b, t, j] = eta[j]


def make_numba(process, B, L):
    T, right, eta0 = (np.asarray(a) for a in (process.T, process.right, process.eta0))
    beliefs = np.empty((B, L, T.shape[1]), T.dtype)
    lognorm = np.empty((B, L), T.dtype)

    def run(tokens):
        _numba_kernel(T, right, eta0, tokens, beliefs, lognorm)
        return beliefs, lognorm

    return run


def load_baseline(rev: str):
    """sfpjax as of git revision ``rev``, imported as the package ``sfpjax_baseline``."""
    root = pathlib.Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "sfpjax"], check=True,
                             capture_output=True).stdout
    tmp = tempfile.mkdtemp(prefix="sfpjax_baseline_")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    os.rename(os.path.join(tmp, "sfpjax"), os.path.join(tmp, "sfpjax_baseline"))
    sys.path.insert(0, tmp)
    try:
        return importlib.import_module("sfpjax_baseline")
    finally:
        sys.path.remove(tmp)


# ----------------------------------------------------------------------------- measurement


def write_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a NumPy fill of a preallocated float32 buffer (median over repeats)."""
    buf = np.empty(nbytes // 4, np.float32)
    buf.fill(0.0)  # touch every page once, as a reused output buffer is
    times = []
    for k in range(repeats):
        t0 = time.perf_counter()
        buf.fill(float(k))
        times.append(time.perf_counter() - t0)
    return nbytes / float(np.median(times))


def _block(out):
    return jax.block_until_ready(out)


def check(name, out, ref_beliefs, ref_lognorm, n):
    beliefs = np.asarray(out[0])[:n]
    err = float(np.abs(beliefs - ref_beliefs).max())
    if err > 2e-4:
        raise AssertionError(f"{name}: beliefs differ from the float64 reference by {err:.3g}")
    if name != "dynamax":
        lerr = float(np.abs(np.asarray(out[1])[:n] - ref_lognorm).max())
    else:  # dynamax returns the sequence log-probability only
        lerr = float(np.abs(np.asarray(out[1])[:n] - ref_lognorm.sum(-1)).max()) / ref_lognorm.shape[1]
    if lerr > 2e-4:
        raise AssertionError(f"{name}: log normalizers differ from the reference by {lerr:.3g}")
    return err


def batch_mesh():
    return jax.sharding.Mesh(jax.devices(), ("batch",))


def split_over_devices(tokens):
    """The tokens split along the batch axis over all devices (the documented multi-core use)."""
    return jax.device_put(tokens, jax.NamedSharding(batch_mesh(), jax.P("batch")))


def bench_case(label, build, B, L, rounds, methods, key, warmup_s, baseline=None):
    """``build(package)`` makes the process with ``sfpjax`` (or the baseline version of it)."""
    process = build(sfpjax)
    d = process.num_states
    tokens_1dev = sfpjax.sample(process, key=key, batch_size=B, seq_len=L)
    tokens_np = np.asarray(tokens_1dev)
    tokens = split_over_devices(tokens_1dev)
    n_ref = min(B, 512)
    ref_b, ref_l = numpy_filter(process.T, process.right, process.eta0, tokens_np[:n_ref])
    sfpjax_process = process
    # Placed on the tokens' mesh once, as the filter_beliefs docstring asks.
    placed = sfpjax.replicate(process, batch_mesh())
    # The baselines see only the joint matrices (no factor structure).
    process = sfpjax.GHMM(process.T, process.eta0, process.right)

    reused = {}

    def reuse(name, toks, proc=placed, package=sfpjax):
        def run():
            # The previous result is donated: its buffers become this call's output.
            reused[name] = package.filter_beliefs(proc, toks, out=reused.get(name))
            return reused[name]

        return run

    fns = {
        "sfpjax": reuse("sfpjax", tokens),
        "sfpjax_fresh": lambda: sfpjax.filter_beliefs(placed, tokens),
    }
    if jax.device_count() > 1:
        fns["sfpjax_copy"] = reuse("sfpjax_copy", tokens, sfpjax_process)
        fns["sfpjax_1dev"] = reuse("sfpjax_1dev", tokens_1dev, sfpjax_process)
    if baseline is not None:
        fns["baseline"] = reuse("baseline", tokens, build(baseline), baseline)
    if "numpy" in methods:
        fns["numpy"] = lambda: numpy_filter(process.T, process.right, process.eta0, tokens_np)
    if "dynamax" in methods and hmm_filter is not None:
        f = make_dynamax(process)
        fns["dynamax"] = lambda: f(tokens)
    if "vmap_scan" in methods:
        f2 = make_vmap_scan(process)
        fns["vmap_scan"] = lambda: f2(tokens)
    if "numba" in methods and numba is not None:
        f3 = make_numba(process, B, L)
        fns["numba"] = lambda: f3(tokens_np)

    compile_s, errs = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out = _block(fn())
        compile_s[name] = time.perf_counter() - t0
        errs[name] = check(name, out, ref_b, ref_l, n_ref)
        del out
    for name in reused:  # the reused result itself must still be right after many reuses
        _block(fns[name]())
        _block(fns[name]())
        errs[name] = check(name, reused[name], ref_b, ref_l, n_ref)

    times = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            # Untimed calls of the same method first, for at least warmup_s: the previous
            # method's worker threads keep spinning for a while after it returns (numba's
            # OpenMP threads, XLA's pool), and that cost belongs to neither; and these
            # 2-core machines reach full speed only after tens of ms of load (`--ramp`
            # prints the ramp), which a single warm-up call gave the fastest method least.
            warm_end = time.perf_counter() + warmup_s
            _block(fns[name]())
            while time.perf_counter() < warm_end:
                _block(fns[name]())
            t0 = time.perf_counter()
            out = _block(fns[name]())
            times[name].append(time.perf_counter() - t0)
            del out

    nbytes = B * L * (d + 1) * 4
    bw = write_bandwidth(nbytes, repeats=max(5, rounds))
    limit = bw / ((d + 1) * 4)
    updates = B * L
    print(f"\n## {label}  (d={d}, V={process.vocab_size}, B={B}, L={L}, float32, {rounds} rounds, "
          f"{warmup_s:g} s warm-up per timed call)")
    print(f"write bandwidth {bw / 1e9:.1f} GB/s -> output-write limit {limit / 1e6:.0f} M updates/s")
    print(f"{'method':12s} {'M upd/s':>9s} {'ms':>8s} {'compile s':>9s} {'sfpjax x':>9s} {'fresh x':>8s} "
          f"{'of limit':>8s} {'max err':>8s}")
    base = np.array(times["sfpjax"])
    fresh = np.array(times["sfpjax_fresh"])
    rows = {}
    for name, ts in times.items():
        ts = np.array(ts)
        med = float(np.median(ts))
        ratio = float(np.median(ts / base))
        ratio_fresh = float(np.median(ts / fresh))
        rows[name] = (updates / med / 1e6, ratio, ratio_fresh)
        print(f"{name:12s} {updates / med / 1e6:9.1f} {med * 1e3:8.2f} {compile_s[name]:9.2f} "
              f"{ratio:9.2f} {ratio_fresh:8.2f} {updates / med / limit:8.1%} {errs[name]:8.1e}")
    return rows


def warmup_ramp(process, B, L, key, idle_s=0.02, repeats=25):
    """sfpjax's time for a call after ``idle_s`` of idleness and k untimed calls: how long this
    machine takes to reach full speed (the reason for ``--warmup``)."""
    tokens = split_over_devices(sfpjax.sample(process, key=key, batch_size=B, seq_len=L))
    process = sfpjax.replicate(process, batch_mesh())
    res = _block(sfpjax.filter_beliefs(process, tokens))
    print(f"\n## warm-up ramp: sfpjax on {jax.device_count()} devices, B={B}, L={L}, "
          f"after {idle_s * 1e3:g} ms idle and k untimed calls (median of {repeats})")
    for k in (1, 2, 4, 8, 16):
        ts = []
        for _ in range(repeats):
            time.sleep(idle_s)
            for _ in range(k):
                res = _block(sfpjax.filter_beliefs(process, tokens, out=res))
            t0 = time.perf_counter()
            res = _block(sfpjax.filter_beliefs(process, tokens, out=res))
            ts.append(time.perf_counter() - t0)
        print(f"k={k:2d}: {B * L / np.median(ts) / 1e6:6.1f} M updates/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B = 4096 only and 3 rounds")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 9, quick 3)")
    ap.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes (default 4096 16384)")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--warmup", type=float, default=0.05,
                    help="seconds of untimed calls of a method before each of its timed calls "
                         "(at least one call; 0 gives exactly one)")
    ap.add_argument("--ramp", action="store_true",
                    help="only print how sfpjax's speed ramps up after the machine idles (Mess3, B = 4096)")
    ap.add_argument("--devices", type=int, default=os.cpu_count(),
                    help="CPU devices JAX starts with, the batch split over them (default: one per core)")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also time sfpjax as of this git revision (e.g. main), in the same process")
    args = ap.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    rounds = args.rounds or (3 if args.quick else 9)
    batches = args.batch or ([4096] if args.quick else [4096, 16384])

    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"numba {'absent' if numba is None else numba.__version__}; "
          f"dynamax {'absent' if hmm_filter is None else 'present'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    mess3 = sfpjax.mess3(0.15, 0.6)
    if args.ramp:
        warmup_ramp(mess3, 4096, args.length, jax.random.key(0))
        return
    cases = (
        ("Mess3(0.15, 0.6)", lambda pkg: pkg.mess3(0.15, 0.6)),
        ("Mess3 x Mess3", lambda pkg: pkg.product(pkg.mess3(0.15, 0.6), pkg.mess3(0.15, 0.6))),
    )
    key = jax.random.key(0)
    summary = []
    for B in batches:
        slow = ["numpy", "dynamax", "vmap_scan", "numba"]
        for label, build in cases:
            key, sub = jax.random.split(key)
            rows = bench_case(label, build, B, args.length, rounds, slow, sub, args.warmup, baseline)
            summary.append((label, B, rows))
    print("\n## summary: median per-round ratio method time / sfpjax time (out= reuse; fresh in brackets)")
    names = [n for n in ("baseline", "sfpjax_copy", "dynamax", "vmap_scan", "numba")
             if any(n in rows for _, _, rows in summary)]
    one = lambda rows: f"{rows['sfpjax_1dev'][0]:.1f}" if "sfpjax_1dev" in rows else "-"
    print("| case | sfpjax M upd/s | sfpjax_fresh M upd/s | sfpjax 1 device M upd/s | "
          + " | ".join(f"x {n}" for n in names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for label, B, rows in summary:
        cells = [f"{rows[n][1]:.2f} ({rows[n][2]:.2f})" if n in rows else "-" for n in names]
        print(f"| {label}, B={B} | {rows['sfpjax'][0]:.1f} | {rows['sfpjax_fresh'][0]:.1f} | {one(rows)} | "
              + " | ".join(cells) + " |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
