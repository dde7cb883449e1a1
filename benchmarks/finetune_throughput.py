"""Fine-tuning throughput: rank-1 LoRA and full fine-tuning against TransformerLens + torch, and stacking.

Model and data as in ``training_throughput.py`` (whose helpers this script imports): 2
layers, d_model 64, 2 heads, d_mlp 256, vocab 3, fixed random batches 256 x 16, AdamW with
the same hyperparameters on both sides, the same initial weights.

* Rank-1 LoRA on ``mlp.W_out`` of both blocks (the default target of ``sfpjax.LoRA``).
  Ours: ``sfpjax.LoRA(rank=1)`` wrapped model and trainable filter, trained by the library
  step (``sfpjax.make_step(..., trainable=...)``, the step ``sfpjax.finetune`` runs) with
  ``--scan`` steps per compiled call (the ``TrainConfig.steps_per_call`` default). Peer:
  TransformerLens 3.9 ``HookedTransformer`` on torch 2.13 CPU with the same LoRA written in
  torch: ``torch.nn.utils.parametrize`` makes each ``W_out`` the frozen weight plus
  ``A @ B`` (A copied from ours, B zero), and torch AdamW updates ``A, B`` only.
* Full fine-tuning: every parameter, ``sfpjax.FullFinetune()`` against plain torch AdamW.
* Stacking: ``K`` rank-1 LoRA fine-tunes (``--stack``, default 8; the step of
  ``sfpjax.finetune_stack``) in one compiled step against the same ``K`` run one after
  another with the single step.

Before timing, the losses of 4 LoRA steps and 4 full steps on the same batches agree with
the peer's (rtol 1e-4). Ratios are medians of per-round ratios of interleaved timings.

Run (in a venv with the ``bench`` extra)::

    .venv-bench/bin/python benchmarks/finetune_throughput.py            # or --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import sfpjax  # noqa: E402
from training_throughput import (  # noqa: E402
    BETAS, EPS, LR, N_BATCHES, WD, batches, block, med, model_config, print_device, timed, tl_model_like,
    torch_step,
)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--scan", type=int, default=16, help="steps per compiled call (the train default)")
    ap.add_argument("--calls", type=int, default=2, help="scan calls per method per round")
    ap.add_argument("--stack", type=int, default=8, help="K for stacked against sequential fine-tunes")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--torch-adamw", choices=["fused", "foreach", "default"], default="fused")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 call, K=4: a check that it runs")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.calls, args.stack = 3, 1, 4
    return args


class LoRADelta(torch.nn.Module):
    """``W -> W + A @ B``, the torch parametrization of a frozen weight."""

    def __init__(self, A: np.ndarray, B: np.ndarray):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor(A))
        self.B = torch.nn.Parameter(torch.tensor(B))

    def forward(self, W):
        return W + self.A @ self.B


def torch_lora(tl, lora: sfpjax.LoRATransformer):
    """Parametrize ``tl``'s adapted weights like ``lora``; return the trainable torch parameters."""
    for p in tl.parameters():
        p.requires_grad_(False)
    params = []
    for name, ad in lora.adapters.items():
        _, layer, part, weight = name.split(".")  # blocks.{l}.mlp.W_out
        module = getattr(tl.blocks[int(layer)], part)
        delta = LoRADelta(np.asarray(ad.A), np.asarray(ad.B))
        parametrize.register_parametrization(module, weight, delta)
        params += [delta.A, delta.B]
    return params


def main():
    args = parse_args()
    cfg = model_config(args.ctx)
    jax_batches, torch_batches = batches(args.batch, args.ctx)
    base = sfpjax.Transformer(cfg, key=jr.key(0))
    opt = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    source = sfpjax.ArraySource(jnp.concatenate(jax_batches))
    tokens_per_step = args.batch * args.ctx
    methods = {"lora": sfpjax.LoRA(rank=1), "full": sfpjax.FullFinetune()}

    @eqx.filter_jit(donate="all-except-first")
    def check_step(data, model, state):
        tokens, trainable = data
        params, frozen = eqx.partition(model, eqx.is_inexact_array if trainable is None else trainable)
        loss, grads = eqx.filter_value_and_grad(
            lambda p: sfpjax.next_token_loss(eqx.combine(p, frozen), tokens))(params)
        updates, state = opt.update(grads, state, params)
        return eqx.combine(eqx.apply_updates(params, updates), frozen), state, loss

    runs, peers, compile_s, check_diff = {}, {}, {}, {}
    for name, method in methods.items():
        wrapped = method.wrap(base, key=jr.key(1))
        trainable = method.trainable(wrapped)
        tl = tl_model_like(base, args.threads)
        params = torch_lora(tl, wrapped) if name == "lora" else list(tl.parameters())
        peers[name] = torch_step(tl, params, args.torch_adamw)
        # Correctness: 4 steps on the same batches give the same losses.
        model = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, wrapped)
        state = sfpjax.init_opt_state(opt, model, trainable=trainable)
        ours, theirs = [], []
        for i in range(4):
            model, state, loss = check_step((jax_batches[i], trainable), model, state)
            ours.append(float(loss))
            theirs.append(peers[name](torch_batches[i]).item())
        np.testing.assert_allclose(ours, theirs, rtol=1e-4)
        check_diff[name] = max(abs(a - b) for a, b in zip(ours, theirs))
        # The library step, as finetune runs it.
        step = sfpjax.make_step(opt, batch_size=args.batch, seq_len=args.ctx, trainable=trainable)
        model = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, wrapped)
        state = sfpjax.init_opt_state(opt, model, trainable=trainable)
        keys = jr.split(jr.key(2), args.scan)
        t0 = time.perf_counter()
        model, state, losses = step.many(model, state, source, keys)
        block(losses)
        compile_s[name] = time.perf_counter() - t0
        runs[name] = {"step": step, "model": model, "state": state, "keys": keys}

    # K stacked LoRA fine-tunes against K sequential ones (each its own model and state).
    K = args.stack
    lora = methods["lora"]
    wrapped_stack = eqx.filter_vmap(lambda k: lora.wrap(base, key=k))(jr.split(jr.key(3), K))
    trainable = lora.trainable(wrapped_stack)
    single = runs["lora"]["step"]
    stacked = single.vmap(shared_source=True)
    stack_state = eqx.filter_vmap(lambda m: sfpjax.init_opt_state(opt, m, trainable=trainable))(wrapped_stack)
    stack_keys = jax.vmap(lambda k: jr.split(k, K))(jr.split(jr.key(4), args.scan))  # (scan, K)
    t0 = time.perf_counter()
    stack_model, stack_state, losses = stacked.many(wrapped_stack, stack_state, source, stack_keys)
    block(losses)
    compile_s["stack"] = time.perf_counter() - t0
    seq = [{"model": jax.tree.map(lambda x, k=k: x[k], stack_model),
            "state": jax.tree.map(lambda x, k=k: x[k], stack_state)} for k in range(K)]
    stack = {"model": stack_model, "state": stack_state}

    def ours(name):
        r = runs[name]

        def call(i):
            r["model"], r["state"], losses = r["step"].many(r["model"], r["state"], source, r["keys"])
            return losses

        return call

    def peer(name):
        return lambda i: peers[name](torch_batches[i % N_BATCHES])

    def stacked_call(i):
        stack["model"], stack["state"], losses = stacked.many(stack["model"], stack["state"], source, stack_keys)
        return losses

    def sequential_call(i):
        for r in seq:
            r["model"], r["state"], losses = single.many(r["model"], r["state"], source, runs["lora"]["keys"])
        return losses

    print_device()
    print(f"batch {args.batch} x ctx {args.ctx}, {args.scan} steps per call; correctness: 4 losses agree "
          f"(max |diff| LoRA {check_diff['lora']:.1e}, full {check_diff['full']:.1e})")
    print("compile: " + ", ".join(f"{k} {v:.2f}s" for k, v in compile_s.items()))
    per_call = args.scan * tokens_per_step
    for name in methods:
        timed(peer(name), 3, tokens_per_step)
    rows = {k: [] for k in ("lora", "tl_lora", "full", "tl_full", "stacked", "sequential")}
    for r in range(args.rounds):
        for name in methods:
            rows[name].append(timed(ours(name), args.calls, per_call))
            rows["tl_" + name].append(timed(peer(name), args.calls * args.scan, tokens_per_step))
        rows["stacked"].append(timed(stacked_call, args.calls, K * per_call))
        rows["sequential"].append(timed(sequential_call, args.calls, K * per_call))
        print(f"  round {r} (load avg {os.getloadavg()[0]:4.1f}): "
              + "  ".join(f"{k} {v[-1]:8.0f}" for k, v in rows.items()) + " tok/s", flush=True)

    def ratio(a, b):
        return med([x / y for x, y in zip(rows[a], rows[b])])

    print(f"rank-1 LoRA tokens/s (median): sfpjax {med(rows['lora']):.0f}, TransformerLens+torch LoRA "
          f"{med(rows['tl_lora']):.0f}; ratio {ratio('lora', 'tl_lora'):.2f}x (target >= 1.5x)")
    print(f"full fine-tuning tokens/s (median): sfpjax {med(rows['full']):.0f}, TransformerLens "
          f"{med(rows['tl_full']):.0f}; ratio {ratio('full', 'tl_full'):.2f}x (target >= 1.5x)")
    print(f"K={K} rank-1 LoRA fine-tunes, tokens/s over all runs: stacked {med(rows['stacked']):.0f}, "
          f"sequential {med(rows['sequential']):.0f}; ratio {ratio('stacked', 'sequential'):.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
