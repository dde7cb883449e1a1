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

import numpy as np


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="steps per implementation per round")
    ap.add_argument("--scan", type=int, default=16, help="steps per call for the lax.scan variant (0: skip)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--torch-adamw", choices=["fused", "foreach", "default"], default="fused")
    return ap.parse_args()


ARGS = parse_args()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

import sfpjax  # noqa: E402

LR, WD, BETAS, EPS = 1e-3, 0.01, (0.9, 0.999), 1e-8
N_BATCHES = 8


def block(x):
    return jax.block_until_ready(x)


# ---------------------------------------------------------------- models and data
cfg = sfpjax.TransformerConfig(
    vocab_size=3, n_ctx=ARGS.ctx, n_layers=2, d_model=64, n_heads=2, d_mlp=256, act="gelu"
)
rng = np.random.default_rng(0)
np_batches = [rng.integers(0, 3, (ARGS.batch, ARGS.ctx)) for _ in range(N_BATCHES)]
jax_batches = [jnp.asarray(b, jnp.int32) for b in np_batches]
torch_batches = [torch.as_tensor(b, dtype=torch.long) for b in np_batches]

jax_model = sfpjax.Transformer(cfg, key=jr.key(0))

torch.set_num_threads(ARGS.threads)
torch.manual_seed(0)
tl_cfg = HookedTransformerConfig(
    n_layers=2, d_model=64, n_heads=2, d_head=32, d_mlp=256, n_ctx=ARGS.ctx, d_vocab=3,
    act_fn="gelu", normalization_type="LN", device="cpu", dtype=torch.float32, seed=0,
)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    tl_model = HookedTransformer(tl_cfg)


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


copy_weights(jax_model, tl_model)

# ---------------------------------------------------------------- training steps
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
lib_step = sfpjax.make_step(opt, batch_size=ARGS.batch, seq_len=ARGS.ctx)
lib_source = sfpjax.ArraySource(jnp.concatenate(jax_batches))


adamw_kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {"foreach": False}}
tl_opt = torch.optim.AdamW(tl_model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                           **adamw_kw[ARGS.torch_adamw])


def tl_step(tokens):
    loss = tl_model(tokens, return_type="loss")
    tl_opt.zero_grad(set_to_none=True)
    loss.backward()
    tl_opt.step()
    return loss


# ---------------------------------------------------------------- correctness first
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
if ARGS.scan:
    scan_keys = jax.random.split(jax.random.key(1), ARGS.scan)
    t0 = time.perf_counter()
    jax_model, jax_state, losses = lib_step.many(jax_model, jax_state, lib_source, scan_keys)
    block(losses)
    compile_scan = time.perf_counter() - t0

# ---------------------------------------------------------------- timing
tokens_per_step = ARGS.batch * ARGS.ctx


def time_jax(n):
    global jax_model, jax_state
    keys = jax.random.split(jax.random.key(2), n)
    t0 = time.perf_counter()
    for i in range(n):
        jax_model, jax_state, loss = lib_step(jax_model, jax_state, lib_source, keys[i])
    block(loss)
    return n * tokens_per_step / (time.perf_counter() - t0)


def time_jax_scan(n):
    global jax_model, jax_state
    calls = max(1, n // ARGS.scan)
    t0 = time.perf_counter()
    for _ in range(calls):
        jax_model, jax_state, losses = lib_step.many(jax_model, jax_state, lib_source, scan_keys)
    block(losses)
    return calls * ARGS.scan * tokens_per_step / (time.perf_counter() - t0)


def time_tl(n):
    t0 = time.perf_counter()
    for i in range(n):
        tl_step(torch_batches[i % N_BATCHES])
    return n * tokens_per_step / (time.perf_counter() - t0)


print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
      f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}")
print(f"jax {jax.__version__}, equinox {eqx.__version__}, optax {optax.__version__}, "
      f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
print(f"batch {ARGS.batch} x ctx {ARGS.ctx}; correctness: logits and 4 training losses agree "
      f"(max |loss diff| {max(abs(a - b) for a, b in zip(jax_losses, tl_losses)):.1e})")
print(f"compile: check step {compile_step:.2f}s, library step {compile_lib:.2f}s" + (f", library step.many x{ARGS.scan} {compile_scan:.2f}s" if ARGS.scan else ""))

time_tl(3)
rows = {"sfpjax": [], "tl": [], "scan": []}
for r in range(ARGS.rounds):
    rows["sfpjax"].append(time_jax(ARGS.steps))
    rows["tl"].append(time_tl(ARGS.steps))
    if ARGS.scan:
        rows["scan"].append(time_jax_scan(ARGS.steps))
    print(f"  round {r} (load avg {os.getloadavg()[0]:4.1f}): sfpjax {rows['sfpjax'][-1]:8.0f} tok/s   "
          f"TransformerLens {rows['tl'][-1]:8.0f} tok/s"
          + (f"   sfpjax scan x{ARGS.scan} {rows['scan'][-1]:8.0f} tok/s" if ARGS.scan else ""), flush=True)


def med(xs):
    return statistics.median(xs)


ratio = med([a / b for a, b in zip(rows["sfpjax"], rows["tl"])])
print(f"training tokens/s (median): sfpjax {med(rows['sfpjax']):.0f}, TransformerLens {med(rows['tl']):.0f}; "
      f"median per-round ratio sfpjax/TL = {ratio:.2f}x")
if ARGS.scan:
    ratio_scan = med([a / b for a, b in zip(rows["scan"], rows["tl"])])
    print(f"  with {ARGS.scan} steps per call (lax.scan): sfpjax {med(rows['scan']):.0f} tok/s, "
          f"ratio {ratio_scan:.2f}x")

# ---------------------------------------------------------------- intervention overhead
def add_vector(a, mask, params):
    vector, scale = params
    return a + jnp.where(mask[:, None], (scale * vector)[None, :], 0.0)


vec = jr.normal(jr.key(1), (cfg.d_model,), jnp.float32)
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
for r in range(ARGS.rounds):
    for k, ivs in variants.items():
        fwd_rows[k].append(time_forward(ivs, 3 * ARGS.steps))
base = fwd_rows["none"]
print(f"forward pass (jitted, batch {ARGS.batch} x {ARGS.ctx}): none {med(base) * 1e3:.2f} ms")
for k in ("1 intervention", "3 interventions"):
    over = med([a / b for a, b in zip(fwd_rows[k], base)]) - 1
    print(f"  {k}: {med(fwd_rows[k]) * 1e3:.2f} ms, median overhead {100 * over:+.1f}%")
