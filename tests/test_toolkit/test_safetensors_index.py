"""The torch-free header reader on the ground floor agrees with the torch dtype table the converters read with."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from converters.hf.safetensors_io import DTYPES
from toolkit.errors import ConvertError
from toolkit.safetensors_index import INDEX_NAME, ITEMSIZE, SafetensorsError, load_index, read_header


def test_itemsize_names_and_sizes_match_the_torch_table():
    assert set(ITEMSIZE) == set(DTYPES)
    assert {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()} == ITEMSIZE


def test_header_and_single_file_index(tmp_path):
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.ones(4, dtype=torch.float32)}, tmp_path / "model.safetensors")
    header = read_header(tmp_path / "model.safetensors")
    assert {name: (info.dtype, info.shape, info.nbytes) for name, info in header.tensors.items()} == {
        "a": ("BF16", (2, 3), 12), "b": ("F32", (4,), 16)}
    assert load_index(tmp_path) == ({"a": "model.safetensors", "b": "model.safetensors"}, {})


def test_errors_are_convert_errors_that_name_the_file(tmp_path):
    (tmp_path / INDEX_NAME).write_text("{")
    with pytest.raises(SafetensorsError, match=INDEX_NAME) as caught:
        load_index(tmp_path)
    assert isinstance(caught.value, ConvertError) and caught.value.exit_code == 2
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(SafetensorsError, match="cut.safetensors.*too short"):
        read_header(tmp_path / "cut.safetensors")
