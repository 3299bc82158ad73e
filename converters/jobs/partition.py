"""Work items spread over `--shard I/N` parts (machines) and over worker processes, by size."""

from __future__ import annotations

from collections.abc import Sequence


def balance(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Item indices per part: largest item first to the least-loaded part (ties: the lower index).

    Deterministic from the sizes alone, so every machine computes the same split. Each part's
    indices come back in ascending order, the order the items were planned in.
    """
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    loads = [0] * parts
    owned: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        loads[part] += sizes[index]
        owned[part].append(index)
    return [sorted(indices) for indices in owned]
