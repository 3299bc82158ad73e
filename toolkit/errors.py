"""The error root that the converters and the shared readers on this floor raise.

It sits on the ground floor because the safetensors reader here (used by `patcher` too) must raise it:
every `convert` command catches `ConvertError` once and prints its message, with no traceback.
The rest of the converters' error family (I/O failures, dead workers, signals) lives in
`converters.jobs.errors`.
"""

from __future__ import annotations

EXIT_REFUSED = 2  # bad input or an unsafe request; nothing written


class ConvertError(Exception):
    """An expected failure (bad input, unsafe request); the message says what and what to do."""

    exit_code = EXIT_REFUSED

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
