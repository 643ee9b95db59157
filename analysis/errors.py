"""One family of exceptions; every message says what was expected, what was
found, and where (file, tensor name, shape)."""


class MergescopeError(Exception):
    """Base of every error the engine raises on purpose."""


class CheckpointError(MergescopeError):
    """A checkpoint file or folder cannot be read as asked."""


class ValidationError(MergescopeError, ValueError):
    """Inputs are readable but inconsistent (keys, shapes, dtypes, values)."""


class HyperparameterError(MergescopeError, ValueError):
    """A method's knob is missing, unknown, or out of its declared range."""


class StorageError(MergescopeError, OSError):
    """A cache or export file could not be written (disk full: errno ENOSPC).
    `filename` is the file; nothing partial was left at its path."""


class ResourceError(MergescopeError):
    """Work does not fit the memory it may use, even after falling back (smaller batches, the CPU)."""
