"""The host path's memo: least recently used eviction, and safe use from several threads at once."""

import threading

import pytest

from ptv2_kernels._memo import Memo


def test_evicts_the_least_recently_used():
    memo = Memo(capacity=2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # "a" is now the most recently used
    memo.put("c", 3)
    assert memo.get("b") is None and memo.get("a") == 1 and memo.get("c") == 3
    assert len(memo) == 2
    memo.put("a", 4)  # a new value for a key replaces the old one
    assert memo.get("a") == 4 and len(memo) == 2
    memo.clear()
    assert len(memo) == 0 and memo.get("a") is None


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        Memo(capacity=0)


def test_threads_sharing_a_memo_never_break_each_others_lookups():
    """Many threads putting and getting keys in a memo smaller than their key set (so that entries are evicted
    under other threads' lookups): no error, and every value found is the one put for its key."""
    memo = Memo(capacity=3)
    errors, wrong = [], []
    start = threading.Barrier(8)

    def work(offset):
        try:
            start.wait()
            for step in range(3000):
                key = (offset + step) % 7
                memo.put(key, key * 10)
                value = memo.get((key + 1) % 7)
                if value is not None and value != ((key + 1) % 7) * 10:
                    wrong.append(value)
        except Exception as error:  # noqa: BLE001 - any error is the failure this test looks for
            errors.append(error)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong
    assert len(memo) <= 3
