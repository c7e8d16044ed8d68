"""Weights files read and written one tensor at a time (issue #16: SDXL's footprint).

An SDXL UNet is 10.3 GB in fp32. Reading a whole `.safetensors` into a dict, folding a LoRA into
a second dict and casting it into a third (what loading a student or exporting one did) holds
two or three copies at once. Here:

- `LazyTensors` is a read-only mapping over `.safetensors` files whose values are read when
  asked for and not kept, so `for k in w: use(w[k])` holds one tensor at a time; `shape()` and
  `dtype()` come from the files' headers without reading any data.
- `MappedTensors` applies a per-tensor function (fold a LoRA, cast) to such a mapping, lazily.
- `write_safetensors` writes a (lazy) mapping as a standard `.safetensors` file tensor by
  tensor: the header first (from shapes and dtypes alone), then each tensor's bytes. What it
  writes loads with `safetensors.torch.load_file` to the same tensors and metadata that
  `save_file` of the same dict would give.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from train.manifest import describe_nonfinite

# safetensors' dtype names (the format's spec).
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES_BY_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class LazyTensors(Mapping):
    """name → tensor over one or more `.safetensors` files, each tensor read on access."""

    def __init__(self, files: Path | list[Path]):
        self.files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        self._where: dict[str, Path] = {}
        self._header: dict[str, dict] = {}
        for path in self.files:
            header = read_header(path)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._where[name] = path
                    self._header[name] = entry

    def __getitem__(self, name: str) -> Tensor:
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES_BY_NAME[self._header[name]["dtype"]]


class MappedTensors(Mapping):
    """`source` with `fn(name, tensor)` applied to each tensor when it is read (shape-preserving;
    `dtype` is what the results are, None = the source's)."""

    def __init__(self, source: Mapping[str, Tensor], fn: Callable[[str, Tensor], Tensor],
                 dtype: torch.dtype | None = None):
        self.source, self.fn, self._dtype = source, fn, dtype

    def __getitem__(self, name: str) -> Tensor:
        return self.fn(name, self.source[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def shape(self, name: str) -> tuple[int, ...]:
        return tensor_shape(self.source, name)

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype or tensor_dtype(self.source, name)


def tensor_shape(tensors: Mapping[str, Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape without reading it when the mapping can tell (lazy mappings)."""
    return tensors.shape(name) if hasattr(tensors, "shape") else tuple(tensors[name].shape)


def tensor_dtype(tensors: Mapping[str, Tensor], name: str) -> torch.dtype:
    return tensors.dtype(name) if hasattr(tensors, "dtype") else tensors[name].dtype


def read_header(path: Path) -> dict:
    """The JSON header of a `.safetensors` file (names, dtypes, shapes, offsets, metadata)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


class NonFiniteTensors(ValueError):
    """Raised by `write_safetensors` after it wrote a tensor with a NaN or Inf (the caller's
    staging file is then discarded); `names` lists them all."""

    def __init__(self, names: list[str]):
        super().__init__(describe_nonfinite(names))
        self.names = names


def write_safetensors(path: Path, tensors: Mapping[str, Tensor], *, metadata: Mapping[str, str] | None = None,
                      dtype: torch.dtype | None = None, check_finite: bool = True) -> None:
    """Write `tensors` (cast to `dtype` when given) to `path` one tensor at a time.

    Raises `NonFiniteTensors` (after writing) when a floating tensor has a NaN or Inf: write
    to a staging path (train/files.py: `atomic_file`) so that such a file never appears."""
    names = sorted(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in names:
        out_dtype = dtype or tensor_dtype(tensors, name)
        shape = tensor_shape(tensors, name)
        nbytes = _numel(shape) * torch.empty((), dtype=out_dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[out_dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    bad = []
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            tensor = tensors[name].detach().to("cpu")
            if dtype is not None:
                tensor = tensor.to(dtype)
            tensor = tensor.contiguous()
            expected = header[name]
            if list(tensor.shape) != expected["shape"] or SAFETENSORS_DTYPES[tensor.dtype] != expected["dtype"]:
                raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype} read, header says "
                                 f"{expected['shape']} {expected['dtype']}")
            if check_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
            if tensor.numel():
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor
    if bad:
        raise NonFiniteTensors(bad)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
