"""Reward functions and the reward protocol (see `protocol.py`)."""

from .protocol import CheckedReward, RewardError, RewardResult, combine_feedback

__all__ = ["CheckedReward", "RewardError", "RewardResult", "combine_feedback"]
