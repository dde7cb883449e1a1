"""Belief-state geometry end to end: train on a process, compare with the exact loss floor,
find the Bayes-optimal beliefs linearly in the residual stream.

    python experiments/belief_geometry.py                    # Mess3 and RRXOR, default sizes
    python experiments/belief_geometry.py --preset tiny      # seconds
    python experiments/belief_geometry.py --processes mess3 --steps 3000 --out runs/bg

For each process: train a small transformer on fresh samples, evaluate its per-position loss
against the myopic entropies, fit linear probes from each layer's residual stream (and from
all layers concatenated) to the exact beliefs on training sequences, score them on held-out
sequences, and plot the simplex of true versus predicted beliefs. Writes ``results.json``,
``summary.md`` and PNG plots into ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import sfpjax  # noqa: E402
import sfpjax.plots  # noqa: E402
from _cli import config_json, parse_config  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = "runs/belief_geometry"
    processes: tuple[str, ...] = ("mess3", "rrxor")
    seq_len: int = 10
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 2
    d_mlp: int = 256
    steps: int = 3000
    batch_size: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    eval_every: int = 500
    probe_sequences: int = 4000
    test_fraction: float = 0.25
    seed: int = 0


PRESETS = {
    "tiny": dict(seq_len=6, n_layers=1, d_model=16, d_mlp=32, steps=30, batch_size=16, warmup_steps=5,
                 eval_every=15, probe_sequences=200),
}

PROCESSES = {"mess3": lambda: sfpjax.mess3(0.15, 0.6), "rrxor": lambda: sfpjax.rrxor(0.5, 0.5)}


def probe_sites(model_cfg: sfpjax.TransformerConfig) -> list[str]:
    return [f"blocks.{layer}.hook_resid_post" for layer in range(model_cfg.n_layers)] + ["ln_final.hook_normalized"]


def analyse_process(name: str, config: Config, key) -> dict:
    process = PROCESSES[name]()
    model_key, train_key, eval_key, probe_key, split_key = jax.random.split(key, 5)
    model_cfg = sfpjax.TransformerConfig(vocab_size=process.vocab_size, n_ctx=config.seq_len,
                                         n_layers=config.n_layers, d_model=config.d_model,
                                         n_heads=config.n_heads, d_mlp=config.d_mlp)
    train_cfg = sfpjax.TrainConfig(steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len,
                                   learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                                   eval_every=config.eval_every, log_every=max(1, config.steps // 100))
    run_dir = os.path.join(config.out, name)
    t0 = time.perf_counter()
    trained = sfpjax.train(sfpjax.Transformer(model_cfg, key=model_key), process, train_cfg,
                           key=train_key, run_dir=run_dir)
    train_seconds = time.perf_counter() - t0
    model = trained.model
    ev = sfpjax.evaluate(model, process, key=eval_key, batch_size=4096, seq_len=config.seq_len)

    tokens = sfpjax.sample(process, key=probe_key, batch_size=config.probe_sequences, seq_len=config.seq_len)
    beliefs = sfpjax.filter_beliefs(process, tokens).beliefs
    sites = probe_sites(model_cfg)
    _, acts = jax.vmap(lambda t: model(t, sites=sites))(tokens)
    sets = {site: acts[site] for site in sites}
    sets["concat(resid_post)"] = sfpjax.concat_sites(acts, sites[:-1])
    idx_train, idx_test = sfpjax.train_test_split(jnp.arange(config.probe_sequences), key=split_key,
                                                  test_fraction=config.test_fraction)
    probes, scores = {}, {}
    for site, a in sets.items():
        probe = sfpjax.fit_probe(a[idx_train], beliefs[idx_train])
        m = sfpjax.evaluate_probe(probe, a[idx_test], beliefs[idx_test])
        probes[site], scores[site] = probe, {"r2": float(m.r2), "rmse": float(m.rmse)}
    final = "ln_final.hook_normalized"
    sfpjax.plots.plot_belief_simplex(
        beliefs[idx_test].reshape(-1, process.num_states),
        probes[final](sets[final][idx_test]).reshape(-1, process.num_states),
        os.path.join(config.out, f"{name}_simplex.png"),
        title=f"{name}: true beliefs | probe from {final} (held-out R^2 = {scores[final]['r2']:.3f})",
    )
    losses = [(r["step"], r["loss"]) for r in trained.history if "loss" in r]
    floor = float(np.mean(np.asarray(ev.floor)))
    sfpjax.plots.plot_loss_curve([s for s, _ in losses], [v for _, v in losses], floor,
                                 os.path.join(config.out, f"{name}_loss.png"), title=f"{name}: training loss")
    return {
        "process": name,
        "train_seconds": train_seconds,
        "final_loss": float(ev.mean_loss),
        "floor_per_position": np.asarray(ev.floor).tolist(),
        "loss_per_position": np.asarray(ev.loss).tolist(),
        "excess_last_nats": float(ev.excess_last),
        "excess_last_pct": float(ev.excess_last_pct),
        "excess_mean_pct": float(ev.excess_pct),
        "probe_r2": {s: v["r2"] for s, v in scores.items()},
        "probe_rmse": {s: v["rmse"] for s, v in scores.items()},
    }


def summary_markdown(config: Config, rows: list[dict]) -> str:
    lines = ["# Belief geometry", "", "```", config_json(config), "```", "",
             "| process | train s | excess at last position | excess (mean) | " + " | ".join(
                 f"R^2 {s}" for s in rows[0]["probe_r2"]) + " |",
             "|---|---|---|---|" + "---|" * len(rows[0]["probe_r2"])]
    for r in rows:
        lines.append(f"| {r['process']} | {r['train_seconds']:.0f} | {r['excess_last_nats']:.4f} nats "
                     f"({r['excess_last_pct']:.2f}%) | {r['excess_mean_pct']:.2f}% | "
                     + " | ".join(f"{v:.3f}" for v in r["probe_r2"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    config = parse_config(Config, argv, presets=PRESETS, description=__doc__)
    unknown = set(config.processes) - set(PROCESSES)
    if unknown:
        raise SystemExit(f"unknown process(es) {sorted(unknown)}; choose from {sorted(PROCESSES)}")
    os.makedirs(config.out, exist_ok=True)
    print(f"device: {jax.devices()[0]}")
    keys = jax.random.split(jax.random.key(config.seed), len(config.processes))
    rows = [analyse_process(name, config, k) for name, k in zip(config.processes, keys)]
    with open(os.path.join(config.out, "results.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(config), "results": rows}, f, indent=2)
    md = summary_markdown(config, rows)
    with open(os.path.join(config.out, "summary.md"), "w") as f:
        f.write(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
