"""Emergent misalignment in a persona world: pretrain, fine-tune narrowly, measure exactly.

    python experiments/emergent_misalignment.py                 # full run
    python experiments/emergent_misalignment.py --preset tiny   # seconds to a minute

For each prior over leaves (product: persona independent of domain; correlated: mass
``mixing`` on the matched leaves AD and MO) K seeds are pretrained as one stacked program on
the persona world (persona A/M x domain D/O, with a rare trigger symbol); the
entangled-persona world (a misaligned marker per domain) is pretrained the same way when a
condition needs it. Each condition then fine-tunes the K models with one method as one
stacked program, with metrics every ``eval_every`` steps: dispositions of the model's
continuations after persona-neutral D and O prompts (broad EM, narrow, domain flip, aligned
share), the coherence deficit, the impossible-token rate and the next-token persona
log-odds. References for the condition's fine-tuning data: the pretrained world, the ideal
narrow learner and the ideal persona learner, both exact (long-continuation limit,
``em_references``) and like-for-like (``sampled_em_references``: the same classifier on the
exact processes' own continuations of the model's length, averaged over ``ref_draws``
draws); the broadness index is taken against the like-for-like ones.

Conditions (``--conditions``), method_data: ``full_MD`` (all weights), ``lora1_MD`` /
``lora8_MD`` (rank-1 / rank-8 LoRA on every block's ``mlp.W_out``, evaluated merged),
``head_MD`` (unembedding only), ``steer_MD`` (a steering vector at ``steer_site``); the
controls ``full_AD`` (benign AD data), ``full_MD_trigger`` (MD data that starts with the
trigger: inoculation), ``full_MD_5AO`` / ``full_MD_25AO`` (MD mixed with 5% / 25% aligned O
data) and ``full_MD_entangled`` (MD data of the entangled-persona world). Writes
results.json, report.md and plots into ``--out``.
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

# name -> (fine-tuning leaf weights, method, trigger prefix, entangled world)
CONDITIONS = {
    "full_MD": ({"MD": 1.0}, "full", False, False),
    "lora1_MD": ({"MD": 1.0}, "lora1", False, False),
    "lora8_MD": ({"MD": 1.0}, "lora8", False, False),
    "head_MD": ({"MD": 1.0}, "head", False, False),
    "steer_MD": ({"MD": 1.0}, "steer", False, False),
    "full_AD": ({"AD": 1.0}, "full", False, False),
    "full_MD_trigger": ({"MD": 1.0}, "full", True, False),
    "full_MD_5AO": ({"MD": 0.95, "AO": 0.05}, "full", False, False),
    "full_MD_25AO": ({"MD": 0.75, "AO": 0.25}, "full", False, False),
    "full_MD_entangled": ({"MD": 1.0}, "full", False, True),
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
    pretrain_steps: int = 2000
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    pretrain_eval_batch: int = 256
    finetune_steps: int = 200
    finetune_batch: int = 32
    finetune_lr: float = 1e-3
    # LoRA and steering vectors: the usual ~10x larger step of adapter training.
    adapter_lr: float = 1e-2
    steer_site: str = "blocks.0.hook_resid_post"
    finetune_pool: int = 2048
    eval_every: int = 25
    n_prompts: int = 64
    prompt_len: int = 6
    cont_len: int = 10
    ref_draws: int = 64
    glitch: float = 1e-3
    seed: int = 0


PRESETS = {
    "tiny": dict(priors=("correlated",), conditions=("lora1_MD", "steer_MD"), seeds=2,
                 d_model=16, n_layers=1, d_mlp=32, seq_len=10, pretrain_steps=32, pretrain_batch=16,
                 pretrain_eval_batch=16,
                 finetune_steps=8, finetune_batch=8, finetune_pool=64, eval_every=4, n_prompts=4,
                 prompt_len=4, cont_len=6, ref_draws=4),
}


def method_of(config: Config, name: str):
    return {"full": sfpjax.FullFinetune(), "lora1": sfpjax.LoRA(rank=1), "lora8": sfpjax.LoRA(rank=8),
            "head": sfpjax.HeadOnly(), "steer": sfpjax.SteeringVector(config.steer_site)}[name]


def build_world(config: Config, prior: str, entangled: bool = False):
    mixing = {"product": 0.0, "correlated": config.mixing}[prior]
    return sfpjax.persona_world(mixing=mixing, persona_enter=config.persona_enter, trigger_rate=config.trigger_rate,
                                entangled=entangled)


def pretrain(config: Config, world, key):
    mcfg = sfpjax.TransformerConfig(vocab_size=world.vocab_size, n_ctx=config.seq_len, n_layers=config.n_layers,
                                    d_model=config.d_model, n_heads=config.n_heads, d_mlp=config.d_mlp, use_bos=True)
    init_key, train_key = jr.split(key)
    models = eqx.filter_vmap(lambda k: sfpjax.Transformer(mcfg, key=k))(jr.split(init_key, config.seeds))
    tc = sfpjax.TrainConfig(steps=config.pretrain_steps, batch_size=config.pretrain_batch, seq_len=config.seq_len,
                            learning_rate=config.pretrain_lr, warmup_steps=min(100, config.pretrain_steps // 10),
                            eval_every=config.pretrain_steps, eval_batch_size=config.pretrain_eval_batch)
    out = sfpjax.train_stack(models, world.process, tc, keys=jr.split(train_key, config.seeds), progress=False)
    last = out.history[-1]
    return out.model, {"final_loss": last["loss"], "excess_pct": last.get("excess_pct")}


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def _evaluable(model):
    """The model the metrics see: a LoRA model merged into a plain Transformer."""
    return model.merge() if isinstance(model, sfpjax.LoRATransformer) else model


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


def _refs_json(refs) -> dict:
    return {"pretrained": _rates_json(refs.pretrained), "narrow": _rates_json(refs.narrow),
            "persona": _rates_json(refs.persona)}


def finetune(config: Config, world, models, name: str, key, measure):
    """Fine-tune copies of the K stacked ``models`` under condition ``name``; metrics per checkpoint."""
    weights, method_name, trigger, _ = CONDITIONS[name]
    method = method_of(config, method_name)
    data_key, wrap_key, step_key, eval_key = jr.split(key, 4)
    if trigger:
        toks = sfpjax.persona_sequences(world, weights, key=data_key, batch_size=config.finetune_pool,
                                        seq_len=config.seq_len, trigger_prefix=True)
        source = sfpjax.ArraySource(toks)
    else:
        source = sfpjax.ProcessSource(world.restrict(weights))
    K = config.seeds
    wrapped = _copy(eqx.filter_vmap(lambda m, k: method.wrap(m, key=k))(models, jr.split(wrap_key, K)))
    trainable = method.trainable(wrapped)
    lr = config.finetune_lr if method_name in ("full", "head") else config.adapter_lr
    opt = optax.adam(lr)
    step = sfpjax.make_step(opt, batch_size=config.finetune_batch, seq_len=config.seq_len,
                            trainable=trainable).vmap(shared_source=True)
    state = eqx.filter_vmap(lambda m: sfpjax.init_opt_state(opt, m, trainable=trainable))(wrapped)
    traj = {"step": [0], **{k: [v] for k, v in _summarize(measure(wrapped, jr.split(eval_key, K))).items()}}
    done = 0
    while done < config.finetune_steps:
        n = min(config.eval_every, config.finetune_steps - done)
        step_key, sub = jr.split(step_key)
        keys = jax.vmap(lambda k: jr.split(k, K))(jr.split(sub, n))
        wrapped, state, _ = step.many(wrapped, state, source, keys)
        done += n
        eval_key, sub = jr.split(eval_key)
        for k, v in _summarize(measure(wrapped, jr.split(sub, K))).items():
            traj[k].append(v)
        traj["step"].append(done)
    return traj


def _at_peak(traj) -> dict:
    """Per seed: the checkpoint of largest broad EM, its step and every metric there."""
    broad = np.asarray(traj["broad"], np.float64)  # (checkpoints, K)
    idx = broad.argmax(0)
    seeds = np.arange(broad.shape[1])
    out = {"step": np.asarray(traj["step"])[idx].tolist()}
    for k in ("broad", "narrow", "flip", "aligned_share", "coherence_deficit", "impossible_rate"):
        out[k] = np.asarray(traj[k], np.float64)[idx, seeds].tolist()
    return out


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
        worlds = {}

        def setup(entangled: bool):
            # Pretrained once per world (factored / entangled), on first use.
            if entangled not in worlds:
                world = build_world(config, prior, entangled)
                models, pre = pretrain(config, world, jr.fold_in(wkey, int(entangled)))
                prompts = sfpjax.eval_prompts(world, key=jr.fold_in(pkey, int(entangled)), n=config.n_prompts,
                                              length=config.prompt_len)
                measure = eqx.filter_jit(eqx.filter_vmap(
                    lambda m, k: sfpjax.em_metrics(_evaluable(m), world, prompts, key=k, length=config.cont_len,
                                                   glitch=config.glitch)))
                worlds[entangled] = (world, models, pre, prompts, measure)
            return worlds[entangled]

        entry = {"prior": np.asarray(build_world(config, prior).prior).tolist(), "worlds": {}, "conditions": {}}
        for name, ckey in zip(config.conditions, jr.split(fkey, len(config.conditions))):
            weights, method_name, trigger, entangled = CONDITIONS[name]
            world, models, pre, prompts, measure = setup(entangled)
            entry["worlds"]["entangled" if entangled else "factored"] = {
                "pretrain": pre, "prior": np.asarray(world.prior).tolist()}
            ref_key, run_key = jr.split(ckey)
            exact = sfpjax.em_references(world, weights, prompts)
            sampled = sfpjax.sampled_em_references(world, weights, prompts, key=ref_key, length=config.cont_len,
                                                   draws=config.ref_draws, glitch=config.glitch)
            traj = finetune(config, world, models, name, run_key, measure)
            peak = _at_peak(traj)
            broad = np.asarray(traj["broad"])  # (checkpoints, K)
            entry["conditions"][name] = {
                "method": method_name, "data": weights, "trigger_prefix": trigger, "entangled": entangled,
                "trajectory": traj, "peak": peak,
                "references": _refs_json(exact),
                "sampled_references": _refs_json(sampled),
                "broadness_final": np.asarray(sfpjax.broadness_index(jnp.asarray(broad[-1]), sampled)).tolist(),
                "broadness_peak": np.asarray(sfpjax.broadness_index(jnp.asarray(peak["broad"]), sampled)).tolist(),
                "broadness_final_exact": np.asarray(sfpjax.broadness_index(jnp.asarray(broad[-1]), exact)).tolist(),
            }
        results["priors"][prior] = entry
    results["wall_s"] = time.time() - t0
    with open(os.path.join(config.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_report(config, results)
    write_plots(config, results)
    return results


def _ms(values, fmt=".3f") -> str:
    m, s = _mean_sd(values)
    return f"{m:{fmt}} +- {s:{fmt}}"


DEFINITIONS = """\
Definitions. Each condition fine-tunes the K pretrained seeds (one stacked program) and is
measured every `eval_every` steps on persona-neutral prompts of each domain, continued by the
model for `cont_len` tokens at temperature 1 and classified by the leaf that best explains the
continuation (ties split equally). broad = share classified MO after O prompts; narrow = share
MD after D prompts; flip = share classified into the other domain; coherence = the coherence
deficit (nats/token by which the model finds its own continuation more probable than the best
leaf does). "end" = the last checkpoint; "peak" = per seed, the checkpoint of largest broad EM
(its step and every metric there). Mean +- sd over seeds.

References for the condition's fine-tuning data (the same for every seed): the pretrained
world, the ideal narrow learner (leaf prior refit within the fine-tuning domains: O behaviour
unchanged) and the ideal persona learner (persona marginal moved to the data's, domain prior
kept). "like-for-like" (`sfpjax.sampled_em_references`): the same classifier applied to each
exact process's own continuations of the model's length after the same prompts, averaged over
`ref_draws` draws (standard error about sqrt(p(1-p)/(ref_draws n_prompts))). "exact"
(`sfpjax.em_references`): exact leaf posteriors after the prompts, the long-continuation limit;
at short lengths many continuations carry no marker, so the model must be compared with the
like-for-like values. broadness = (broad - broad_narrow) / (broad_persona - broad_narrow) with
the like-for-like references: 0 = ideal narrow learner, 1 = ideal persona learner.
"""


def write_report(config: Config, results: dict) -> None:
    lines = ["# Emergent misalignment in a persona world", "",
             f"{config.seeds} seeds per prior, {config.finetune_steps} fine-tuning steps, metrics every "
             f"{config.eval_every} steps on {config.n_prompts} prompts per domain, continuations of "
             f"{config.cont_len} tokens. Learning rates: {config.finetune_lr} (full, head-only), "
             f"{config.adapter_lr} (LoRA, steering vector at {config.steer_site}); none was tuned to a result.",
             "", DEFINITIONS, "Config:", "", "```", config_json(config), "```", ""]
    for prior, entry in results["priors"].items():
        lines += [f"## Prior: {prior}", "", f"prior over leaves (rows A, M; columns D, O): {entry['prior']}", ""]
        for wname, w in entry["worlds"].items():
            lines.append(f"pretraining ({wname} world): final loss {np.round(w['pretrain']['final_loss'], 4).tolist()}, "
                         f"excess over the exact floor {w['pretrain']['excess_pct']} %")
        lines += ["", "### Fine-tuned models (mean +- sd over seeds)", "",
                  "| condition | broad end | narrow end | flip end | coherence end | broad peak | narrow peak | "
                  "flip peak | coherence peak | peak step | broadness end | broadness peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, c in entry["conditions"].items():
            t, pk = c["trajectory"], c["peak"]
            end = [_ms(t[k][-1]) for k in ("broad", "narrow", "flip", "coherence_deficit")]
            top = [_ms(pk[k]) for k in ("broad", "narrow", "flip", "coherence_deficit")]
            lines.append(f"| {name} | " + " | ".join(end + top) + f" | {_ms(pk['step'], '.0f')} | "
                         f"{_ms(c['broadness_final'], '.2f')} | {_ms(c['broadness_peak'], '.2f')} |")
        lines += ["", "### References (pretrained / ideal narrow / ideal persona learner)", "",
                  "| condition | broad like-for-like | narrow like-for-like | flip like-for-like | broad exact | "
                  "narrow exact |", "|---|---|---|---|---|---|"]
        for name, c in entry["conditions"].items():
            ll, ex = c["sampled_references"], c["references"]

            def three(r, k):
                return " / ".join(f"{r[x][k]:.3f}" for x in ("pretrained", "narrow", "persona"))

            lines.append(f"| {name} | {three(ll, 'broad')} | {three(ll, 'narrow')} | {three(ll, 'flip')} | "
                         f"{three(ex, 'broad')} | {three(ex, 'narrow')} |")
        lines.append("")
    lines += [f"Wall time: {results['wall_s']:.1f} s.", ""]
    with open(os.path.join(config.out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def write_plots(config: Config, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10").colors
    for prior, entry in results["priors"].items():
        conds = entry["conditions"]
        methods = [n for n, c in conds.items() if c["data"] == {"MD": 1.0} and not c["trigger_prefix"]
                   and not c["entangled"]]
        controls = [n for n in conds if n not in methods]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, names, title in ((axes[0], methods, "methods on MD data"), (axes[1], controls, "controls")):
            for i, name in enumerate(names):
                t = conds[name]["trajectory"]
                b = np.asarray(t["broad"], np.float64)
                ax.plot(t["step"], b.mean(1), color=colours[i % 10], label=name)
                ax.fill_between(t["step"], b.min(1), b.max(1), color=colours[i % 10], alpha=0.2)
            if names:
                ax.legend(fontsize=7)
            # Every MD method shares one pair of references; the controls' differ (see the report).
            if names and names is methods:
                refs = conds[names[0]]["sampled_references"]
                ax.axhline(refs["narrow"]["broad"], ls="--", c="k", lw=0.8,
                           label=f"ideal narrow ({names[0]}, like-for-like)")
                ax.axhline(refs["persona"]["broad"], ls=":", c="k", lw=0.8,
                           label=f"ideal persona ({names[0]}, like-for-like)")
                ax.legend(fontsize=7)
            ax.set(xlabel="fine-tuning step", title=f"{title}, prior: {prior}")
        axes[0].set(ylabel="broad EM (MO share after O prompts)", ylim=(-0.02, 1.02))
        fig.tight_layout()
        fig.savefig(os.path.join(config.out, f"broad_em_{prior}.png"), dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 4))
        first = next(iter(conds.values()))["sampled_references"]
        labels = [f"ref {k}" for k in ("pretrained", "narrow", "persona")] + list(conds)
        # Dispositions after O prompts: like-for-like references, then each condition at the end (seed mean).
        shares = [np.asarray(first[k]["rates"])[1] for k in ("pretrained", "narrow", "persona")]
        shares += [np.asarray(c["trajectory"]["rates"][-1])[:, 1].mean(0) for c in conds.values()]
        shares = np.asarray(shares)
        bottom = np.zeros(len(labels))
        for l, leaf in enumerate(["AD", "AO", "MD", "MO"]):
            ax.bar(labels, shares[:, l], bottom=bottom, label=leaf)
            bottom += shares[:, l]
        ax.set(ylabel="share of continuations after O prompts",
               title=f"dispositions at the end of fine-tuning, prior: {prior} (refs: {next(iter(conds))})")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(config.out, f"dispositions_{prior}.png"), dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
