"""A bounded LRU of recurrent states after prompt prefixes, keyed by the prefix's token ids.

A recurrent model's whole context is its state, so "caching a prefix" is storing one state (the
same size for a 10-token and a 10,000-token prefix). The engine prefills prompts in pieces that end
at multiples of the piece length and stores the state at every such boundary; a later prompt that
starts with a stored prefix starts from that state and prefills only the rest, through the same
piece boundaries as a cold prefill, so the result is the cold one.
"""

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from ..state import State


def prefix_keys(ids: Sequence[int], every: int, below: int) -> list[tuple[int, bytes]]:
    """(length, key) for the prefixes of `ids` whose lengths are multiples of `every` and < `below`,
    shortest first. A key is a digest of the ids, so a key for 2,000 tokens costs 32 bytes."""
    keys, h = [], hashlib.blake2b(digest_size=32)
    for end in range(every, below, every):
        h.update(array("q", ids[end - every:end]).tobytes())
        keys.append((end, h.copy().digest()))
    return keys


class PrefixCache:
    """States after prompt prefixes, least recently used evicted first, at most `max_bytes` of state
    in all (0 disables the cache). Counts lookups, hits, evictions and the prompt tokens hits saved."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache's max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, State] = OrderedDict()
        self.nbytes = 0
        self.lookups = self.hits = self.saved_tokens = self.evictions = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, keys: list[tuple[int, bytes]]) -> tuple[int, State | None]:
        """The longest stored prefix among `keys` (as `prefix_keys` gives them): (length, state), or
        (0, None). The state is the stored one: copy it, never modify it."""
        if not self.enabled:
            return 0, None
        self.lookups += 1
        for length, key in reversed(keys):
            state = self.entries.get(key)
            if state is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                self.saved_tokens += length
                return length, state
        return 0, None

    def insert(self, key: bytes, state: State) -> None:
        """Stores `state` (owned by the cache from now on) under `key`, evicting the least recently
        used entries to stay within max_bytes; a state larger than the whole cache is not stored."""
        if not self.enabled or key in self.entries or state.nbytes > self.max_bytes:
            return
        while self.nbytes + state.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evictions += 1
        self.entries[key] = state
        self.nbytes += state.nbytes

    def stats(self) -> dict:
        return {
            "entries": len(self.entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
            "lookups": self.lookups, "hits": self.hits, "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
            "saved_tokens": self.saved_tokens, "evictions": self.evictions,
        }
