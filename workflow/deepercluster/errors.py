"""Errors in the user's inputs: the CLI prints their one-line message (file and fix), no traceback.

Every other exception is a bug and keeps its traceback.
"""

import re


class InputError(RuntimeError):
    """Bad input to a stage; the message names the file and the fix."""


class ConfigError(InputError, ValueError):
    """A config value or key the schema does not allow (also a ``ValueError``, as Snakemake expects)."""


class DataError(InputError):
    """A data source, table, manifest or system data file that cannot give the images asked for."""


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable or of another architecture."""


class ShardError(InputError):
    """A feature shard that is missing, truncated or inconsistent."""


class ClustersError(InputError):
    """A clusters file that does not match the others, or more clusters asked for than there are images."""


class EvaluationError(InputError):
    """An evaluation input (labels, VOC07 folder, retrieval list, earlier evaluations) that cannot be used."""


class UnreadableImageError(InputError):
    """An image of the manifest that can no longer be read."""


class TrainingInputError(InputError):
    """Training settings or inputs that cannot make a block (batch size vs ranks, labels vs manifest, launcher)."""


class OutOfSpaceError(InputError):
    """The disk of an output is full; nothing finished was lost, the output was not written."""


class OutputNotWritableError(InputError):
    """The folder of an output may not be written (permissions, an immutable folder, a read-only disk)."""


def one_line(error: InputError) -> str:
    """``error``'s message on one line; re-raised from a DataLoader worker (whose message is the worker's
    traceback), the original error's message alone."""
    message = str(error)
    if message.startswith("Caught ") and "Original Traceback" in message:
        message = message.rpartition(f"{type(error).__module__}.{type(error).__qualname__}: ")[2] or message
    return re.sub(r"\s*\n\s*", " ", message).strip()
