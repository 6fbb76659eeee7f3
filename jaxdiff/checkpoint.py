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
* :meth:`Checkpointer.restore_newest` skips unreadable (truncated, corrupt) checkpoints for the
  newest readable one and returns its state together with *its own* metadata (data position), so
  state, data order and random stream always come from the same checkpoint; it reports every
  checkpoint it skipped. :meth:`Checkpointer.move_aside` renames an unreadable checkpoint to
  ``corrupt-<step>`` next to the others: out of the way of new saves, never deleted.
* A save over a step that exists on disk but does not restore (written by an earlier process and
  corrupted since) moves the bad one aside and writes the new one; a readable existing step is
  never overwritten. Nothing here deletes a checkpoint except the keep-last-K policy.

>>> ckpt = Checkpointer(workdir + "/checkpoints", save_every=1000, keep=3)
>>> found = ckpt.restore_newest(state)          # found.step is None if there is no checkpoint yet
>>> state = found.value
>>> if found.step is not None:
...     data.restore(found.metadata["data"])    # the data position saved with that same checkpoint
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
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointMismatchError", "Restored"]

PyTree = Any
logger = logging.getLogger(__name__)

_STATE, _META = "state", "metadata"


class CheckpointMismatchError(ValueError):
    """The target's structure or leaf shapes differ from those in the checkpoint."""


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore_newest` found.

    Attributes:
      value: what was read from checkpoint ``step`` (the target itself if none was readable).
      step: the checkpoint read, or ``None``.
      metadata: the JSON metadata saved with that same checkpoint (``{}`` if none).
      unreadable: ``(step, reason)`` of every newer checkpoint that could not be read, newest first.
    """

    value: Any
    step: int | None
    metadata: dict
    unreadable: list


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
        shown = "; ".join(problems[:20]) + (f"; ... ({len(problems)} in all)" if len(problems) > 20 else "")
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
        self._readable: set[int] = set()  # steps saved or restored by this process
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
            if step in self._readable or self._is_readable(step):
                return False
            self.move_aside(step)  # exists but does not restore: keep it aside, write the new one
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.PyTreeSave(_to_saveable(state)),
                _META: ocp.args.JsonSave(_jsonable(metadata)),
            }
        )
        started = bool(self._manager.save(step, args=args, force=True))
        if started:
            self._readable.add(step)
        return started

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
        restored = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
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
        (the target does not fit) is raised, not skipped. :meth:`restore_newest` also returns the
        step and its metadata.
        """
        found = self.restore_newest(target)
        for i, (step, reason) in enumerate(found.unreadable):
            older = found.unreadable[i + 1][0] if i + 1 < len(found.unreadable) else found.step
            logger.warning(
                "checkpoint %d in %s is unreadable (%s); falling back to %s",
                step,
                self.directory,
                reason,
                "the initial state" if older is None else f"step {older}",
            )
        return found.value

    def restore_newest(self, target: PyTree | None = None, *, read=None) -> Restored:
        """The newest checkpoint that reads, with the metadata saved in that same checkpoint.

        Args:
          target: restore the whole state into this structure (see :meth:`restore`); or
          read: a function ``step -> value`` to read instead (e.g. ``ckpt.restore_ema``).

        Returns:
          A :class:`Restored`: the value, its step and metadata, and the ``(step, reason)`` of every
          newer checkpoint skipped as unreadable (nothing is moved or deleted here; see
          :meth:`move_aside`). With no readable checkpoint, ``value`` is ``target`` and ``step`` is ``None``.

        Raises:
          CheckpointMismatchError: the target does not fit a readable checkpoint (never skipped).
        """
        if read is None:
            read = lambda step: self.restore(target, step)  # noqa: E731
        unreadable = []
        for step in reversed(self._resolve_all()):
            try:
                value = read(step)
                metadata = self.metadata(step) or {}
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means an unusable checkpoint
                unreadable.append((step, f"{type(e).__name__}: {_first_line(e)}"))
                continue
            self._readable.add(step)
            return Restored(value, step, metadata, unreadable)
        return Restored(target, None, {}, unreadable)

    def move_aside(self, step: int) -> str:
        """Renames checkpoint ``step`` to ``corrupt-<step>`` (``-2``, ``-3``, ... if taken); returns the path.

        The directory stays next to the others for inspection; orbax no longer sees it as a step, so
        neither a new save of that step nor the keep-last-K policy touches it.
        """
        self.wait()
        source = os.path.join(self.directory, str(int(step)))
        dest, n = os.path.join(self.directory, f"corrupt-{int(step)}"), 1
        while os.path.exists(dest):
            n += 1
            dest = os.path.join(self.directory, f"corrupt-{int(step)}-{n}")
        os.rename(source, dest)
        self._readable.discard(int(step))
        self._manager.reload()
        return dest

    def _is_readable(self, step: int) -> bool:
        """Whether checkpoint ``step`` restores in full (every array and the metadata)."""
        try:
            saved = self._saved_tree(step)
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_default_sharding()), saved
            )
            self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.PyTreeRestore(
                            item=abstract,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                        ),
                        _META: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception:  # noqa: BLE001 - any read failure means an unusable checkpoint
            return False
        self._readable.add(step)
        return True

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
