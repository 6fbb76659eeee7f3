"""Builds a score network from its name, for config files and experiment scripts."""

from __future__ import annotations

import flax.linen as nn

from jaxdiff.models._mlp import MLP
from jaxdiff.models._ncsnpp import DDPMpp, NCSNpp

__all__ = ["get_model", "MODELS"]

MODELS: dict[str, type[nn.Module]] = {"ncsnpp": NCSNpp, "ddpmpp": DDPMpp, "mlp": MLP}


def get_model(name: str, **kwargs) -> nn.Module:
    """Returns the score network ``name`` (case-insensitive) built with ``kwargs``.

    Args:
        name: ``'ncsnpp'``, ``'ddpmpp'`` or ``'mlp'``.
        **kwargs: the module's attributes, e.g. ``nf=128, ch_mult=(1, 2, 2, 2)``.

    Returns:
        The (unbound) Flax module.

    Raises:
        ValueError: for an unknown name, listing the valid ones.

    Example:
        >>> get_model("ddpmpp", nf=64).embedding_type
        'positional'
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[key](**kwargs)
