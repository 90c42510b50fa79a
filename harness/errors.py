"""The harness's own exceptions: each ends a run with one line instead of a traceback."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and what is allowed."""


class RunFolderError(RuntimeError):
    """A run folder or cache entry holds state this run must not use (another config's run); one line."""


class StageStopped(RuntimeError):
    """A stage stopped on purpose before its last step (``train.stop_after_steps``); its checkpoint resumes it."""
