"""Atomic outputs and provenance: a stage killed at any moment leaves no finished-looking file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from deepercluster.errors import InputError, OutOfSpaceError

# Below this many free bytes a failed write is taken for a full disk (torch.save reports one
# as a RuntimeError with no errno).
FULL_DISK_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary name starts with a dot and ends with ``.partial``, so neither Snakemake
    nor a user mistakes it for the output. On any exception it is removed. A full disk is an
    ``OutOfSpaceError`` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        if isinstance(error, InputError) or not out_of_space(error, path.parent):
            raise
        raise OutOfSpaceError(
            f"no space left on the disk of {path} while writing it: free space there (or move results/ to "
            "a larger disk) and rerun; finished outputs are kept and not redone"
        ) from error
    finally:
        partial.unlink(missing_ok=True)


def out_of_space(error: OSError | RuntimeError, folder: Path) -> bool:
    """Whether a failed write was a full disk: errno ENOSPC, or (no errno) almost no free bytes left."""
    if isinstance(error, OSError):
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
