"""Argument checks shared by the score networks.

They run on static information only (option strings, shapes, dtypes), so a bad call fails with a
clear ``ValueError`` while the function is being traced, before anything is compiled.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

__all__ = ["check_choice", "check_dtype", "check_noise_cond", "check_labels", "COMPUTE_DTYPES"]

# Compute dtypes of the networks' ``dtype`` option (parameters are float32 either way).
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_choice(name: str, value: str, valid: Sequence[str]) -> str:
    """Returns ``value`` lower-cased, or raises listing the valid choices."""
    if not isinstance(value, str) or value.lower() not in valid:
        choices = ", ".join(map(repr, valid))
        raise ValueError(f"{name}={value!r} is not valid; choose one of {choices}")
    return value.lower()


def check_dtype(value) -> str:
    """The compute dtype ``value`` (a name or a NumPy/JAX dtype) as ``'float32'`` or ``'bfloat16'``, or raises."""
    name = value
    if not isinstance(value, str):
        try:
            name = jnp.dtype(value).name
        except TypeError:
            name = None
    if not isinstance(name, str) or name.lower() not in COMPUTE_DTYPES:
        choices = ", ".join(map(repr, COMPUTE_DTYPES))
        raise ValueError(
            f"dtype={value!r} is not a valid compute dtype; choose one of {choices} "
            "(parameters stay float32 either way)"
        )
    return name.lower()


def check_noise_cond(noise_cond, batch: int) -> None:
    """``noise_cond`` must be a real array of shape ``(batch,)``."""
    shape = jnp.shape(noise_cond)
    if shape != (batch,):
        raise ValueError(
            f"noise_cond must have shape (batch,) = ({batch},), got {shape}; pass one noise "
            "level per example (broadcast a scalar with jnp.full((batch,), value))"
        )
    if jnp.issubdtype(jnp.result_type(noise_cond), jnp.complexfloating):
        raise ValueError("noise_cond must be real")


def check_labels(y, num_classes: int | None, batch: int) -> None:
    """``y`` is required (integer, shape ``(batch,)``) iff the model is class-conditional.

    Label values are not checked (they may be traced); they must lie in ``[0, num_classes]``, the
    last being the null class. An out-of-range label looks up a NaN embedding, so it cannot pass
    unnoticed.
    """
    if num_classes is None:
        if y is not None:
            raise ValueError(
                "labels y were given to a model without class conditioning; build it with "
                "num_classes=... or call it with y=None"
            )
        return
    if y is None:
        raise ValueError(
            f"this model is class-conditional (num_classes={num_classes}); pass integer labels y "
            f"of shape ({batch},), using {num_classes} for the null class of classifier-free "
            "guidance"
        )
    if jnp.shape(y) != (batch,):
        raise ValueError(f"labels y must have shape ({batch},), got {jnp.shape(y)}")
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise ValueError(f"labels y must be integers, got dtype {jnp.result_type(y)}")
