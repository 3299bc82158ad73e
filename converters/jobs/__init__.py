"""The job engine under every converter: partitioning, worker processes, destination claim, progress, errors.

A converter plans its work items, then calls these with its per-item function; nothing here knows
about tensors or file formats.
"""
