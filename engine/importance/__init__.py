"""Importance scores: width (heads, neurons, channels) and depth (BI, perplexity, Taylor+)."""

from engine.importance.aggregate import AGGREGATIONS, spearman
from engine.importance.api import ScoreConfig, compute_scores
from engine.importance.cache import cache_key, score
from engine.importance.scores import ScoreError, Scores

__all__ = ["AGGREGATIONS", "ScoreConfig", "ScoreError", "Scores", "cache_key", "compute_scores", "score",
           "spearman"]
