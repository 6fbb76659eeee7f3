"""Per-example data inside a score function: what a per-example ODE solve must split with the batch.

A score function is a :class:`jax.tree_util.Partial` whose arrays are mostly shared by the whole batch (network
parameters, mixture components). Some lead with the batch axis instead: class labels, per-example guidance
weights. Solvers that give every example its own adaptive steps (``jax.vmap`` over examples, as
:func:`jaxdiff.likelihood.log_likelihood` and :func:`jaxdiff.samplers.ode.ode_sample` do by default) must hand each
example its own slice of those arrays and all of the shared ones. Wrapping them in :class:`PerExample` says which
are which; the function that receives one calls :func:`unwrap`.

>>> import jax.numpy as jnp
>>> from jax.tree_util import Partial
>>> def score(mean, x, t):
...     return unwrap(mean) - x
>>> score_fn = Partial(score, PerExample(jnp.zeros((4, 2))))  # one mean per example
>>> score_fn(jnp.ones((4, 2)), jnp.zeros(4)).shape
(4, 2)
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["PerExample", "per_example", "unwrap", "is_per_example"]


@jax.tree_util.register_pytree_node_class
class PerExample:
    """A pytree node marking ``value`` (a pytree of arrays that lead with the batch axis) as per-example data."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(children[0])

    def __repr__(self) -> str:
        return f"PerExample({self.value!r})"


def is_per_example(node: Any) -> bool:
    return isinstance(node, PerExample)


def unwrap(value: Any) -> Any:
    """``value`` itself, or what a :class:`PerExample` holds."""
    return value.value if isinstance(value, PerExample) else value


def per_example(value: Any) -> Any:
    """Marks an array with at least one axis as per-example; a scalar or ``None`` stays shared (unchanged)."""
    if value is None or isinstance(value, PerExample) or jax.numpy.ndim(value) == 0:
        return value
    return PerExample(value)
