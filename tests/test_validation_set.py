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
