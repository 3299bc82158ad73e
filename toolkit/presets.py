"""The models users name instead of giving a dir: their published config.json files (toolkit/models/,
sources in toolkit/models/SOURCES.md). `launch plan --model NAME` plans them; tests scale them down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODELS_DIR = Path(__file__).resolve().parent / "models"

# name -> the config file; several releases share one architecture
PRESETS: dict[str, str] = {
    "deepseek-v3": "deepseek-v3.json",
    "deepseek-v3-0324": "deepseek-v3.json",
    "deepseek-r1": "deepseek-r1.json",
    "kimi-k2": "kimi-k2-instruct.json",
    "moonlight-16b-a3b": "moonlight-16b-a3b-instruct.json",
    "deepseek-v2-lite": "deepseek-v2-lite.json",
}


def preset_config(name: str) -> dict[str, Any]:
    """The published config.json of a preset, as a fresh dict; KeyError for an unknown name."""
    return json.loads((MODELS_DIR / PRESETS[name]).read_text())
