"""Choosing prune targets with evidence: one-shot previews and the candidate search.

shapes      every valid shape within a parameter budget (pure arithmetic, torch-free)
store       the store of a model's previews (torch-free)
preview     the cached teacher side and the one-shot preview of a set of targets
tournament  K students distilled on the same batches, one teacher forward per batch
job         the "search" and "preview" job kinds (run folders; engine.jobs)

The job entry points below import the torch parts only when a job runs.
"""

from __future__ import annotations


def run_search_job(run, should_stop):
    """The "search" job kind: enumerate -> preview every shape -> tournament of the top K."""
    from engine.search.job import search_job

    return search_job(run, should_stop)


def run_preview_job(run, should_stop):
    """The "preview" job kind: one-shot KL / ppl of one set of targets."""
    from engine.search.job import preview_job

    return preview_job(run, should_stop)
