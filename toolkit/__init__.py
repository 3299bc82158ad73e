"""The ground floor every other package stands on: version, config.json edits, recipes, errors, safetensors headers.

Nothing here imports patcher, converters or launch; they all import from here.
"""
