"""``train.profile_steps``: a window of steady steps of the run's own stage under the profiler, written beside the
run and into results.json, without changing which folder the run lives in or what it computes."""

import json
import random
import traceback
from collections import Counter

import pytest
import torch

from harness.profiling import SyncAudit, busy_us, call_site, device_ms_by_kind, summarize, window

from helpers.e2e import results, run_cli


def test_the_window_starts_past_warm_up_and_holds_no_validation():
    assert window(200, 5, 100) == (50, 55)  # a quarter of the way in
    assert window(94, 4, 25) == (25, 29)  # it would cross the validation at 25: it starts right after it
    assert window(200, 80, 100) == (100, 180)
    assert window(200, 150, 100) == (100, 200)  # longer than val_every: to the next validation (or the end)
    assert window(8, 5, 100) == (3, 8)  # a short fit: from step 3 to its end
    assert window(3, 5, 100) == (3, 3)  # nothing left to profile: an empty window
    for total, steps, every in ((94, 4, 25), (200, 80, 100), (10, 5, 4), (5, 5, 4), (40, 7, 10)):
        a, b = window(total, steps, every)
        assert 3 <= a <= b <= total and not any(a < v < b for v in range(every, total, every))


def test_busy_time_is_the_union_of_the_intervals():
    rng = random.Random(0)
    for _ in range(200):
        spans = [(a, a + rng.randint(0, 20)) for a in (rng.randint(0, 100) for _ in range(rng.randint(0, 12)))]
        covered = {t for a, b in spans for t in range(a, b)}  # unit cells, counted independently of the merge
        assert busy_us([(float(a), float(b)) for a, b in spans]) == len(covered)


def test_the_gpu_busy_share_counts_kernels_not_the_annotation_ranges_around_them():
    """Kineto puts a user annotation's range on the GPU's timeline too (``Optimizer.step#...``, spanning the
    step's kernels and the gaps between them): busy time and the kernel table count the kernels alone."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    def event(i, name, start, end, device=DeviceType.CUDA, annotation=False):
        return FunctionEvent(i, name, 0, start, end, stack=[], device_type=device, is_user_annotation=annotation)

    events = EventList(
        [
            event(0, "Optimizer.step#AdamW.step", 0, 10_000, DeviceType.CPU, annotation=True),
            event(1, "Optimizer.step#AdamW.step", 1_000, 9_000, annotation=True),  # its range on the GPU
            event(2, "gemm", 1_000, 3_000),
            event(3, "gemm", 5_000, 6_000),
            event(4, "silu", 8_000, 9_000),
        ],
        use_device="cuda",
    )
    events._build_tree()  # as torch.profiler does once a window ends

    class Window:  # what StepProfiler hands over: torch.profiler.profile's events and their averages
        def events(self):
            return events

        def key_averages(self):
            return events.key_averages()

    report = summarize(Window(), steps=1, wall_s=0.010, sync_sites=Counter(), span=(4, 5))
    assert report["gpu_busy_ms_per_step"] == 4.0 and report["gpu_busy_share"] == 0.4  # 4 of 10 ms, not 8
    assert all("Optimizer.step" not in row["name"] for row in report["top_device"] + report["top_host"])


def test_a_steps_kernel_time_is_split_by_the_op_that_launched_each_kernel_counted_once():
    """The expert GEMMs' kernels count under aten::_grouped_mm, not again under the aten::linear around them or as
    rows of their own; a compiled kernel under its triton_ launcher; kernel time no op launched is named so."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    def op(i, name, start, end, kernels=(), device=DeviceType.CPU):
        e = FunctionEvent(i, name, 0, start, end, stack=[], device_type=device, use_device="cuda")
        for kernel, us in kernels:
            e.append_kernel(kernel, 0, us)
        return e

    events = EventList(
        [
            op(0, "aten::linear", 0, 1_000, [("gemv", 50)]),  # its own kernel, and the mm's under it
            op(1, "aten::mm", 100, 900, [("sm90_gemm", 400)]),
            op(2, "aten::_grouped_mm", 1_000, 2_000, [("cutlass_grouped", 600), ("cutlass_grouped", 300)]),
            op(3, "triton_poi_fused_mul_silu_0", 2_000, 2_100, [("triton_poi_fused_mul_silu_0", 200)]),
            op(4, "aten::_fused_adamw_", 2_100, 2_200, [("multi_tensor_apply", 150)]),
            # the kernels' own rows on the GPU's timeline: counted once, through their ops above
            op(5, "gemv", 0, 50, device=DeviceType.CUDA),
            op(6, "sm90_gemm", 100, 500, device=DeviceType.CUDA),
            op(7, "cutlass_grouped", 1_000, 1_600, device=DeviceType.CUDA),
            op(8, "cutlass_grouped", 1_600, 1_900, device=DeviceType.CUDA),
            op(9, "triton_poi_fused_mul_silu_0", 2_000, 2_200, device=DeviceType.CUDA),
            op(10, "multi_tensor_apply", 2_200, 2_350, device=DeviceType.CUDA),
            op(11, "stray", 3_000, 3_100, device=DeviceType.CUDA),  # no op recorded around its launch
        ],
        use_device="cuda",
    )
    events._build_tree()

    class Window:
        def events(self):
            return events

        def key_averages(self):
            return events.key_averages()

    by_kind = device_ms_by_kind(Window(), steps=2)
    assert by_kind == {
        "expert GEMMs": 0.45,
        "other GEMMs": 0.2,
        "compiled kernels: norms, activations, MoE glue, recompute": 0.1,
        "optimizer and clip": 0.075,
        "other": 0.025,  # aten::linear's own kernel
        "unattributed": 0.05,
    }, by_kind


def test_a_wait_is_charged_to_the_line_that_asked_for_the_value():
    def ask():
        return traceback.extract_stack()

    site = call_site(ask())
    assert site.startswith("test_profiling.py:") and site.endswith(" ask")


def test_a_profiled_run_writes_its_window_and_keeps_its_folder(env, tmp_path):
    args = ("name=prof", "method=dense", "iso_flop_baseline=false")
    run_cli(env, tmp_path, *args)
    plain = (tmp_path / "runs" / "prof" / "latest").resolve()
    run_cli(env, tmp_path, *args, "train.profile_steps=4", "force=true")
    profiled = (tmp_path / "runs" / "prof" / "latest").resolve()
    assert profiled == plain  # the same config: the same folder, its hash untouched by the profiler
    report = results(profiled)["profile"]
    first, end = window(results(profiled)["steps"], 4, 10)
    assert (report["first_step"], report["steps"]) == (first, end - first) and end - first == 4
    assert report["step_ms"] > 0 and report["top_host"], report
    assert report["gpu_busy_share"] is None  # a CPU run: no device activity to measure
    on_disk = sorted(p.name for p in (profiled / "profile").iterdir())
    assert on_disk == ["profile.json", "summary.txt", "trace.json.gz"]
    assert json.loads((profiled / "profile" / "profile.json").read_text()) == report
    assert "aten::" in (profiled / "profile" / "summary.txt").read_text()  # the host ops of a training step

    finished = run_cli(env, tmp_path, *args, "train.profile_steps=4")  # complete: nothing trains, nothing profiled
    assert (
        "train.profile_steps=4 profiled nothing: the run is complete; add force=true"
        in finished.stdout + finished.stderr
    )


def test_a_bad_profile_steps_stops_in_one_line(env, tmp_path):
    proc = run_cli(env, tmp_path, "train.profile_steps=-2", check=False)
    assert proc.returncode != 0 and "train.profile_steps=-2" in proc.stderr


@pytest.mark.gpu
def test_the_sync_check_names_a_planted_item_call():
    x = torch.ones(4, device="cuda")
    with SyncAudit() as audit:
        for _ in range(3):
            value = (x * 2).sum().item()  # a planted host wait
    assert value == 8.0
    (site, count), *_ = audit.sites.items()
    assert "test_profiling.py" in site and count == 3, audit.sites
