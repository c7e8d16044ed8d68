"""train/tensor_files.py: safetensors read and written one tensor at a time (issue #16)."""

import weakref
from collections.abc import Mapping

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from train.tensor_files import LazyTensors, MappedTensors, NonFiniteTensors, write_safetensors


def _tensors():
    torch.manual_seed(0)
    return {"b.weight": torch.randn(5, 3), "a.bias": torch.randn(7).to(torch.bfloat16),
            "c.half": torch.randn(2, 2, 3, 3).half(), "d.steps": torch.arange(4), "e.empty": torch.zeros(0, 3)}


def test_streamed_file_loads_to_the_same_tensors_and_metadata_as_save_file(tmp_path):
    tensors, meta = _tensors(), {"steps": "4", "config": '{"a": 1}'}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=meta)
    write_safetensors(tmp_path / "new.safetensors", tensors, metadata=meta)
    ref, new = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "new.safetensors")
    assert ref.keys() == new.keys()
    for key in ref:
        assert ref[key].dtype == new[key].dtype and torch.equal(ref[key], new[key]), key
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        assert f.metadata() == meta


def test_cast_on_write_and_lazy_reading_from_the_header(tmp_path):
    tensors = _tensors()
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    write_safetensors(tmp_path / "f.safetensors", floats, dtype=torch.float16)
    lazy = LazyTensors(tmp_path / "f.safetensors")
    assert sorted(lazy) == sorted(floats)
    assert lazy.shape("b.weight") == (5, 3) and lazy.dtype("b.weight") == torch.float16
    for key, value in floats.items():
        assert torch.equal(lazy[key], value.to(torch.float16)), key
    doubled = MappedTensors(lazy, lambda _, v: v.float() * 2, torch.float32)
    assert doubled.dtype("c.half") == torch.float32 and doubled.shape("c.half") == (2, 2, 3, 3)
    assert torch.equal(doubled["c.half"], floats["c.half"].float() * 2)


class _Generated(Mapping):
    """Tensors made on access; counts how many are alive at once while they are written."""

    def __init__(self, n: int, size: int):
        self.n, self.size, self.alive, self.most_alive = n, size, 0, 0

    def __getitem__(self, key):
        value = torch.full((self.size,), float(int(key[1:])))
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(value, self._died)
        return value

    def _died(self):
        self.alive -= 1

    def __iter__(self):
        return iter(f"t{i:03d}" for i in range(self.n))

    def __len__(self):
        return self.n

    def shape(self, key):
        return (self.size,)

    def dtype(self, key):
        return torch.float32


def test_writing_holds_one_tensor_at_a_time(tmp_path):
    source = _Generated(50, 1000)
    write_safetensors(tmp_path / "g.safetensors", source, dtype=torch.float16)
    assert source.most_alive == 1  # never the whole state dict
    loaded = load_file(tmp_path / "g.safetensors")
    assert len(loaded) == 50 and torch.equal(loaded["t007"], torch.full((1000,), 7.0, dtype=torch.float16))


def test_non_finite_tensors_are_named_after_writing(tmp_path):
    tensors = {"ok": torch.ones(2), "big": torch.tensor([1e6]), "nan": torch.tensor([float("nan")])}
    with pytest.raises(NonFiniteTensors) as err:
        write_safetensors(tmp_path / "x.safetensors", tensors, dtype=torch.float16)  # 1e6 overflows fp16
    assert sorted(err.value.names) == ["big", "nan"]
