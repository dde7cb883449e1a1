"""The stacked run that tests/_stack_worker.py trains over two processes and the test trains in one."""

import equinox as eqx
import jax
import jax.random as jr

import sfpjax

K = 4


def stack_case(run_dir=None):
    cfg = sfpjax.TrainConfig(steps=6, batch_size=4, seq_len=6, learning_rate=1e-2, warmup_steps=0, log_every=2,
                             eval_every=3, eval_batch_size=8, checkpoint_every=3)
    mcfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=6, n_layers=1, d_model=8, n_heads=1, d_mlp=16)
    keys = jr.split(jr.key(3), K)
    models = eqx.filter_vmap(lambda k: sfpjax.Transformer(mcfg, key=k))(keys)
    processes = jax.vmap(lambda x: sfpjax.mess3(x, 0.6))(jax.numpy.linspace(0.1, 0.4, K))
    return sfpjax.train_stack(models, processes, cfg, keys=jr.split(jr.key(4), K), run_dir=run_dir, progress=False)
