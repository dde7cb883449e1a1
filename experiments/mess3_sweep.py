"""Sweep Mess3(x, a) over a grid: exact statistics, then K transformers trained as one program.

    python experiments/mess3_sweep.py                  # 64 x 64 grid + 8 trained models
    python experiments/mess3_sweep.py --preset tiny    # seconds

Part 1 (exact, per grid point): entropy-rate upper bound H(X_11 | X_1:10), the myopic-entropy
curve to depth 10, the number of distinct beliefs after 8 symbols, and the spread of the
depth-8 belief cloud in the simplex (probability-weighted RMS distance to its mean).
Part 2: K small transformers, one per value of x on a line through the grid, trained in one
vmapped program; excess loss over the exact floor per point.
Writes results tables (CSV), heatmaps and a summary into the run folder; rerunning into the
same folder resumes finished chunks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import sfpjax  # noqa: E402
import sfpjax.plots  # noqa: E402
from _cli import config_json, parse_config, use_every_cpu_core  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = "runs/mess3_sweep"
    n_x: int = 64
    n_a: int = 64
    x_min: float = 0.02
    x_max: float = 0.48
    a_min: float = 0.02
    a_max: float = 0.98
    depth: int = 10
    distinct_depth: int = 8
    chunk_size: int = 512
    # training sweep
    train_k: int = 8
    train_a: float = 0.6
    train_steps: int = 600
    train_batch: int = 64
    train_seq_len: int = 10
    d_model: int = 32
    n_layers: int = 1
    seed: int = 0


PRESETS = {
    "tiny": dict(n_x=4, n_a=4, depth=4, distinct_depth=3, chunk_size=8, train_k=2, train_steps=20,
                 train_batch=8, train_seq_len=6, d_model=8),
}


def exact_statistics(config: Config):
    def point(p):
        process = sfpjax.mess3(p["x"], p["a"])
        myopic = sfpjax.myopic_entropies(process, config.depth)
        spread = sfpjax.belief_spread(process, config.distinct_depth)
        return {
            "entropy_rate_bound": myopic[-1],
            "excess_entropy_partial": (myopic - myopic[-1]).sum(),
            "distinct_beliefs": sfpjax.num_distinct_beliefs(process, config.distinct_depth),
            "belief_spread": spread,
            "myopic_entropies": myopic,
        }

    g = sfpjax.grid(x=np.linspace(config.x_min, config.x_max, config.n_x),
                    a=np.linspace(config.a_min, config.a_max, config.n_a))
    return sfpjax.run_sweep(point, g, out_dir=os.path.join(config.out, "exact"), chunk_size=config.chunk_size)


def training_sweep(config: Config):
    xs = np.linspace(config.x_min, config.x_max, config.train_k)
    processes = jax.vmap(sfpjax.mess3)(jnp.asarray(xs, jnp.float32), jnp.full(config.train_k, config.train_a, jnp.float32))
    model_cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=config.train_seq_len, n_layers=config.n_layers,
                                         d_model=config.d_model, n_heads=2, d_mlp=4 * config.d_model)
    train_cfg = sfpjax.TrainConfig(steps=config.train_steps, batch_size=config.train_batch,
                                   seq_len=config.train_seq_len, learning_rate=3e-3, warmup_steps=min(20, config.train_steps // 10),
                                   eval_every=0, log_every=max(1, config.train_steps // 10))
    model_key, train_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    models = eqx.filter_vmap(lambda k: sfpjax.Transformer(model_cfg, key=k))(
        jax.random.split(model_key, config.train_k))
    t0 = time.perf_counter()
    result = sfpjax.train_stack(models, processes, train_cfg, keys=jax.random.split(train_key, config.train_k))
    seconds = time.perf_counter() - t0
    # Each model is scored against its own process's exact floor, all K in one vmapped call.
    floors = jax.vmap(lambda p: sfpjax.loss_floor(p, config.train_seq_len, use_bos=False))(processes)
    evals = eqx.filter_vmap(
        lambda m, p, k, f: sfpjax.evaluate(m, p, key=k, batch_size=1024, seq_len=config.train_seq_len, floor=f)
    )(result.model, processes, jax.random.split(eval_key, config.train_k), floors)
    rows = [{"x": float(xs[k]), "a": config.train_a, "loss": float(evals.mean_loss[k]),
             "excess_mean_pct": float(evals.excess_pct[k]), "excess_last_nats": float(evals.excess_last[k]),
             "excess_last_pct": float(evals.excess_last_pct[k])} for k in range(config.train_k)]
    return rows, seconds


def main(argv=None):
    config = parse_config(Config, argv, presets=PRESETS, description=__doc__)
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "config.json"), "w") as f:
        f.write(config_json(config))
    print(f"devices: {jax.devices()}")
    t0 = time.perf_counter()
    exact = exact_statistics(config)
    exact_s = time.perf_counter() - t0
    print(f"exact sweep: {len(exact)} points in {exact_s:.1f}s ({len(exact) / exact_s:.0f} points/s)")
    shape = (config.n_x, config.n_a)
    extent = (config.a_min, config.a_max, config.x_min, config.x_max)
    for name in ("entropy_rate_bound", "distinct_beliefs", "belief_spread"):
        sfpjax.plots.plot_heatmap(exact.table[name].reshape(shape), os.path.join(config.out, f"{name}.png"),
                                  extent=extent, xlabel="a", ylabel="x", title=f"Mess3(x, a): {name}")
    rows, train_s = training_sweep(config)
    summary = {"config": dataclasses.asdict(config), "exact_points": len(exact), "exact_seconds": exact_s,
               "train_seconds": train_s, "training": rows}
    with open(os.path.join(config.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"trained {config.train_k} models in one program in {train_s:.1f}s")
    print(f"{'x':>6} {'a':>5} " + " ".join(f"{k:>14}" for k in rows[0] if k not in ('x', 'a')))
    for r in rows:
        print(f"{r['x']:6.3f} {r['a']:5.2f} " + " ".join(f"{v:14.4f}" for k, v in r.items() if k not in ('x', 'a')))
    return summary


if __name__ == "__main__":
    use_every_cpu_core()  # the exact sweep is sharded over the devices
    main()
