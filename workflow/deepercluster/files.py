"""Atomic outputs and provenance: a stage killed at any moment leaves no finished-looking file."""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from deepercluster.errors import InputError, OutOfSpaceError, OutputNotWritableError

# Below this many free bytes a failed write is taken for a full disk (torch.save reports one
# as a RuntimeError with no errno).
FULL_DISK_BYTES = 1 << 20
# The temporary name of an output being written: ``.{name}.{pid}.partial``, pid the writer's.
PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.partial")
# What a write into a folder one may not write raises: no permission, an immutable folder, a read-only disk.
NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name starts with a dot and ends with ``.partial``, so neither Snakemake
    nor a user mistakes it for the output. On any exception it is removed; those of ``path`` that a killed
    writer left are removed first (``remove_stale_partials``). A full disk is an ``OutOfSpaceError``, a folder
    that may not be written an ``OutputNotWritableError``, each naming ``path``.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
        yield partial
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        if isinstance(error, InputError):
            raise
        if isinstance(error, OSError) and error.errno in NOT_PERMITTED and not os.access(writable(path), os.W_OK):
            raise OutputNotWritableError(
                f"cannot write {path}: the folder {writable(path)} is not writable ({os.strerror(error.errno)}); "
                "make it writable (its permissions, chattr -i, a read-write mount) or move results/ to a writable "
                "disk, and rerun"
            ) from error
        if not out_of_space(error, path.parent):
            raise
        raise OutOfSpaceError(
            f"no space left on the disk of {path} while writing it: free space there (or move results/ to "
            "a larger disk) and rerun; finished outputs are kept and not redone"
        ) from error
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A folder beside ``path`` for the temporary files of the stage writing it (``.{name}.{pid}.scratch``), removed
    when the block ends; those of ``path`` that killed writers left are removed first."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.scratch"):
        pid = stale.name.rsplit(".", 2)[1]
        if pid.isdigit() and not running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = path.with_name(f".{path.name}.{os.getpid()}.scratch")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def writable(path: Path) -> Path:
    """The folder a write of ``path`` needs to write into: its own, or the nearest one above it that exists."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def remove_stale_partials(path: Path) -> None:
    """Remove the partial files of ``path`` that writers killed mid-write left (their pid no longer runs here)."""
    for partial, pid in earlier_partials(path.parent).get(path.name, []):
        if not running(pid):
            partial.unlink(missing_ok=True)


@functools.cache
def earlier_partials(folder: Path) -> dict[str, list[tuple[Path, int]]]:
    """The partial files in ``folder`` when this process first writes there, (file, writer's pid) by output name:
    listed once per process and folder, so that writing many files into one folder stays linear (a writer that
    dies later leaves its partial to the next run)."""
    found: dict[str, list[tuple[Path, int]]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if match := PARTIAL.fullmatch(entry.name):
                found.setdefault(match["name"], []).append((folder / entry.name, int(match["pid"])))
    return found


def running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def out_of_space(error: OSError | RuntimeError, folder: Path) -> bool:
    """Whether a failed write was a full disk: errno ENOSPC, or (no errno: torch.save, numpy's short write) almost
    no free bytes left."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    usage = os.statvfs(folder)
    return usage.f_bavail * usage.f_frsize < FULL_DISK_BYTES


def sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, the provenance key of checkpoints and stage outputs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
