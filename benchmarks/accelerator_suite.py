"""One command for an accelerator: beliefs, training, stacked training and fine-tuning, a sweep.

    python benchmarks/accelerator_suite.py                  # sizes for the backend found
    python benchmarks/accelerator_suite.py --tiny           # seconds on CPU (the test)
    python benchmarks/accelerator_suite.py --out suite.json

Prints the device and writes one JSON (``--out``, default ``accelerator_suite.json``):

* ``beliefs``: all-prefix belief throughput (updates/s; one update = one token of one
  sequence) of ``sfpjax.filter_beliefs`` on Mess3(0.15, 0.6) and Mess3 x Mess3 (factored
  path), against ``vmap_scan`` (``jax.vmap`` of ``sfpjax.filter_beliefs_reference``) and
  ``dynamax`` (``hmm_filter`` under ``jax.vmap``, when importable) on the same device and the
  same tokens, built by benchmarks/belief_throughput.py. Every method is checked against
  the float64 NumPy reference on the first sequences before timing. Batch sizes up to 2^20
  sequences on an accelerator, a few thousand on CPU.
* ``training``: tokens/s of ``sfpjax.train`` (one model).
* ``stacked``: ``sfpjax.train_stack`` and ``sfpjax.finetune_stack`` (LoRA) for ``K``
  models in one program (up to 256 on an accelerator), split over the local devices; runs/s
  and tokens/s.
* ``sweep``: points/s of ``sfpjax.run_sweep`` over a grid of Mess3 processes (the medium
  exact-statistics workload of benchmarks/sweep_scaling.py).

Compile time (the first call) is reported apart from the run time (median over rounds of
later calls, each ended with ``jax.block_until_ready``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import belief_throughput as bt  # noqa: E402
import sweep_scaling  # noqa: E402

import sfpjax  # noqa: E402

# sizes per mode: belief batch sizes and length; training model, batch, length, steps;
# stacked K values and steps; sweep grid side; timing rounds
SIZES = {
    "tiny": dict(belief_B=(64,), belief_L=8, d_model=16, n_layers=1, batch=8, seq_len=8, steps=4,
                 K=(2,), stack_steps=2, sweep_n=2, rounds=1),
    "cpu": dict(belief_B=(1024, 4096), belief_L=64, d_model=32, n_layers=2, batch=32, seq_len=32, steps=50,
                K=(4, 16), stack_steps=20, sweep_n=16, rounds=3),
    "accelerator": dict(belief_B=(2**14, 2**17, 2**20), belief_L=64, d_model=128, n_layers=4, batch=256,
                        seq_len=64, steps=200, K=(16, 64, 256), stack_steps=50, sweep_n=64, rounds=3),
}


def timed(fn, rounds: int):
    """``(result, compile_s, run_s)``: the first call's seconds, then the median of ``rounds`` calls."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, first, float(np.median(times))


def beliefs(s: dict, key) -> list[dict]:
    cases = [("Mess3", sfpjax.mess3(0.15, 0.6)),
             ("Mess3 x Mess3", sfpjax.product(sfpjax.mess3(0.15, 0.6), sfpjax.mess3(0.15, 0.6)))]
    L = s["belief_L"]
    rows = []
    for label, process in cases:
        joint = sfpjax.GHMM(process.T, process.eta0, process.right)  # baselines see no factor structure
        placed = sfpjax.replicate(process, bt.batch_mesh())
        methods = {"sfpjax": lambda toks: sfpjax.filter_beliefs(placed, toks),
                   "vmap_scan": bt.make_vmap_scan(joint)}
        if bt.hmm_filter is not None:
            methods["dynamax"] = bt.make_dynamax(joint)
        for B in s["belief_B"]:
            key, sub = jr.split(key)
            tokens = sfpjax.sample(process, key=sub, batch_size=B, seq_len=L)
            n_ref = min(B, 64)
            ref_b, ref_l = bt.numpy_filter(joint.T, joint.right, joint.eta0, np.asarray(tokens[:n_ref]))
            tokens = bt.split_over_devices(tokens)
            row = {"process": label, "B": B, "L": L}
            for name, fn in methods.items():
                out, first, run = timed(lambda: fn(tokens), s["rounds"])
                if name == "sfpjax":
                    out = (out.beliefs, out.log_normalizers)
                bt.check(name, out, ref_b, ref_l, n_ref)
                del out
                row[name] = {"compile_s": first, "run_s": run, "updates_per_s": B * L / run}
            for name in methods:
                if name != "sfpjax":
                    row[f"sfpjax_over_{name}"] = row[name]["run_s"] / row["sfpjax"]["run_s"]
            rows.append(row)
    return rows


def _model_config(s: dict, vocab: int):
    return sfpjax.TransformerConfig(vocab_size=vocab, n_ctx=s["seq_len"], n_layers=s["n_layers"],
                                    d_model=s["d_model"], n_heads=4 if s["d_model"] >= 64 else 2,
                                    d_mlp=4 * s["d_model"])


def training(s: dict, key) -> dict:
    init_key, train_key = jr.split(key)
    model = sfpjax.Transformer(_model_config(s, 3), key=init_key)
    tc = sfpjax.TrainConfig(steps=s["steps"], batch_size=s["batch"], seq_len=s["seq_len"], log_every=s["steps"])
    out, first, run = timed(lambda: sfpjax.train(model, sfpjax.mess3(), tc, key=train_key, progress=False).model,
                            s["rounds"])
    tokens = s["steps"] * s["batch"] * s["seq_len"]
    return {"steps": s["steps"], "batch": s["batch"], "seq_len": s["seq_len"], "d_model": s["d_model"],
            "n_layers": s["n_layers"], "first_call_s": first, "run_s": run, "tokens_per_s": tokens / run}


def stacked(s: dict, key) -> list[dict]:
    rows = []
    cfg = _model_config(s, 3)
    tc = sfpjax.TrainConfig(steps=s["stack_steps"], batch_size=s["batch"], seq_len=s["seq_len"],
                            log_every=s["stack_steps"])
    for K in s["K"]:
        key, init_key, train_key, ft_key = jr.split(key, 4)
        xs = jnp.linspace(0.05, 0.45, K, dtype=jnp.float32)
        processes = jax.vmap(sfpjax.mess3)(xs, jnp.full(K, 0.6, jnp.float32))
        models = eqx.filter_vmap(lambda k: sfpjax.Transformer(cfg, key=k))(jr.split(init_key, K))
        trained, first, run = timed(lambda: sfpjax.train_stack(models, processes, tc, keys=jr.split(train_key, K),
                                                               progress=False).model, s["rounds"])
        _, ft_first, ft_run = timed(
            lambda: sfpjax.finetune_stack(trained, processes, tc, method=sfpjax.LoRA(rank=4),
                                          keys=jr.split(ft_key, K), progress=False).model, s["rounds"])
        tokens = K * s["stack_steps"] * s["batch"] * s["seq_len"]
        rows.append({"K": K, "steps": s["stack_steps"], "devices_used": len(trained.W_E.sharding.device_set),
                     "train_first_call_s": first, "train_run_s": run, "train_runs_per_s": K / run,
                     "train_tokens_per_s": tokens / run, "finetune_first_call_s": ft_first,
                     "finetune_run_s": ft_run, "finetune_tokens_per_s": tokens / ft_run})
    return rows


def sweep(s: dict) -> dict:
    point_fn = sweep_scaling.make_point_fn(*sweep_scaling.WORKLOADS["medium"])
    n = s["sweep_n"]
    _, first, run, n_dev = sweep_scaling.time_sweep(point_fn, n, s["rounds"])
    return {"workload": "medium", "points": n * n, "devices": n_dev, "first_call_s": first, "run_s": run,
            "points_per_s": n * n / run}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="seconds-long sizes (CPU tests)")
    ap.add_argument("--out", default="accelerator_suite.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    mode = "tiny" if args.tiny else ("cpu" if backend == "cpu" else "accelerator")
    s = SIZES[mode]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({backend}) x{jax.device_count()}, mode {mode}", flush=True)
    b_key, t_key, s_key = jr.split(jr.key(args.seed), 3)
    result = {"device": dev.device_kind, "backend": backend, "device_count": jax.device_count(), "mode": mode,
              "sizes": s, "jax": jax.__version__}
    t0 = time.perf_counter()
    result["beliefs"] = beliefs(s, b_key)
    for r in result["beliefs"]:
        ratios = ", ".join(f"{k[len('sfpjax_over_'):]} {v:.2f}x" for k, v in r.items() if k.startswith("sfpjax_over_"))
        print(f"beliefs {r['process']:14s} B={r['B']:>8d} L={r['L']}: sfpjax {r['sfpjax']['updates_per_s']:.3g} "
              f"updates/s; time of method / sfpjax: {ratios}", flush=True)
    result["training"] = training(s, t_key)
    print(f"training: {result['training']['tokens_per_s']:.3g} tokens/s", flush=True)
    result["stacked"] = stacked(s, s_key)
    for r in result["stacked"]:
        print(f"stacked K={r['K']:>4d} on {r['devices_used']} device(s): train {r['train_tokens_per_s']:.3g} "
              f"tokens/s ({r['train_runs_per_s']:.3g} runs/s), LoRA fine-tune {r['finetune_tokens_per_s']:.3g} "
              "tokens/s", flush=True)
    result["sweep"] = sweep(s)
    print(f"sweep: {result['sweep']['points_per_s']:.3g} points/s ({result['sweep']['points']} points)", flush=True)
    result["wall_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
