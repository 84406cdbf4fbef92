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


# ----------------------------------------------------------------------------------------------
# Passes side by side on the CPU (runtime.cpu_pass_workers) and freed memory kept between passes


@pytest.fixture(scope="module")
def tiny_tm(tmp_path_factory):
    from longdoc_cli.tasks.runner import load_task_model
    from tests.fixtures_tiny import build_tiny_model

    return load_task_model(build_tiny_model(tmp_path_factory.mktemp("m")), task="classify", dtype="fp32")


def _windows(tm):
    text = "the quick brown fox jumps over the lazy dog. a long document needs a long model. " * 30
    tok = tm.tokenizer
    short = tok.document_windows(tok.encode("a short one"), 40, 0)  # a padded batch too
    return tok.document_windows(tok.encode(text), 40, 10) + short


def test_cpu_pass_workers(monkeypatch):
    import torch

    from longdoc_cli.runtime import cpu_pass_workers

    monkeypatch.delenv("LONGDOC_CPU_WORKERS", raising=False)
    threads = torch.get_num_threads()
    assert cpu_pass_workers("cuda", 50) == 1 and cpu_pass_workers("cpu", 1) == 1
    assert cpu_pass_workers("cpu", 50) == min(2, threads)
    monkeypatch.setenv("LONGDOC_CPU_WORKERS", "1")
    assert cpu_pass_workers("cpu", 50) == 1
    monkeypatch.setenv("LONGDOC_CPU_WORKERS", "64")
    assert cpu_pass_workers("cpu", 3) == min(3, threads)


def test_passes_side_by_side_give_the_same_outputs_in_order(tiny_tm, monkeypatch):
    """Two workers of one thread each against one pass at a time: the same numbers, yielded in the
    same order; one thread for the consumer while they run; and torch's thread count as it was
    afterwards (in this thread and for new threads)."""
    import threading

    import torch

    from longdoc_cli.tasks import runner

    windows = _windows(tiny_tm)
    monkeypatch.setattr(runner, "BATCH_TOKENS", 0)  # batch_size windows a pass: many passes
    monkeypatch.setattr(runner, "cpu_pass_workers", lambda device, passes: 1)
    one = list(runner.run_windows(tiny_tm, windows, 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(runner, "cpu_pass_workers", lambda device, passes: 2)
        side = list(runner.run_windows(tiny_tm, windows, 2))
        assert [i for i, _ in side] == [i for i, _ in one] and len(side) == len(windows) > 8
        for (_, a), (_, b) in zip(one, side, strict=True):
            assert torch.equal(a, b)
        assert torch.get_num_threads() == 2
        # between yields the consumer's own ops run on one thread, the cores left to the workers
        during = [torch.get_num_threads() for _ in runner.run_windows(tiny_tm, windows, 2)]
        assert set(during) == {1} and torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]
        # a consumer that stops early: the workers are stopped, nothing is left running
        stream = runner.run_windows(tiny_tm, windows, 2)
        next(stream)
        stream.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("longdoc-pass")]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_failing_pass_raises_in_the_caller(tiny_tm, monkeypatch):
    from longdoc_cli.tasks import runner

    monkeypatch.setattr(runner, "BATCH_TOKENS", 0)
    monkeypatch.setattr(runner, "cpu_pass_workers", lambda device, passes: 2)
    calls = []

    def broken(tm, windows, chunk):
        calls.append(chunk)
        if len(calls) == 2:
            raise RuntimeError("pass failed")
        return runner.__dict__["_real_forward"](tm, windows, chunk)

    monkeypatch.setitem(runner.__dict__, "_real_forward", runner._forward)
    monkeypatch.setattr(runner, "_forward", broken)
    with pytest.raises(RuntimeError, match="pass failed"):
        list(runner.run_windows(tiny_tm, _windows(tiny_tm), 2))


def test_reuse_freed_memory_sets_and_restores_the_thresholds(monkeypatch):
    from longdoc_cli import runtime

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(runtime, "_libc", None)
    with runtime.reuse_freed_memory():  # not where return_freed_memory set the threshold: nothing
        pass
    assert calls == []
    monkeypatch.setattr(runtime, "_libc", FakeLibc())
    with runtime.reuse_freed_memory():
        with runtime.reuse_freed_memory():  # nested (two threads): set once, restored by the last
            pass
        assert calls == [(-3, runtime.REUSE_MMAP_THRESHOLD), (-1, runtime.REUSE_TRIM_THRESHOLD)]
    assert calls[2:] == [(-3, runtime.MMAP_THRESHOLD), (-1, 128 << 10), ("trim", 0)]
