"""User-facing error types.

Each failure a user can cause (a bad config key, a corrupt shard, a missing
checkpoint) raises one of these with a one-line message that names the file,
key or value and what was expected. Entry points catch `GptMoeError`, print the
message on one line and exit non-zero instead of showing a traceback.
"""


class GptMoeError(Exception):
    """Base class: the message is meant for the user, on one line."""


class ConfigError(GptMoeError, ValueError):
    """A model, training or DeepSpeed configuration value is missing or impossible."""


class DataError(GptMoeError, ValueError):
    """A corpus, shard, manifest or tokenizer is missing, malformed or inconsistent."""


class CheckpointError(GptMoeError, ValueError):
    """A checkpoint is missing, incomplete or does not match the model."""


class LostRankError(GptMoeError, RuntimeError):
    """A collective failed because another rank stopped answering: its node died, froze or lost the network."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to `limit` characters:
    what a one-line error quotes of a library's failure."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
