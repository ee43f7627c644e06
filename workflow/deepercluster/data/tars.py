"""Images in tar shards (the WebDataset layout: ``shard-000123.tar`` holding ``key.jpg``, ``key.cls``, ``key.json``),
indexed from their headers and read by one positioned read each, never extracted.

A tar's index gives one row per image member: the tar's ``path``, the member's ``key``, the ``offset`` and
``size`` of its bytes, the tar's ``tar_size`` and ``tar_mtime`` when it was indexed (a tar changed since is
refused): ``formats.manifest.LOCATION``; and the key's metadata members as columns: ``.cls`` -> ``label``,
``.txt`` -> ``text``, each top-level scalar of ``.json`` -> a column of its name.
"""

from __future__ import annotations

import collections
import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator

import pandas as pd

from deepercluster.errors import DataError, UnreadableImageError

# A member's key and extension as WebDataset splits them: the key runs to the first dot of the file name.
KEY_AND_EXTENSION = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")
# Metadata members: a text member's column; ``json`` gives one column per top-level scalar.
TEXT_MEMBERS = {"cls": "label", "txt": "text"}
# Tars a reading process keeps open (a training rank draws from thousands of tars; ulimit -n is often 1,024).
OPEN_TARS = 64


def index_tar(path: str, image_extensions: tuple[str, ...]) -> pd.DataFrame:
    """One row per image member of the tar ``path``, read from its headers (and its small metadata members)."""
    stat = os.stat(path)
    images: dict[str, tarfile.TarInfo] = {}
    metadata: dict[str, dict[str, object]] = collections.defaultdict(dict)
    with open(path, "rb") as file:
        for key, extension, member in file_members(file, path, stat.st_size):
            if "." + extension.lower() in image_extensions:
                if key in images:
                    raise DataError(
                        f"{path} holds two images of key {key!r} ({images[key].name}, {member.name}); keep one image "
                        "per key"
                    )
                images[key] = member
            elif extension in TEXT_MEMBERS or extension == "json":
                metadata[key].update(read_metadata(file, member, extension, path))
    rows = [
        {"path": path, "key": key, "offset": m.offset_data, "size": m.size, **metadata.get(key, {})}
        for key, m in images.items()
    ]
    frame = pd.DataFrame(rows, columns=["path", "key", "offset", "size"] if not rows else None)
    return frame.assign(tar_size=stat.st_size, tar_mtime=stat.st_mtime)


def file_members(file: io.BufferedReader, path: str, size: int) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of each file member of the open tar ``path`` of ``size`` bytes, from its headers."""
    fix = "replace it with a complete copy, or move it out of data.path"
    try:
        with tarfile.open(fileobj=file, mode="r:") as tar:
            for member in tar:
                key, extension = split_member(member)
                if member.offset_data + member.size > size:
                    raise DataError(f"{path} is truncated: {member.name} ends past its {size} bytes; {fix}")
                if key is not None and member.isfile():
                    yield key, extension, member
    except (tarfile.TarError, EOFError) as error:
        raise DataError(f"{path} is not a readable tar ({error}); {fix}") from error


def split_member(member: tarfile.TarInfo) -> tuple[str | None, str]:
    """A member's (key, extension); (None, "") for a name with no extension."""
    match = KEY_AND_EXTENSION.match(member.name)
    return (match.group(1), match.group(2)) if match else (None, "")


def read_metadata(file: io.BufferedReader, member: tarfile.TarInfo, extension: str, tar: str) -> dict[str, object]:
    """The columns a metadata member gives its key."""
    text = os.pread(file.fileno(), member.size, member.offset_data).decode("utf-8", errors="replace").strip()
    if extension != "json":
        return {TEXT_MEMBERS[extension]: text}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{tar}: {member.name} is not JSON ({error}); fix or remove that member") from error
    return (
        {k: v for k, v in values.items() if isinstance(v, str | int | float | bool)} if isinstance(values, dict) else {}
    )


def tar_paths(root: str) -> list[str]:
    """The ``.tar`` files of ``data.path``: a folder (searched recursively) or a glob pattern, sorted."""
    if os.path.isdir(root):
        found = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".tar")]
    else:
        found = [p for p in glob.glob(root, recursive=True) if p.endswith(".tar") and os.path.isfile(p)]
    return sorted(os.path.abspath(p) for p in found)


def duplicate_keys(frame: pd.DataFrame) -> DataError | None:
    """The error of two tars holding the same key (a key is an image's name across the collection)."""
    repeated = frame[frame["key"].duplicated(keep=False)]
    if repeated.empty:
        return None
    key = repeated["key"].iloc[0]
    tars = repeated.loc[repeated["key"] == key, "path"].tolist()
    return DataError(
        f"{tars[0]} and {tars[1]} both hold the key {key!r} ({repeated['key'].nunique()} keys are repeated): a "
        "repeated image weighs twice in the clustering; remove one of the copies"
    )


class MemberBytes(io.BytesIO):
    """An image's bytes read from a tar, shown (in PIL's messages) as where they were read."""

    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(data)
        self.where = where

    def __repr__(self) -> str:
        return self.where


class TarReader:
    """Reads images from the tars of a manifest: one ``os.pread`` of each image's bytes, the tar checked against
    its size and mtime when indexed the first time this process opens it. Picklable: DataLoader workers open their
    own files."""

    def __init__(self) -> None:
        self.files: collections.OrderedDict[str, int] = collections.OrderedDict()

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()

    def __del__(self) -> None:
        for descriptor in self.files.values():
            os.close(descriptor)

    def read(self, path: str, offset: int, size: int, tar_size: int, tar_mtime: float) -> io.BytesIO:
        """The image bytes ``[offset, offset + size)`` of the tar ``path``."""
        data = os.pread(self.descriptor(path, tar_size, tar_mtime), size, offset)
        if len(data) != size:
            raise UnreadableImageError(
                f"{path} ended at byte {offset + len(data)} inside an image of {size} bytes at {offset}; {RESTORE}"
            )
        return MemberBytes(data, f"{path} bytes {offset} to {offset + size}")

    def descriptor(self, path: str, tar_size: int, tar_mtime: float) -> int:
        """The open file of ``path``, opened (and checked) when this process has not kept it open."""
        if path in self.files:
            self.files.move_to_end(path)
            return self.files[path]
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError as error:
            raise UnreadableImageError(f"cannot open {path} ({error.strerror}); {RESTORE}") from error
        stat = os.fstat(descriptor)
        if (stat.st_size, stat.st_mtime) != (tar_size, tar_mtime):
            os.close(descriptor)
            raise UnreadableImageError(
                f"{path} changed since results/data/manifest.parquet was built (now {stat.st_size} bytes, modified "
                f"{stat.st_mtime}; then {tar_size} bytes, {tar_mtime}): its images' offsets no longer hold; "
                "restore it, or delete the manifest and rerun to index it again"
            )
        self.files[path] = descriptor
        if len(self.files) > OPEN_TARS:
            os.close(self.files.popitem(last=False)[1])
        return descriptor


RESTORE = "restore it from where the collection is kept, or delete results/data/manifest.parquet and rerun"
