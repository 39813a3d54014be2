"""A small memo of the most recently used entries, shared by the host path's caches.

The op remembers what it derived from tensors that every layer of a forward (and every decode step) hands it
again: the checked index values, the masks a backend derives, auto's choice of backend. Those memos are module
globals, so two threads running the op at once (a server's workers on a CPU) share them: every read and write is
safe against the others, so that one thread's eviction never breaks another's lookup (writes take a lock; a lookup
takes none, see :meth:`Memo.get`).
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Hashable, Optional


class Memo:
    """At most ``capacity`` entries; a lookup that finds one makes it the most recently used, and a new entry past
    the capacity evicts the least recently used."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._entries: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[Any]:
        """The entry of ``key``, or None. Without the lock (lookups run per layer per step): each of its two dict
        operations is atomic, and an entry evicted between them was still the right value."""
        value = self._entries.get(key)
        if value is not None:
            try:
                self._entries.move_to_end(key)
            except KeyError:  # evicted by another thread meanwhile
                pass
        return value

    def put(self, key: Hashable, value: Any) -> None:
        """Remember ``value`` (not None) for ``key``."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
