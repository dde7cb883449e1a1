"""Factored and semi-factored steering (seed 001, appendix A; seed 000, section 1).

    python experiments/factored_steering.py                          # both regimes, default config
    python experiments/factored_steering.py --preset tiny --out runs/t    # seconds
    python experiments/factored_steering.py --train.steps 3000 --model.d-model 32 --out runs/x

Regime (i): Z1R x Z1R (9 joint states, 4 tokens). Regime (ii): the partition-preserving
semi-factored Z1R of seed 000 (sectors span{S0} + span{S1,SR} per factor, prior mass
p_matched on the matched block P00 and 1 - p_matched on P11). ``--p-mismatched q`` moves
mass q onto the mismatched blocks P01 and P10 (``sfpjax.partitioned_z1r_sfp``), so the
model also sees sequences in the blocks that Table 2 steers into; q = 0 (the default) is
seed 000's eq. 2.26. For each regime: train the transformer of ``config.model`` with
``config.train`` (``vocab_size`` and ``n_ctx`` come from the process and
``train.seq_len``), read final-position blocks.1.hook_resid_post activations of held-out
sequences with exact beliefs, fit probes, then steer every factor between every pair of
synchronized marginal beliefs (S0, S1, SR; ``sfpjax.synchronized_classes``) with every
method of ``sfpjax.STEERING_METHODS``.

The report (prose in ``factored_steering_report.md``, numbers from this run) also says how
factored the representation at the steering site is: the held-out R^2 of the direct-sum
fit ``x ~ sum_f <<eta_f| A_f + c`` against the joint fit ``x ~ <<eta| A + c``.

Writes config.json, results.json, report.md and plots into --out.
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

SITE = "blocks.1.hook_resid_post"
LN_SITE = "ln_final.hook_normalized"
SITES = {"resid": SITE, "ln_final": LN_SITE}
METHODS = tuple(sfpjax.STEERING_METHODS)
NAMES = ("S0", "S1", "SR")
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "factored_steering_report.md")

SEED_TABLE1 = {  # scale: (target, steered factor, unsteered factor)
    0.0: (0.014, 0.000, 0.000), 0.5: (0.095, 0.046, 0.000), 1.0: (0.222, 0.146, 0.000),
    1.5: (0.567, 0.439, 0.001), 2.0: (1.036, 0.850, 0.002), 3.0: (1.703, 1.443, 0.004),
}
SEED_TABLE2 = {  # scale: (forbidden P10, forbidden P01, target P10, target P01)
    0.0: (0.001, 0.001, 0.518, 0.516), 0.5: (0.000, 0.000, 0.983, 0.986),
    1.0: (0.000, 0.001, 0.999, 0.999), 2.0: (0.019, 0.080, 0.981, 0.920),
    3.0: (0.130, 0.373, 0.870, 0.627), 5.0: (0.395, 0.691, 0.605, 0.309),
}


def _model_config() -> sfpjax.TransformerConfig:
    return sfpjax.TransformerConfig(vocab_size=4, n_ctx=11, n_layers=2, d_model=64, n_heads=2, d_mlp=256)


def _train_config() -> sfpjax.TrainConfig:
    # seq_len = L + 1: the model reads L tokens; without BOS the last position of a training
    # sequence has no target, so the steered position L - 1 is then one the loss has shaped.
    return sfpjax.TrainConfig(steps=10000, batch_size=64, seq_len=11, learning_rate=3e-3, warmup_steps=100,
                              log_every=500)


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = "runs/factored_steering"
    regimes: tuple[str, ...] = ("factored", "semi")
    model: sfpjax.TransformerConfig = dataclasses.field(default_factory=_model_config)
    train: sfpjax.TrainConfig = dataclasses.field(default_factory=_train_config)
    n_fit: int = 2000          # held-out sequences for centroids, means and probes
    n_eval: int = 500          # held-out sequences that are steered (seed 001: 500)
    min_class: int = 10        # a belief class needs this many sequences in both sets
    scales: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
    p_matched: float = 0.5
    p_mismatched: float = 0.0  # prior mass on P01 + P10 in the semi regime (0: seed 000 eq. 2.26)
    probe_ridge: float = 0.0   # ridge of the joint probe used by belief-state steering
    seed: int = 0


PRESETS = {
    "tiny": {"train.steps": 60, "train.batch_size": 16, "train.seq_len": 7, "train.warmup_steps": 5,
             "train.log_every": 10, "model.d_model": 16, "model.d_mlp": 32, "n_fit": 200, "n_eval": 60,
             "min_class": 2},
}


def build(regime: str, config: Config):
    if regime == "factored":
        z = sfpjax.z1r()
        return sfpjax.product(z, z), (z, z), None
    if regime == "semi":
        sfp = sfpjax.partitioned_z1r_sfp(config.p_matched, p_mismatched=config.p_mismatched)
        return sfp.process, sfp.factors, sfp.sectors
    raise ValueError(f"unknown regime {regime!r}; use 'factored' or 'semi'.")


def final_acts(model, tokens):
    run = jax.jit(jax.vmap(lambda t: model(t, sites=[SITE, LN_SITE])))
    logits, acts = run(tokens)
    return np.asarray(acts[SITE][:, -1]), np.asarray(acts[LN_SITE][:, -1]), np.asarray(jax.nn.softmax(logits[:, -1]))


def run_regime(regime: str, config: Config, key):
    process, factors, sectors = build(regime, config)
    dims = tuple(f.num_states for f in factors)
    vocab = tuple(f.vocab_size for f in factors)
    model_key, train_key, fit_key, eval_key, loss_key = jax.random.split(key, 5)
    L = config.train.seq_len - 1
    model_cfg = dataclasses.replace(config.model, vocab_size=process.vocab_size, n_ctx=config.train.seq_len)
    t0 = time.perf_counter()
    model = sfpjax.train(sfpjax.Transformer(model_cfg, key=model_key), process, config.train, key=train_key,
                         progress=False).model
    train_s = time.perf_counter() - t0
    ev = sfpjax.evaluate(model, process, key=loss_key, batch_size=1024, seq_len=L + 1)

    # Held-out sequences of length L + 1: the model reads x_1..x_L, x_{L+1} is the observed next symbol.
    data = {}
    for name, k, n in (("fit", fit_key, config.n_fit), ("eval", eval_key, config.n_eval)):
        toks = sfpjax.sample(process, key=k, batch_size=n, seq_len=L + 1)
        beliefs = np.asarray(sfpjax.filter_beliefs(process, toks[:, :L]).beliefs[:, -1], np.float64)
        acts, ln_acts, probs = final_acts(model, toks[:, :L])
        nxt = [np.asarray(s) for s in sfpjax.decode_tokens(toks[:, L], vocab)]
        margs = [np.asarray(m) for m in sfpjax.factor_marginals(beliefs, dims)]
        data[name] = dict(tokens=toks[:, :L], beliefs=beliefs, acts=acts, ln_acts=ln_acts, probs=probs, next=nxt,
                          marg=margs)
    fit, evl = data["fit"], data["eval"]

    factor_probes = sfpjax.fit_factor_probes(fit["acts"], fit["beliefs"], dims)
    joint_probe = sfpjax.fit_probe(fit["acts"], fit["beliefs"], ridge=config.probe_ridge)
    decoder = sfpjax.fit_probe(fit["beliefs"], fit["acts"])
    r2 = {f"factor{f}": float(sfpjax.probe_r2(p, evl["acts"], evl["marg"][f])) for f, p in enumerate(factor_probes)}
    r2["joint"] = float(sfpjax.probe_r2(joint_probe, evl["acts"], evl["beliefs"]))
    direct_sum = sfpjax.fit_probe(np.concatenate(fit["marg"], -1), fit["acts"])
    additivity = {"direct_sum": float(sfpjax.probe_r2(direct_sum, np.concatenate(evl["marg"], -1), evl["acts"])),
                  "joint": float(sfpjax.probe_r2(decoder, evl["beliefs"], evl["acts"]))}
    # How often the other factor sits in its S0 state inside each (synchronized) class of a factor: under the
    # matched-sector prior of eq. 2.26 the {S1, SR} classes of one factor never see the other factor at S0.
    other_s0 = {}
    for f in range(len(dims)):
        for k, nm in enumerate(NAMES):
            inside = fit["marg"][f][:, k] > 1 - 1e-6
            if inside.any():
                other_s0[f"factor{f} {nm}"] = float(np.mean([fit["marg"][g][inside, 0].mean()
                                                             for g in range(len(dims)) if g != f]))

    scales = jnp.asarray(config.scales, jnp.float32)
    pairs = []
    for f in range(len(dims)):
        fc = sfpjax.factor_centroids(fit["acts"], fit["beliefs"], dims, f)
        fc_ln = sfpjax.factor_centroids(fit["ln_acts"], fit["beliefs"], dims, f)
        mu, _ = sfpjax.label_means(fit["acts"], fit["next"][f], vocab[f])
        model_marg = np.asarray(sfpjax.factor_token_marginals(evl["probs"], vocab)[f])
        classes = sfpjax.synchronized_classes(fc, evl["marg"][f], config.min_class)
        for bs, src in classes:
            for bt, tgt in classes:
                if np.array_equal(bs, bt):
                    continue
                p_t = np.asarray(sfpjax.next_token_probs(factors[f], jnp.asarray(bt, jnp.float32)))
                vectors = sfpjax.steering_vectors(
                    f, bs, bt, factor_process=factors[f], centroids=fc, ln_centroids=fc_ln, label_means=mu,
                    joint_probe=joint_probe, decoder=decoder, acts=evl["acts"], factor_dims=dims)
                token_classes, block = None, None
                if sectors is not None:
                    s_sec, t_sec = sfpjax.belief_sector(bs, sectors[f]), sfpjax.belief_sector(bt, sectors[f])
                    if s_sec == 0 and t_sec == 1:
                        # Sources in the matched block P00; the other factor sits at S0.
                        others = [np.eye(d)[0] for d in dims]
                        others[f] = bt
                        block = tuple(1 if g == f else 0 for g in range(len(dims)))
                        token_classes = sfpjax.sector_token_classes(factors, sectors, block, others)
                        # Only sequences in P00 itself: with mass on P01/P10 a factor at S0 does
                        # not put the other factor at S0.
                        src = src & np.all([evl["marg"][g][:, 0] > 1 - 1e-6 for g in range(len(dims)) if g != f],
                                           axis=0)
                exact_probs = sfpjax.next_token_probs(process, jnp.asarray(evl["beliefs"], jnp.float32))
                row = dict(factor=f, source=NAMES[int(bs.argmax())], target=NAMES[int(bt.argmax())],
                           n_source=int(src.sum()),
                           block=None if block is None else "P" + "".join(map(str, block)), methods={})
                # Every call steers the whole eval batch and averages over the source class, so
                # all pairs and methods share one compiled sweep.
                for method, vec in vectors.items():
                    spec = sfpjax.STEERING_METHODS[method]
                    res = sfpjax.evaluate_steering(
                        model, evl["tokens"], SITES[spec.site],
                        jnp.asarray(vec, jnp.float32), scales, factor=f, vocab_sizes=vocab,
                        preserve_norm=spec.preserve_norm,
                        target_marginal=jnp.asarray(model_marg[tgt].mean(0), jnp.float32),
                        exact_target_marginal=jnp.asarray(p_t, jnp.float32), exact_probs=exact_probs,
                        token_classes=token_classes, mask=jnp.asarray(src))
                    row["methods"][method] = {k: np.asarray(v).tolist() for k, v in res._asdict().items()
                                              if k != "scales"}
                pairs.append(row)
    summary = summarize(pairs, config)
    return dict(regime=regime, train_seconds=train_s, excess_loss_pct=float(ev.excess_pct),
                excess_last_pct=float(ev.excess_last_pct), probe_r2=r2, activation_r2=additivity,
                other_factor_s0_share=other_s0,
                factor_swap_symmetric=sfpjax.factor_swap_symmetric(process, dims, vocab),
                model_config=dataclasses.asdict(model_cfg),
                p_mismatched=config.p_mismatched if regime == "semi" else None,
                pairs=pairs, summary=summary)


def _mean(rows, method, key):
    vals = np.array([r["methods"][method][key] for r in rows], np.float64)
    return np.nanmean(vals, 0).tolist() if len(vals) else [float("nan")] * 0


def summarize(pairs, config):
    out = {}
    for method in METHODS:
        m = {}
        for key in ("kl_target", "kl_steered", "kl_unsteered", "kl_target_exact", "kl_unsteered_exact"):
            m[key] = _mean(pairs, method, key)
            for f in (0, 1):
                m[f"{key}_factor{f}"] = _mean([r for r in pairs if r["factor"] == f], method, key)
        st, un = np.array(m["kl_steered"]), np.array(m["kl_unsteered"])
        m["specificity"] = np.where(un > 0, st / np.where(un > 0, un, 1), np.inf).tolist()
        for block in ("P10", "P01"):
            rows = [r for r in pairs if r["block"] == block]
            for key in ("target_mass", "allowed_mass", "forbidden_mass"):
                m[f"{key}_{block}"] = _mean(rows, method, key) if rows else []
        out[method] = m
    return out


def _fmt(x):
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3g}"


def _sections() -> dict[str, str]:
    with open(TEMPLATE) as f:
        text = f.read()
    parts = text.split("\n@@ ")[1:]
    # The newline that ends a section is the one its "@@" line split off.
    return {p.split("\n", 1)[0].strip(): p.split("\n", 1)[1] + "\n" for p in parts}


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _seed(table, sc, j):
    return f" [{table[sc][j]:.3f}]" if sc in table else ""


def report(results, config):
    sec = _sections()
    scales = list(config.scales)
    i0 = scales.index(0.0) if 0.0 in scales else None
    i1 = scales.index(1.0) if 1.0 in scales else len(scales) // 2
    out = [sec["header"].format(config=json.dumps(dataclasses.asdict(config)))]
    for name, res in results["regimes"].items():
        summ = res["summary"]
        s = summ["centroid"]
        r2 = res["activation_r2"]
        out.append(sec["regime"].format(
            name=name, train_seconds=f"{res['train_seconds']:.1f}", excess_pct=f"{res['excess_loss_pct']:.3f}",
            excess_last_pct=f"{res['excess_last_pct']:.3f}",
            probe_r2=", ".join(f"{k} {v:.4f}" for k, v in res["probe_r2"].items()), site=SITE,
            r2_direct_sum=f"{r2['direct_sum']:.4f}", r2_joint=f"{r2['joint']:.4f}", n_pairs=len(res["pairs"]),
            pairs=", ".join(f"f{r['factor']} {r['source']}->{r['target']} n={r['n_source']}" for r in res["pairs"])))
        if name == "factored":
            rows = [(sc, f"{_fmt(s['kl_target'][i])}{_seed(SEED_TABLE1, sc, 0)}",
                     f"{_fmt(s['kl_steered'][i])}{_seed(SEED_TABLE1, sc, 1)}",
                     f"{_fmt(s['kl_unsteered'][i])}{_seed(SEED_TABLE1, sc, 2)}", _fmt(s["kl_target_exact"][i]))
                    for i, sc in enumerate(scales)]
            out.append(sec["table1"].format(table=_table(
                ("scale", "KL(target-model ‖ steered)", "KL(steered factor)", "KL(unsteered factor)",
                 "KL(exact target ‖ steered)"), rows)))
            if i0 is not None and res["pairs"]:
                t0 = [r["methods"]["centroid"]["kl_target"][i0] for r in res["pairs"]]
                out.append(sec["magnitudes"].format(t0_min=_fmt(min(t0)), t0_max=_fmt(max(t0))))
            ln, norm = summ["centroid-ln"], summ["centroid-norm"]
            out.append(sec["factored"].format(
                site=SITE, ln_site=LN_SITE, scale=scales[i1], norm_spill=_fmt(norm["kl_unsteered"][i1]),
                centroid_spill=_fmt(s["kl_unsteered"][i1]), ln_spill=_fmt(ln["kl_unsteered"][i1]),
                ln_specificity=_fmt(ln["specificity"][i1]), centroid_specificity=_fmt(s["specificity"][i1]),
                r2_direct_sum=f"{r2['direct_sum']:.3f}", r2_joint=f"{r2['joint']:.3f}",
                generative_spill=_fmt(summ["belief-generative"]["kl_unsteered"][i1])))
        if name == "semi":
            q = res.get("p_mismatched") or 0.0
            prior = ("prior mass only on the matched blocks P00 and P11" if q == 0 else
                     f"prior mass {q} on the mismatched blocks P01 and P10 and the rest on P00 and P11")
            f0, f1 = s["kl_unsteered_factor0"][i1], s["kl_unsteered_factor1"][i1]
            s1 = [v for k, v in res.get("other_factor_s0_share", {}).items() if not k.endswith("S0")]

            def g(k, i):
                return _fmt(s[k][i]) if s[k] else "—"

            spill = [(sc, _fmt(s["kl_steered_factor0"][i]), _fmt(s["kl_unsteered_factor0"][i]),
                      _fmt(s["kl_steered_factor1"][i]), _fmt(s["kl_unsteered_factor1"][i]))
                     for i, sc in enumerate(scales)]
            t2 = [(sc, f"{g('forbidden_mass_P10', i)}{_seed(SEED_TABLE2, sc, 0)}",
                   f"{g('forbidden_mass_P01', i)}{_seed(SEED_TABLE2, sc, 1)}",
                   f"{g('target_mass_P10', i)}{_seed(SEED_TABLE2, sc, 2)}",
                   f"{g('target_mass_P01', i)}{_seed(SEED_TABLE2, sc, 3)}",
                   g("allowed_mass_P10", i), g("allowed_mass_P01", i)) for i, sc in enumerate(scales)]
            out.append(sec["semi"].format(
                prior=prior, symmetric=res.get("factor_swap_symmetric"), scale=scales[i1], spill_f0=_fmt(f0),
                spill_f1=_fmt(f1), spill_ratio=_fmt(max(f0, f1) / max(min(f0, f1), 1e-30)),
                max_other_s0=_fmt(max(s1) if s1 else float("nan")), forbidden_p10=g("forbidden_mass_P10", i1),
                spillover_table=_table(("scale", "steer f0: steered", "steer f0: spillover", "steer f1: steered",
                                        "steer f1: spillover"), spill),
                table2=_table(("scale", "forbidden P10", "forbidden P01", "target-class P10", "target-class P01",
                               "allowed-not-target P10", "allowed-not-target P01"), t2)))
        methods = [(m, _fmt(summ[m]["kl_target"][i1]), _fmt(summ[m]["kl_target_exact"][i1]),
                    _fmt(summ[m]["kl_steered"][i1]), _fmt(summ[m]["kl_unsteered"][i1]),
                    _fmt(summ[m]["specificity"][i1]), _fmt(summ[m]["kl_unsteered_exact"][i1])) for m in METHODS]
        by_scale = [(sc, *[v for m in METHODS for v in (_fmt(summ[m]["kl_steered"][i]),
                                                          _fmt(summ[m]["kl_unsteered"][i]))])
                    for i, sc in enumerate(scales)]
        out.append(sec["methods"].format(
            scale=scales[i1],
            methods_table=_table(("method", "KL(target-model ‖ steered)", "KL(exact target ‖ steered)", "steered",
                                  "unsteered", "specificity", "unsteered vs exact"), methods),
            by_scale_table=_table(("scale", *[f"{m}: {w}" for m in METHODS for w in ("steered", "unsteered")]),
                                  by_scale)))
    out.append(sec["footer"].format(seconds=f"{results['seconds']:.1f}", device=results["device"]))
    return "".join(out)


def plots(results, config):
    x = np.asarray(config.scales)
    colors = sfpjax.plots.series_colors(METHODS)
    for name, res in results["regimes"].items():
        for f in (0, 1):
            panels = {
                method: {
                    "steered factor": np.maximum(np.asarray(res["summary"][method][f"kl_steered_factor{f}"], np.float64), 1e-8),
                    "other factor": np.maximum(np.asarray(res["summary"][method][f"kl_unsteered_factor{f}"], np.float64), 1e-8),
                }
                for method in METHODS
            }
            sfpjax.plots.plot_panels(x, panels, os.path.join(config.out, f"kl_{name}_factor{f}.png"), "steering scale",
                                     "KL (nats, floored at 1e-8)", colors=colors, logy=True,
                                     title=f"{name}: steering factor {f}, effect and spillover per method")
        if name == "semi":
            panels = {method: {block: np.asarray(res["summary"][method][f"forbidden_mass_{block}"], np.float64)
                               for block in ("P10", "P01") if res["summary"][method][f"forbidden_mass_{block}"]}
                      for method in METHODS}
            panels = {k: v for k, v in panels.items() if v}
            if panels:
                sfpjax.plots.plot_panels(x, panels, os.path.join(config.out, "forbidden_mass_semi.png"),
                                         "steering scale", "forbidden-token mass", colors=colors,
                                         title="semi-factored: partition violation per method")


def main(argv=None):
    config = parse_config(Config, argv, presets=PRESETS, description=__doc__)
    os.makedirs(config.out, exist_ok=True)
    with open(os.path.join(config.out, "config.json"), "w") as f:
        f.write(config_json(config))
    t0 = time.perf_counter()
    key = jax.random.key(config.seed)
    results = {"config": dataclasses.asdict(config), "device": str(jax.devices()[0]), "regimes": {}}
    for i, regime in enumerate(config.regimes):
        results["regimes"][regime] = run_regime(regime, config, jax.random.fold_in(key, i))
        print(f"{regime}: done after {time.perf_counter() - t0:.1f}s", flush=True)
    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(config.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = report(results, config)
    with open(os.path.join(config.out, "report.md"), "w") as f:
        f.write(text)
    plots(results, config)
    print(text)
    return results


if __name__ == "__main__":
    main()
