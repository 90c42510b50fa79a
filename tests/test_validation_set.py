"""One validation set: data.val_tokens picks the windows, whatever the batch size; bad values stop before compute."""

import numpy as np
import pytest

from harness.data import FixedWindows, TokenDataModule
from harness.errors import ConfigError


@pytest.mark.parametrize("batch_size", [8, 16, 32])
def test_windows_do_not_depend_on_the_batch_size(tmp_path, batch_size):
    dm = TokenDataModule(str(tmp_path), seq_len=64, batch_size=batch_size, val_tokens=8192)
    ref = TokenDataModule(str(tmp_path), seq_len=64, batch_size=16, val_tokens=8192)
    assert dm.val_windows == ref.val_windows == 128
    tokens = np.arange(10_000, dtype=np.uint16)
    assert np.array_equal(FixedWindows(tokens, 64, dm.val_windows).starts, FixedWindows(tokens, 64, 128).starts)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"val_tokens": 0}, "data.val_tokens=0"),
        ({"val_tokens": -64}, "data.val_tokens=-64"),
        ({"val_tokens": 63}, "data.val_tokens=63"),
        ({"val_batches": 8}, "data.val_batches is gone: set data.val_tokens"),
    ],
)
def test_bad_validation_sizes_are_one_line(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        TokenDataModule(str(tmp_path), seq_len=64, **kw)


def _window_losses_vary():
    """A decoder with large random weights on random tokens: its windows' losses differ by whole nats, so a
    wrongly weighted mean shows."""
    import torch

    from harness.model import Decoder, ModelConfig

    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=256, max_seq_len=32, init_std=0.5)).eval()
    tokens = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16)
    tokens[:4000] = 7  # a run of one token: those windows' losses differ from the random ones'
    return model, FixedWindows(tokens, 32, 127)  # 127 windows: no batch size or world size of 2 divides it


def test_the_validation_loss_is_the_mean_over_windows_whatever_the_batch_size():
    from torch.utils.data import DataLoader

    from harness.lit import evaluate

    model, ds = _window_losses_vary()
    per_window = [evaluate(model, DataLoader(ds, batch_size=1))]
    for batch in (16, 50, 127):  # 7 x 16 + 15, 2 x 50 + 27, one batch
        assert evaluate(model, DataLoader(ds, batch_size=batch)) == pytest.approx(per_window[0], abs=1e-6)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_shards_give_the_one_device_mean_and_the_same_number_of_batches_on_every_rank(world):
    import torch
    from torch.utils.data import DataLoader

    from harness.data import RankShard
    from harness.lit import evaluate

    model, ds = _window_losses_vary()
    shards = [RankShard(ds, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # a sharded model runs the same forwards on every rank
    total = windows = 0.0
    with torch.no_grad():
        for shard in shards:  # what LitLM.validation_step sums on each rank, then reduced over ranks
            for x, y, w in DataLoader(shard, batch_size=8):
                logits = model(x).logits.float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
                total += float((loss.view(y.shape).mean(1) * w).sum())
                windows += float(w.sum())
    assert windows == len(ds)
    assert total / windows == pytest.approx(evaluate(model, DataLoader(ds, batch_size=127)), abs=1e-5)
