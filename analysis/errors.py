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
