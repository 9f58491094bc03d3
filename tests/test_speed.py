from __future__ import annotations

import math

import pytest
from tiny_models import FAMILIES, save_tiny, tiny_model

from engine.speed import measure_throughput, size_on_disk


@pytest.mark.parametrize("family", FAMILIES)
def test_throughput_is_measured_with_kv_cache(family):
    m = tiny_model(family)
    t = measure_throughput(m, batch_size=2, prompt_len=12, new_tokens=4, repeats=1)
    assert t.batch_size == 2 and t.new_tokens == 4
    for v in (t.prefill_tokens_per_s, t.decode_tokens_per_s, t.decode_ms_per_step):
        assert math.isfinite(v) and v > 0


def test_size_on_disk_counts_weight_files(tmp_path):
    path = save_tiny("llama", tmp_path / "m")
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert size_on_disk(path) == weights > 0
