"""Training throughput of sfpjax.Transformer against TransformerLens, and intervention overhead.

Baseline: TransformerLens 3.9.0 ``HookedTransformer`` on PyTorch 2.13.0 (CPU), trained with
``torch.optim.AdamW`` (``fused=True``, the fastest of its CPU implementations here). Ours:
``sfpjax.Transformer`` trained with ``optax.adamw`` through ``sfpjax.next_token_loss``
(the loss ``sfpjax.train`` uses), one ``eqx.filter_jit`` region per step with the model and
optimizer state donated. Same architecture (2 layers, d_model 64, 2 heads of 32, d_mlp 256,
exact GELU, LayerNorm, vocab 3 as for Mess3), same initial weights (copied from ours into
the HookedTransformer), same AdamW hyperparameters, the same fixed random token batches
(256 x 16). Before timing, the logits of the two models and their losses over a few
training steps are checked to agree.

Timing: compile time is reported separately; then ``--rounds`` interleaved rounds, each
timing ``--steps`` steps of each implementation back to back; the reported ratio is the
median of the per-round ratios, so load from other processes on the machine cancels as
far as it can. ``--scan K`` also times ``K`` optimizer steps per compiled call
(``lax.scan`` over ``K`` batches; exactly the updates of ``K`` separate steps).

The second part times the jitted forward pass (``model.batched`` on the same batch) with
0, 1 and 3 add-vector interventions on residual-stream sites.

The model, data, weight copy and round-robin timing helpers are importable
(``benchmarks/finetune_throughput.py`` reuses them).

Run (in a venv with the ``bench`` extra, e.g. ``.venv-bench``)::

    .venv-bench/bin/python benchmarks/training_throughput.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sfpjax

LR, WD, BETAS, EPS = 1e-3, 0.01, (0.9, 0.999), 1e-8
N_BATCHES = 8
ADAMW_KW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {"foreach": False}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="steps per implementation per round")
    ap.add_argument("--scan", type=int, default=16, help="steps per call for the lax.scan variant (0: skip)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--torch-adamw", choices=["fused", "foreach", "default"], default="fused")
    return ap.parse_args(argv)


def block(x):
    return jax.block_until_ready(x)


def med(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------- models and data
def model_config(ctx: int) -> sfpjax.TransformerConfig:
    """The benchmarked architecture: 2 layers, d_model 64, 2 heads, d_mlp 256, vocab 3."""
    return sfpjax.TransformerConfig(vocab_size=3, n_ctx=ctx, n_layers=2, d_model=64, n_heads=2, d_mlp=256,
                                    act="gelu")


def batches(batch: int, ctx: int):
    """``N_BATCHES`` fixed random token batches as NumPy, JAX and torch arrays."""
    rng = np.random.default_rng(0)
    np_batches = [rng.integers(0, 3, (batch, ctx)) for _ in range(N_BATCHES)]
    return ([jnp.asarray(b, jnp.int32) for b in np_batches],
            [torch.as_tensor(b, dtype=torch.long) for b in np_batches])


def tl_model_like(model: sfpjax.Transformer, threads: int) -> HookedTransformer:
    """A HookedTransformer of the same architecture holding ``model``'s weights."""
    cfg = model.config
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp,
        n_ctx=cfg.n_ctx, d_vocab=cfg.vocab_size, act_fn=cfg.act, normalization_type="LN", device="cpu",
        dtype=torch.float32, seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tl = HookedTransformer(tl_cfg)
    copy_weights(model, tl)
    return tl


def copy_weights(model: sfpjax.Transformer, tl: HookedTransformer) -> None:
    def t(x):
        return torch.tensor(np.asarray(x))

    sd = {"embed.W_E": t(model.W_E), "pos_embed.W_pos": t(model.W_pos),
          "ln_final.w": t(model.ln_final_w), "ln_final.b": t(model.ln_final_b),
          "unembed.W_U": t(model.W_U), "unembed.b_U": t(model.b_U)}
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}."
        for j, n in enumerate("QKV"):
            sd[p + f"attn.W_{n}"] = t(jnp.moveaxis(blk.W_QKV[:, j], 0, 1))
            sd[p + f"attn.b_{n}"] = t(blk.b_QKV[j])
        sd.update({p + "attn.W_O": t(blk.W_O), p + "attn.b_O": t(blk.b_O),
                   p + "ln1.w": t(blk.ln1_w), p + "ln1.b": t(blk.ln1_b),
                   p + "ln2.w": t(blk.ln2_w), p + "ln2.b": t(blk.ln2_b),
                   p + "mlp.W_in": t(blk.W_in), p + "mlp.b_in": t(blk.b_in),
                   p + "mlp.W_out": t(blk.W_out), p + "mlp.b_out": t(blk.b_out)})
    missing, unexpected = tl.load_state_dict(sd, strict=False)
    learnable = [k for k in missing if not k.endswith(("IGNORE", "mask"))]
    if learnable or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {learnable}, unexpected {unexpected}")


def torch_step(tl: HookedTransformer, params, adamw: str):
    """A TransformerLens training step with torch AdamW over ``params`` (same hyperparameters)."""
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **ADAMW_KW[adamw])

    def step(tokens):
        loss = tl(tokens, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def timed(fn, n: int, tokens_per_call: int) -> float:
    """Tokens per second of ``n`` calls of ``fn(i)`` (its last result blocked on)."""
    t0 = time.perf_counter()
    out = None
    for i in range(n):
        out = fn(i)
    if not isinstance(out, torch.Tensor):  # torch on CPU has finished when it returns
        block(out)
    return n * tokens_per_call / (time.perf_counter() - t0)


def print_device(threads_note: str = "") -> None:
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}")
    print(f"jax {jax.__version__}, equinox {eqx.__version__}, optax {optax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}{threads_note}")


def main():
    args = parse_args()
    cfg = model_config(args.ctx)
    jax_batches, torch_batches = batches(args.batch, args.ctx)
    jax_model = sfpjax.Transformer(cfg, key=jr.key(0))
    tl_model = tl_model_like(jax_model, args.threads)

    # ------------------------------------------------------------ training steps
    opt = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)

    def one_step(model, state, tokens):
        loss, grads = eqx.filter_value_and_grad(sfpjax.next_token_loss)(model, tokens)
        updates, state = opt.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    @eqx.filter_jit(donate="all-except-first")
    def jax_step(tokens, model, state):
        return one_step(model, state, tokens)

    # What sfpjax.train runs: the library step (batch drawn on device from the source inside the
    # jitted region) and its multi-step form (TrainConfig.steps_per_call steps per compiled call).
    lib_step = sfpjax.make_step(opt, batch_size=args.batch, seq_len=args.ctx)
    lib_source = sfpjax.ArraySource(jnp.concatenate(jax_batches))
    tl_step = torch_step(tl_model, tl_model.parameters(), args.torch_adamw)

    # ------------------------------------------------------------ correctness first
    with jax.numpy_dtype_promotion("standard"):
        jax_state = opt.init(jax_model)
    with torch.no_grad():
        tl_logits = tl_model(torch_batches[0]).numpy()
    ours_logits = np.asarray(jax_model.batched(jax_batches[0]))
    np.testing.assert_allclose(ours_logits, tl_logits, rtol=1e-4, atol=1e-5)

    t0 = time.perf_counter()
    jax_model, jax_state, loss = jax_step(jax_batches[0], jax_model, jax_state)
    block(loss)
    compile_step = time.perf_counter() - t0
    jax_losses, tl_losses = [float(loss)], [tl_step(torch_batches[0]).item()]
    for i in range(1, 4):
        jax_model, jax_state, loss = jax_step(jax_batches[i], jax_model, jax_state)
        jax_losses.append(float(loss))
        tl_losses.append(tl_step(torch_batches[i]).item())
    np.testing.assert_allclose(jax_losses, tl_losses, rtol=1e-4)

    t0 = time.perf_counter()
    jax_model, jax_state, loss = lib_step(jax_model, jax_state, lib_source, jax.random.key(0))
    block(loss)
    compile_lib = time.perf_counter() - t0
    if args.scan:
        scan_keys = jax.random.split(jax.random.key(1), args.scan)
        t0 = time.perf_counter()
        jax_model, jax_state, losses = lib_step.many(jax_model, jax_state, lib_source, scan_keys)
        block(losses)
        compile_scan = time.perf_counter() - t0

    # ------------------------------------------------------------ timing
    tokens_per_step = args.batch * args.ctx
    state = {"model": jax_model, "opt": jax_state}
    step_keys = jax.random.split(jax.random.key(2), args.steps)

    def jax_call(i):
        state["model"], state["opt"], loss = lib_step(state["model"], state["opt"], lib_source, step_keys[i])
        return loss

    def scan_call(i):
        state["model"], state["opt"], losses = lib_step.many(state["model"], state["opt"], lib_source, scan_keys)
        return losses

    def tl_call(i):
        return tl_step(torch_batches[i % N_BATCHES])

    print_device()
    print(f"batch {args.batch} x ctx {args.ctx}; correctness: logits and 4 training losses agree "
          f"(max |loss diff| {max(abs(a - b) for a, b in zip(jax_losses, tl_losses)):.1e})")
    print(f"compile: check step {compile_step:.2f}s, library step {compile_lib:.2f}s"
          + (f", library step.many x{args.scan} {compile_scan:.2f}s" if args.scan else ""))

    timed(tl_call, 3, tokens_per_step)
    rows = {"sfpjax": [], "tl": [], "scan": []}
    for r in range(args.rounds):
        rows["sfpjax"].append(timed(jax_call, args.steps, tokens_per_step))
        rows["tl"].append(timed(tl_call, args.steps, tokens_per_step))
        if args.scan:
            calls = max(1, args.steps // args.scan)
            rows["scan"].append(timed(scan_call, calls, args.scan * tokens_per_step))
        print(f"  round {r} (load avg {os.getloadavg()[0]:4.1f}): sfpjax {rows['sfpjax'][-1]:8.0f} tok/s   "
              f"TransformerLens {rows['tl'][-1]:8.0f} tok/s"
              + (f"   sfpjax scan x{args.scan} {rows['scan'][-1]:8.0f} tok/s" if args.scan else ""), flush=True)

    ratio = med([a / b for a, b in zip(rows["sfpjax"], rows["tl"])])
    print(f"training tokens/s (median): sfpjax {med(rows['sfpjax']):.0f}, TransformerLens {med(rows['tl']):.0f}; "
          f"median per-round ratio sfpjax/TL = {ratio:.2f}x")
    if args.scan:
        ratio_scan = med([a / b for a, b in zip(rows["scan"], rows["tl"])])
        print(f"  with {args.scan} steps per call (lax.scan): sfpjax {med(rows['scan']):.0f} tok/s, "
              f"ratio {ratio_scan:.2f}x")

    intervention_overhead(args, state["model"], jax_batches)


# ---------------------------------------------------------------- intervention overhead
def intervention_overhead(args, jax_model, jax_batches):
    def add_vector(a, mask, params):
        vector, scale = params
        return a + jnp.where(mask[:, None], (scale * vector)[None, :], 0.0)

    vec = jr.normal(jr.key(1), (jax_model.config.d_model,), jnp.float32)
    sites3 = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]

    @eqx.filter_jit
    def forward(model, tokens, ivs):
        return model.batched(tokens, interventions=ivs)

    variants = {
        "none": {},
        "1 intervention": {sites3[-1]: sfpjax.Intervention(add_vector, (vec, jnp.float32(2.0)))},
        "3 interventions": {s: sfpjax.Intervention(add_vector, (vec, jnp.float32(2.0))) for s in sites3},
    }
    for ivs in variants.values():
        block(forward(jax_model, jax_batches[0], ivs))

    def time_forward(ivs, n):
        t0 = time.perf_counter()
        for i in range(n):
            out = forward(jax_model, jax_batches[i % N_BATCHES], ivs)
        block(out)
        return (time.perf_counter() - t0) / n

    fwd_rows = {k: [] for k in variants}
    for r in range(args.rounds):
        for k, ivs in variants.items():
            fwd_rows[k].append(time_forward(ivs, 3 * args.steps))
    base = fwd_rows["none"]
    print(f"forward pass (jitted, batch {args.batch} x {args.ctx}): none {med(base) * 1e3:.2f} ms")
    for k in ("1 intervention", "3 interventions"):
        over = med([a / b for a, b in zip(fwd_rows[k], base)]) - 1
        print(f"  {k}: {med(fwd_rows[k]) * 1e3:.2f} ms, median overhead {100 * over:+.1f}%")


if __name__ == "__main__":
    main()
