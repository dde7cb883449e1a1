"""Points/s of a sweep: one vmapped, sharded program versus a Python loop over points.

    python benchmarks/sweep_scaling.py            # full
    python benchmarks/sweep_scaling.py --quick    # a short run

1. Exact-statistics sweeps over Mess3(x, a) (myopic entropies, distinct beliefs, belief
   spread): ``sfpjax.run_sweep`` (jit(vmap) over a chunk, sharded over local devices) versus
   a Python loop that calls the same jitted per-point function once per point. JAX starts
   with one CPU device per core (``--devices``, default ``os.cpu_count()``); the loop's
   calls run on the default device, as a plain loop's do.
2. Scaling with the number of host devices: the same sweep in subprocesses with
   ``--xla_force_host_platform_device_count`` = 1, 2, 4, 8 (forced devices share the
   machine's physical cores, so this measures sharding overhead, not extra hardware).
3. Training sweep: K transformers trained as one vmapped program (``sfpjax.train_stack``)
   versus K sequential ``sfpjax.train`` runs with the same configuration.
4. Pre-train + fine-tune sweep: K points (one Mess3 process each) pre-trained with
   ``sfpjax.train_stack`` and fine-tuned with ``sfpjax.finetune_stack`` (LoRA) as stacked
   programs, in points/s, versus a Python loop of ``sfpjax.train`` + ``sfpjax.finetune``
   per point; the stacked sweep also in subprocesses with 1, 2 and 4 forced host devices
   (the K axis split over them). Compilation is excluded (each is run once untimed).
Correctness is checked before timing (the loop and the sweep give the same numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# Per-point workloads: (myopic-entropy depth, distinct-belief depth). The heaviest is the
# statistics of experiments/mess3_sweep.py; lighter ones show where per-call overhead dominates.
WORKLOADS = {"light": (4, 3), "medium": (6, 5), "experiment": (10, 8)}


def make_point_fn(depth, distinct_depth):
    import sfpjax

    def point_fn(p):
        process = sfpjax.mess3(p["x"], p["a"])
        myopic = sfpjax.myopic_entropies(process, depth)
        spread = sfpjax.belief_spread(process, distinct_depth)
        return {"h": myopic[-1], "distinct": sfpjax.num_distinct_beliefs(process, distinct_depth), "spread": spread}

    return point_fn


def make_grid(n):
    import sfpjax

    return sfpjax.grid(x=np.linspace(0.02, 0.48, n), a=np.linspace(0.02, 0.98, n))


def time_sweep(point_fn, n, rounds, chunk_size=None):
    """Median seconds of run_sweep over an n x n grid (fresh folder each round)."""
    import jax

    import sfpjax

    g = make_grid(n)
    t0 = time.perf_counter()
    res = sfpjax.run_sweep(point_fn, g, out_dir=tempfile.mkdtemp(), progress=False, chunk_size=chunk_size)
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sfpjax.run_sweep(point_fn, g, out_dir=tempfile.mkdtemp(), progress=False, chunk_size=chunk_size)
        times.append(time.perf_counter() - t0)
    return res, first, float(np.median(times)), len(jax.devices())


def exact_sweep_vs_loop(workload, n, rounds, chunk_size):
    import jax
    import jax.numpy as jnp

    point_fn = make_point_fn(*WORKLOADS[workload])
    g = make_grid(n)
    cols = g.columns()
    single = jax.jit(point_fn)
    res, first, sweep_s, n_dev = time_sweep(point_fn, n, rounds, chunk_size)
    # Loop baseline: same jitted per-point function, one call per point.
    t0 = time.perf_counter()
    jax.block_until_ready(single({"x": jnp.float32(cols["x"][0]), "a": jnp.float32(cols["a"][0])}))
    loop_compile = time.perf_counter() - t0
    loop_times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = [single({"x": jnp.float32(x), "a": jnp.float32(a)}) for x, a in zip(cols["x"], cols["a"])]
        jax.block_until_ready(out)
        loop_times.append(time.perf_counter() - t0)
    loop_s = float(np.median(loop_times))
    loop_h = np.array([float(o["h"]) for o in out])
    np.testing.assert_allclose(res.table["h"], loop_h, rtol=1e-5)
    # Counting beliefs rounded to 1e-6 is sensitive to float32 ulps at the rounding boundary,
    # which differ between the vmapped and the per-point program: allow a few per cent.
    np.testing.assert_allclose(res.table["distinct"], [int(o["distinct"]) for o in out], rtol=0.05)
    pts = len(g)
    return {
        "points": pts, "devices": n_dev,
        "sweep_first_call_s": first, "sweep_s": sweep_s, "sweep_points_per_s": pts / sweep_s,
        "loop_compile_s": loop_compile, "loop_s": loop_s, "loop_points_per_s": pts / loop_s,
        "speedup": loop_s / sweep_s,
    }


def device_scaling(workload, n, rounds, counts=(1, 2, 4, 8)):
    rows = []
    for c in counts:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={c}", JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, __file__, "--child", workload, str(n), str(rounds)], env=env,
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def training_vmapped_vs_sequential(k, steps):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import sfpjax

    xs = jnp.linspace(0.05, 0.45, k, dtype=jnp.float32)
    processes = jax.vmap(sfpjax.mess3)(xs, jnp.full(k, 0.6, jnp.float32))
    mcfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=10, n_layers=1, d_model=32, n_heads=2, d_mlp=128)
    tcfg = sfpjax.TrainConfig(steps=steps, batch_size=64, seq_len=10, learning_rate=3e-3, warmup_steps=10,
                              eval_every=0, log_every=steps)
    keys = jax.random.split(jax.random.key(0), k)
    models = eqx.filter_vmap(lambda kk: sfpjax.Transformer(mcfg, key=kk))(keys)
    train_key = jax.random.key(1)

    def run_stack():
        return sfpjax.train_stack(models, processes, tcfg, keys=jax.random.split(train_key, k), progress=False)

    def run_sequential():
        outs = []
        for i in range(k):
            m = jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, models)
            p = jax.tree.map(lambda a: a[i], processes)
            outs.append(sfpjax.train(m, p, tcfg, key=jax.random.split(train_key, k)[i], progress=False))
        return outs

    run_stack(), run_sequential()  # compile both
    t0 = time.perf_counter()
    run_stack()
    stack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_sequential()
    seq_s = time.perf_counter() - t0
    return {"k": k, "steps": steps, "stacked_s": stack_s, "sequential_s": seq_s, "speedup": seq_s / stack_s}


def _point_processes(k):
    import jax
    import jax.numpy as jnp

    import sfpjax

    return jax.vmap(sfpjax.mess3)(jnp.linspace(0.05, 0.45, k, dtype=jnp.float32), jnp.full(k, 0.6, jnp.float32))


def _sweep_configs(steps):
    import sfpjax

    mcfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=10, n_layers=1, d_model=32, n_heads=2, d_mlp=128)
    pre = sfpjax.TrainConfig(steps=steps, batch_size=64, seq_len=10, learning_rate=3e-3, log_every=steps)
    ft = sfpjax.TrainConfig(steps=max(1, steps // 4), batch_size=32, seq_len=10, learning_rate=1e-3,
                            schedule="constant", log_every=steps)
    return mcfg, pre, ft


def stacked_pretrain_finetune(k, steps):
    """Seconds of one stacked pre-train + LoRA fine-tune sweep of k points (compiled first)."""
    import equinox as eqx
    import jax

    import sfpjax

    mcfg, pre, ft = _sweep_configs(steps)
    processes = _point_processes(k)
    models = eqx.filter_vmap(lambda kk: sfpjax.Transformer(mcfg, key=kk))(jax.random.split(jax.random.key(0), k))

    def run():
        keys = jax.random.split(jax.random.key(1), k)
        trained = sfpjax.train_stack(models, processes, pre, keys=keys, progress=False).model
        return sfpjax.finetune_stack(trained, processes, ft, method=sfpjax.LoRA(rank=4), keys=keys,
                                     progress=False).model

    run()
    t0 = time.perf_counter()
    out = jax.block_until_ready(run())
    return time.perf_counter() - t0, len(jax.tree.leaves(eqx.filter(out, eqx.is_array))[0].sharding.device_set)


def looped_pretrain_finetune(k, steps):
    """Seconds of the same k points as a Python loop of train + finetune (compiled first)."""
    import equinox as eqx
    import jax

    import sfpjax

    mcfg, pre, ft = _sweep_configs(steps)
    processes = _point_processes(k)
    keys = jax.random.split(jax.random.key(1), k)

    def one(i):
        p = jax.tree.map(lambda a: a[i], processes)
        m = sfpjax.Transformer(mcfg, key=jax.random.split(jax.random.key(0), k)[i])
        m = sfpjax.train(m, p, pre, key=keys[i], progress=False).model
        return sfpjax.finetune(m, p, ft, method=sfpjax.LoRA(rank=4), key=keys[i], progress=False).model

    jax.block_until_ready(one(0))
    t0 = time.perf_counter()
    for i in range(k):
        out = one(i)
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def training_sweep_scaling(k, steps, counts=(1, 2, 4)):
    rows = []
    for c in counts:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={c}", JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, __file__, "--child-train", str(k), str(steps)], env=env,
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--devices", type=int, default=os.cpu_count(),
                    help="CPU devices JAX starts with for parts 1 and 3 (default: one per core)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--child-train", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_train:  # stacked pre-train + fine-tune on the XLA_FLAGS device count
        import jax

        k, steps = int(args.child_train[0]), int(args.child_train[1])
        s, used = stacked_pretrain_finetune(k, steps)
        print(json.dumps({"devices": len(jax.devices()), "devices_used": used, "points": k, "s": s,
                          "points_per_s": k / s}))
        return
    if args.child:  # a child gets its device count from XLA_FLAGS
        workload, n, rounds = args.child[0], int(args.child[1]), int(args.child[2])
        _, first, sweep_s, n_dev = time_sweep(make_point_fn(*WORKLOADS[workload]), n, rounds)
        print(json.dumps({"devices": n_dev, "points": n * n, "first_call_s": first, "sweep_s": sweep_s,
                          "points_per_s": n * n / sweep_s}))
        return
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    n, rounds, k, steps = (16, 2, 4, 50) if args.quick else (64, 3, 8, 200)
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, cpus: {os.cpu_count()}")
    for workload, (depth, distinct_depth) in WORKLOADS.items():
        size = n if workload != "experiment" else max(4, n // 4)
        r = exact_sweep_vs_loop(workload, size, rounds, chunk_size=None if workload != "experiment" else 64)
        print(f"exact sweep, {workload}: {size}x{size} Mess3 points (myopic depth {depth}, distinct beliefs "
              f"depth {distinct_depth}):")
        print(f"  run_sweep (jit+vmap): {r['sweep_points_per_s']:10.1f} points/s  (first call incl. compile "
              f"{r['sweep_first_call_s']:.2f}s)")
        print(f"  python loop of jit  : {r['loop_points_per_s']:10.1f} points/s  (compile {r['loop_compile_s']:.2f}s)")
        print(f"  ratio sweep/loop    : {r['speedup']:10.1f}x")
    print("device scaling, medium workload (forced host devices on the same physical cores):")
    for row in device_scaling("medium", n, rounds):
        print(f"  {row['devices']} devices: {row['points_per_s']:10.0f} points/s")
    t = training_vmapped_vs_sequential(k, steps)
    print(f"training sweep: {k} models x {steps} steps: stacked {t['stacked_s']:.2f}s, "
          f"sequential {t['sequential_s']:.2f}s, ratio {t['speedup']:.1f}x")
    k2, steps2 = (4, 20) if args.quick else (16, 100)
    stacked_s, used = stacked_pretrain_finetune(k2, steps2)
    loop_s = looped_pretrain_finetune(k2, steps2)
    print(f"pre-train + LoRA fine-tune sweep, {k2} points x ({steps2} + {max(1, steps2 // 4)}) steps:")
    print(f"  stacked on {used} device(s): {k2 / stacked_s:8.2f} points/s")
    print(f"  python loop         : {k2 / loop_s:8.2f} points/s")
    print(f"  ratio stacked/loop  : {loop_s / stacked_s:8.1f}x")
    print("  stacked, forced host devices (same physical cores):")
    for row in training_sweep_scaling(k2, steps2):
        print(f"    {row['devices']} devices ({row['devices_used']} used): {row['points_per_s']:8.2f} points/s")


if __name__ == "__main__":
    main()
