"""Fine-tuning a trained :class:`Transformer`: full, head-only, rank-r LoRA, a steering vector.

Every method is the training loop of :func:`sfpjax.train` with two choices: a wrapper
around the model (none, :class:`sfpjax.LoRATransformer`, :class:`sfpjax.SteeredTransformer`)
and the Equinox filter of the leaves that train (:meth:`FinetuneMethod.trainable`). The
frozen part gets no gradient, no optimizer state and no weight decay. Checkpoints (every
``cfg.checkpoint_every`` steps), ``metrics.jsonl``, exact resume and stacking of ``K`` runs
into one compiled program are those of the loop.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Int, Key, PRNGKeyArray, PyTree, UInt32

from ..model._lora import LoRATransformer
from ..model._steered import SteeredTransformer
from ..model._transformer import Transformer
from ..processes._ghmm import GHMM
from ._config import TrainConfig
from ._data import ArraySource, ProcessSource
from ._loop import Runs, TrainResult, check_stack, run_training
from ._rundir import fingerprint

__all__ = ["FullFinetune", "HeadOnly", "LoRA", "SteeringVector", "finetune", "finetune_stack"]


def _only(wrapped, select) -> PyTree[bool]:
    mask = jax.tree.map(lambda _: False, wrapped)
    return eqx.tree_at(select, mask, replace_fn=lambda node: jax.tree.map(lambda _: True, node))


class FinetuneMethod(abc.ABC):
    """What a fine-tuning method provides (the classes below are the ones there are).

    ``wrap(model, *, key)`` returns the model to train (the base, or a wrapper around it);
    ``trainable(wrapped)`` returns the Equinox filter of its leaves that train.
    """

    @abc.abstractmethod
    def wrap(self, model: Transformer, *, key: PRNGKeyArray) -> Any:
        """The model to train: ``model`` itself or a wrapper around it."""

    @abc.abstractmethod
    def trainable(self, wrapped) -> PyTree[bool] | None:
        """The Equinox filter of the leaves of ``wrapped`` that train."""


@dataclasses.dataclass(frozen=True)
class FullFinetune(FinetuneMethod):
    """Every parameter of the model trains; the result is a plain :class:`Transformer`.

    >>> import sfpjax
    >>> sfpjax.FullFinetune()
    FullFinetune()
    """

    def wrap(self, model, *, key):
        return model

    def trainable(self, wrapped):
        return None


@dataclasses.dataclass(frozen=True)
class HeadOnly(FinetuneMethod):
    """Only the unembedding ``W_U, b_U`` trains; the result is a plain :class:`Transformer`.

    >>> import sfpjax
    >>> sfpjax.HeadOnly()
    HeadOnly()
    """

    def wrap(self, model, *, key):
        return model

    def trainable(self, wrapped):
        return _only(wrapped, lambda m: (m.W_U, m.b_U))


@dataclasses.dataclass(frozen=True)
class LoRA(FinetuneMethod):
    """Rank-``rank`` adapters ``W + A @ B`` on ``targets``; only ``A`` and ``B`` train.

    The result is a :class:`sfpjax.LoRATransformer` (``.merge()`` gives the plain model).
    ``B`` starts at zero, so step 0 is the base model.

    Args:
        rank: ``r``; at most ``min(d_in, d_out)`` of every target.
        targets: matrix names as in :func:`sfpjax.lora_target_names`; a block matrix
            without the ``blocks.{l}.`` prefix (``"attn.W_Q"``) means every block.

    >>> import sfpjax
    >>> sfpjax.LoRA(rank=1, targets=("attn.W_Q", "attn.W_V")).rank
    1
    """

    rank: int = 1
    targets: tuple[str, ...] = ("mlp.W_out",)

    def wrap(self, model, *, key):
        return LoRATransformer(model, rank=self.rank, targets=tuple(self.targets), key=key)

    def trainable(self, wrapped):
        return _only(wrapped, lambda m: m.adapters)


@dataclasses.dataclass(frozen=True)
class SteeringVector(FinetuneMethod):
    """One vector added at ``site`` (every position); only the vector trains.

    The result is a :class:`sfpjax.SteeredTransformer` whose ``vector`` starts at zero.

    Args:
        site: a residual-stream site such as ``"blocks.0.hook_resid_post"`` (or
            ``"blocks.{l}.mlp.hook_post"``).

    >>> import sfpjax
    >>> sfpjax.SteeringVector("blocks.0.hook_resid_post").site
    'blocks.0.hook_resid_post'
    """

    site: str

    def wrap(self, model, *, key):
        return SteeredTransformer(model, self.site)

    def trainable(self, wrapped):
        return _only(wrapped, lambda m: m.vector)


def _check_method(method) -> None:
    if not isinstance(method, FinetuneMethod):
        raise ValueError(
            f"method must be sfpjax.FullFinetune(), HeadOnly(), LoRA(rank, targets) or "
            f"SteeringVector(site), got {type(method).__name__}."
        )


def finetune(
    model: Transformer,
    data: GHMM | ProcessSource | ArraySource | Int[Array, "N L"],
    cfg: TrainConfig,
    *,
    method: FinetuneMethod,
    key: PRNGKeyArray,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    eval_process: GHMM | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune a trained ``model`` on ``data`` with ``method``.

    Args:
        model: the trained :class:`Transformer` (left unchanged).
        data: as in :func:`train`: a process (e.g. one leaf of a persona world), a token
            array ``(N, L_max)`` or a source.
        cfg: a :class:`TrainConfig`; ``cfg.checkpoint_every`` sets how often checkpoints
            are written to ``run_dir``.
        method: :class:`FullFinetune`, :class:`HeadOnly`, :class:`LoRA` or
            :class:`SteeringVector`.
        key: PRNG key; ``wrap_key, train_key = split(key)`` initialize the wrapper (LoRA's
            ``A``) and drive the run as ``train``'s key does.
        run_dir, resume, eval_process, progress: as in :func:`train`. A resumed run must
            have the same base model, method, data, key and config (bookkeeping aside).

    Returns:
        :class:`TrainResult` whose ``model`` is the fine-tuned model: a ``Transformer`` for
        full and head-only fine-tuning, a :class:`LoRATransformer` or
        :class:`SteeredTransformer` otherwise. Checkpoints hold that whole model; restore
        one with ``sfpjax.restore_checkpoint(run_dir, like, result.opt_state)`` where
        ``like = method.wrap(model, key=key)`` (any key: only shapes matter).

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> base = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> tc = sfpjax.TrainConfig(steps=4, batch_size=8, seq_len=8)
    >>> out = sfpjax.finetune(base, sfpjax.mess3(), tc, method=sfpjax.LoRA(rank=1), key=jr.key(1),
    ...                       progress=False)
    >>> type(out.model).__name__, type(out.model.merge()).__name__
    ('LoRATransformer', 'Transformer')
    """
    _check_method(method)
    if not isinstance(model, Transformer):
        raise ValueError(f"finetune adapts a trained sfpjax.Transformer, got {type(model).__name__}.")
    wrap_key, train_key = jr.split(key)
    wrapped = method.wrap(model, key=wrap_key)
    return run_training(
        wrapped, data, cfg, key=train_key, runs=Runs(stacked=False), trainable=method.trainable(wrapped),
        run_dir=run_dir, resume=resume, eval_process=eval_process, progress=progress,
        fingerprints={"base_model": fingerprint(model), "method": repr(method)},
    )


def finetune_stack(
    models: Transformer,
    data: GHMM | ProcessSource | ArraySource | Int[Array, "... L"],
    cfg: TrainConfig,
    *,
    method: FinetuneMethod,
    keys: Key[Array, " K"] | UInt32[Array, "K 2"],
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    eval_process: GHMM | None = None,
    progress: bool = True,
) -> TrainResult:
    """``K`` fine-tuning runs (seeds x conditions) in one compiled program.

    Run ``k`` is ``finetune(model_k, data_k, cfg, method=method, key=keys[k])``, vmapped.

    Args:
        models: one trained :class:`Transformer` (every run starts from it) or a stack of
            ``K`` (leading axis ``K``, e.g. the result of :func:`train_stack`).
        data: one source for all runs or a stacked one (leading axis ``K``), as in
            :func:`train_stack`: stack data sets of equal shape to compare conditions.
        method: one method for all runs (stacking needs equal shapes).
        keys: ``K`` PRNG keys.
        The rest as in :func:`finetune`; ``history`` values are lists over the ``K`` runs.

    >>> import jax.random as jr, sfpjax
    >>> cfg = sfpjax.TransformerConfig(vocab_size=3, n_ctx=8, n_layers=1, d_model=16, d_mlp=32)
    >>> base = sfpjax.Transformer(cfg, key=jr.key(0))
    >>> tc = sfpjax.TrainConfig(steps=4, batch_size=8, seq_len=8)
    >>> out = sfpjax.finetune_stack(base, sfpjax.mess3(), tc, method=sfpjax.HeadOnly(),
    ...                             keys=jr.split(jr.key(1), 3), progress=False)
    >>> out.model.W_U.shape
    (3, 16, 3)
    """
    _check_method(method)
    if not isinstance(models, Transformer):
        raise ValueError(f"finetune_stack adapts trained sfpjax.Transformer models, got {type(models).__name__}.")
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    K = keys.shape[0] if keys.ndim else 0
    if models.W_E.ndim == 2:  # one model: every run starts from it
        models = jax.tree.map(lambda x: jnp.broadcast_to(x, (K, *x.shape)) if eqx.is_array(x) else x, models)
    keys = check_stack(models, keys)
    split = jax.vmap(jr.split)(keys)
    wrapped = eqx.filter_vmap(lambda m, k: method.wrap(m, key=k))(models, split[:, 0])
    return run_training(
        wrapped, data, cfg, key=split[:, 1], runs=Runs(stacked=True), trainable=method.trainable(wrapped),
        run_dir=run_dir, resume=resume, eval_process=eval_process, progress=progress,
        fingerprints={"base_model": fingerprint(models), "method": repr(method)},
    )
