"""Samplers: pure functions ``(key, score_fn, sde, shape, *, steps, ...) -> (samples, info)``.

:func:`sample` reaches every one of them by name; the functions themselves take objects, not strings.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import jax

from jaxdiff.samplers.pc import (
    CORRECTORS,
    PREDICTORS,
    ancestral_sample,
    annealed_langevin_sample,
    euler_maruyama_sample,
    pc_sample,
    reverse_diffusion_sample,
    tweedie_denoise,
)

Array = jax.Array

# name -> "module:function", imported on first use so that optional samplers stay independent.
_METHODS: dict[str, str] = {
    "euler_maruyama": "jaxdiff.samplers.pc:euler_maruyama_sample",
    "reverse_diffusion": "jaxdiff.samplers.pc:reverse_diffusion_sample",
    "ancestral": "jaxdiff.samplers.pc:ancestral_sample",
    "annealed_langevin": "jaxdiff.samplers.pc:annealed_langevin_sample",
    "pc": "jaxdiff.samplers.pc:pc_sample",
    "ode": "jaxdiff.samplers.ode:ode_sample",
    "ddim": "jaxdiff.samplers.ddim:ddim_sample",
    "dpm_solver++": "jaxdiff.samplers.dpm_solver:dpm_solver_pp_sample",
    "heun": "jaxdiff.samplers.edm:heun_sample",
    "flow_euler": "jaxdiff.samplers.flow:flow_euler_sample",
}


def available_methods() -> list[str]:
    """Names accepted by :func:`sample` (those whose module is present)."""
    names = []
    for name, target in _METHODS.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            names.append(name)
    return names


def get_sampler(method: str) -> Callable:
    """The sampler function registered under ``method``."""
    if method not in available_methods():
        raise ValueError(f"unknown sampling method {method!r}; valid: {', '.join(available_methods())}")
    module, fn = _METHODS[method].split(":")
    return getattr(importlib.import_module(module), fn)


def sampler_options(method: str) -> list[str]:
    """Keyword options a method accepts (besides ``steps``)."""
    params = inspect.signature(get_sampler(method)).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "steps"]


def sample(
    key: Array,
    score_fn: Callable[[Array, Array], Array],
    sde,
    shape: tuple[int, ...],
    method: str = "pc",
    steps: int | None = None,
    **options,
) -> tuple[Array, dict]:
    """Draws samples with the sampler named ``method``.

    Args:
      key: PRNG key.
      score_fn: ``score_fn(x, t) -> score``, ``t`` of shape ``(batch,)``.
      sde: a :class:`jaxdiff.sde.SDE`.
      shape: ``(batch, *event_shape)``.
      method: one of :func:`available_methods`.
      steps: number of steps (the meaning is the sampler's; defaults to ``sde.N`` for SDE samplers).
      **options: the sampler's keyword options (``predictor=``, ``corrector=``, ``snr=``, ``eps=``, ...).

    Returns:
      ``(samples, info)``; ``info["nfe"]`` is the number of score evaluations.

    >>> import jaxdiff
    >>> sde = jaxdiff.VPSDE()
    >>> gm = jaxdiff.GaussianMixture.grid()
    >>> x, info = jaxdiff.sample(jax.random.key(0), gm.score_fn(sde), sde, (64, 2), method="pc", steps=100)
    """
    fn = get_sampler(method)
    valid = sampler_options(method)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; valid: {', '.join(valid)}"
        )
    from jaxdiff.samplers import _common

    _common.check_sde(sde)
    shape = _common.check_shape(shape)
    _common.check_score_fn(score_fn, shape)
    return fn(key, score_fn, sde, shape, steps=steps, **options)


__all__ = [
    "CORRECTORS",
    "PREDICTORS",
    "ancestral_sample",
    "annealed_langevin_sample",
    "available_methods",
    "euler_maruyama_sample",
    "get_sampler",
    "pc_sample",
    "reverse_diffusion_sample",
    "sample",
    "sampler_options",
    "tweedie_denoise",
]
