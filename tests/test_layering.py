"""The layering of the package, read from its import statements (every one, also those inside functions).

* Lower layers never import higher ones: every top-level unit of ``jaxdiff`` has a rank and imports only units
  of lower rank (or itself). ``jaxdiff/__init__.py``, the curated public API, may import anything.
* Nothing imports another package's private module (``jaxdiff.models._embedding`` from outside ``models``),
  or a private name from another unit, except the declared friends below.
* The maths and inference layers know nothing of Flax or optax: samplers, likelihood and guidance see networks
  only as functions (``score_fn(x, t)``, ``log_prob_y_fn(x, t)``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxdiff"

# Lower ranks are lower layers.
RANKS = {
    # The maths of the process and the numerics, per-example data, running things, reading data.
    "sde": 0,
    "per_example": 0,
    "ode": 0,
    "parallel": 0,
    "checkpoint": 0,
    "data": 0,
    "_grouping": 0,  # batching of random draws (the initialiser's compile time)
    # Built directly on those: the closed-form oracle, the parameterization of networks, metrics, train state,
    # continuous batching of the adaptive solves.
    "oracle": 1,
    "refill": 1,
    "parameterization": 1,
    "metrics": 1,
    "train": 1,
    # Networks, samplers, losses.
    "models": 2,
    "samplers": 2,
    "losses": 2,
    # Inference built on the samplers.
    "likelihood": 3,
    "guidance": 3,
    # Formats made elsewhere, translated into jaxdiff's own models and SDEs.
    "compat": 4,
}

# Private modules that a module outside their package may import, and who may. The samplers' shared conventions
# (argument checks, per-example keys and noise) serve the two modules that run samplers of their own: the
# constrained samplers of guidance and the likelihood's probability-flow solve.
FRIENDS = {"jaxdiff.samplers._common": {"jaxdiff.guidance", "jaxdiff.likelihood"}}

# Units that must not import these libraries (directly): networks reach them only as functions.
NO_NETWORK_LIBRARIES = {"sde", "oracle", "ode", "per_example", "samplers", "likelihood", "guidance"}
NETWORK_LIBRARIES = {"flax", "optax", "orbax"}


def package_sources() -> dict[str, str]:
    """``{module name: source}`` of every module of the package."""
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("jaxdiff", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        sources[".".join(parts)] = path.read_text()
    return sources


def _is_package(name: str, sources: dict[str, str]) -> bool:
    return any(other.startswith(name + ".") for other in sources)


def imports(name: str, source: str, sources: dict[str, str]):
    """``(imported module, imported name or None)`` for every import of ``jaxdiff`` or a library in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                package = name if _is_package(name, sources) else name.rpartition(".")[0]
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if candidate in sources:
                    yield candidate, None
                else:
                    yield base, alias.name


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "jaxdiff" else None


def _private_owner(module: str) -> str | None:
    """The package that owns ``module`` if some part of its name is private, else ``None``."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def violations(sources: dict[str, str]) -> list[str]:
    found = []
    for name, source in sources.items():
        unit = _unit(name)
        if unit is None:  # jaxdiff/__init__.py: the public API imports what it curates
            continue
        if unit not in RANKS:
            found.append(f"{name}: unit {unit!r} has no rank in tests/test_layering.py RANKS")
            continue
        for module, imported_name in imports(name, source, sources):
            library = module.split(".")[0]
            if library in NETWORK_LIBRARIES and unit in NO_NETWORK_LIBRARIES:
                found.append(f"{name} imports {module}: {unit} must see networks only as functions")
            if library != "jaxdiff":
                continue
            target_unit = _unit(module)
            if target_unit is None:  # `from jaxdiff import sde` resolves to jaxdiff.sde when it is a module
                found.append(f"{name} imports {imported_name!r} from the package root; import the module itself")
                continue
            if target_unit != unit and RANKS.get(target_unit, -1) >= RANKS[unit]:
                found.append(
                    f"{name} (rank {RANKS[unit]}) imports {module} (rank {RANKS.get(target_unit)}): "
                    "a layer imports only lower ones"
                )
            owner = _private_owner(module)
            inside = name == owner or name.startswith(f"{owner}.")
            if owner is not None and not inside and name not in FRIENDS.get(module, ()):
                found.append(f"{name} imports {module}, a private module of {owner}")
            private_name = imported_name is not None and imported_name.startswith("_")
            if private_name and target_unit != unit and name not in FRIENDS.get(module, ()):
                found.append(f"{name} imports the private name {imported_name} of {module}")
    return list(dict.fromkeys(found))  # one line per violation, however many names an import statement lists


def test_the_package_is_layered():
    sources = package_sources()
    assert "jaxdiff.guidance" in sources and "jaxdiff.models._classifier" in sources
    assert violations(sources) == []


def test_guidance_sees_the_classifier_only_as_a_function():
    sources = package_sources()
    guidance_imports = {module for module, _ in imports("jaxdiff.guidance", sources["jaxdiff.guidance"], sources)}
    assert not any(m.startswith("jaxdiff.models.") for m in guidance_imports), guidance_imports
    assert not guidance_imports & NETWORK_LIBRARIES


@pytest.mark.parametrize(
    "module, line, message",
    [
        # The import guidance used to have: a private module of the layer below.
        ("jaxdiff.guidance", "from jaxdiff.models._embedding import embed_noise", "a private module of jaxdiff.models"),
        ("jaxdiff.guidance", "from jaxdiff.models import _embedding", "a private module of jaxdiff.models"),
        ("jaxdiff.guidance", "import flax.linen as nn", "must see networks only as functions"),
        ("jaxdiff.compat.score_sde", "from jaxdiff.samplers import _common", "a private module of jaxdiff.samplers"),
        ("jaxdiff.losses", "from jaxdiff.sde import _private_helper", "the private name _private_helper"),
        ("jaxdiff.sde", "from jaxdiff.samplers import sample", "a layer imports only lower ones"),
        ("jaxdiff.samplers.pc", "from jaxdiff.likelihood import log_likelihood", "a layer imports only lower ones"),
        ("jaxdiff.models._mlp", "from jaxdiff import guidance", "a layer imports only lower ones"),
        ("jaxdiff.samplers.pc", "from ..guidance import inpaint", "a layer imports only lower ones"),
    ],
)
def test_the_checker_finds_each_kind_of_violation(module, line, message):
    sources = package_sources()
    sources[module] = sources[module] + "\n" + line + "\n"
    found = violations(sources)
    assert len(found) == 1 and message in found[0], found
