"""The exceptions the core library raises; the server maps them to gRPC status codes in one place."""


class DeltaMaskError(Exception):
    """Base class of every error the core library raises on purpose."""


class PayloadError(DeltaMaskError, ValueError):
    """Anything wrong with a serialized update or theta message: truncated, garbled, unknown codec,
    wrong d, an image of the wrong kind or size. Raised before any state is touched."""


class DataError(DeltaMaskError, ValueError):
    """Anything wrong with a dataset or a partition: missing files, wrong layout, empty client."""


class ModelError(DeltaMaskError, ValueError):
    """A backbone that cannot be built as asked: unknown backbone, missing weight file, bad split."""


class CheckpointError(DeltaMaskError, ValueError):
    """A run's checkpoint that cannot be resumed: damaged, or written by a run of another configuration."""
