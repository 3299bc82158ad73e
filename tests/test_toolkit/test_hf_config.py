"""Text-preserving config.json edits: only the touched members change, in any JSON layout."""

from __future__ import annotations

import json

import pytest

from toolkit.hf_config import ConfigEdit, ConfigFormatError, remove_key, set_key, top_level_members

PRETTY = '{\n    "a": 1,\n    "quantization_config": {"fmt": "e4m3"},\n    "num_nextn_predict_layers": 1,\n    "z": [1, 2]\n}\n'


def test_members_and_positions():
    members = top_level_members(PRETTY)
    assert [m.key for m in members] == ["a", "quantization_config", "num_nextn_predict_layers", "z"]
    assert PRETTY[members[1].value_start : members[1].value_end] == '{"fmt": "e4m3"}'


@pytest.mark.parametrize("key", ["a", "quantization_config", "z"])
def test_remove_any_position_keeps_the_rest_verbatim(key):
    edited = remove_key(PRETTY, key)
    expected = {k: v for k, v in json.loads(PRETTY).items() if k != key}
    assert json.loads(edited) == expected
    assert list(json.loads(edited)) == list(expected)
    for line in PRETTY.splitlines():
        if f'"{key}"' not in line:
            assert line.rstrip(",") in edited


def test_remove_only_member():
    assert json.loads(remove_key('{"only": {"x": 1}}', "only")) == {}


def test_set_in_place_and_append_with_file_indent():
    assert set_key(PRETTY, "num_nextn_predict_layers", 0) == PRETTY.replace('"num_nextn_predict_layers": 1', '"num_nextn_predict_layers": 0')
    appended = set_key(PRETTY, "torch_dtype", "bfloat16")
    assert appended.endswith('    "z": [1, 2],\n    "torch_dtype": "bfloat16"\n}\n')


def test_compact_file_stays_compact():
    compact = '{"a":1,"quantization_config":{"x":1},"num_nextn_predict_layers":1}'
    assert ConfigEdit().apply(compact) == '{"a":1,"num_nextn_predict_layers":0}'


def test_dtype_edit_and_changes_list():
    text = '{\n  "torch_dtype": "float8",\n  "quantization_config": {}\n}'
    edit = ConfigEdit(dtype="bfloat16")
    assert edit.changes(json.loads(text)) == ["remove quantization_config", "torch_dtype: float8 -> bfloat16"]
    assert edit.apply(text) == '{\n  "torch_dtype": "bfloat16"\n}'


@pytest.mark.parametrize("text", ["", "{", '{"a": 1,}', "[]", '"str"', '{"a" 1}'])
def test_malformed_is_refused(text):
    with pytest.raises(ConfigFormatError):
        top_level_members(text)
