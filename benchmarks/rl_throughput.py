"""RL post-training throughput: sfpjax's REINFORCE step against the same loop in PyTorch.

Baseline: TransformerLens 3.9.0 ``HookedTransformer`` on PyTorch 2.13.0 (CPU), with the
REINFORCE loop written as a researcher would: prompts drawn from a fixed table, ``N`` tokens
sampled one at a time under ``torch.no_grad`` (each draw a forward pass over the tokens so
far, which is shorter than our fixed buffer), rewards, a reference forward pass, returns
with the KL penalty ``r - beta sum log(pi / pi_0)``, group-normalized advantages, the
policy-gradient loss, ``backward`` and ``torch.optim.Adam``. Ours: ``sfpjax.make_rl_step``
(the step ``sfpjax.rl_train`` runs): the same computation in one ``eqx.filter_jit`` region,
and ``step.many`` with ``--scan`` steps per compiled call. Same architecture (2 layers,
d_model 64, 2 heads, d_mlp 256, vocab 3, no BOS), same initial weights, same batch
(``--prompts`` prompts x ``--group`` completions, prompt length ``--prompt-len``,
``--new`` new tokens). Before timing, the two models' logits and completion
log-probabilities are checked to agree.

Second part: ``K`` runs stacked into one compiled step (``stacked=True``) against the same
``K`` runs stepped one after the other (one compiled single-run step each).

Timing: compile time is reported separately; then ``--rounds`` interleaved rounds; ratios
are medians of the per-round ratios, so load from other processes cancels as far as it can.

    .venv-bench/bin/python benchmarks/rl_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import numpy as np


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--stack", type=int, default=8, help="K runs for the stacked-vs-sequential part")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per implementation per round")
    ap.add_argument("--scan", type=int, default=10, help="steps per call for step.many (0: skip)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="few rounds and steps: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.scan, args.stack = 2, 3, 3, 4
    return args


ARGS = parse_args()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import torch  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

import sfpjax  # noqa: E402
from training_throughput import copy_weights  # noqa: E402

B, G, P, N = ARGS.prompts, ARGS.group, ARGS.prompt_len, ARGS.new
LR, BETA, TAU = 1e-3, 0.1, 1.0
V = 3


def block(x):
    return jax.block_until_ready(x)


cfg = sfpjax.TransformerConfig(vocab_size=V, n_ctx=P + N, n_layers=2, d_model=64, n_heads=2, d_mlp=256)
policy = sfpjax.Transformer(cfg, key=jr.key(0))
reference = sfpjax.Transformer(cfg, key=jr.key(0))
rng = np.random.default_rng(0)
table = rng.integers(0, V, (256, P))
prompts = sfpjax.ArrayPrompts(jnp.asarray(table, jnp.int32))
torch_table = torch.as_tensor(table, dtype=torch.long)


def reward(x, y, info):
    return jnp.mean((y == 0).astype(jnp.float32))


torch.set_num_threads(ARGS.threads)
torch.manual_seed(0)
tl_cfg = HookedTransformerConfig(
    n_layers=2, d_model=64, n_heads=2, d_head=32, d_mlp=256, n_ctx=P + N, d_vocab=V,
    act_fn="gelu", normalization_type="LN", device="cpu", dtype=torch.float32, seed=0,
)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    tl_policy = HookedTransformer(tl_cfg)
    tl_reference = HookedTransformer(tl_cfg)


copy_weights(policy, tl_policy)
copy_weights(reference, tl_reference)
for p_ in tl_reference.parameters():
    p_.requires_grad_(False)
tl_opt = torch.optim.Adam(tl_policy.parameters(), lr=LR)


def tl_step():
    idx = torch.randint(0, torch_table.shape[0], (B,))
    buf = torch_table[idx].repeat_interleave(G, dim=0)
    with torch.no_grad():
        for _ in range(N):
            logits = tl_policy(buf)[:, -1] / TAU
            y = torch.multinomial(torch.softmax(logits, -1), 1)
            buf = torch.cat([buf, y], dim=1)
        ref_lp = torch.log_softmax(tl_reference(buf)[:, P - 1:P + N - 1] / TAU, -1)
    comp = buf[:, P:]
    r = (comp == 0).float().mean(1)
    lp = torch.log_softmax(tl_policy(buf)[:, P - 1:P + N - 1] / TAU, -1)
    taken = lp.gather(-1, comp[..., None])[..., 0]
    ref_taken = ref_lp.gather(-1, comp[..., None])[..., 0]
    ret = (r - BETA * (taken.detach() - ref_taken).sum(1)).view(B, G)
    adv = ((ret - ret.mean(1, keepdim=True)) / (ret.std(1, unbiased=False, keepdim=True) + 1e-4)).view(-1)
    loss = -(adv * taken.sum(1)).mean()
    tl_opt.zero_grad(set_to_none=True)
    loss.backward()
    tl_opt.step()
    return r.mean()


# ---------------------------------------------------------------- correctness first
seqs = np.concatenate([table[:32], rng.integers(0, V, (32, N))], axis=1)
ours = np.asarray(sfpjax.completion_log_probs(policy, jnp.asarray(seqs, jnp.int32), prompt_len=P))
with torch.no_grad():
    theirs = torch.log_softmax(tl_policy(torch.as_tensor(seqs))[:, P - 1:P + N - 1], -1).numpy()
np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)

rc = sfpjax.RLConfig(steps=1, prompts_per_step=B, group_size=G, n_new=N, learning_rate=LR, kl_weight=BETA,
                     grad_clip=None)
step = sfpjax.make_rl_step(rc)
state = step.init(policy)
t0 = time.perf_counter()
policy, state, m = step(policy, state, reference, prompts, reward, BETA, jr.key(1))
block(m)
compile_step = time.perf_counter() - t0
if ARGS.scan:
    t0 = time.perf_counter()
    policy, state, ms = step.many(policy, state, reference, prompts, reward, BETA, jr.split(jr.key(2), ARGS.scan))
    block(ms)
    compile_scan = time.perf_counter() - t0
tl_step()

K = ARGS.stack
stacked_step = sfpjax.make_rl_step(rc, stacked=True)
stack = eqx.filter_vmap(lambda _: reference)(jnp.arange(K))
stack_state = stacked_step.init(stack)
kws = jnp.full((K,), BETA, jnp.float32)
t0 = time.perf_counter()
stack, stack_state, m = stacked_step(stack, stack_state, reference, prompts, reward, kws, jr.split(jr.key(3), K))
block(m)
compile_stack = time.perf_counter() - t0
singles = [jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, reference) for _ in range(K)]
single_states = [step.init(s) for s in singles]


# ---------------------------------------------------------------- timing
def time_ours(n):
    global policy, state
    keys = jr.split(jr.key(4), n)
    t0 = time.perf_counter()
    for i in range(n):
        policy, state, m = step(policy, state, reference, prompts, reward, BETA, keys[i])
    block(m)
    return n / (time.perf_counter() - t0)


def time_ours_scan(n):
    global policy, state
    calls = max(1, n // ARGS.scan)
    t0 = time.perf_counter()
    for c in range(calls):
        policy, state, ms = step.many(policy, state, reference, prompts, reward, BETA,
                                      jr.split(jr.key(5 + c), ARGS.scan))
    block(ms)
    return calls * ARGS.scan / (time.perf_counter() - t0)


def time_torch(n):
    t0 = time.perf_counter()
    for _ in range(n):
        tl_step()
    return n / (time.perf_counter() - t0)


def time_stacked(n):
    global stack, stack_state
    t0 = time.perf_counter()
    for i in range(n):
        stack, stack_state, m = stacked_step(stack, stack_state, reference, prompts, reward, kws,
                                             jr.split(jr.key(100 + i), K))
    block(m)
    return n * K / (time.perf_counter() - t0)


def time_sequential(n):
    t0 = time.perf_counter()
    for i in range(n):
        for k in range(K):
            singles[k], single_states[k], m = step(singles[k], single_states[k], reference, prompts, reward, BETA,
                                                   jr.fold_in(jr.key(200 + i), k))
    block(m)
    return n * K / (time.perf_counter() - t0)


print(f"device: {jax.devices()[0]} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
      f"{ARGS.threads} torch threads, jax {jax.__version__}")
print(f"batch: {B} prompts x {G} completions, prompt {P} + {N} new tokens; vocab {V}; "
      f"2 layers, d_model 64, d_mlp 256")
print(f"compile: step {compile_step:.2f} s" + (f", step.many({ARGS.scan}) {compile_scan:.2f} s" if ARGS.scan else "")
      + f", stacked step (K={K}) {compile_stack:.2f} s")
rows = {"ours": [], "scan": [], "torch": [], "stacked": [], "sequential": []}
for _ in range(ARGS.rounds):
    rows["ours"].append(time_ours(ARGS.steps))
    if ARGS.scan:
        rows["scan"].append(time_ours_scan(ARGS.steps))
    rows["torch"].append(time_torch(ARGS.steps))
    rows["stacked"].append(time_stacked(ARGS.steps))
    rows["sequential"].append(time_sequential(ARGS.steps))


def med(name):
    return statistics.median(rows[name])


def ratio(a, b):
    return statistics.median([x / y for x, y in zip(rows[a], rows[b])])


print(f"RL steps/s   sfpjax step {med('ours'):8.1f}   TransformerLens loop {med('torch'):8.1f}   "
      f"ratio {ratio('ours', 'torch'):.2f}x (target >= 2x)")
if ARGS.scan:
    print(f"RL steps/s   sfpjax step.many({ARGS.scan}) {med('scan'):8.1f}   ratio {ratio('scan', 'torch'):.2f}x")
print(f"run-steps/s  K={K} stacked {med('stacked'):8.1f}   sequential {med('sequential'):8.1f}   "
      f"ratio {ratio('stacked', 'sequential'):.2f}x (target >= 4x)")
