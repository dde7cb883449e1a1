"""Policy-gradient post-training: REINFORCE with group baselines and a KL penalty to a reference.

Every step draws ``B`` prompts ``x = x_1 .. x_P`` (from a process or a fixed array), extends
each ``G`` times with ``N`` tokens ``y`` drawn from the policy ``pi_theta`` (see
``sfpjax.generate``), scores each completion with a reward ``r(x, y)`` and takes one
optimizer step on the KL-regularized objective

    J(theta) = E_x E_{y ~ pi_theta(.|x)} [ r(x, y) ] - beta KL(pi_theta(.|x) || pi_0(.|x)),

whose maximizer is the exponential tilt ``pi*(y|x) = pi_0(y|x) exp(r(x, y) / beta) / Z(x)``.
The KL enters the return of each completion, ``R = r - beta sum_n log(pi_theta / pi_0)(y_n)``
(a stop-gradient value), so ``E[(R - b) grad log pi_theta(y|x)] = grad J`` for any baseline
``b`` that does not depend on ``y`` (the score has mean zero). Advantages ``A`` are formed
within each group of ``G`` completions of one prompt:

* ``"group"`` (GRPO): ``A = (R - mean_G R) / (std_G R + 1e-4)``; the tilt is still a
  stationary point, since there ``R = beta log Z(x)`` is the same for every completion;
* ``"baseline"``: the leave-one-out baseline ``A_i = R_i - mean_{j != i} R_j`` (an unbiased
  estimate of ``grad J``);
* ``"none"``: ``A = R`` (plain REINFORCE; ``G = 1`` allowed).

The loss is ``-mean(A * sum_n log pi_theta(y_n | x, y_<n))``. Metrics per step: the mean
reward, the KL ``sum_n KL(pi_theta(.|h_n) || pi_0(.|h_n))`` summed exactly over the alphabet
at each drawn history ``h_n`` (averaged over completions: an unbiased estimate of the sequence
KL), the mean per-token entropy of the policy, the mean return and the loss.

Determinism: step ``s`` uses ``fold_in(key, s)``, so a run is a function of its key and a
resumed run (from a checkpoint written with ``sfpjax.save_checkpoint``) repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Key, PRNGKeyArray, UInt32

from ..model._generate import completion_log_probs, sample_completions
from .._io import sha256_tree
from ._prompts import ArrayPrompts, PromptBatch, PromptSource
from ._rundir import key_data, open_run_dir, to_json
from ._checkpoint import restore_checkpoint, save_checkpoint
from ._step import init_opt_state, trainable_mask

__all__ = [
    "RLConfig",
    "RLResult",
    "make_rl_step",
    "rl_train",
    "rl_train_stack",
]

_ADVANTAGES = ("group", "baseline", "none")
_BOOKKEEPING = ("log_every", "checkpoint_every", "keep_checkpoints", "steps_per_call")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Hyperparameters of a policy-gradient run.

    Args:
        steps: optimizer steps.
        prompts_per_step: ``B`` prompts per step.
        group_size: ``G`` completions per prompt.
        n_new: ``N`` tokens per completion.
        learning_rate: Adam learning rate (constant).
        kl_weight: ``beta``, the weight of the KL penalty to the reference model (``>= 0``).
        temperature: ``tau``; the policy is ``softmax(logits / tau)`` (also for the reference).
        advantage: ``"group"``, ``"baseline"`` or ``"none"`` (see the module docstring).
        grad_clip: clip the global gradient norm to this; ``None`` for no clipping.
        log_every: keep the metrics of every this many steps (and the last).
        checkpoint_every: with a ``run_dir``, write a checkpoint every this many steps (and at
            the end); 0 writes only the final one.
        keep_checkpoints: keep the newest this many; ``None`` keeps all.
        steps_per_call: steps inside one compiled ``lax.scan`` (same updates, less overhead).

    >>> import sfpjax
    >>> sfpjax.RLConfig(steps=10, prompts_per_step=8, group_size=4, n_new=2).advantage
    'group'
    """

    steps: int
    prompts_per_step: int
    group_size: int
    n_new: int
    learning_rate: float = 1e-3
    kl_weight: float = 0.1
    temperature: float = 1.0
    advantage: str = "group"
    grad_clip: float | None = 1.0
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int | None = 3
    steps_per_call: int = 1

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "group_size", "n_new", "log_every", "steps_per_call"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RLConfig.{name} must be an int >= 1, got {v!r}.")
        v = self.checkpoint_every
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"RLConfig.checkpoint_every must be an int >= 0, got {v!r}.")
        if self.keep_checkpoints is not None and (not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1):
            raise ValueError(f"RLConfig.keep_checkpoints must be None or an int >= 1, got {self.keep_checkpoints!r}.")
        for name, lo, open_lo in (("learning_rate", 0.0, True), ("kl_weight", 0.0, False), ("temperature", 0.0, True)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (v <= lo if open_lo else v < lo):
                raise ValueError(f"RLConfig.{name} must be a finite number {'>' if open_lo else '>='} {lo}, got {v!r}.")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"RLConfig.grad_clip must be None or a positive number, got {self.grad_clip!r}.")
        if self.advantage not in _ADVANTAGES:
            raise ValueError(f"RLConfig.advantage must be one of {_ADVANTAGES}, got {self.advantage!r}.")
        if self.advantage != "none" and self.group_size < 2:
            raise ValueError(
                f"advantage={self.advantage!r} compares completions within a group, which needs "
                f"group_size >= 2 (got {self.group_size}); raise group_size or use advantage='none'."
            )


def _optimizer(cfg: RLConfig) -> optax.GradientTransformation:
    adam = optax.adam(cfg.learning_rate)
    return adam if cfg.grad_clip is None else optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam)


def _partition(model, trainable):
    # The same selection as init_opt_state makes: trainable floating-point arrays.
    return eqx.partition(model, trainable_mask(model, trainable))


def _advantages(R: Float[Array, "B G"], mode: str) -> Float[Array, "B G"]:
    if mode == "none":
        return R
    G = R.shape[1]
    mean = R.mean(axis=1, keepdims=True)
    if mode == "baseline":
        return (R - mean) * (G / (G - 1))
    std = jnp.sqrt(jnp.mean((R - mean) ** 2, axis=1, keepdims=True))
    return (R - mean) / (std + 1e-4)


class _Spec(NamedTuple):
    optimizer: Any
    trainable: Any
    cfg: RLConfig
    stacked: bool
    axes: tuple  # vmap axes of (reference, source, reward)


def _single(spec: _Spec, model, opt_state, reference, source, reward, kl_weight, key):
    cfg = spec.cfg
    B, G, N = cfg.prompts_per_step, cfg.group_size, cfg.n_new
    tau = jnp.float32(cfg.temperature)
    prompt_key, draw_key = jr.split(key)
    batch = source.prompts(prompt_key, B)
    rep = jax.tree.map(lambda x: jnp.repeat(x, G, axis=0), batch)
    completions = sample_completions(model, rep.tokens, key=draw_key, n_new=N, temperature=tau)
    seqs = jnp.concatenate([rep.tokens, completions], axis=1)
    P = rep.tokens.shape[1]
    info = PromptBatch(rep.tokens, rep.states, rep.beliefs)
    r = jax.vmap(lambda x, y, s, b: reward(x, y, PromptBatch(x, s, b)))(
        info.tokens, completions, info.states, info.beliefs
    )
    if r.shape != (B * G,):
        raise ValueError(
            f"the reward must return one scalar per completion: reward(prompt (P,), completion (N,), "
            f"info) -> shape (), vmapped to ({B * G},); got shape {r.shape[1:]} per completion."
        )
    r = r.astype(jnp.float32)
    ref_lp = jax.lax.stop_gradient(completion_log_probs(reference, seqs, prompt_len=P, temperature=tau))
    ref_taken = jnp.take_along_axis(ref_lp, completions[..., None], axis=-1)[..., 0]
    params, frozen = _partition(model, spec.trainable)
    beta = jnp.asarray(kl_weight, jnp.float32)

    def objective(p):
        lp = completion_log_probs(eqx.combine(p, frozen), seqs, prompt_len=P, temperature=tau)
        taken = jnp.take_along_axis(lp, completions[..., None], axis=-1)[..., 0]
        lp_sg = jax.lax.stop_gradient(lp)
        log_ratio = (jax.lax.stop_gradient(taken) - ref_taken).sum(-1)
        ret = r - beta * log_ratio
        adv = _advantages(ret.reshape(B, G), cfg.advantage).reshape(-1)
        loss = -jnp.mean(adv * taken.sum(-1))
        probs = jnp.exp(lp_sg)
        kl = jnp.sum(probs * (lp_sg - ref_lp), axis=(-1, -2)).mean()
        entropy = -jnp.sum(probs * lp_sg, axis=-1).mean()
        return loss, dict(loss=loss, reward=r.mean(), kl=kl, entropy=entropy, ret=ret.mean())

    (_, metrics), grads = eqx.filter_value_and_grad(objective, has_aux=True)(params)
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = spec.optimizer.update(grads, opt_state, params)
    params = eqx.apply_updates(params, updates)
    return eqx.combine(params, frozen), opt_state, metrics


def _one(spec, model, opt_state, reference, source, reward, kl_weight, key):
    if spec.stacked:
        ra, sa, wa = spec.axes
        body = eqx.filter_vmap(
            lambda m, o, ref, src, rw, kw, k: _single(spec, m, o, ref, src, rw, kw, k),
            in_axes=(0, 0, ra, sa, wa, 0, 0),
        )
        return body(model, opt_state, reference, source, reward, kl_weight, key)
    return _single(spec, model, opt_state, reference, source, reward, kl_weight, key)


@eqx.filter_jit(donate="all-except-first")
def _rl_step(data, model, opt_state):
    spec, reference, source, reward, kl_weight, key = data
    return _one(spec, model, opt_state, reference, source, reward, kl_weight, key)


@eqx.filter_jit(donate="all-except-first")
def _rl_steps(data, model, opt_state):
    spec, reference, source, reward, kl_weight, keys = data
    params, static = eqx.partition((model, opt_state), eqx.is_array)

    def body(carry, key):
        m, o = eqx.combine(carry, static)
        m, o, metrics = _one(spec, m, o, reference, source, reward, kl_weight, key)
        return eqx.filter((m, o), eqx.is_array), metrics

    params, metrics = jax.lax.scan(body, params, keys)
    model, opt_state = eqx.combine(params, static)
    return model, opt_state, metrics


def make_rl_step(
    cfg: RLConfig,
    *,
    optimizer: optax.GradientTransformation | None = None,
    trainable=None,
    stacked: bool = False,
    reference_stacked: bool = False,
    prompts_stacked: bool = False,
    reward_stacked: bool = False,
) -> Callable:
    """One jitted policy-gradient step: prompts, rollouts, rewards, advantages, update.

    Returns ``step(model, opt_state, reference, prompts, reward, kl_weight, key) -> (model,
    opt_state, metrics)`` (one ``eqx.filter_jit`` region; the model and optimizer state are
    donated, so the reference must not share their buffers) and ``step.many(..., keys)`` running one step per key in a ``lax.scan``, with
    metrics stacked over steps; ``step.init(model)`` is the optimizer state to start from
    (of each run, for a stack). ``metrics`` holds ``loss``, ``reward``, ``kl``, ``entropy``
    and ``ret`` (mean return); see the module docstring.

    Args:
        cfg: an :class:`RLConfig` (``kl_weight`` is passed to the step as an array instead,
            so a stack may use one weight per run).
        optimizer: Optax optimizer; default Adam at ``cfg.learning_rate`` with clipping.
        trainable: an Equinox filter of the parameters to update (e.g. the LoRA factors of
            a wrapped model); ``None`` updates every floating-point array.
        stacked: ``model``, ``opt_state``, ``kl_weight`` and ``key`` carry a leading axis of
            ``K`` runs, vmapped in the one compiled step.
        reference_stacked, prompts_stacked, reward_stacked: with ``stacked``, whether the
            reference model, the prompt source and the reward (a pytree, e.g. an
            ``eqx.Module`` with array fields) carry the ``K`` axis too, or are shared.

    >>> import jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=2, n_ctx=4, n_layers=1, d_model=16, d_mlp=32)
    >>> model = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> ref = sfpjax.Transformer(cfg, key=jr.key(0))  # the step donates model: keep a separate copy
    >>> rc = sfpjax.RLConfig(steps=1, prompts_per_step=4, group_size=2, n_new=2)
    >>> step = sfpjax.make_rl_step(rc)
    >>> state = step.init(model)
    >>> reward = lambda x, y, info: (y == 1).mean()
    >>> src = sfpjax.PromptSource(sfpjax.coin(), 2)
    >>> model, state, m = step(model, state, ref, src, reward, 0.1, jr.key(1))
    >>> sorted(m)
    ['entropy', 'kl', 'loss', 'ret', 'reward']
    """
    if not isinstance(cfg, RLConfig):
        raise ValueError(f"cfg must be an RLConfig, got {type(cfg).__name__}.")
    optimizer = _optimizer(cfg) if optimizer is None else optimizer
    axes = tuple(0 if (stacked and s) else None for s in (reference_stacked, prompts_stacked, reward_stacked))
    spec = _Spec(optimizer, trainable, cfg, bool(stacked), axes)

    def prep(model, reference, prompts, kl_weight):
        _check_models(model, reference, prompts, cfg, stacked, reference_stacked)
        kw = jnp.asarray(kl_weight, jnp.float32)
        return kw

    def step(model, opt_state, reference, prompts, reward, kl_weight, key):
        kw = prep(model, reference, prompts, kl_weight)
        return _rl_step((spec, reference, prompts, reward, kw, key), model, opt_state)

    def many(model, opt_state, reference, prompts, reward, kl_weight, keys):
        kw = prep(model, reference, prompts, kl_weight)
        return _rl_steps((spec, reference, prompts, reward, kw, keys), model, opt_state)

    def init(model):
        if stacked:
            return eqx.filter_vmap(lambda m: init_opt_state(optimizer, m, trainable=trainable))(model)
        return init_opt_state(optimizer, model, trainable=trainable)

    step.many = many
    step.optimizer = optimizer
    step.init = init
    return step


def _check_models(model, reference, prompts, cfg: RLConfig, stacked: bool, reference_stacked: bool) -> None:
    config = getattr(model, "config", None)
    rconfig = getattr(reference, "config", None)
    if config is None or rconfig is None:
        raise ValueError("the policy and the reference must carry a TransformerConfig as .config.")
    if rconfig.vocab_size != config.vocab_size:
        raise ValueError(
            f"the reference model has vocab_size={rconfig.vocab_size} but the policy has "
            f"vocab_size={config.vocab_size}; the KL penalty needs one alphabet. Use the pretrained "
            "model of the policy's process as the reference."
        )
    if rconfig.use_bos != config.use_bos:
        raise ValueError(f"the reference has use_bos={rconfig.use_bos}, the policy use_bos={config.use_bos}.")
    if not hasattr(prompts, "prompts"):
        raise ValueError(
            f"prompts must be a PromptSource or ArrayPrompts, got {type(prompts).__name__}; wrap a "
            "token array as sfpjax.ArrayPrompts(tokens)."
        )
    vocab = getattr(prompts, "vocab_size", None)
    if vocab is not None and vocab != config.vocab_size:
        raise ValueError(
            f"the prompt process emits {vocab} symbols but the model's vocab_size is {config.vocab_size}."
        )
    P = prompts.prompt_len
    if P < (0 if config.use_bos else 1):
        raise ValueError("without BOS the prompts need at least one token; use prompt_len >= 1 or a BOS model.")
    for what, c in (("policy", config), ("reference", rconfig)):
        if P + cfg.n_new > c.n_ctx:
            raise ValueError(
                f"prompt_len {P} + n_new {cfg.n_new} exceeds the {what}'s n_ctx={c.n_ctx}."
            )


class RLResult(NamedTuple):
    """What :func:`rl_train` returns: the final policy, optimizer state and metric rows."""

    model: Any
    opt_state: Any
    history: list[dict]


def _fingerprint(*trees) -> str:
    return sha256_tree(trees)


_fold_in_stack = jax.jit(jax.vmap(jr.fold_in, in_axes=(0, None)))


def _run(model, reference, prompts, reward, cfg, *, key, kl_weight, optimizer, trainable, run_dir,
         resume, progress, stacked, reference_stacked=False, prompts_stacked=False,
         reward_stacked=False) -> RLResult:
    step_fn = make_rl_step(
        cfg, optimizer=optimizer, trainable=trainable, stacked=stacked,
        reference_stacked=reference_stacked, prompts_stacked=prompts_stacked, reward_stacked=reward_stacked,
    )
    _check_models(model, reference, prompts, cfg, stacked, reference_stacked)
    opt_state = step_fn.init(model)
    kw = jnp.asarray(kl_weight, jnp.float32)
    fingerprint = _fingerprint(reference, prompts, reward, kw)

    def step_key(s):
        return _fold_in_stack(key, s) if stacked else jr.fold_in(key, s)

    model_config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(model_config):
        model_config = None
    start, rows, metrics_path = 0, [], None
    if run_dir is not None:
        run_dir, metrics_path, last = open_run_dir(run_dir, resume)
        if resume and last is not None:
            ck = restore_checkpoint(run_dir, model, opt_state, model_config, cfg, ignore_fields=_BOOKKEEPING)
            if not np.array_equal(key_data(ck.key), key_data(key)):
                raise ValueError(
                    f"the key differs from the key of the run in {run_dir}; resume with the same key."
                )
            if ck.metadata.get("extra", {}).get("fingerprint") != fingerprint:
                raise ValueError(
                    f"the reference model, prompts, reward arrays or KL weight differ from those of the "
                    f"run in {run_dir}; resume with the same ones or start a new run_dir."
                )
            model, opt_state, start = ck.model, ck.opt_state, ck.step
            if metrics_path.exists():
                rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
                rows = [r for r in rows if r["step"] <= start]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if start == 0:
        # The step donates its inputs; copy once so the caller's model stays usable.
        model = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not progress or None, dynamic_ncols=True, desc="rl")
    try:
        s = start
        while s < cfg.steps:
            stop = min(cfg.steps, (s // cfg.steps_per_call + 1) * cfg.steps_per_call)
            if run_dir is not None and cfg.checkpoint_every:
                stop = min(stop, (s // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
            if stop - s == 1:
                model, opt_state, m = step_fn(model, opt_state, reference, prompts, reward, kw, step_key(s))
                ms = jax.tree.map(lambda x: x[None], m)
            else:
                keys = jnp.stack([step_key(t) for t in range(s, stop)])
                model, opt_state, ms = step_fn.many(model, opt_state, reference, prompts, reward, kw, keys)
            ms = jax.device_get(ms)
            new = []
            for t in range(s, stop):
                if (t + 1) % cfg.log_every == 0 or t + 1 == cfg.steps:
                    row = {"step": t + 1}
                    row.update({k: to_json(v[t - s]) for k, v in ms.items()})
                    new.append(row)
            rows += new
            if metrics_path is not None and new:
                with open(metrics_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)
            if new:
                bar.set_postfix({"reward": f"{np.mean(new[-1]['reward']):.3f}", "kl": f"{np.mean(new[-1]['kl']):.3f}"},
                                refresh=False)
            bar.update(stop - s)
            s = stop
            if run_dir is not None and (s == cfg.steps or (cfg.checkpoint_every and s % cfg.checkpoint_every == 0)):
                save_checkpoint(
                    run_dir, s, model=model, opt_state=opt_state, key=key, model_config=model_config,
                    train_config=cfg, extra={"fingerprint": fingerprint, "stacked": stacked},
                    keep=cfg.keep_checkpoints,
                )
    finally:
        bar.close()
    return RLResult(model, opt_state, rows)


def rl_train(
    model,
    reference,
    prompts: PromptSource | ArrayPrompts,
    reward: Callable,
    cfg: RLConfig,
    *,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation | None = None,
    trainable=None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
) -> RLResult:
    """Post-train ``model`` with REINFORCE (group advantages, KL penalty to ``reference``).

    Args:
        model: the policy to train, usually a copy of the pretrained model (or a LoRA
            wrapper around it, with ``trainable`` selecting the adapters).
        reference: the frozen reference ``pi_0`` (same alphabet and BOS setting).
        prompts: a :class:`PromptSource` (fresh prompts from a process) or :class:`ArrayPrompts`.
        reward: ``reward(prompt (P,), completion (N,), info) -> ()``, a pure JAX function of
            one example (it is vmapped over the batch); ``info`` is a :class:`PromptBatch`
            row with ``tokens``, ``states`` (hidden states, ``(P + 1,)``, or ``None``) and
            ``beliefs`` (the exact belief after the prompt ``(d,)``, or ``None``). It may be
            an ``eqx.Module`` whose array fields parametrize it.
        cfg: an :class:`RLConfig`.
        key: the run's PRNG key; step ``s`` uses ``fold_in(key, s)``.
        optimizer: Optax optimizer; default Adam at ``cfg.learning_rate`` with clipping.
        trainable: Equinox filter of the parameters to update; ``None``: all of them.
        run_dir: where ``metrics.jsonl`` and checkpoints go (``sfpjax.save_checkpoint``);
            ``None`` writes nothing.
        resume: continue the run in ``run_dir`` from its latest checkpoint (exactly).
        progress: show a progress bar.

    Returns:
        :class:`RLResult` ``(model, opt_state, history)``; history rows hold ``step``,
        ``reward``, ``kl``, ``entropy``, ``ret`` and ``loss``.

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=2, n_ctx=4, n_layers=1, d_model=16, d_mlp=32)
    >>> ref = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> rc = sfpjax.RLConfig(steps=3, prompts_per_step=4, group_size=2, n_new=2)
    >>> out = sfpjax.rl_train(ref, ref, sfpjax.PromptSource(sfpjax.coin(), 2),
    ...                       lambda x, y, info: (y == 1).mean(), rc, key=jr.key(1))
    >>> len(out.history), sorted(out.history[0])[:3]
    (3, ['entropy', 'kl', 'loss'])
    """
    kl_weight = cfg.kl_weight
    return _run(model, reference, prompts, reward, cfg, key=key, kl_weight=kl_weight, optimizer=optimizer,
                trainable=trainable, run_dir=run_dir, resume=resume, progress=progress, stacked=False)


def rl_train_stack(
    models,
    reference,
    prompts: PromptSource | ArrayPrompts,
    reward: Callable,
    cfg: RLConfig,
    *,
    keys: Key[Array, " K"] | UInt32[Array, "K 2"],
    kl_weights: Float[ArrayLike, " _K"] | None = None,
    reference_stacked: bool = False,
    prompts_stacked: bool = False,
    reward_stacked: bool = False,
    optimizer: optax.GradientTransformation | None = None,
    trainable=None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
) -> RLResult:
    """``K`` policy-gradient runs (seeds, rewards, KL weights) vmapped into one compiled step.

    Run ``k`` is exactly ``rl_train(models[k], reference[k], prompts[k], reward[k], cfg,
    key=keys[k])`` with ``cfg.kl_weight = kl_weights[k]`` (the ``[k]`` only where stacked).

    Args:
        models: a stack of ``K`` policies (leading axis ``K`` on every array), e.g.
            ``eqx.filter_vmap(lambda _: pretrained)(jnp.arange(K))``.
        reference: the reference model, shared or (``reference_stacked``) one per run.
        prompts: a prompt source, shared or (``prompts_stacked``) stacked.
        reward: a reward, shared or (``reward_stacked``) a pytree with stacked array fields
            (different rewards in one stack: an ``eqx.Module`` that selects with ``lax.switch``
            on a stacked index).
        keys: ``K`` PRNG keys.
        kl_weights: ``(K,)`` KL weights; default ``cfg.kl_weight`` for every run.
        The rest as in :func:`rl_train`; ``history`` values are lists over the ``K`` runs.

    >>> import equinox as eqx, jax.numpy as jnp, jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=2, n_ctx=4, n_layers=1, d_model=16, d_mlp=32)
    >>> ref = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> models = eqx.filter_vmap(lambda _: ref)(jnp.arange(3))
    >>> rc = sfpjax.RLConfig(steps=2, prompts_per_step=4, group_size=2, n_new=1)
    >>> out = sfpjax.rl_train_stack(models, ref, sfpjax.PromptSource(sfpjax.coin(), 2),
    ...     lambda x, y, info: (y[0] == 1).astype(float), rc, keys=jr.split(jr.key(1), 3),
    ...     kl_weights=jnp.array([0.0, 0.1, 1.0]))
    >>> len(out.history[-1]["reward"])
    3
    """
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if keys.ndim != (1 if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else 2):
        raise ValueError(f"keys must be a stack of K PRNG keys (e.g. jr.split(key, K)), got shape {keys.shape}.")
    K = keys.shape[0]
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(eqx.filter(models, eqx.is_array))}
    if sizes != {K}:
        raise ValueError(
            f"models must be a stack of K={K} models (every array with leading axis {K}); found "
            f"leading axes {sorted(sizes)}."
        )
    kw = jnp.full((K,), cfg.kl_weight, jnp.float32) if kl_weights is None else jnp.asarray(kl_weights, jnp.float32)
    if kw.shape != (K,):
        raise ValueError(f"kl_weights must have shape ({K},), one per run; got {kw.shape}.")
    return _run(models, reference, prompts, reward, cfg, key=keys, kl_weight=kw, optimizer=optimizer,
                trainable=trainable, run_dir=run_dir, resume=resume, progress=progress, stacked=True,
                reference_stacked=reference_stacked, prompts_stacked=prompts_stacked,
                reward_stacked=reward_stacked)
