"""A slot-based KV cache the native engine manages itself, plugged into HF models as `past_key_values`.

Layout per layer: keys/values of shape [slots, kv_heads, capacity, head_dim]. The running batch always
occupies the first `B` slots (finished rows are back-filled by moving the last rows into the holes), so
the tensors attention reads are plain views `[:B, :, :kv_len]` with no gather. Every row has its own
write column; rows admitted together are left-padded to a common prefill length and the padding is
masked out by the engine's 4-D attention mask, so rows of any length and age share one forward pass.

Any HF model whose attention calls `past_key_values.update(k, v, layer_idx)` (all decoder-only models in
transformers 5.x) works: the engine sets a *plan* (which rows/columns this forward writes) before each
call, and `update` writes there and returns the keys/values the attention should see.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache


class SlotKVCache(Cache):
    """Preallocated per-slot cache; capacity (columns) grows by doubling up to `max_len`."""

    is_compileable = False

    def __init__(self, max_slots: int, max_len: int, initial_capacity: int = 256) -> None:
        # Deliberately not calling Cache.__init__: the layer objects of HF caches are not used.
        self.layers = []
        self.max_slots = max_slots
        self.max_len = max_len
        self.capacity = min(initial_capacity, max_len)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._plan: tuple[Any, ...] | None = None

    # ------------------------------------------------------------ plans set by the engine
    def plan_prefill(self, row0: int, nrows: int, ncols: int) -> None:
        """This forward writes columns [0, ncols) of rows [row0, row0 + nrows) and attends to them."""
        self._plan = ("prefill", row0, nrows, ncols)

    def plan_decode(self, nrows: int, write_cols: torch.Tensor, kv_len: int) -> None:
        """This forward writes q tokens per row at columns `write_cols` ([nrows, q]) and attends to
        columns [0, kv_len) of rows [0, nrows). q > 1 is what speculative verification needs."""
        self._plan = ("decode", nrows, write_cols, kv_len)

    # ------------------------------------------------------------ HF Cache interface
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # Extra arguments (cache_kwargs in transformers < 5.2x, `kwargs=` after) carry RoPE details this
        # cache does not need: keys arrive already rotated.
        if layer_idx >= len(self.keys):
            self._allocate(layer_idx, key_states)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        plan = self._plan
        if plan is None:
            raise RuntimeError("SlotKVCache used without a plan (call plan_prefill/plan_decode first)")
        if plan[0] == "prefill":
            _, r0, n, cols = plan
            k[r0:r0 + n, :, :cols] = key_states
            v[r0:r0 + n, :, :cols] = value_states
            return k[r0:r0 + n, :, :cols], v[r0:r0 + n, :, :cols]
        _, n, write_cols, kv_len = plan
        rows = self._row_index(n, write_cols.device)
        # k[rows, :, cols] has shape [n, q, heads, dim]; key_states is [n, heads, q, dim].
        k[rows, :, write_cols] = key_states.transpose(1, 2)
        v[rows, :, write_cols] = value_states.transpose(1, 2)
        return k[:n, :, :kv_len], v[:n, :, :kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly by the engine

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        plan = self._plan
        kv_len = plan[3] if plan is not None else query_length
        return kv_len, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def __len__(self) -> int:
        return len(self.keys)

    # ------------------------------------------------------------ slot management
    def ensure_capacity(self, cols: int) -> None:
        if cols <= self.capacity:
            return
        new_cap = min(self.max_len, max(cols, 2 * self.capacity))
        for i in range(len(self.keys)):
            self.keys[i] = self._grow(self.keys[i], new_cap)
            self.values[i] = self._grow(self.values[i], new_cap)
        self.capacity = new_cap

    def move_rows(self, src: list[int], dst: list[int], ncols: int) -> None:
        """Copies rows `src` into rows `dst` (columns [0, ncols)): back-filling holes and forking n samples."""
        if not src or not self.keys:
            return
        device = self.keys[0].device
        s = torch.tensor(src, device=device)
        d = torch.tensor(dst, device=device)
        for buf in (*self.keys, *self.values):
            buf[d, :, :ncols] = buf[s, :, :ncols]

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # ------------------------------------------------------------ internals
    _rows_cache: torch.Tensor | None = None

    def _row_index(self, n: int, device: torch.device) -> torch.Tensor:
        rc = self._rows_cache
        if rc is None or rc.device != device or rc.shape[0] < self.max_slots:
            rc = self._rows_cache = torch.arange(self.max_slots, device=device)[:, None]
        return rc[:n]

    def _allocate(self, layer_idx: int, like: torch.Tensor) -> None:
        while len(self.keys) <= layer_idx:
            shape = (self.max_slots, like.shape[1], self.capacity, like.shape[3])
            self.keys.append(torch.zeros(shape, dtype=like.dtype, device=like.device))
            self.values.append(torch.zeros(shape, dtype=like.dtype, device=like.device))

    @staticmethod
    def _grow(buf: torch.Tensor, new_cap: int) -> torch.Tensor:
        out = buf.new_zeros((buf.shape[0], buf.shape[1], new_cap, buf.shape[3]))
        out[:, :, : buf.shape[2]] = buf
        return out


@functools.cache
def _cache_kwarg_name(module_cls: type) -> str:
    params = inspect.signature(module_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for a HF model or decoder layer's forward: transformers 5.2x renamed `past_key_values`
    to `cache` (the old name is deprecated there, removed in 5.40); older versions only know the old one."""
    return {_cache_kwarg_name(type(module)): cache}
