"""Typed errors. Each carries a message meant for the person who sent the request or built the
servable: what was wrong, what was expected, what was received. Protocol mapping lives elsewhere."""


class KilnError(Exception):
    """Base of every error Kiln reports on purpose (anything else is a bug)."""


class InvalidInput(KilnError):
    """A request's inputs do not fit the signature: names, dtypes, shapes or values."""


class NotFound(KilnError):
    """A model, version or signature that does not exist."""


class Unsupported(KilnError):
    """Valid but not supported here, such as a dtype the engine cannot run."""


class ServableError(KilnError):
    """A servable that cannot be loaded: missing or corrupt files, other CPU, unknown format."""


class CompileError(KilnError):
    """A SavedModel that cannot be compiled as asked, naming the signature and the reason."""


class StorageError(KilnError):
    """A model store that cannot be read: unreachable after retries, or refusing access."""


class ConfigError(KilnError):
    """A model configuration (flags, models.config, YAML or JSON) that cannot be used as written."""
