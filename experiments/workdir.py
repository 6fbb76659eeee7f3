"""A run's work directory, kept whole under faults: one writer, a config that cannot drift, files that survive.

    WORKDIR/config.json      the run's config; written atomically, and only after the compatibility check
    WORKDIR/lock             held by the one train.py writing here: PID, host and start time
    WORKDIR/checkpoints/     <step>/ from orbax; corrupt-<step>/ for unreadable ones, moved aside, never deleted
    WORKDIR/metrics.jsonl    one row per log interval, appended by reopening the file for every row

:func:`load_run` is what every script that reads a run uses (``sample.py``, ``evaluate.py``, ``edit.py``, and
any other): the config from ``config.json`` (or, if that is unreadable, the copy saved in the checkpoint), the
newest *readable* checkpoint's EMA parameters (unreadable newer ones are named, the same fallback as
``train.py``), refused if they are not finite.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile

import numpy as np
from common import ConfigError, validate
from ml_collections import ConfigDict

from jaxdiff.checkpoint import Checkpointer, CheckpointMismatchError

# Keys that may change when a run is resumed: they decide how long it runs, how often it logs and saves, and what
# the end-of-run evaluation does, never what a training step computes. Every other key (model, SDE, data, batch
# size, seed, optimiser, loss) is fixed by the first start. A trailing ".*" allows a whole section.
# The one exception is model.dtype, the compute precision: parameters, optimiser state and EMA are float32 in
# both precisions, with the same tree, so a run may continue in the other one (begun in float32 on a CPU,
# continued in bfloat16 on an accelerator); only the rounding of the steps after the switch differs.
SAFE_CHANGES = (
    "name",
    "model.dtype",
    "training.n_iters",
    "training.log_every",
    "training.save_every",
    "training.keep",
    "training.progress_bar",
    "training.steps_per_call",
    "sampling.*",
    "eval.*",
)


class Refused(Exception):
    """A result that would be wrong (non-finite samples, NLL or parameters): one line, exit code 3."""

    code = 3


class WorkdirBusy(ConfigError):
    """Another live process holds the work directory's lock."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


# -- paths and space ---------------------------------------------------------------------------------------
def prepare_dir(path: str, flag: str = "--workdir") -> str:
    """Creates ``path`` if missing and checks it is a directory this process can write into.

    Raises:
      ConfigError: naming ``flag`` and ``path`` for a file in the way, a missing parent, a read-only or full disk.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({_reason(e)})") from None
    return path


def check_output(path: str, flag: str = "--out") -> None:
    """Checks, before any long work, that files ``path.*`` can be written: its directory exists and is writable."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {path}: the directory {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {folder} ({_reason(e)})") from None


def check_free_space(path: str, need_bytes: int, what: str) -> None:
    """Refuses to start work that will need ``need_bytes`` on the disk of ``path`` when less is free."""
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise ConfigError(f"{path}: {what} needs about {_size(need_bytes)}, {_size(free)} free on that disk")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def write_json_atomic(path: str, obj, *, text: str | None = None) -> None:
    """Writes JSON to ``path`` through a temporary file and a rename: the old file or the new one, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text if text is not None else json.dumps(obj, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_jsonl(path: str, row: dict) -> None:
    """Appends one JSON line, opening the file anew: a deleted or rotated file is recreated, never written blind."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file (``[]`` if it is missing); a torn last line is ignored."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# -- one writer ---------------------------------------------------------------------------------------------
class Lock:
    """An exclusive lock on a work directory, held by one process: ``WORKDIR/lock`` names PID, host and start time.

    The file is locked with ``flock``, which the kernel releases when the holder dies however it dies, so a
    lock left by a killed process is recognised as stale and taken over (``note`` says whose it was).
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "lock")
        self.fd: int | None = None
        self.note: str | None = None

    def acquire(self) -> Lock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _describe(os.read(fd, 4096))
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise WorkdirBusy(
                        f"--workdir {os.path.dirname(self.path)}: in use by {holder}; wait for it to finish or "
                        "stop it (one train.py per work directory)"
                    ) from None
                raise
            try:  # the holder may have removed the file between our open and our lock: lock the current one
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    raise FileNotFoundError
            except FileNotFoundError:
                os.close(fd)
                continue
            break
        previous = os.read(fd, 4096)
        if previous.strip():
            self.note = f"note: took over the stale lock of {_describe(previous)}, which is no longer running"
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"PID {info['pid']} on {info['host']} (started {info['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


# -- the config ---------------------------------------------------------------------------------------------
def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".*") and key.startswith(s[:-1])) for s in SAFE_CHANGES)


# Keys added to the configs after runs were written, with the value a config without them stands for: a key
# absent on one side and equal to its default on the other is no change.
DEFAULTS = {"model.dtype": "float32"}


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every key whose change would alter a resumed run (see ``SAFE_CHANGES``)."""
    a, b = _flat(old), _flat(new)
    value = lambda d, k: d.get(k, DEFAULTS.get(k, "(absent)"))  # noqa: E731
    return [
        f"{k}: {value(a, k)!r} -> {value(b, k)!r}"
        for k in sorted(a.keys() | b.keys())
        if value(a, k) != value(b, k) and not _safe(k)
    ]


def config_dict(config: ConfigDict) -> dict:
    """The config as plain JSON data (tuples as lists), as it is written to ``config.json``."""
    return json.loads(config.to_json_best_effort())


def read_config(workdir: str) -> tuple[dict | None, str | None]:
    """``(config, None)`` from ``WORKDIR/config.json``; ``(None, why)`` if it is missing or unreadable."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return None, "no config.json"
    try:
        with open(path) as f:
            return json.load(f), None
    except (OSError, ValueError) as e:
        return None, f"config.json is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"


def check_resume(workdir: str, config: ConfigDict) -> None:
    """Refuses to resume ``workdir`` with a config that changes the run, naming each changed key and value.

    The reference is ``config.json``, or if that is missing or unreadable the config saved with the newest
    readable checkpoint. Nothing is written here.
    """
    saved, _ = read_config(workdir)
    if saved is None:
        saved = _checkpoint_config(workdir)
    if saved is None:
        return
    changes = config_changes(saved, config_dict(config))
    if changes:
        allowed = ", ".join(SAFE_CHANGES)
        raise ConfigError(
            f"--workdir {workdir} holds a run with another config; changed: {'; '.join(changes)}. "
            f"Use a new --workdir, or change only: {allowed}"
        )


def _checkpoint_config(workdir: str) -> dict | None:
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return None
    steps = sorted((int(d) for d in os.listdir(folder) if d.isdigit()), reverse=True)
    for step in steps:
        try:
            with open(os.path.join(folder, str(step), "metadata", "metadata")) as f:
                config = json.load(f).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if config:
            return config
    return None


# -- reading a run ------------------------------------------------------------------------------------------
def load_run(workdir: str, *, log=print):
    """The config, newest readable EMA parameters and step of a run, for sampling, evaluation and editing.

    Unreadable newer checkpoints are named in one note each (and left where they are: moving them aside is for
    the one writer, ``train.py``). A missing or unreadable ``config.json`` falls back, with a note, to the config
    saved with the checkpoint.

    Returns:
      ``(config, params, step)``.

    Raises:
      ConfigError: no run here, or no readable checkpoint (naming each).
      Refused: the parameters are not finite.
    """
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: no such directory")
    saved, why = read_config(workdir)
    folder = os.path.join(workdir, "checkpoints")
    if saved is None and not os.path.isdir(folder):
        raise ConfigError(f"--workdir {workdir}: {why} (write one with experiments/train.py)")
    if not os.path.isdir(folder):
        raise ConfigError(f"--workdir {workdir}: no checkpoint in {folder}")
    ckpt = Checkpointer(folder, async_save=False)
    try:
        found = ckpt.restore_newest(read=ckpt.restore_ema)
    except CheckpointMismatchError as e:
        raise ConfigError(f"--workdir {workdir}: {str(e).splitlines()[0][:300]}") from None
    for step, reason in found.unreadable:
        then = f"using checkpoint {found.step}" if found.step is not None else "no older one"
        log(f"note: checkpoint {step} in {folder} is unreadable ({reason}); {then}")
    if found.step is None:
        if found.unreadable:
            names = ", ".join(str(s) for s, _ in found.unreadable)
            raise ConfigError(f"--workdir {workdir}: no readable checkpoint in {folder} (unreadable: {names})")
        raise ConfigError(f"--workdir {workdir}: no checkpoint in {folder}")
    if saved is None:
        saved = found.metadata.get("config")
        if saved is None:
            raise ConfigError(f"--workdir {workdir}: {why}, and checkpoint {found.step} carries no config")
        log(f"note: --workdir {workdir}: {why}; using the config saved with checkpoint {found.step}")
    try:
        config = validate(ConfigDict(saved))
    except (KeyError, AttributeError, TypeError) as e:
        raise ConfigError(f"--workdir {workdir}: config.json lacks {e}") from None
    require_finite_params(found.value, f"checkpoint {found.step} in {folder}")
    return config, found.value, found.step


def require_finite_params(params, what: str) -> None:
    """Refuses parameters with NaN or inf: whatever they produced would be reported as a result."""
    import jax

    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    bad = sum(int(np.size(x) - np.count_nonzero(np.isfinite(x))) for x in leaves)
    if bad:
        total = sum(int(np.size(x)) for x in leaves)
        raise Refused(f"{what}: {bad} of {total} EMA parameter values are not finite; refusing to use them")


def require_finite(values, info: dict | None, what: str) -> None:
    """Refuses to report a metric computed from non-finite outputs: ``info["nonfinite"]`` or found in ``values``.

    ``info["nonfinite"]`` of the samplers and the likelihood counts the examples whose output is not finite,
    including adaptive solves that failed or did not converge (which come back as NaN).
    """
    arr = np.asarray(values)
    rows = arr.reshape(arr.shape[0], -1) if arr.ndim else arr.reshape(1, 1)
    found = int(np.sum(~np.all(np.isfinite(rows), axis=-1)))
    flagged = int(np.asarray(info.get("nonfinite", 0))) if info else 0
    bad = max(found, flagged)
    if bad:
        raise Refused(f"{what}: {bad} of {len(rows)} outputs are not finite (a diverged model or a failed ODE solve)")
