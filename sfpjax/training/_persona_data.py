"""Leaf-restricted, mixed and trigger-prefixed sequences from a persona world.

Fresh samples from one leaf or a mixture of leaves need nothing new: the world started in
those leaves is a GHMM, ``ProcessSource(world.restrict({"MD": 0.95, "AO": 0.05}))``.
``persona_sequences`` draws a fixed set of such sequences, optionally each beginning with
the trigger (the inoculation-prompting data), for an ``ArraySource``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Int, PRNGKeyArray

from ..inference._filter import belief_update, next_token_probs
from ..inference._sampling import sample
from ..processes._persona import PersonaWorld

__all__ = ["persona_sequences"]


def persona_sequences(
    world: PersonaWorld,
    weights,
    *,
    key: PRNGKeyArray,
    batch_size: int,
    seq_len: int,
    trigger_prefix: bool = False,
) -> Int[Array, "B L"]:
    """Sequences from a mixture of leaves, optionally starting with the trigger.

    Each sequence starts in leaf ``l`` with probability ``w_l`` (from ``<<eta_l|``) and runs
    under the world's dynamics (leak included). With ``trigger_prefix`` the first token is
    drawn from the leaf mixture's next-token law conditioned on its persona symbol being the
    trigger (its domain symbol keeps its exact conditional law), and the rest of the
    sequence from the belief after it: the exact law of the world's sequences conditioned
    on beginning with the trigger.

    Args:
        world: a ``PersonaWorld`` (built with ``trigger_rate`` for ``trigger_prefix``).
        weights: leaf weights, as ``PersonaWorld.leaf_weights`` (``{"MD": 1.0}``,
            ``{"MD": 0.95, "AO": 0.05}``).
        key: PRNG key.
        batch_size, seq_len: output shape ``(batch_size, seq_len)``.

    >>> import jax.random as jr, sfpjax
    >>> w = sfpjax.persona_world(trigger_rate=0.05)
    >>> toks = sfpjax.persona_sequences(w, {"MD": 1.0}, key=jr.key(0), batch_size=4, seq_len=6, trigger_prefix=True)
    >>> bool((toks[:, 0] // w.domain_vocab == w.trigger).all())
    True
    """
    if not isinstance(world, PersonaWorld):
        raise ValueError(f"persona_sequences needs a PersonaWorld; got {type(world).__name__}.")
    process = world.restrict(weights)
    if not trigger_prefix:
        return sample(process, key=key, batch_size=batch_size, seq_len=seq_len)
    if world.trigger is None:
        raise ValueError("trigger_prefix=True needs a world with a trigger symbol; build it with trigger_rate=...")
    if int(seq_len) < 1 or int(batch_size) < 1:
        raise ValueError(f"batch_size and seq_len must be positive; got {batch_size} and {seq_len}.")
    first_key, rest_key = jr.split(key)
    probs = next_token_probs(process, process.eta0)
    is_trigger = (jnp.arange(world.vocab_size) // world.domain_vocab) == world.trigger
    masked = jnp.where(is_trigger, probs, 0.0)
    masked = eqx.error_if(masked, masked.sum() <= 0, "the trigger has probability 0 in these leaves (trigger_rate 0?).")
    first = jr.categorical(first_key, jnp.log(masked), shape=(int(batch_size),)).astype(jnp.int32)
    if int(seq_len) == 1:
        return first[:, None]
    eta = jax.vmap(lambda x: belief_update(process, process.eta0, x)[0])(first)
    rest = sample(process, key=rest_key, batch_size=batch_size, seq_len=int(seq_len) - 1, initial=eta)
    return jnp.concatenate([first[:, None], rest], axis=1)
