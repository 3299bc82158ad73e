"""Reward functions verl loads by path (`launch grpo --reward-fn launch/rewards.py`).

`compute_score` scores the toolkit's smoke task (data_source `dsv3-toolkit/digit-share`) and hands
every other data source, MATH-lighteval included, to verl's own default scorer. The smoke task is
one a randomly initialised model learns in tens of GRPO steps: the reward is the share of the
response's non-space characters that are digits. Its only purpose is to prove that the whole loop
(rollout, reward, advantage, actor update, weight sync back into the rollout engine) works: if the
updated weights never reached vLLM, the reward would stay flat at its initial level.

This file imports nothing from the toolkit: verl loads it as a standalone module on every worker.
"""

from __future__ import annotations

DIGIT_SHARE = "dsv3-toolkit/digit-share"


def digit_share(text: str) -> float:
    """Share of the non-whitespace characters of `text` that are ASCII digits (0.0 for an empty text)."""
    characters = [c for c in text if not c.isspace()]
    if not characters:
        return 0.0
    return sum(c in "0123456789" for c in characters) / len(characters)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """verl's custom reward function signature; other data sources go to verl's default scorer."""
    if data_source == DIGIT_SHARE:
        return digit_share(solution_str)
    from verl.utils.reward_score import default_compute_score

    return default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
