"""The dense parent's validation loss is scored once per base, validation windows, loader batch and device, and
kept beside the base: a sweep's jobs read it instead of scoring the same checkpoint again."""

import json
from pathlib import Path

import pytest

from helpers.e2e import results, run_cli


@pytest.mark.slow
def test_a_second_job_on_the_base_reads_its_score_and_another_loader_batch_scores_again(env, tmp_path):
    run_cli(env, tmp_path, "method=pretrain", "name=first")
    again = run_cli(env, tmp_path, "method=pretrain", "name=again")
    other = run_cli(env, tmp_path, "method=pretrain", "data.batch_size=5", "name=other")  # 128 windows: 25 x 5 + 3
    first, second, third = (results(tmp_path / "runs" / n / "latest") for n in ("first", "again", "other"))

    assert second["dense_base"] == third["dense_base"] == first["dense_base"]
    assert "scored on these windows and this device before" in again.stdout
    assert "scored on these windows and this device before" not in other.stdout
    assert second["dense_parent_val_loss"] == first["dense_parent_val_loss"]
    # another summation order: the same mean up to float rounding, scored anew
    assert third["dense_parent_val_loss"] == pytest.approx(first["dense_parent_val_loss"], rel=1e-5)

    base = Path(env["UPCYCLE_CACHE"]) / "dense" / first["dense_base"]
    # the session's cache is shared: other tests may have scored this base at other loader batches too
    kept = [json.loads(p.read_text()) for p in base.glob("parent_val/*.json")]
    kept = {k["inputs"]["batch"]: k["val_loss"] for k in kept}
    assert kept[16] == first["dense_parent_val_loss"] and kept[5] == third["dense_parent_val_loss"]
