"""Importance scores: width (heads, neurons, channels) and depth (BI, perplexity, Taylor+)."""

from engine.importance.scores import ScoreError, Scores

__all__ = ["Scores", "ScoreError"]
