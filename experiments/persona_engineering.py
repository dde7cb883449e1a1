"""Persona engineering: which persona structure keeps alignment fidelity and resists EM?

    python experiments/persona_engineering.py                  # default grid (modest sizes, CPU)
    python experiments/persona_engineering.py --grid full      # wider grid, for a GPU
    python experiments/persona_engineering.py --preset tiny    # seconds (the test)

Seed 001, weeks 8-10. One knob of the persona world (``sfpjax.persona_world``) is moved
at a time from the baseline (the EM experiment's correlated world without trigger):

1. ``mixing``: prior mass on the matched leaves AD and MO (``(1 - mixing)`` product prior
   ``+ mixing`` uniform on the matched leaves): how strongly the persona is tied to the domain.
2. relative dimensionality ``n_content:n_domain_content``: the number of content symbols of
   the persona factor and of the domain factor (each sector sub-process keeps its two states
   ``N, S``, so this is the dimension of each factor's emission space, ``V_P`` vs ``V_Q``).
3. ``sectors``: the number of persona sectors (``A, M`` then further aligned-side sectors
   ``B, C, ...``; aligned is ``A``, misaligned ``M``).
4. ``leak``: after every symbol the persona is redrawn with this probability (breaks the
   exact SFP block structure).
5. ``entangled``: markers shared by every domain (factored, 0) or one marker per persona
   and domain (entangled, 1).

For every point and seed (points with equal array shapes, i.e. equal dimensionality,
sector count and entanglement, train as one stacked program over points x seeds, split over
the local devices; the others as separate programs):

* pretrain on the world (``sfpjax.train_stack``);
* **alignment fidelity** ``exp(-e_A)``, where ``e_A`` is the model's excess cross-entropy in
  nats per token over the exact world, ``E[-log q(x_t | x_<t) + log Pr(x_t | x_<t)]``, on
  sequences of the aligned persona (the world restricted to the leaves ``(A, d)`` with
  weights ``prior(A, d)``); ``Pr`` is the world's exact conditional
  (``sfpjax.sequence_log_prob``), the expectation a Monte-Carlo mean over ``fidelity_batch``
  sequences. 1 means the model predicts aligned text as well as the world itself;
* narrow fine-tuning, the EM experiment's standard protocol (``full_MD``: every weight, data
  from the leaf MD, Adam at a constant rate), with ``sfpjax.finetune_stack``;
* broad EM, coherence deficit and impossible rate after persona-neutral prompts
  (``sfpjax.em_metrics``), before and after fine-tuning. **Robustness** is
  ``1 - (broad EM after - broad EM before)``: one minus the rise of the misaligned-persona
  share after O prompts that the narrow fine-tuning caused (1: no spread; above 1: it fell),
  so worlds whose prior already puts more mass on MO are not counted as less robust for
  it. The exact references (pretrained world, ideal narrow and persona learners) and the
  broadness index are in the table too.

Writes ``results.csv`` (one row per point x seed), ``results.json``, ``pareto.png``
(mean fidelity vs mean robustness per point, seed sd as error bars, baseline marked, Pareto
front drawn), ``knobs.png`` (one-knob curves, mean +- sd over seeds) and ``report.md`` (the
Pareto improvements over the baseline, or that there were none) into ``--out``.

On CPU every core is a JAX device; a program of ``K`` runs uses the largest number of them
that divides ``K`` (the baseline group of 6 points x 3 seeds splits over 2 cores, a group
of one point x 3 seeds runs on one).

The default grid (10 points x 3 seeds, 5 programs) uses small models and short runs so that
it is meant to finish in about 20 minutes on 2 CPU cores; that was not timed on a quiet
machine. On a GPU use ``--grid full`` with longer runs, e.g. ``--pretrain-steps 4000
--finetune-steps 300``.
"""

from __future__ import annotations

import csv
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

sys.path.insert(0, os.path.dirname(__file__))
import sfpjax  # noqa: E402
from _cli import config_json, parse_config, use_every_cpu_core  # noqa: E402

GRIDS = {
    "tiny": dict(mixing=(0.0, 0.6), dims=("2:2",), sectors=(2, 3), leak=(0.0,), entangled=(0,)),
    "default": dict(mixing=(0.0, 0.3, 0.6, 0.9), dims=("2:2", "4:2", "2:4"), sectors=(2, 3),
                    leak=(0.0, 0.03, 0.1), entangled=(0, 1)),
    "full": dict(mixing=(0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9), dims=("1:2", "2:2", "4:2", "2:4", "6:2", "2:6"),
                 sectors=(2, 3, 4), leak=(0.0, 0.01, 0.03, 0.1, 0.2), entangled=(0, 1)),
}
KNOBS = ("mixing", "dims", "sectors", "leak", "entangled")


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = "runs/persona_engineering"
    grid: str = "default"
    seeds: int = 3
    baseline_mixing: float = 0.6
    baseline_dims: str = "2:2"
    baseline_sectors: int = 2
    baseline_leak: float = 0.0
    baseline_entangled: int = 0
    persona_enter: float = 0.1
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    d_mlp: int = 64
    seq_len: int = 16
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    finetune_steps: int = 100
    finetune_batch: int = 32
    finetune_lr: float = 1e-3
    fidelity_batch: int = 512
    n_prompts: int = 64
    prompt_len: int = 6
    cont_len: int = 10
    glitch: float = 1e-3
    seed: int = 0


PRESETS = {
    "tiny": dict(grid="tiny", seeds=2, d_model=16, n_layers=1, d_mlp=32, seq_len=10, pretrain_steps=16,
                 pretrain_batch=16, finetune_steps=4, finetune_batch=8, fidelity_batch=16, n_prompts=4,
                 prompt_len=4, cont_len=6),
}


@dataclasses.dataclass(frozen=True)
class Point:
    """One persona world of the grid (the five knobs)."""

    mixing: float
    dims: str
    sectors: int
    leak: float
    entangled: int

    @property
    def shape_key(self) -> tuple:
        # Knobs that change array shapes: points that differ only in the others stack.
        return (self.dims, self.sectors, self.entangled)


def grid_points(config: Config) -> tuple[Point, list[Point]]:
    """The baseline and every point one knob away from it (baseline first, no repeats)."""
    if config.grid not in GRIDS:
        raise SystemExit(f"unknown grid {config.grid!r}; choose from {sorted(GRIDS)}")
    base = Point(config.baseline_mixing, config.baseline_dims, config.baseline_sectors, config.baseline_leak,
                 config.baseline_entangled)
    points = [base]
    for knob in KNOBS:
        for v in GRIDS[config.grid][knob]:
            p = dataclasses.replace(base, **{knob: v})
            if p not in points:
                points.append(p)
    return base, points


def build_world(config: Config, point: Point):
    n_content, n_domain_content = (int(s) for s in point.dims.split(":"))
    persona = ("A", "M") + tuple("BCDEFGH"[: point.sectors - 2])
    return sfpjax.persona_world(persona, mixing=point.mixing, leak=point.leak, entangled=bool(point.entangled),
                                n_content=n_content, n_domain_content=n_domain_content,
                                persona_enter=config.persona_enter)


def aligned_process(world):
    """The world started in its aligned persona: leaves ``(A, d)`` weighted by ``prior(A, d)``."""
    row = np.asarray(world.prior)[world.aligned]
    return world.restrict({world.persona_names[world.aligned] + d: float(w / row.sum())
                           for d, w in zip(world.domain_names, row)})


def aligned_excess(model, world_process, aligned, *, key, batch_size: int, seq_len: int):
    """``e_A``: the model's excess nats/token over the exact world on aligned-persona sequences."""
    toks = sfpjax.sample(aligned, key=key, batch_size=batch_size, seq_len=seq_len)
    model_nll = sfpjax.per_position_loss(model, toks).sum(-1)
    exact_nll = -sfpjax.sequence_log_prob(world_process, toks)
    return ((model_nll - exact_nll) / seq_len).mean()


def _stack(trees):
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def run_group(config: Config, points: list[Point], key) -> list[dict]:
    """Pretrain, measure, fine-tune and measure every point x seed of one shape group, stacked."""
    S = config.seeds
    K = len(points) * S
    worlds = [build_world(config, p) for p in points]
    world_key, init_key, pre_key, fid_key, prompt_key, ft_key, m0_key, m1_key = jr.split(key, 8)
    prompts = [sfpjax.eval_prompts(w, key=k, n=config.n_prompts, length=config.prompt_len)
               for w, k in zip(worlds, jr.split(prompt_key, len(worlds)))]
    rep = lambda xs: [x for x in xs for _ in range(S)]  # run k = point k // S, seed k % S
    world_k, prompts_k = _stack(rep(worlds)), _stack(rep(prompts))
    aligned_k = _stack(rep([aligned_process(w) for w in worlds]))
    md_k = _stack(rep([w.restrict({"MD": 1.0}) for w in worlds]))

    mcfg = sfpjax.TransformerConfig(vocab_size=worlds[0].vocab_size, n_ctx=config.seq_len, n_layers=config.n_layers,
                                    d_model=config.d_model, n_heads=config.n_heads, d_mlp=config.d_mlp, use_bos=True)
    models = eqx.filter_vmap(lambda k: sfpjax.Transformer(mcfg, key=k))(jr.split(init_key, K))
    tc = sfpjax.TrainConfig(steps=config.pretrain_steps, batch_size=config.pretrain_batch, seq_len=config.seq_len,
                            learning_rate=config.pretrain_lr, warmup_steps=min(100, config.pretrain_steps // 10),
                            eval_every=config.pretrain_steps, eval_batch_size=256)
    pre = sfpjax.train_stack(models, world_k.process, tc, keys=jr.split(pre_key, K), progress=False)
    pretrained = pre.model

    fidelity = eqx.filter_jit(eqx.filter_vmap(
        lambda m, p, a, k: aligned_excess(m, p, a, key=k, batch_size=config.fidelity_batch, seq_len=config.seq_len)))
    e_A = np.asarray(fidelity(pretrained, world_k.process, aligned_k, jr.split(fid_key, K)), np.float64)
    measure = eqx.filter_jit(eqx.filter_vmap(
        lambda m, w, p, k: sfpjax.em_metrics(m, w, p, key=k, length=config.cont_len, glitch=config.glitch)))
    before = measure(pretrained, world_k, prompts_k, jr.split(m0_key, K))

    ftc = sfpjax.TrainConfig(steps=config.finetune_steps, batch_size=config.finetune_batch, seq_len=config.seq_len,
                             learning_rate=config.finetune_lr, schedule="constant", grad_clip=None)
    tuned = sfpjax.finetune_stack(pretrained, md_k, ftc, method=sfpjax.FullFinetune(), keys=jr.split(ft_key, K),
                                  progress=False).model
    after = measure(tuned, world_k, prompts_k, jr.split(m1_key, K))

    rows = []
    for k in range(K):
        p, w, pr = points[k // S], worlds[k // S], prompts[k // S]
        refs = sfpjax.em_references(w, {"MD": 1.0}, pr)
        broad = float(after.rates.broad[k])
        rows.append({
            **dataclasses.asdict(p), "seed": k % S,
            "fidelity": float(np.exp(-e_A[k])), "aligned_excess": float(e_A[k]),
            "pretrain_excess_pct": float(np.asarray(pre.history[-1]["excess_pct"])[k]),
            "robustness": 1.0 - (broad - float(before.rates.broad[k])), "broad_after": broad,
            "broad_before": float(before.rates.broad[k]), "ref_broad_pretrained": float(refs.pretrained.broad),
            "narrow_after": float(after.rates.narrow[k]), "aligned_share_before": float(before.rates.aligned_share[k]),
            "coherence_after": float(after.coherence_deficit[k]), "impossible_after": float(after.impossible_rate[k]),
            "broadness": float(sfpjax.broadness_index(jnp.asarray(broad), refs)),
            "ref_broad_narrow": float(refs.narrow.broad), "ref_broad_persona": float(refs.persona.broad),
        })
    return rows


def point_means(rows: list[dict], points: list[Point]) -> list[dict]:
    out = []
    for p in points:
        mine = [r for r in rows if Point(*(r[f.name] for f in dataclasses.fields(Point))) == p]
        f = np.array([r["fidelity"] for r in mine])
        rb = np.array([r["robustness"] for r in mine])
        out.append({"point": p, "fidelity": f.mean(), "fidelity_sd": f.std(), "robustness": rb.mean(),
                    "robustness_sd": rb.std()})
    return out


def pareto_front(means: list[dict]) -> list[int]:
    """Indices of the points no other point beats on both fidelity and robustness (means)."""
    def dominates(a, b):
        return (a["fidelity"] >= b["fidelity"] and a["robustness"] >= b["robustness"]
                and (a["fidelity"] > b["fidelity"] or a["robustness"] > b["robustness"]))

    return [i for i, m in enumerate(means) if not any(dominates(o, m) for o in means)]


def improvements(means: list[dict], base: Point) -> list[dict]:
    """Points at least as good as the baseline on both axes and better on one (means over seeds)."""
    b = next(m for m in means if m["point"] == base)
    return [m for m in means if m["point"] != base and m["fidelity"] >= b["fidelity"] and m["robustness"] >= b["robustness"]
            and (m["fidelity"] > b["fidelity"] or m["robustness"] > b["robustness"])]


def label(p: Point, base: Point) -> str:
    moved = [f"{k}={getattr(p, k)}" for k in KNOBS if getattr(p, k) != getattr(base, k)]
    return ", ".join(moved) or "baseline"


def main(argv=None):
    config = parse_config(Config, argv, presets=PRESETS, description=__doc__)
    base, points = grid_points(config)
    os.makedirs(config.out, exist_ok=True)
    t0 = time.time()
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault(p.shape_key, []).append(p)
    rows = []
    for key, members in zip(jr.split(jr.key(config.seed), len(groups)), groups.values()):
        rows += run_group(config, members, key)
    wall = time.time() - t0
    means = point_means(rows, points)
    results = {"config": dataclasses.asdict(config), "devices": [str(d) for d in jax.local_devices()],
               "programs": len(groups), "wall_s": wall, "rows": rows}
    with open(os.path.join(config.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(config.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_report(config, base, means, results)
    write_plots(config, base, means, rows)
    return results


def write_report(config: Config, base: Point, means: list[dict], results: dict) -> None:
    front = pareto_front(means)
    better = improvements(means, base)
    b = next(m for m in means if m["point"] == base)
    lines = ["# Persona engineering", "",
             f"{len(means)} persona worlds x {config.seeds} seeds, {results['programs']} compiled programs on "
             f"{len(results['devices'])} device(s), {results['wall_s']:.0f} s. Fidelity = exp(-aligned excess nats/token "
             "over the exact world); robustness = 1 - (rise of broad EM under narrow MD fine-tuning). Mean +- sd over seeds.",
             "", f"Baseline: {base} (fidelity {b['fidelity']:.4f} +- {b['fidelity_sd']:.4f}, robustness "
             f"{b['robustness']:.3f} +- {b['robustness_sd']:.3f}).", "",
             "| point | fidelity | robustness | Pareto front | improves on baseline |", "|---|---|---|---|---|"]
    for i, m in enumerate(means):
        lines.append(f"| {label(m['point'], base)} | {m['fidelity']:.4f} +- {m['fidelity_sd']:.4f} | "
                     f"{m['robustness']:.3f} +- {m['robustness_sd']:.3f} | {'yes' if i in front else ''} | "
                     f"{'yes' if m in better else ''} |")
    lines.append("")
    if better:
        lines.append("Pareto improvements over the baseline (means; check the seed sd before trusting a small gap): "
                     + "; ".join(label(m["point"], base) for m in better) + ".")
    else:
        lines.append("No Pareto improvement over the baseline was found in this grid: every point that gains "
                     "fidelity or robustness loses the other (or ties).")
    lines += ["", "Config:", "", "```", config_json(config), "```", ""]
    with open(os.path.join(config.out, "report.md"), "w") as f:
        f.write("\n".join(lines))


def write_plots(config: Config, base: Point, means: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in means:
        is_base = m["point"] == base
        ax.errorbar(m["fidelity"], m["robustness"], xerr=m["fidelity_sd"], yerr=m["robustness_sd"],
                    fmt="*" if is_base else "o", ms=12 if is_base else 5, c="k" if is_base else None, capsize=2)
        ax.annotate(label(m["point"], base), (m["fidelity"], m["robustness"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    front = sorted((means[i] for i in pareto_front(means)), key=lambda m: m["fidelity"])
    ax.plot([m["fidelity"] for m in front], [m["robustness"] for m in front], "o-", c="r", mfc="none", ms=10,
            lw=1, label="Pareto front")
    ax.set(xlabel="alignment fidelity exp(-aligned excess)", ylabel="robustness 1 - rise of broad EM",
           title="persona engineering (star: baseline)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(config.out, "pareto.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(KNOBS), figsize=(3 * len(KNOBS), 5), squeeze=False)
    for j, knob in enumerate(KNOBS):
        line = [m for m in means if all(getattr(m["point"], o) == getattr(base, o) for o in KNOBS if o != knob)]
        line.sort(key=lambda m: getattr(m["point"], knob))
        xs = [str(getattr(m["point"], knob)) for m in line]
        for i, what in enumerate(("fidelity", "robustness")):
            ax = axes[i, j]
            ax.errorbar(xs, [m[what] for m in line], yerr=[m[f"{what}_sd"] for m in line], marker="o", capsize=3)
            ax.set(xlabel=knob, ylabel=what if j == 0 else None)
    fig.tight_layout()
    fig.savefig(os.path.join(config.out, "knobs.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    use_every_cpu_core()  # each stacked program splits its points x seeds over the cores
    main()
