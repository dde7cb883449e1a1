"""Emergent misalignment in a persona world: pretrain, fine-tune narrowly, measure exactly.

    python experiments/emergent_misalignment.py                 # full run
    python experiments/emergent_misalignment.py --preset tiny   # seconds to a minute

For each prior over leaves (product: persona independent of domain; correlated: mass
``mixing`` on the matched leaves AD and MO) K seeds are pretrained as one stacked program on
the persona world (persona A/M x domain D/O, with a rare trigger symbol). Each condition
then fine-tunes copies of the K models on its data, with metrics every ``eval_every``
steps: dispositions of the model's continuations after persona-neutral D and O prompts
(broad EM, narrow, domain flip, aligned share), the coherence deficit, the impossible-token
rate and the next-token persona log-odds; beside them the exact references of the
pretrained world, the ideal narrow learner and the ideal persona learner for the condition's
fine-tuning data, and the broadness index.

Conditions (``--conditions``): ``full_MD`` (all weights, MD data), ``head_MD`` (unembedding
only), ``full_AD`` (benign AD data), ``full_MD_trigger`` (MD data that starts with the
trigger: inoculation), ``full_MD_5AO`` / ``full_MD_25AO`` (MD mixed with 5% / 25% aligned
O data). Writes results.json, report.md and plots into ``--out``.
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
import jax.random as jr
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
import sfpjax  # noqa: E402
from _cli import config_json, parse_config  # noqa: E402

CONDITIONS = {
    "full_MD": ({"MD": 1.0}, "full", False),
    "head_MD": ({"MD": 1.0}, "head", False),
    "full_AD": ({"AD": 1.0}, "full", False),
    "full_MD_trigger": ({"MD": 1.0}, "full", True),
    "full_MD_5AO": ({"MD": 0.95, "AO": 0.05}, "full", False),
    "full_MD_25AO": ({"MD": 0.75, "AO": 0.25}, "full", False),
}


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = "runs/emergent_misalignment"
    priors: tuple[str, ...] = ("product", "correlated")
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    mixing: float = 0.6
    persona_enter: float = 0.1
    trigger_rate: float = 0.02
    seeds: int = 3
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    d_mlp: int = 64
    seq_len: int = 16
    pretrain_steps: int = 3000
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    finetune_steps: int = 200
    finetune_batch: int = 32
    finetune_lr: float = 1e-3
    finetune_pool: int = 2048
    eval_every: int = 25
    n_prompts: int = 64
    prompt_len: int = 6
    cont_len: int = 10
    glitch: float = 1e-3
    seed: int = 0


PRESETS = {
    "tiny": dict(priors=("correlated",), conditions=("head_MD", "full_MD_trigger"), seeds=2,
                 d_model=16, n_layers=1, d_mlp=32, seq_len=10, pretrain_steps=32, pretrain_batch=16,
                 finetune_steps=8, finetune_batch=8, finetune_pool=64, eval_every=4, n_prompts=4,
                 prompt_len=4, cont_len=6),
}


def build_world(config: Config, prior: str):
    mixing = {"product": 0.0, "correlated": config.mixing}[prior]
    return sfpjax.persona_world(mixing=mixing, persona_enter=config.persona_enter, trigger_rate=config.trigger_rate)


def pretrain(config: Config, world, key):
    mcfg = sfpjax.TransformerConfig(vocab_size=world.vocab_size, n_ctx=config.seq_len, n_layers=config.n_layers,
                                    d_model=config.d_model, n_heads=config.n_heads, d_mlp=config.d_mlp, use_bos=True)
    init_key, train_key = jr.split(key)
    models = eqx.filter_vmap(lambda k: sfpjax.Transformer(mcfg, key=k))(jr.split(init_key, config.seeds))
    tc = sfpjax.TrainConfig(steps=config.pretrain_steps, batch_size=config.pretrain_batch, seq_len=config.seq_len,
                            learning_rate=config.pretrain_lr, warmup_steps=min(100, config.pretrain_steps // 10),
                            eval_every=config.pretrain_steps, eval_batch_size=256)
    out = sfpjax.train_stack(models, world.process, tc, keys=jr.split(train_key, config.seeds), progress=False)
    last = out.history[-1]
    return out.model, {"final_loss": last["loss"], "excess_pct": last.get("excess_pct")}


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def _head_only(model):
    spec = jax.tree.map(lambda _: False, model)
    return eqx.tree_at(lambda m: (m.W_U, m.b_U), spec, (True, True))


def _summarize(metrics) -> dict:
    r = metrics.rates
    return {
        "broad": np.asarray(r.broad).tolist(), "narrow": np.asarray(r.narrow).tolist(),
        "flip": np.asarray(r.flip).tolist(), "aligned_share": np.asarray(r.aligned_share).tolist(),
        "coherence_deficit": np.asarray(metrics.coherence_deficit).tolist(),
        "impossible_rate": np.asarray(metrics.impossible_rate).tolist(),
        "log_odds_D": np.asarray(metrics.log_odds[:, 0].mean(-1)).tolist(),
        "log_odds_O": np.asarray(metrics.log_odds[:, 1:].mean((-2, -1))).tolist(),
        "rates": np.asarray(r.rates).tolist(),
    }


def _rates_json(r) -> dict:
    return {"broad": float(r.broad), "narrow": float(r.narrow), "flip": float(r.flip),
            "aligned_share": float(r.aligned_share), "rates": np.asarray(r.rates).tolist()}


def finetune(config: Config, world, models, prompts, name: str, key, measure):
    weights, method, trigger = CONDITIONS[name]
    data_key, step_key, eval_key = jr.split(key, 3)
    if trigger:
        toks = sfpjax.persona_sequences(world, weights, key=data_key, batch_size=config.finetune_pool,
                                        seq_len=config.seq_len, trigger_prefix=True)
        source = sfpjax.ArraySource(toks)
    else:
        source = sfpjax.ProcessSource(world.restrict(weights))
    trainable = _head_only(jax.tree.map(lambda x: x[0] if eqx.is_array(x) else x, models)) if method == "head" else None
    opt = optax.adam(config.finetune_lr)
    step = sfpjax.make_step(opt, batch_size=config.finetune_batch, seq_len=config.seq_len, trainable=trainable,
                            stacked=True, shared_source=True)
    models = _copy(models)
    state = sfpjax.init_opt_state(opt, models, trainable=trainable, stacked=True)
    K = config.seeds
    traj = {"step": [0], **{k: [v] for k, v in _summarize(measure(models, jr.split(eval_key, K))).items()}}
    done = 0
    while done < config.finetune_steps:
        n = min(config.eval_every, config.finetune_steps - done)
        step_key, sub = jr.split(step_key)
        keys = jax.vmap(lambda k: jr.split(k, K))(jr.split(sub, n))
        models, state, _ = step.many(models, state, source, keys)
        done += n
        eval_key, sub = jr.split(eval_key)
        for k, v in _summarize(measure(models, jr.split(sub, K))).items():
            traj[k].append(v)
        traj["step"].append(done)
    return traj


def _mean_sd(values) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std())


def main(argv=None):
    config = parse_config(Config, argv, presets=PRESETS, description=__doc__)
    for c in config.conditions:
        if c not in CONDITIONS:
            raise SystemExit(f"unknown condition {c!r}; choose from {sorted(CONDITIONS)}")
    os.makedirs(config.out, exist_ok=True)
    t0 = time.time()
    key = jr.key(config.seed)
    results = {"config": dataclasses.asdict(config), "priors": {}}
    for prior in config.priors:
        key, wkey, pkey, fkey = jr.split(key, 4)
        world = build_world(config, prior)
        models, pre = pretrain(config, world, wkey)
        prompts = sfpjax.eval_prompts(world, key=pkey, n=config.n_prompts, length=config.prompt_len)
        measure = eqx.filter_jit(eqx.filter_vmap(
            lambda m, k: sfpjax.em_metrics(m, world, prompts, key=k, length=config.cont_len, glitch=config.glitch)))
        entry = {"pretrain": pre, "prior": np.asarray(world.prior).tolist(), "conditions": {}}
        for name, ckey in zip(config.conditions, jr.split(fkey, len(config.conditions))):
            weights = CONDITIONS[name][0]
            refs = sfpjax.em_references(world, weights, prompts)
            # The same classifier on the exact processes' own continuations of the same length.
            skeys = jr.split(jr.fold_in(ckey, 1), 3)
            sampled = {
                label: _rates_json(sfpjax.sampled_em_rates(w, prompts, key=k, length=config.cont_len,
                                                           glitch=config.glitch))
                for label, w, k in zip(("pretrained", "narrow", "persona"),
                                       (world, sfpjax.narrow_learner(world, weights),
                                        sfpjax.persona_learner(world, weights)), skeys)
            }
            traj = finetune(config, world, models, prompts, name, ckey, measure)
            broad = np.asarray(traj["broad"])  # (checkpoints, K)
            entry["conditions"][name] = {
                "trajectory": traj,
                "references": {"pretrained": _rates_json(refs.pretrained), "narrow": _rates_json(refs.narrow),
                               "persona": _rates_json(refs.persona)},
                "sampled_references": sampled,
                "broadness_final": np.asarray(sfpjax.broadness_index(jnp.asarray(broad[-1]), refs)).tolist(),
                "broadness_peak": np.asarray(sfpjax.broadness_index(jnp.asarray(broad.max(0)), refs)).tolist(),
            }
        results["priors"][prior] = entry
    results["wall_s"] = time.time() - t0
    with open(os.path.join(config.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(config, results)
    write_plots(config, results)
    return results


def write_report(config: Config, results: dict) -> None:
    lines = ["# Emergent misalignment in a persona world", "",
             f"{config.seeds} seeds per prior, mean +- sd over seeds; 'peak' is the largest value over the "
             f"fine-tuning trajectory (every {config.eval_every} steps). Exact references: the pretrained world, "
             "the ideal narrow learner (leaf prior refit within the fine-tuning domains) and the ideal persona "
             "learner (persona marginal moved, domain prior kept), as exact leaf posteriors (the long-continuation limit) and "
             "as the disposition classifier's rates on the exact processes' own continuations of the model's length "
             "(the like-for-like comparison: short continuations without a marker are ambiguous, ties split). "
             "Broadness 0 = narrow learner, 1 = persona learner (exact references).",
             "", "Config:", "", "```", config_json(config), "```", ""]
    for prior, entry in results["priors"].items():
        lines += [f"## Prior: {prior}", "", f"prior over leaves (rows A, M; columns D, O): {entry['prior']}", "",
                  f"pretraining: final loss {np.round(entry['pretrain']['final_loss'], 4).tolist()}, "
                  f"excess over the exact floor {entry['pretrain']['excess_pct']} %", "",
                  "| condition | broad end | broad peak | narrow end | flip end | coherence end (nats/tok) | "
                  "impossible end | broadness end | ref broad: pretrained / narrow / persona (exact) | "
                  "same, classifier on exact continuations |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, c in entry["conditions"].items():
            t = c["trajectory"]

            def ms(key, idx=-1):
                m, s = _mean_sd(t[key][idx])
                return f"{m:.3f} +- {s:.3f}"

            peak = np.asarray(t["broad"]).max(0)
            pm, ps = _mean_sd(peak)
            bm, bs = _mean_sd(c["broadness_final"])
            r = c["references"]
            lines.append(
                f"| {name} | {ms('broad')} | {pm:.3f} +- {ps:.3f} | {ms('narrow')} | {ms('flip')} | "
                f"{ms('coherence_deficit')} | {ms('impossible_rate')} | {bm:.2f} +- {bs:.2f} | "
                f"{r['pretrained']['broad']:.3f} / {r['narrow']['broad']:.3f} / {r['persona']['broad']:.3f} | "
                + " / ".join(f"{c['sampled_references'][k]['broad']:.3f}" for k in ("pretrained", "narrow", "persona"))
                + " |")
        lines.append("")
    lines += [f"Wall time: {results['wall_s']:.1f} s.", ""]
    with open(os.path.join(config.out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def write_plots(config: Config, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for prior, entry in results["priors"].items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in entry["conditions"].items():
            t = c["trajectory"]
            b = np.asarray(t["broad"], np.float64)
            ax.plot(t["step"], b.mean(1), label=name)
            ax.fill_between(t["step"], b.min(1), b.max(1), alpha=0.2)
        first = next(iter(entry["conditions"].values()))["references"]
        ax.axhline(first["narrow"]["broad"], ls="--", c="k", lw=0.8, label="ideal narrow (MD)")
        ax.axhline(first["persona"]["broad"], ls=":", c="k", lw=0.8, label="ideal persona (MD)")
        ax.set(xlabel="fine-tuning step", ylabel="broad EM rate (MO after O prompts)", ylim=(-0.02, 1.02),
               title=f"prior: {prior}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(config.out, f"broad_em_{prior}.png"), dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(entry["conditions"])
        leaves = ["AD", "AO", "MD", "MO"]
        bottom = np.zeros(len(names))
        for l, leaf in enumerate(leaves):
            # Dispositions after O prompts at the end of fine-tuning, mean over seeds.
            share = np.array([np.asarray(entry["conditions"][n]["trajectory"]["rates"][-1])[:, 1, l].mean()
                              for n in names])
            ax.bar(names, share, bottom=bottom, label=leaf)
            bottom += share
        ax.set(ylabel="share of continuations after O prompts", title=f"dispositions, prior: {prior}")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(config.out, f"dispositions_{prior}.png"), dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
