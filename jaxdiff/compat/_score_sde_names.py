"""Parameter names of the score_sde reference networks and of jaxdiff's, matched by name.

Both implementations build the same modules in the same order, so Flax's per-class counters agree: the
reference's ``ResnetBlockBigGANpp_10`` is jaxdiff's ``ResnetBlockBigGAN_10``. What differs is the class names
(``...pp`` suffixes in ``models/layerspp.py``), the names jaxdiff gives explicitly (``conv_in``,
``temb_dense_0``, ``fourier_proj``, ``temb_proj``, ``shortcut``, the attention's ``query``/``key``/``value``/
``out``, the FIR convolution's ``kernel``) and the reference's own layer types (``NIN`` with ``W``/``b``,
``Conv2d`` with ``weight``/``bias``). :func:`reference_path` spells a jaxdiff path the reference's way; matching
runs from jaxdiff's expected tree, so the (key-sorted) order of a checkpoint never matters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["reference_path", "flatten", "unflatten", "to_reference", "from_reference", "mismatches"]

Path = tuple[str, ...]

_ATTENTION = {"query": "NIN_0", "key": "NIN_1", "value": "NIN_2", "out": "NIN_3"}
_TOP = {"fourier_proj": "GaussianFourierProjection_0", "temb_dense_0": "Dense_0", "temb_dense_1": "Dense_1"}


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested dicts to ``{path: leaf}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """``{path: leaf}`` to nested dicts."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def reference_path(path: Path, *, ddpm: bool, top_convs: int) -> Path:
    """The reference name of jaxdiff parameter ``path``.

    Args:
      path: e.g. ``("AttnBlock_0", "query", "kernel")``.
      ddpm: the reference network is ``models/ddpm.py`` (class names without the ``pp`` suffix).
      top_convs: how many unnamed ``Conv_k`` jaxdiff's top level has (the output pyramid's), which sets the
        reference index of ``conv_out``.
    """
    top, inner = path[0], list(path[1:])
    if top in _TOP:
        top = _TOP[top]
    elif top == "conv_in":
        top = "Conv_0"
    elif top == "conv_out":
        top = f"Conv_{top_convs + 1}"
    elif re.fullmatch(r"Conv_\d+", top):
        top = f"Conv_{_index(top) + 1}"
    elif top.startswith("ResnetBlockBigGAN_"):
        top = top.replace("ResnetBlockBigGAN_", "ResnetBlockBigGANpp_")
    elif top.startswith("ResnetBlockDDPM_") and not ddpm:
        top = top.replace("ResnetBlockDDPM_", "ResnetBlockDDPMpp_")
    elif top.startswith("AttnBlock_") and not ddpm:
        top = top.replace("AttnBlock_", "AttnBlockpp_")
    elif top == "label_embed":
        raise ValueError("the reference networks have no class conditioning (label_embed)")
    if inner and inner[0] in ("temb_proj", "shortcut") or inner and top.startswith("AttnBlock"):
        layer = {"temb_proj": "Dense_0", "shortcut": "NIN_0", **_ATTENTION}.get(inner[0], inner[0])
        if layer.startswith("NIN_"):
            inner = [layer, {"kernel": "W", "bias": "b"}[inner[-1]]]
        else:
            inner = [layer, *inner[1:]]
    elif inner and inner[0].startswith("FIRConv_"):
        inner = [inner[0].replace("FIRConv_", "Conv2d_"), {"kernel": "weight"}.get(inner[-1], inner[-1])]
    return (top, *inner)


def _top_convs(flat: Mapping[Path, Any]) -> int:
    return sum(1 for p in flat if len(p) == 2 and p[1] == "kernel" and re.fullmatch(r"Conv_\d+", p[0]))


def to_reference(params: Mapping[str, Any], *, ddpm: bool) -> dict[str, Any]:
    """jaxdiff ``params`` renamed as the reference network names them (the inverse of :func:`from_reference`)."""
    flat = flatten(params)
    n = _top_convs(flat)
    return unflatten({reference_path(p, ddpm=ddpm, top_convs=n): np.asarray(v) for p, v in flat.items()})


def mismatches(reference: Mapping[str, Any], expected: Mapping[str, Any], *, ddpm: bool) -> list[str]:
    """Differences between a reference ``params`` tree and the shapes jaxdiff expects, in reference names.

    Args:
      reference: the checkpoint's parameters (nested dicts of arrays).
      expected: jaxdiff's parameter tree (arrays or shape structs).
      ddpm: as in :func:`reference_path`.

    Returns:
      One string per problem (missing, unexpected, or shape), in a natural order (``_2`` before ``_10``).
    """
    flat_exp = flatten(expected)
    n = _top_convs(flat_exp)
    want = {reference_path(p, ddpm=ddpm, top_convs=n): tuple(v.shape) for p, v in flat_exp.items()}
    have = {p: tuple(np.shape(v)) for p, v in flatten(reference).items()}
    problems = []
    for p in sorted(set(want) | set(have), key=_natural):
        name = "/".join(p)
        if p not in have:
            problems.append(f"{name} {want[p]} is missing")
        elif p not in want:
            problems.append(f"{name} {have[p]} is not in the configured network")
        elif have[p] != want[p]:
            problems.append(f"{name} has shape {have[p]}, the config needs {want[p]}")
    return problems


def from_reference(reference: Mapping[str, Any], expected: Mapping[str, Any], *, ddpm: bool) -> dict[str, Any]:
    """The reference ``params`` as jaxdiff's tree ``expected`` names them; call :func:`mismatches` first."""
    flat_exp = flatten(expected)
    n = _top_convs(flat_exp)
    flat_ref = flatten(reference)
    return unflatten({p: np.asarray(flat_ref[reference_path(p, ddpm=ddpm, top_convs=n)], np.float32) for p in flat_exp})


def _natural(path: Path) -> tuple:
    return tuple(tuple(int(s) if s.isdigit() else s for s in re.split(r"(\d+)", part)) for part in path)
