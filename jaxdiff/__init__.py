"""jaxdiff: score-based generative modelling through SDEs, in JAX."""

from jaxdiff import oracle, samplers, sde
from jaxdiff.oracle import GaussianMixture
from jaxdiff.samplers import sample
from jaxdiff.sde import SDE, VESDE, VPSDE, CosineVPSDE, SubVPSDE

__version__ = "0.1.0"

__all__ = [
    "SDE",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "CosineVPSDE",
    "GaussianMixture",
    "oracle",
    "sample",
    "samplers",
    "sde",
]
