"""The progress callback every long operation takes: `progress(fraction done in [0, 1], message)`.
The CLI adapts it to tqdm, the dashboard's jobs to their run folder's status (Run.progress_cb)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]
