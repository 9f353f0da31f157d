"""The recurrent state: per layer (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH, 1]), float32 by default.

Its size is constant in the sequence length (128.3 MiB per sequence for the 7B's 32 layers). Decoding
can keep C and n in bfloat16 (`stored_as`): half the memory, and half the traffic of a decoding step
at large batch, which the state dominates; m stays float32.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .kernels import MLSTMState, zero_state


STORAGE_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes a decoding state may keep C and n in (`State.stored_as`)."""


@dataclass
class State:
    layers: list[MLSTMState]
    """One (C, n, m) triple per block, in block order."""

    @classmethod
    def zeros(cls, config, batch_size: int, *, device=None, dtype: torch.dtype = torch.float32) -> "State":
        """The empty state (C = 0, n = 0, m = 0) of a model with `config`, for `batch_size` rows."""
        dims = (batch_size, config.num_heads, config.qk_head_dim, config.v_head_dim)
        return cls([zero_state(*dims, device=device, dtype=dtype) for _ in range(config.num_blocks)])

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> MLSTMState:
        return self.layers[index]

    def __iter__(self) -> Iterator[MLSTMState]:
        return iter(self.layers)

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0][0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def _map(self, fn) -> "State":
        return State([tuple(fn(t) for t in layer) for layer in self.layers])

    def detach(self) -> "State":
        """Cuts the gradient history (truncated backpropagation through time)."""
        return self._map(torch.Tensor.detach)

    def clone(self) -> "State":
        return self._map(torch.Tensor.clone)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "State":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def stored_as(self, dtype: torch.dtype, copy: bool = False) -> "State":
        """C and n in `dtype` (float32, or bfloat16, which the decoding step also updates in place), m
        in float32 (a log-space stabilizer: bfloat16 would shift every weight), all contiguous; the
        same tensors where nothing changes, unless `copy`."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16 (what a state keeps C and n in), got {dtype}")
        fmt = dict(memory_format=torch.contiguous_format, copy=copy)
        return State([(C.to(dtype=dtype, **fmt), n.to(dtype=dtype, **fmt), m.to(dtype=torch.float32, **fmt))
                      for C, n, m in self.layers])

    def select(self, rows: torch.Tensor | Sequence[int] | slice) -> "State":
        """A new state with the batch rows `rows` (indices in any order, a bool mask, or a slice):
        selects, reorders or repeats sequences, e.g. for beams or for dropping finished rows."""
        if isinstance(rows, slice):
            return self._map(lambda t: t[rows])
        index = torch.as_tensor(rows, device=self.device)
        if index.dtype == torch.bool:
            if index.shape != (self.batch_size,):
                raise ValueError(f"State.select: a bool mask must have shape [{self.batch_size}], got {list(index.shape)}")
            index = index.nonzero().squeeze(-1)
        if index.ndim != 1 or (index.numel() and not -self.batch_size <= int(index.min()) <= int(index.max()) < self.batch_size):
            raise ValueError(f"State.select: rows must be 1-D indices in [0, {self.batch_size}), got {rows!r}")
        return self._map(lambda t: t.index_select(0, index))

    def index_copy_(self, rows: torch.Tensor, other: "State") -> "State":
        """Writes `other`'s batch rows into this state's rows `rows` (int64 [other's batch size]) in
        place, in this state's dtypes; the other rows are not touched."""
        for mine, theirs in zip(self.layers, other.layers):
            for a, b in zip(mine, theirs):
                a.index_copy_(0, rows, b.to(a.dtype))
        return self

    def copy_(self, other: "State") -> "State":
        """Overwrites this state in place with `other` (same shapes); keeps the tensors' storage."""
        if len(other) != len(self):
            raise ValueError(f"State.copy_: {len(other)} layers into {len(self)}")
        for mine, theirs in zip(self.layers, other.layers):
            for a, b in zip(mine, theirs):
                a.copy_(b)
        return self
