"""Text-preserving edits of a Hugging Face config.json: drop or set top-level keys, keep all else."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_DECODER = json.JSONDecoder()
_WS = re.compile(r"\s*")


class ConfigFormatError(ValueError):
    """config.json is not a JSON object; the message names the position."""


@dataclass(frozen=True)
class Member:
    """One top-level `"key": value` pair and where its text sits in the file."""

    key: str
    key_start: int
    value_start: int
    value_end: int


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _error(text: str, pos: int, what: str) -> ConfigFormatError:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return ConfigFormatError(f"line {line} column {col}: {what}")


def top_level_members(text: str) -> list[Member]:
    """Locate every top-level member of a JSON object without re-serialising anything."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigFormatError(f"line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(document, dict):
        raise ConfigFormatError(f"the top level is a {type(document).__name__}, not an object")
    pos = _skip_ws(text, 0) + 1  # json.loads proved the first non-blank character is '{'
    members: list[Member] = []
    pos = _skip_ws(text, pos)
    if text[pos] == "}":
        return members
    while True:
        key_start = pos
        key, pos = json.decoder.scanstring(text, pos + 1)
        pos = _skip_ws(text, pos) + 1  # ':'
        value_start = _skip_ws(text, pos)
        _, value_end = _DECODER.raw_decode(text, value_start)
        members.append(Member(key, key_start, value_start, value_end))
        pos = _skip_ws(text, value_end)
        if text[pos] == "}":
            return members
        pos = _skip_ws(text, pos + 1)  # ','


def _member_indent(text: str, members: list[Member]) -> str:
    """The whitespace that separates members (newline plus indent), taken from the file."""
    if len(members) >= 2:
        comma = text.index(",", members[0].value_end)
        return text[comma + 1 : members[1].key_start]
    if members:
        open_brace = text.rindex("{", 0, members[0].key_start)
        return text[open_brace + 1 : members[0].key_start]
    return "\n  "


def _dump_like(value: Any, text: str, members: list[Member]) -> str:
    """`value` as the file writes its values: compact, on one line, or (an object or array in an indented file,
    as transformers writes config.json) spread over lines at the file's indent."""
    compact = ": " not in text and ", " not in text and "\n" not in text.strip()
    indent = _member_indent(text, members).lstrip("\r\n") if "\n" in text.strip() else ""
    if isinstance(value, (dict, list)) and value and indent and indent.strip(" ") == "":
        return json.dumps(value, ensure_ascii=False, indent=len(indent)).replace("\n", "\n" + indent)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":") if compact else (", ", ": "))


def remove_key(text: str, key: str) -> str:
    """Remove top-level `key` and its value; the other bytes stay as they were."""
    members = top_level_members(text)
    index = next((i for i, member in enumerate(members) if member.key == key), None)
    if index is None:
        return text
    member = members[index]
    if index + 1 < len(members):
        return text[: member.key_start] + text[members[index + 1].key_start :]
    if index > 0:
        return text[: members[index - 1].value_end] + text[member.value_end :]
    return text[: member.key_start] + text[member.value_end :]


def set_key(text: str, key: str, value: Any) -> str:
    """Set top-level `key` to `value`: the value text is replaced in place, or the member appended."""
    members = top_level_members(text)
    encoded = _dump_like(value, text, members)
    for member in members:
        if member.key == key:
            return text[: member.value_start] + encoded + text[member.value_end :]
    separator = ":" if ": " not in text else ": "
    new_member = json.dumps(key, ensure_ascii=False) + separator + encoded
    if not members:
        close = text.rindex("}")
        return text[:close] + new_member + text[close:]
    last = members[-1]
    return text[: last.value_end] + "," + _member_indent(text, members) + new_member + text[last.value_end :]


@dataclass(frozen=True)
class ConfigEdit:
    """What a DeepSeek-V3 config.json needs before Megatron conversion and verl training."""

    drop_quantization: bool = True
    disable_mtp: bool = True
    dtype: str | None = None
    quantization: dict[str, Any] | None = None  # set quantization_config to this (an FP8 export), instead of dropping it

    def changes(self, config: dict[str, Any]) -> list[str]:
        """Human-readable list of what `apply` would change in this parsed config."""
        found = []
        if self.drop_quantization and "quantization_config" in config:
            found.append("remove quantization_config")
        if self.quantization is not None and config.get("quantization_config") != self.quantization:
            found.append("set quantization_config")
        mtp = config.get("num_nextn_predict_layers")
        if self.disable_mtp and mtp not in (None, 0):
            found.append(f"num_nextn_predict_layers: {mtp} -> 0")
        if self.dtype is not None:
            for dtype_key in ("torch_dtype", "dtype"):
                if dtype_key in config and config[dtype_key] != self.dtype:
                    found.append(f"{dtype_key}: {config[dtype_key]} -> {self.dtype}")
        return found

    def apply(self, text: str) -> str:
        """Return the edited text; unchanged members keep their exact bytes and order."""
        top_level_members(text)  # raises ConfigFormatError with a position on malformed input
        config = json.loads(text)
        if self.drop_quantization and "quantization_config" in config:
            text = remove_key(text, "quantization_config")
        if self.quantization is not None and config.get("quantization_config") != self.quantization:
            text = set_key(text, "quantization_config", self.quantization)
        if self.disable_mtp and config.get("num_nextn_predict_layers") not in (None, 0):
            text = set_key(text, "num_nextn_predict_layers", 0)
        if self.dtype is not None:
            for dtype_key in ("torch_dtype", "dtype"):
                if dtype_key in config and config[dtype_key] != self.dtype:
                    text = set_key(text, dtype_key, self.dtype)
        return text
