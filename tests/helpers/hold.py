"""A Lightning callback that holds a run at the start of its training until the test lets it go: a second process
can then be started while the first one owns the run folder, without timing. The folder comes from the
environment (a path in an override would become part of the run's folder name)."""

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class Hold(Callback):
    def __init__(self, timeout_s: float = 300.0):
        self.folder, self.timeout_s = Path(os.environ["HOLD_DIR"]), float(timeout_s)

    def on_train_start(self, trainer, pl_module):
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{os.getpid()}.started").write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout_s
        while not (self.folder / "release").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"hold: {self.folder / 'release'} never appeared")
            time.sleep(0.05)
