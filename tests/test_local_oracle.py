"""LocalOracle: interleaved measurements, caching, confirm runs and device parsing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from latency.cache import DiskLatencyCache
from latency.harness import TimingSettings
from latency.local_oracle import LocalOracle, parse_device
from search.errors import ArchtreeError
from search.model_source import ModelRef

FAST = TimingSettings(warmup_runs=3, warmup_s=0.0, min_runs=10, min_time_s=0.02, max_remeasures=0)


@dataclass(frozen=True)
class StandIn:
    """What the oracle needs from an ArchSpec: its hash and input."""

    depth: int
    width: int = 256
    input_shape: tuple[int, ...] = (256,)
    token_range: int | None = None
    model: ModelRef = ModelRef("builtin:vgg", 10, 1)

    @property
    def hash(self) -> str:
        return f"d{self.depth}w{self.width}"


REFERENCE = StandIn(depth=8)
SMALL = StandIn(depth=1)


class Builder:
    """Builds a stack of `depth` linear layers and counts the builds."""

    def __init__(self) -> None:
        self.builds = 0

    def __call__(self, spec: StandIn) -> nn.Module:
        self.builds += 1
        layers = [nn.Linear(spec.width, spec.width) for _ in range(spec.depth)]
        return nn.Sequential(*layers).train()


def make_oracle(**kwargs: object) -> LocalOracle:
    return LocalOracle(Builder(), batch_size=8, settings=FAST, **kwargs)  # type: ignore[arg-type]


def test_measure_orders_candidates_by_work() -> None:
    oracle = make_oracle()
    result = oracle.measure(SMALL, REFERENCE)
    assert result.ratio < 1 / 3
    assert result.arch_hash == SMALL.hash
    assert not result.cached
    assert result.candidate.median_ms < result.reference.median_ms
    assert result.fingerprint == oracle.fingerprint()
    assert result.fingerprint["input_shape"] == [256]
    assert result.fingerprint["batch_size"] == 8
    assert oracle.measurements == 1 and oracle.cache_hits == 0


def test_cache_hit_is_marked_and_costs_no_timing() -> None:
    oracle = make_oracle()
    first = oracle.measure(SMALL, REFERENCE)
    second = oracle.measure(SMALL, REFERENCE)
    assert second.cached
    assert second.ratio == first.ratio
    assert second.candidate == first.candidate
    assert oracle.measurements == 1 and oracle.cache_hits == 1
    baseline = oracle.measure_reference(REFERENCE)
    assert oracle.measure_reference(REFERENCE) == baseline
    assert oracle.measurements == 2 and oracle.cache_hits == 2


def test_confirm_never_reuses_a_plain_result_and_runs_longer() -> None:
    oracle = make_oracle()
    plain = oracle.measure(SMALL, REFERENCE)
    confirmed = oracle.measure(SMALL, REFERENCE, confirm=True)
    assert not confirmed.cached
    assert confirmed.candidate.n >= 4 * FAST.min_runs
    assert confirmed.candidate.n > plain.candidate.n
    assert oracle.measure(SMALL, REFERENCE, confirm=True).cached
    baseline = oracle.measure_reference(REFERENCE)
    confirmed_baseline = oracle.measure_reference(REFERENCE, confirm=True)
    assert confirmed_baseline.n > baseline.n
    assert oracle.measurements == 4 and oracle.cache_hits == 1


def test_reference_is_built_once() -> None:
    builder = Builder()
    oracle = LocalOracle(builder, settings=FAST)
    oracle.measure_reference(REFERENCE)
    for depth in (1, 2, 3):
        oracle.measure(StandIn(depth=depth), REFERENCE)
    assert builder.builds == 4


def test_disk_cache_serves_a_new_oracle(tmp_path: Path) -> None:
    first = make_oracle(cache=DiskLatencyCache(tmp_path))
    measured = first.measure(SMALL, REFERENCE)
    second = make_oracle(cache=DiskLatencyCache(tmp_path))
    again = second.measure(SMALL, REFERENCE)
    assert again.cached and again.ratio == measured.ratio
    assert second.measurements == 0 and second.cache_hits == 1


def test_a_cache_entry_of_another_shape_is_measured_again(tmp_path: Path) -> None:
    first = make_oracle(cache=DiskLatencyCache(tmp_path))
    first.measure(SMALL, REFERENCE)
    first.measure_reference(REFERENCE)
    for entry in tmp_path.glob("*.json"):  # valid JSON, but not what this version wrote
        entry.write_text('{"median": "fast"}', encoding="utf-8")
    second = make_oracle(cache=DiskLatencyCache(tmp_path))
    assert not second.measure(SMALL, REFERENCE).cached
    assert second.measure_reference(REFERENCE).median_ms > 0
    assert second.measurements == 2 and second.cache_hits == 0
    assert make_oracle(cache=DiskLatencyCache(tmp_path)).measure(SMALL, REFERENCE).cached


@pytest.mark.parametrize(
    ("field", "value"),
    [("ratio", float("nan")), ("ratio", -0.5), ("median_ms", float("inf")), ("median_ms", 0.0),
     ("cv", -1.0), ("median_ms", "0.27"), ("median_ms", None), ("median_ms", True),
     ("median_ms", 1e308), ("n", "887"), ("n", 1.5)],
)  # fmt: skip
def test_a_cache_entry_of_numbers_no_timing_gives_is_measured_again(
    tmp_path: Path, field: str, value: object
) -> None:
    """A NaN taken from the cache made a search say `smallest reachable nan ms`, and saved
    it with the search, which then failed at every resume; a string where a number goes
    ended the command in an internal error."""
    import json

    first = make_oracle(cache=DiskLatencyCache(tmp_path))
    first.measure(SMALL, REFERENCE)
    first.measure_reference(REFERENCE)

    def edited(entry: dict) -> dict:
        return {k: value if k == field else edited(v) if isinstance(v, dict) else v
                for k, v in entry.items()}  # fmt: skip

    for path in tmp_path.glob("*.json"):
        path.write_text(json.dumps(edited(json.loads(path.read_text()))), encoding="utf-8")
    second = make_oracle(cache=DiskLatencyCache(tmp_path))
    measured = second.measure(SMALL, REFERENCE)
    assert not measured.cached and 0 < measured.ratio < 1
    if field != "ratio":  # the reference's own entry holds timings, no ratio
        assert not second.measure_reference(REFERENCE).cached
    assert second.cache_hits == 0


def test_settings_differing_in_threads_or_batch_do_not_share_results() -> None:
    shared = make_oracle().cache
    make_oracle(cache=shared).measure(SMALL, REFERENCE)
    other_batch = LocalOracle(Builder(), batch_size=2, settings=FAST, cache=shared)
    assert not other_batch.measure(SMALL, REFERENCE).cached
    other_threads = make_oracle(cache=shared, threads=2)
    assert not other_threads.measure(SMALL, REFERENCE).cached


def test_threads_argument_overrides_settings_and_is_restored() -> None:
    previous = torch.get_num_threads()
    oracle = make_oracle(threads=2)
    assert oracle.settings.threads == 2 and oracle.fingerprint()["threads"] == 2
    oracle.measure(SMALL, REFERENCE)
    assert torch.get_num_threads() == previous


def test_parse_device() -> None:
    assert parse_device("local") == ("cpu", "local")
    assert parse_device("local:cpu") == ("cpu", "local")
    assert parse_device("local:cuda") == ("cuda", "local:cuda")
    for text in ("gpu", "cuda", "remote:pi", ""):
        with pytest.raises(ArchtreeError, match="local:cuda"):
            parse_device(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(ArchtreeError, match=r"needs a CUDA GPU.*use --device local$"):
        LocalOracle(Builder(), device="cuda", device_class="local:cuda")


def test_unknown_dtype_is_a_clear_error() -> None:
    with pytest.raises(ArchtreeError, match="float32"):
        LocalOracle(Builder(), dtype="int3")
