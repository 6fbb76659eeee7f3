"""Weight initialisation of the DDPM family of score networks (Ho et al., 2020)."""

from __future__ import annotations

import flax.linen as nn
import jax

__all__ = ["default_init"]


def default_init(scale: float = 1.0) -> jax.nn.initializers.Initializer:
    """Uniform ``fan_avg`` variance scaling, as in DDPM and NCSN++.

    A scale of zero (used for the last layer of every residual branch, ``init_scale=0``) is replaced
    by ``1e-10`` so that the branch starts as (almost) the identity while still receiving gradients.
    """
    scale = 1e-10 if scale == 0 else scale
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")
