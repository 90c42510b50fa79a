"""A window of steady training steps under torch.profiler and CUDA's sync check (``train.profile_steps``).

A harness job trained at 0.66-0.69x the bare step's tokens/s on an H200 (benchmarks/RESULTS.md, 2026-12-03): the
GPU waited 15-28 ms a step for the host. This window says where: each step's wall time beside the time the GPU
was busy in it (the union of its kernels and copies), the kernels and host ops that take the most time, and
every Python line that made the host wait for the GPU (``torch.cuda.set_sync_debug_mode``), with its count. It
writes ``profile/profile.json``, ``profile/summary.txt`` and a Chrome trace (``profile/trace.json.gz``) in the
stage's folder; nothing it records changes what the run computes.
"""

from __future__ import annotations

import gzip
import json
import shutil
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile

# host calls that wait for the device (CUDA runtime names as the profiler records them; cudaMemcpy is the
# blocking copy, cudaMemcpyAsync is not one)
WAITS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})
_SYNC_WARNING = "synchronizing CUDA operation"


def window(total_steps: int, steps: int, val_every: int) -> tuple[int, int]:
    """The optimizer steps ``[start, end)`` to profile: a quarter of the way in (past compile and warm-up), at
    least step 3, with no validation inside (its pass is not charged to the steps): a window that would cross
    one starts right after it, and one longer than ``val_every`` stops at the next (fewer steps than asked,
    which the fit's log says)."""
    start = max(3, total_steps // 4)
    next_val = (start // val_every + 1) * val_every
    if start < next_val < min(start + steps, total_steps):
        start = next_val  # the validation at next_val runs before this step's batch
        next_val += val_every
    end = min(start + steps, total_steps, next_val) if start < total_steps else start
    return start, end


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: the time at least one of them ran."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= reach:
            continue
        total += b - max(a, reach)
        reach = b
    return total


def on_device(event) -> bool:
    """A kernel, copy or memset the GPU ran. Not a user annotation's GPU range (``Optimizer.step#AdamW.step``, the
    names inductor gives its kernels): a range spans the work inside it and idle gaps too, so counting it would call
    the GPU busy for the whole step (99.5% of a profiled H100 step, before this)."""
    return event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation


# what launched a kernel, by the name of the innermost op it ran under (first match wins; lower case)
KINDS = (
    ("expert GEMMs", ("aten::_grouped_mm",)),
    ("other GEMMs", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")),
    ("attention", ("attention", "flash")),
    ("optimizer and clip", ("adam", "_foreach_", "multi_tensor")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("compiled kernels: norms, activations, MoE glue, recompute", ("triton_",)),
    ("copies and fills", ("aten::copy_", "aten::_to_copy", "aten::fill_", "aten::zero_", "memcpy", "memset")),
)


def device_ms_by_kind(prof, steps: int) -> dict[str, float]:
    """A step's kernel time by what launched it (``KINDS``): each kernel counted once, under the innermost op
    recorded around its launch; ``unattributed`` is kernel time no recorded op launched. Where a step's device
    time goes, in the terms of its code: the expert GEMMs against the MoE glue, the optimizer, the recompute."""
    out = Counter()
    for a in prof.key_averages():
        if a.is_user_annotation or a.device_type != torch.autograd.DeviceType.CPU or a.self_device_time_total <= 0:
            continue
        name = a.key.lower()
        kind = next((k for k, patterns in KINDS if any(p in name for p in patterns)), "other")
        out[kind] += a.self_device_time_total
    kernels = sum(e.time_range.elapsed_us() for e in prof.events() if on_device(e))
    if kernels > sum(out.values()):
        out["unattributed"] += kernels - sum(out.values())
    return {k: round(v / 1e3 / steps, 3) for k, v in out.most_common()}


def call_site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame outside torch's own Python: the line that asked for the value."""
    for frame in reversed(stack):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path.endswith("/warnings.py") or "/harness/profiling.py" in path:
            continue
        return f"{_short(path)}:{frame.lineno} {frame.name}"
    return "?"


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/harness/", "/benchmarks/"):
        if marker in path:
            return (marker.strip("/") + "/" if marker != "/site-packages/" else "") + path.split(marker, 1)[1]
    return Path(path).name


class SyncAudit:
    """Counts, by call site, the host's waits for the GPU that CUDA's sync debug mode reports (``.item()``,
    ``.tolist()``, a copy to the host, a pageable copy to the device, data-dependent shapes). A no-op without
    CUDA, where nothing waits."""

    def __init__(self):
        self.sites: Counter[str] = Counter()
        self._saved = None

    def __enter__(self) -> SyncAudit:
        if not torch.cuda.is_available():
            return self
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")  # every occurrence, not the first per line
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if _SYNC_WARNING in str(message):
                self.sites[call_site(traceback.extract_stack()[:-1])] += 1
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        self._saved = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        torch.cuda.set_sync_debug_mode(self._saved)
        self._catch.__exit__(*exc)  # restores warnings.showwarning and the filters
        self._saved = None


class StepProfiler(Callback):
    """Profiles optimizer steps ``[start, end)`` of the fit on rank 0 (see :func:`window`) and writes what it saw
    under ``out_dir``. With gradient accumulation a step is all of its micro-batches."""

    def __init__(self, out_dir: Path, start: int, end: int):
        self.out_dir, self.start, self.end = Path(out_dir), start, end
        self._prof = self._audit = None
        self._t0 = 0.0
        self.report: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._prof is not None or self.report is not None or trainer.global_step != self.start:
            return
        if not trainer.is_global_zero or self.end <= self.start:
            return
        cuda = torch.cuda.is_available() and pl_module.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize(pl_module.device)  # the window starts with an empty queue
        self._prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self._prof.__enter__()
        self._audit = SyncAudit().__enter__()
        self._cuda, self._t0 = cuda, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._prof is None or trainer.global_step < self.end:
            return
        self._stop(trainer.global_step - self.start, pl_module.device)

    def on_train_end(self, trainer, pl_module):
        if self._prof is not None:  # the fit ended inside the window (a stop, a crash test)
            self._stop(trainer.global_step - self.start, pl_module.device)

    def _stop(self, steps: int, device) -> None:
        self._audit.__exit__(None, None, None)
        if self._cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        self.report = summarize(prof, max(steps, 1), wall, self._audit.sites, (self.start, self.start + steps))
        self.write(prof)

    def write(self, prof) -> None:
        out = self.out_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(self.report, indent=1) + "\n")
        (out / "summary.txt").write_text(render(self.report) + "\n")
        trace = out / "trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(out / "trace.json.gz", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()


def summarize(prof, steps: int, wall_s: float, sync_sites: Counter, span: tuple[int, int], top: int = 15) -> dict:
    """The window's figures per step: wall, GPU busy (union of device activity), host waits by call site and by
    CUDA call, and the ``top`` device kernels and host ops by their own time."""
    events = prof.events()
    device = [e for e in events if on_device(e)]
    busy = busy_us([(e.time_range.start, e.time_range.end) for e in device]) / 1e3
    calls, waited = Counter(), Counter()
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name in WAITS:
            calls[e.name] += 1
            waited[e.name] += e.time_range.elapsed_us()
    averages = prof.key_averages()
    step_ms = wall_s * 1e3 / steps

    def rows(key: str) -> list[dict]:
        kept = [a for a in averages if not a.is_user_annotation]  # a range, not work: it would double what it spans
        ranked = sorted(kept, key=lambda a: getattr(a, key), reverse=True)
        return [
            {"name": a.key, "ms_per_step": round(getattr(a, key) / 1e3 / steps, 3), "calls_per_step": a.count / steps}
            for a in ranked[:top]
            if getattr(a, key) > 0
        ]

    return {
        "first_step": span[0],
        "steps": span[1] - span[0],
        "step_ms": round(step_ms, 3),
        "gpu_busy_ms_per_step": round(busy / steps, 3) if device else None,
        "gpu_busy_share": round(busy / steps / step_ms, 4) if device else None,
        "host_waits_by_site": dict(sync_sites.most_common()),
        "host_waits_by_call": {
            k: {"calls": n, "ms_per_step": round(waited[k] / 1e3 / steps, 3)} for k, n in calls.most_common()
        },
        "top_device": rows("self_device_time_total") if device else [],
        "top_host": rows("self_cpu_time_total"),
    }


def render(report: dict) -> str:
    """profile.json as a few lines a person reads."""
    a, n = report["first_step"], report["steps"]
    lines = [f"{n} steps from step {a}: {report['step_ms']:.2f} ms a step"]
    if report["gpu_busy_ms_per_step"] is not None:
        lines[0] += f", GPU busy {report['gpu_busy_ms_per_step']:.2f} ms ({report['gpu_busy_share']:.1%})"
    lines.append(
        "host waits for the GPU, by call site (per window): "
        + (", ".join(f"{site} x{n}" for site, n in report["host_waits_by_site"].items()) or "none reported")
    )
    lines.append(
        "CUDA calls that wait (per window): "
        + (
            ", ".join(
                f"{k} x{w['calls']} ({w['ms_per_step']:.2f} ms a step)" for k, w in report["host_waits_by_call"].items()
            )
            or "none"
        )
    )
    for title, key in (("device kernels", "top_device"), ("host ops", "top_host")):
        if report[key]:
            lines.append(f"top {title} by own time (ms a step, calls a step):")
            lines += [f"  {r['ms_per_step']:9.3f} {r['calls_per_step']:7.1f}  {r['name'][:100]}" for r in report[key]]
    return "\n".join(lines)
