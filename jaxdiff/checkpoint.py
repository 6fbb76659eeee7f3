"""Checkpoints of the train state with orbax: save every N steps, keep the last K, resume.

:class:`Checkpointer` wraps an ``orbax.checkpoint.CheckpointManager`` for one pytree (the train
state: ``step``, ``params``, ``ema_params``, ``opt_state``, ``key``; any pytree works) plus a JSON
dict of metadata (the config, the data iterator's ``state``) saved alongside in the same step
directory.

* Writes are atomic: orbax writes into a temporary directory and renames it when complete, so an
  interrupted save never shadows the previous checkpoint.
* Typed PRNG keys (``jax.random.key``) are stored as their raw ``key_data`` and re-wrapped with the
  target's key implementation on restore, so keys round-trip bit for bit.
* Restores are resharded onto the target: a checkpoint written from 8 devices restores onto 1 and
  vice versa, as each leaf takes the sharding of the corresponding target leaf.
* Restoring into a target whose shapes or structure differ raises a
  :class:`CheckpointMismatchError` naming every mismatching leaf; there is no silent partial
  restore.
* :meth:`Checkpointer.restore_latest` skips an unreadable (truncated, corrupt) newest checkpoint
  with a one-line warning and falls back to the newest good one. Nothing here deletes a checkpoint
  except the keep-last-K policy.

>>> ckpt = Checkpointer(workdir + "/checkpoints", save_every=1000, keep=3)
>>> state = ckpt.restore_latest(state)          # unchanged if there is no checkpoint yet
>>> for step in range(int(state.step), num_steps):
...     state, metrics = train_step(state, next(data))
...     if ckpt.should_save(step + 1):
...         ckpt.save(step + 1, state, metadata={"data": data.state})
>>> ckpt.close()
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointMismatchError"]

PyTree = Any
logger = logging.getLogger(__name__)

_STATE, _META = "state", "metadata"


class CheckpointMismatchError(ValueError):
    """The target's structure or leaf shapes differ from those in the checkpoint."""


# -- typed PRNG keys and abstract targets --------------------------------------------------------


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree: PyTree) -> PyTree:
    """Replaces typed PRNG keys by their raw ``uint32`` key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract(tree: PyTree) -> PyTree:
    """Shapes, dtypes and shardings to restore into (typed keys as their key data)."""

    def leaf(x):
        if _is_key(x):
            if not isinstance(x, jax.Array):
                raise TypeError("restore target PRNG keys must be concrete key arrays")
            x = jax.random.key_data(x)
        if isinstance(x, jax.ShapeDtypeStruct):
            return x if x.sharding is not None else x.update(sharding=_default_sharding())
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_default_sharding())

    return jax.tree.map(leaf, tree)


def _rewrap_keys(restored: PyTree, target: PyTree) -> PyTree:
    return jax.tree.map(
        lambda r, t: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if _is_key(t) else r,
        restored,
        target,
    )


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(p): tuple(x.shape) for p, x in leaves}


def _check_compatible(saved: PyTree, target: PyTree, what: str) -> None:
    """Raises :class:`CheckpointMismatchError` naming every leaf that differs."""
    have, want = _shapes(saved), _shapes(target)
    problems = [
        f"{k}: checkpoint {have[k]} vs target {want[k]}"
        for k in sorted(have.keys() & want.keys())
        if have[k] != want[k]
    ]
    problems += [f"{k}: in the target, not in the checkpoint" for k in sorted(want.keys() - have)]
    problems += [f"{k}: in the checkpoint, not in the target" for k in sorted(have.keys() - want)]
    if problems:
        shown = "; ".join(problems[:20]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 20 else ""
        )
        raise CheckpointMismatchError(f"{what} does not match the target: {shown}")


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    def convert(v):
        if hasattr(v, "to_dict"):  # ml_collections.ConfigDict
            return convert(v.to_dict())
        if isinstance(v, Mapping):
            return {str(k): convert(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, np.generic | np.ndarray) or isinstance(v, jax.Array):
            return np.asarray(v).tolist()
        return v

    out = convert(dict(metadata or {}))
    json.dumps(out)  # fail now, not in a background thread
    return out


# -- the checkpointer ----------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores one train-state pytree (and JSON metadata) under a directory.

    Args:
      directory: where step directories ``<directory>/<step>`` go; created if missing.
      save_every: :meth:`should_save` is true every ``save_every`` steps.
      keep: keep the newest ``keep`` checkpoints (older ones are deleted); ``None`` keeps all.
      async_save: write in a background thread (call :meth:`wait` or :meth:`close` before exit).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int = 1,
        keep: int | None = 3,
        async_save: bool = True,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=1,  # the interval is applied by should_save
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_handlers={
                _STATE: ocp.PyTreeCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )

    # -- saving -----------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a multiple of ``save_every``."""
        return int(step) % self.save_every == 0

    def save(self, step: int, state: PyTree, *, metadata: Mapping[str, Any] | None = None) -> bool:
        """Writes ``state`` (and JSON-able ``metadata``) as checkpoint ``step``.

        Returns:
          ``True`` if a checkpoint was started, ``False`` if ``step`` is already saved.
        """
        step = int(step)
        if step in self.all_steps():
            return False
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeSave(_to_saveable(state)),
                _META: ocp.args.JsonSave(_jsonable(metadata)),
            }
        )
        return bool(self._manager.save(step, args=args, force=True))

    def wait(self) -> None:
        """Blocks until a background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    # -- inspecting -------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def metadata(self, step: int | None = None) -> dict[str, Any] | None:
        """The JSON metadata saved with ``step`` (the newest by default), or ``None``."""
        step = self._resolve(step)
        if step is None:
            return None
        self.wait()
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return dict(restored[_META] or {})

    def _resolve(self, step: int | None) -> int | None:
        self.wait()
        return self.latest_step() if step is None else int(step)

    def _saved_tree(self, step: int) -> PyTree:
        tree = self._manager.item_metadata(step)[_STATE]
        tree = getattr(tree, "tree", tree)
        if tree is None:
            raise OSError(f"checkpoint {step} in {self.directory} has no readable tree metadata")
        return tree

    # -- restoring --------------------------------------------------------------------------------
    def restore(self, target: PyTree, step: int | None = None) -> PyTree:
        """Restores checkpoint ``step`` (the newest by default) into the structure of ``target``.

        Args:
          target: a pytree like the saved one (arrays or ``jax.ShapeDtypeStruct``); each leaf is
            restored with the target leaf's dtype and sharding.
          step: which checkpoint.

        Raises:
          FileNotFoundError: if there is no such checkpoint.
          CheckpointMismatchError: if structure or shapes differ (every difference is named).
        """
        step = self._resolve(step)
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint {step} in {self.directory}")
        abstract = _abstract(target)
        _check_compatible(self._saved_tree(step), abstract, f"checkpoint {step}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.PyTreeRestore(
                        item=abstract,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    )
                }
            ),
        )[_STATE]
        restored = jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(restored))
        return _rewrap_keys(restored, target)

    def restore_latest(self, target: PyTree) -> PyTree:
        """Restores the newest readable checkpoint, or returns ``target`` itself if there is none.

        An unreadable checkpoint (truncated or corrupt files) is reported in one warning line and
        skipped for the next older one; it is left on disk. A :class:`CheckpointMismatchError`
        (the target does not fit) is raised, not skipped.
        """
        for step in reversed(self._resolve_all()):
            try:
                return self.restore(target, step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
                older = [s for s in self.all_steps() if s < step]
                logger.warning(
                    "checkpoint %d in %s is unreadable (%s: %s); falling back to %s",
                    step,
                    self.directory,
                    type(e).__name__,
                    _first_line(e),
                    f"step {older[-1]}" if older else "the initial state",
                )
        return target

    def _resolve_all(self) -> list[int]:
        self.wait()
        return self.all_steps()

    def restore_params(
        self, step: int | None = None, target: PyTree | None = None, *, name: str = "ema_params"
    ) -> PyTree:
        """Restores one top-level field (the EMA parameters by default) without the rest.

        Only that subtree is read, so sampling needs neither the optimiser nor its state structure.

        Args:
          step: which checkpoint (the newest by default).
          target: a parameter pytree to restore into (shapes are checked, shardings kept);
            by default the saved structure as nested dicts, on one device.
          name: the field of the saved state, e.g. ``"ema_params"`` or ``"params"``.
        """
        step = self._resolve(step)
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint {step} in {self.directory}")
        saved = self._saved_tree(step)
        if name not in saved:
            raise KeyError(f"checkpoint {step} has no field {name!r}; it has {sorted(saved)}")
        if target is None:
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_default_sharding()),
                saved[name],
            )
        else:
            abstract = _abstract(target)
            _check_compatible(saved[name], abstract, f"{name!r} of checkpoint {step}")
        item = {name: abstract}
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.PyTreeRestore(
                        item=item,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                        partial_restore=True,
                    )
                }
            ),
        )[_STATE][name]
        if target is not None:
            restored = jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(restored))
            restored = _rewrap_keys(restored, target)
        return restored

    def restore_ema(self, step: int | None = None, target: PyTree | None = None) -> PyTree:
        """The EMA parameters alone, for sampling (see :meth:`restore_params`)."""
        return self.restore_params(step, target, name="ema_params")

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, steps={self.all_steps()})"
