"""Hydra entry point: compose the config, run the experiment, return the objective (val loss)."""

import time

STARTED = time.perf_counter()  # before the imports: the first job's startup seconds count from here (harness/timing.py)

import sys  # noqa: E402

import hydra  # noqa: E402
from hydra.errors import CompactHydraException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from harness.preflight import check_folders, check_presets  # noqa: E402
from harness.resolvers import register  # noqa: E402

register()


class JobFailed(CompactHydraException):
    """A sweep job's config or run-folder error: Hydra reports it in one line (after the job's overrides)
    instead of a traceback, and the sweep still exits non-zero; the preflight named it before the sweep."""


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from harness.errors import ConfigError, RunFolderError
    from harness.train import main as train_main

    try:
        return train_main(cfg)
    except (ConfigError, RunFolderError) as e:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        kind = "config error" if isinstance(e, ConfigError) else "error"
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # an ordinary job failure: the sweep's other jobs go on
            raise JobFailed(f"{kind}: {e}") from None  # Hydra prints it after the job's overrides, no traceback
        raise SystemExit(f"{kind}: {e}") from None  # one line naming the bad key or file, no traceback


if __name__ == "__main__":
    check_presets(sys.argv[1:])  # a misspelled preset: one line, before Hydra composes anything
    check_folders(sys.argv[1:])  # a file where the logs or the cache must go: one line, before Hydra makes a folder
    main()
