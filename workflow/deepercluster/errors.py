"""Errors in the user's inputs: the CLI prints their one-line message (file and fix), no traceback."""


class InputError(RuntimeError):
    """Bad input to a stage; the message names the file and the fix."""


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable or of another architecture."""


class ShardError(InputError):
    """A feature shard that is missing, truncated or inconsistent."""


class UnreadableImageError(InputError):
    """An image of the manifest that can no longer be read."""
