"""Reading safetensors files without trusting them: the header checked against the file (dtypes,
shapes, offsets that tile the data exactly, nothing past the end) before a byte of data is read,
then one tensor at a time into fresh memory."""

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the key."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_header(file: Path) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """A safetensors file's header, checked against the file's size: (byte where the data starts,
    name -> (dtype, shape, begin, end)). Reads only the header."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw_len = fh.read(8)
            (header_len,) = struct.unpack("<Q", raw_len) if len(raw_len) == 8 else (None,)
            raw = fh.read(header_len) if header_len is not None and header_len <= size - 8 else None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from e
    try:
        if raw is None:
            raise ValueError(f"the header length does not fit in the file's {size} bytes")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a safetensors file, truncated or corrupt ({e})") from e
    header.pop("__metadata__", None)
    start = 8 + header_len
    entries = {name: tensor_entry(file, name, info) for name, info in header.items()}
    for name, (_, _, _, end) in entries.items():
        if start + end > size:
            raise CheckpointError(f"{file}: truncated: key {name} ends at byte {start + end} of {size}")
    check_tiling(file, entries, size - start)
    return start, entries


def check_tiling(file: Path, entries: dict[str, tuple[torch.dtype, list[int], int, int]], data_len: int) -> None:
    """The tensors' byte ranges must follow one another from the start of the data to its end
    (`data_len` bytes) with no overlap and no gap (the format's rule, which the safetensors library
    enforces too): overlapping tensors would alias each other's bytes, and a gap means the header
    does not describe the data it sits on."""
    at, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < at:
            raise CheckpointError(f"{file}: corrupt header: key {name} (bytes {begin}-{end} of the data) overlaps key "
                                  f"{previous} (which ends at {at}); the file is damaged or was not written by a "
                                  "safetensors writer")
        if begin > at:
            raise CheckpointError(f"{file}: corrupt header: {begin - at} bytes of the data before key {name} (bytes "
                                  f"{at}-{begin}) belong to no tensor; the file is damaged or was not written by a "
                                  "safetensors writer")
        at, previous = end, name
    if at < data_len:
        raise CheckpointError(f"{file}: corrupt header: the last {data_len - at} bytes of the data (after "
                              f"{f'key {previous}' if previous else 'the header'}) belong to no tensor; the file is damaged or "
                              "was not written by a safetensors writer")


def read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) from a safetensors file, one tensor at a time, with plain reads into
    fresh tensors: unlike a memory map, the file's pages never count as a second resident copy."""
    start, entries = read_header(file)
    with open(file, "rb") as fh:
        for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
            buf = torch.empty(end - begin, dtype=torch.uint8)
            fh.seek(start + begin)
            fh.readinto(memoryview(buf.numpy()))
            yield name, buf.view(dtype).reshape(shape)


def counts(x) -> bool:
    """Whether `x` is a list of integers >= 0 (a shape, or data offsets)."""
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)


def tensor_entry(file: Path, name: str, info) -> tuple[torch.dtype, list[int], int, int]:
    """A safetensors header entry -> (dtype, shape, begin, end), or a CheckpointError naming the key."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: corrupt header: key {name} is not an object with dtype, shape and data_offsets")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{file}: key {name} has an unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not counts(shape) or not counts(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(f"{file}: corrupt header: key {name} has shape {shape!r} and data_offsets {offsets!r}")
    begin, end = offsets
    if math.prod(shape) * dtype.itemsize != end - begin:
        raise CheckpointError(f"{file}: corrupt header: key {name} of shape {shape} and dtype {info['dtype']} needs "
                              f"{math.prod(shape) * dtype.itemsize} bytes, its data_offsets span {end - begin}")
    return dtype, shape, begin, end
