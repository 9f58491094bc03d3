"""prunescope engine: score, plan, prune, distill, evaluate and export LLMs (no Streamlit here)."""

__version__ = "0.1.0"
