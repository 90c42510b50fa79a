"""Where a job's seconds go: each stage's wall time, and inside a fit its setup, first step (compile), steady
steps, validation and checkpoint writes. results.json keeps them as ``timings_s`` and run.log says them in one
line, so the fixed cost of a sweep's short jobs is measured on every run, not guessed."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from lightning.pytorch.callbacks import Callback

_FIRST_JOB = [True]  # the process's first job also pays the interpreter's start and the imports


def startup_seconds() -> float | None:
    """Seconds before the process's first job: from the entry point's ``STARTED`` mark (run.py's first line)
    where it has one, since a shell that execs python (``bash -c 'prep; python run.py'``) hands it its own
    birth time; else (a launcher's worker process) the process's age."""
    started = getattr(sys.modules.get("__main__"), "STARTED", None)
    if isinstance(started, float):
        return time.perf_counter() - started
    return process_age()


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Timings(dict):
    """Stage name -> seconds (a stage timed twice adds up)."""

    def __init__(self):
        super().__init__()
        self.t0 = time.time()  # the job's start: its wall time counts from here (its startup came before)
        if _FIRST_JOB[0]:
            _FIRST_JOB[0] = False
            age = startup_seconds()
            if age is not None:
                self["startup"] = age  # interpreter, imports and config composition, before this job began

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0

    def line(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.items() if not isinstance(v, dict))


class FitClock(Callback):
    """A fit's seconds: ``init`` (before trainer.fit), ``setup`` (trainer.fit to the first batch: data loaders,
    checkpoint restore), ``first_step`` (its first optimizer step: compile, allocator warm-up), ``steps`` (every
    later step, less validation and checkpoint writes: the steady loop with its logging), ``validation``,
    ``checkpoint`` (last.ckpt and trunk writes, see :func:`charge_checkpoint`) and ``total`` (from ``init`` on).
    It goes first in the callbacks, so its validation-end hook runs before the checkpoint saves that follow a
    validation."""

    def __init__(self):
        self.t_made = time.perf_counter()
        self.t_fit = self.t_first = self.t_mark = None
        names = ("init", "setup", "first_step", "steps", "validation", "checkpoint")
        self.seconds = dict.fromkeys(names, 0.0)
        self._paused = 0.0

    def start(self) -> None:
        """trainer.fit begins: the time since this clock was made is ``init`` (compile wrappers, the Lightning
        module, the Trainer and its loggers: W&B's start)."""
        self.t_fit = time.perf_counter()
        self.seconds["init"] = self.t_fit - self.t_made

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.seconds["setup"] = self.t_first - self.t_fit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.seconds["first_step"] and trainer.global_step >= 1:
            self.seconds["first_step"] = time.perf_counter() - self.t_first
            self.t_mark, self._paused = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, pl_module):
        self._t_val = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        spent = time.perf_counter() - self._t_val
        self.seconds["validation"] += spent
        self._paused += spent

    def wrote_checkpoint(self, seconds: float) -> None:
        self.seconds["checkpoint"] += seconds
        self._paused += seconds

    def finish(self) -> dict:
        end = time.perf_counter()
        if self.t_mark is not None:
            self.seconds["steps"] = max(0.0, end - self.t_mark - self._paused)
        self.seconds["total"] = end - self.t_made
        return {k: round(v, 3) for k, v in self.seconds.items()}


# torch.compile's counters a fit reports: frames traced, graphs made, graph breaks, and the on-disk caches' hits
# (a job whose stages or a warm worker's jobs recompile what an earlier one compiled shows it here)
_COMPILE_COUNTERS = (
    ("frames", "frames", "total"),
    ("graphs", "stats", "unique_graphs"),
    ("fx_cache_hits", "inductor", "fxgraph_cache_hit"),
    ("fx_cache_misses", "inductor", "fxgraph_cache_miss"),
    ("autograd_cache_hits", "aot_autograd", "autograd_cache_hit"),
    ("autograd_cache_misses", "aot_autograd", "autograd_cache_miss"),
    ("autograd_cache_bypasses", "aot_autograd", "autograd_cache_bypass"),
)


def compile_counts() -> dict:
    """torch.compile's process-wide counters now, plus its graph breaks (subtract two readings for a fit's own)."""
    from torch._dynamo.utils import counters

    out = {name: int(counters[group][key]) for name, group, key in _COMPILE_COUNTERS}
    out["graph_breaks"] = int(sum(counters["graph_break"].values()))
    return out


def since(before: dict) -> dict:
    """What the counters gained since ``before``."""
    return {k: v - before.get(k, 0) for k, v in compile_counts().items()}


@contextmanager
def charge_checkpoint(trainer):
    """Times a checkpoint write into the trainer's FitClock, if it has one."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        for cb in trainer.callbacks:
            if isinstance(cb, FitClock):
                cb.wrote_checkpoint(time.perf_counter() - t0)
