"""run_windows' batches: ``batch_size`` long windows, more short ones up to BATCH_TOKENS tokens."""

from __future__ import annotations

import pytest

from longdoc_cli.tasks.runner import BATCH_TOKENS, _batches


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_batches_cover_every_window_once_in_order(batch_size):
    lengths = [7, 300, 256, 4096, 256, 30, 2048, 256] * 9
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks = list(_batches(order, lengths, batch_size))
    assert [i for c in chunks for i in c] == order
    for c in chunks:
        longest = max(lengths[i] for i in c)
        # at least batch_size windows (but the last), more only while the padded batch fits the budget
        assert len(c) <= batch_size or len(c) * longest <= BATCH_TOKENS
    assert all(len(c) >= batch_size for c in chunks[:-1])


def test_short_windows_share_a_pass_long_ones_keep_batch_size():
    lengths = [256] * 40 + [4096] * 10
    chunks = list(_batches(list(range(50)), lengths, 4))
    assert [len(c) for c in chunks[:2]] == [BATCH_TOKENS // 256] * 2
    assert all(len(c) == 4 for c in chunks if lengths[c[0]] == 4096 and c is not chunks[-1])
