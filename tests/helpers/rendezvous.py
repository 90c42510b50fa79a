"""A Lightning callback that proves two jobs of a sweep train at the same time, without timing: each job writes
its marker when its training starts and waits, alive, until it sees every other job's marker. Jobs that ran one
after the other never meet, and the first one fails after ``timeout_s`` (a failure guard, not a measurement)."""

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class Rendezvous(Callback):
    def __init__(self, jobs: int, timeout_s: float = 300.0):
        # the folder comes from the environment: a path in an override would become part of the job's folder name
        self.folder, self.jobs, self.timeout_s = Path(os.environ["RENDEZVOUS_DIR"]), int(jobs), float(timeout_s)

    def on_train_start(self, trainer, pl_module):
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = self.folder / f"{os.getpid()}.start"
        mine.write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout_s
        while len(list(self.folder.glob("*.start"))) < self.jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rendezvous: no other job started training while {mine} waited")
            time.sleep(0.05)
        seen = sorted(p.name for p in self.folder.glob("*.start") if p != mine)
        (self.folder / f"{os.getpid()}.met").write_text("\n".join(seen))
