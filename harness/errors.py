"""The one exception type for a bad configuration: raised before any compute, one line naming the key."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and what is allowed."""


class RunFolderError(RuntimeError):
    """A run folder or cache entry holds state this run must not use (another config's run); one line."""
