"""The media cache's worker tier, and the keys every in-process tier shares.

A worker keeps two things per media item, both keyed by `item_key`:

- here, the item preprocessed for its model (pixel patches and grid): a hit
  skips fetch, decode and preprocessing;
- in the engine (`ContinuousEngine.encoder_cache`), the vision encoder's
  output: a hit skips the vision tower. The engine still needs the pixels
  of every item (it slices per item from them), which is why this tier
  exists.

The key is derived from the item's content hash, never from its uuid: a
uuid only names content (the shared tier says which), so re-sending other
media under the same uuid can never make a worker reuse stale tensors. It
is namespaced by tenant (no cross-tenant reuse, not even of timing), model
and the processor's configuration, and the per-request decode options that
change the pixels (RGBA background, video frame sampling).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


def processor_fingerprint(processor: Any) -> str:
    """What of a processor changes its output: its image and video processors' configuration."""
    parts = []
    for name in ("image_processor", "video_processor"):
        sub = getattr(processor, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            parts.append(json.dumps(sub.to_dict(), sort_keys=True, default=str))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def item_key(tenant: str, model: str, fingerprint: str, modality: str, options: Any, digest: str) -> str:
    """The in-process identity of one media item (readable prefix, opaque rest)."""
    detail = json.dumps([tenant, model, fingerprint, modality, options, digest], default=str)
    return f"{tenant}:{model}:{modality}:{hashlib.sha256(detail.encode()).hexdigest()[:40]}"


class ItemCache:
    """Least recently used out first, under a byte budget, thread-safe (task threads share it).

    Holds preprocessed media items here (their `nbytes`) and, in the continuous
    engine, vision-encoder outputs (tensors, sized by `size`).
    """

    def __init__(self, max_bytes: int, size: Callable[[Any], int] = lambda value: int(value.nbytes)) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: Any) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= self._size(old)
            while self._items and self.bytes + size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= self._size(evicted)
            self._items[key] = value
            self.bytes += size
