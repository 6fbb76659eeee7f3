"""jaxdiff: score-based generative modelling through SDEs, in JAX.

The light core (SDEs, oracle, samplers) is imported eagerly; the other modules (``models``, ``losses``,
``train``, ``data``, ``checkpoint``, ``parallel``, ``likelihood``, ``ode``, ``parameterization``,
``guidance``, ``metrics``) load on first
use, e.g. ``jaxdiff.likelihood.log_likelihood`` or ``from jaxdiff import train``.
"""

import importlib

from jaxdiff import oracle, per_example, samplers, sde
from jaxdiff.oracle import GaussianMixture
from jaxdiff.per_example import PerExample
from jaxdiff.samplers import sample
from jaxdiff.sde import SDE, VESDE, VPSDE, CosineVPSDE, RectifiedFlow, SubVPSDE

__version__ = "0.1.0"

_LAZY = (
    "checkpoint",
    "data",
    "guidance",
    "likelihood",
    "losses",
    "metrics",
    "models",
    "ode",
    "parallel",
    "parameterization",
    "train",
)


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"jaxdiff.{name}")
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


__all__ = [
    "SDE",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "CosineVPSDE",
    "RectifiedFlow",
    "GaussianMixture",
    "PerExample",
    "oracle",
    "per_example",
    "sample",
    "samplers",
    "sde",
    *_LAZY,
]
