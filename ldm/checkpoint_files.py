"""Checkpoint files without Lightning: written atomically, checked for completeness, read without running code.

The pure half of :mod:`ldm.checkpoints` (which adds Lightning's checkpoint IO plugin): the frozen-stage
wrappers of the pure packages (``ldm.autoencoder``, ``ldm.contrastive``) load trained parts through it
(:mod:`ldm.run_parts`) without importing Lightning.


Why by hand: Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction whose
temporary file lives in ``$TMPDIR``. When that is another file system than the run folder
(tmpfs or node-local disk against a shared run folder, the usual cluster layout), the final
"rename" is a copy that writes the destination in place, so a kill during the copy leaves a
truncated file under the final ``.ckpt`` name (and an orphaned temporary file in ``$TMPDIR``).
:class:`AtomicCheckpointIO` writes a temporary file *in the destination folder*, flushes and
fsyncs it, then ``os.replace``-s it into place (atomic on POSIX within one file system) and
fsyncs the folder: a final name only ever holds a complete checkpoint.

Reading: a checkpoint is a pickle, and ``torch.load(weights_only=False)`` runs whatever code
a crafted file names. Every checkpoint the project reads goes through
:func:`load_checkpoint_file`: ``weights_only=True`` with :data:`SAFE_GLOBALS` allow-listed.
:func:`checkpoint_problem` is the cheap completeness check the loaders use to skip a truncated
file: torch's zip format ends with the zip central directory, which a truncated file lacks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import socket
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

log = logging.getLogger(__name__)

#: Python objects our checkpoints hold beyond what ``torch.load(weights_only=True)`` accepts by default
#: (tensors, dicts, lists, tuples, str, numbers, OrderedDict). Measured by saving a checkpoint of every stage
#: (KL and VQ autoencoder, CLIP, SigLIP, prior, LDM, inpainting LDM, both unCLIP decoders) and loading it with
#: ``weights_only=True``: Lightning's hyper-parameters (plain dicts from jsonargparse), loop, callback
#: (ModelCheckpoint, EMAWeightAveraging), optimizer and LR-scheduler states need nothing more today. A new kind
#: of state that needs a class (e.g. numpy RNG state: ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
#: ``numpy.dtype`` and its dtype class) is added here, never by loading with ``weights_only=False``.
SAFE_GLOBALS: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = []

#: the infix of temporary checkpoint files; loaders never pick a file whose name contains it
TEMP_INFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint file that is incomplete, unreadable or holds objects outside :data:`SAFE_GLOBALS`."""


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete torch checkpoint, or None if it looks complete.

    Cheap: reads the zip end record and central directory only (no tensor data). A torch checkpoint is a
    zip archive whose central directory is written last, so a file cut anywhere lacks it; each member's
    offset + size must also lie inside the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except FileNotFoundError:
        return "file vanished"
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"not a complete torch zip checkpoint (truncated or corrupt: {e})"
    if not any(info.filename.endswith("/data.pkl") or info.filename == "data.pkl" for info in infos):
        return "zip archive without data.pkl: not a torch checkpoint"
    for info in infos:
        if info.header_offset + info.compress_size > size:
            return f"member {info.filename} extends past the end of the file (truncated)"
    return None


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` of a checkpoint with ``weights_only=True`` and :data:`SAFE_GLOBALS` allowed.

    Raises :class:`CheckpointError` naming the file when it is incomplete or when unpickling it would build
    an object that is not allow-listed (which is how a crafted checkpoint runs code): nothing of it runs.
    """
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"cannot load checkpoint {path}: {problem}")
    with open(path, "rb") as f:
        return _safe_load(f, path, map_location)


def _safe_load(f: Any, path: str | os.PathLike, map_location: Any) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the global {found.group(1)}" if found else "an object"
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it asks to build {what}, which checkpoints of this project never "
            "hold (a crafted or foreign file would run code this way). If the file is yours and the object is "
            "harmless, add it to ldm.checkpoints.SAFE_GLOBALS."
        ) from None


def temp_path(path: Path) -> Path:
    """The temporary file a writer of ``path`` uses: hidden, in the same folder, named by host and pid (so a
    writer can tell whether the process that left one behind is still alive)."""
    return path.with_name(f".{path.name}{TEMP_INFIX}-{_host()}-{os.getpid()}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def is_temp_file(path: str | os.PathLike) -> bool:
    """Whether a file name is a temporary (possibly partial) checkpoint that loaders must never pick."""
    return TEMP_INFIX in Path(path).name


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove temporary checkpoint files in ``folder`` left by killed writers; returns what was removed.

    Only files written on this host by a process that no longer exists are removed: a writer on another node
    sharing the folder, or a live one, may still be writing its file.
    """
    removed = []
    host = _host()
    for candidate in folder.glob(f".*{TEMP_INFIX}-*"):
        match = _TEMP_NAME.match(candidate.name)
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
            removed.append(candidate)
            log.info("removed %s, a partial checkpoint of a writer that was killed", candidate)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def atomic_save(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, ``os.replace``, fsync the folder.

    A kill at any moment leaves either the previous file or the new complete one under ``path``, plus at
    most a hidden temporary file that :func:`remove_stale_temp_files` removes on the next save.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(folder)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (a crash right after it must not bring back the old entry)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and platforms) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The ``global_step`` a Lightning checkpoint was written at (-1 if it has none). Cheap: the file is
    memory-mapped, so no tensor data is read."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    step = checkpoint.get("global_step", -1) if isinstance(checkpoint, dict) else -1
    return int(step) if isinstance(step, int) else -1


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of a run folder with the highest training step, or None if it has none.

    Candidates: the preemption checkpoints (``hpc_ckpt_*.ckpt``) in the folder and every ``checkpoints/*.ckpt``
    (last, best, periodic). Incomplete and temporary files are skipped with a warning; among equal steps the
    newest file wins. This is what a requeued job resumes from: a job requeued without warning (node failure,
    ``scontrol requeue``) must not go back to an older ``hpc_ckpt`` when a newer periodic checkpoint exists.
    """
    run_dir = Path(run_dir)
    files = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("*.ckpt")]
    ranked = []
    for path in files:
        if is_temp_file(path):
            continue
        problem = checkpoint_problem(path)
        if problem is not None:
            log.warning("skipping checkpoint %s: %s", path, problem)
            continue
        try:
            ranked.append((checkpoint_step(path), path.stat().st_mtime, path))
        except (OSError, RuntimeError, pickle.UnpicklingError) as e:
            log.warning("skipping checkpoint %s: %s", path, e)
    if not ranked:
        return None
    return max(ranked, key=lambda r: (r[0], r[1]))[2]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``last.ckpt`` or the newest ``*.ckpt`` under ``path/checkpoints``.

    Only complete checkpoints are picked: a truncated or unreadable one (a writer killed mid-save by an older
    version, a full disk, a copy cut short) is skipped with a warning for the newest complete one, and
    temporary files (``*.tmp*``) are never candidates. A file named explicitly is returned as it is: loading it
    (:func:`load_checkpoint_file`) says if it is incomplete.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path
    folder = path / "checkpoints"
    candidates = []  # (mtime, path)
    for ckpt in folder.glob("*.ckpt") if folder.is_dir() else []:
        mtime = _mtime(ckpt)
        if mtime is not None and not is_temp_file(ckpt):
            candidates.append((mtime, ckpt))
    if not candidates:
        raise FileNotFoundError(f"no checkpoint: {path} is neither a .ckpt file nor a run folder with checkpoints/*.ckpt")
    # last.ckpt first (the weights of the last step), then newest first
    ordered = [p for _, p in sorted(candidates, key=lambda c: (c[1].name == "last.ckpt", c[0]), reverse=True)]
    skipped = []
    for ckpt in ordered:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s; trying an older one", ckpt, problem)
        skipped.append(f"{ckpt.name} ({problem})")
    raise CheckpointError(f"no complete checkpoint in {folder}: " + "; ".join(skipped))


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile (a checkpoint callback rotating its top-k)
        return None


def find_config(ckpt: Path) -> Path:
    for folder in (ckpt.parent, ckpt.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise FileNotFoundError(
        f"no config.yaml beside {ckpt} or in {ckpt.parent.parent}: load a checkpoint from the run folder "
        "that `ldm fit` wrote (runs/<name>/<version>/), which holds config.yaml"
    )


def run_config(path: str | os.PathLike) -> dict:
    """The resolved config.yaml of a run folder (or of a checkpoint inside one)."""
    return yaml.safe_load(find_config(find_checkpoint(path)).read_text()) or {}
