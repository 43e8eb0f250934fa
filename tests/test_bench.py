"""The benchmark suite: its quick mode run for real (`python -m bench.run --quick` in a
subprocess), plus the parsing and target logic on fixed inputs.

The quick run's checks are about the shape of what it writes (summary.json rows, summary.md,
PNG plots), never the numbers: timings on a shared machine are not reproducible.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import ROW_FIELDS, accuracy_gap, evaluate_targets, make_row
from bench.service_overhead import parse_wrk

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE_KEYS = {"cpu_model", "cores", "torch_version", "torch_threads", "timing_threads"}
WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:60113/v1/jobs/0fee7fa74930
  2 threads and 100 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   294.02ms   73.76ms 525.62ms   72.10%
    Req/Sec   163.35     89.47   353.00     64.86%
  Latency Distribution
     50%  276.60ms
     75%  330.20ms
     90%  415.97ms
     99%    1.49s
  638 requests in 2.04s, 662.30KB read
  Non-2xx or 3xx responses: 3
Requests/sec:    312.69
Transfer/sec:    324.60KB
"""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The results folder of one quick run, and its stdout."""
    if importlib.util.find_spec("matplotlib") is None:
        pytest.fail(
            "matplotlib is not installed, and the benchmark's plots need it: add matplotlib to "
            "the test extras (pip install matplotlib; `make bench` installs it)"
        )
    base = tmp_path_factory.mktemp("bench")
    out = base / "results"
    # What an earlier run with one seed left: its answer goes, the rest of the folder stays.
    stale = out / "search" / "vgg-70-archtree"
    stale.mkdir(parents=True)
    (stale / "arch.json").write_text("{}")
    (out / "search" / "notes.txt").write_text("kept")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ARCHTREE_HOME": str(base / "home"),
    }
    # Two seeds: every search twice, each seed on its own split and its own trained model.
    command = [sys.executable, "-m", "bench.run", "--quick", "--seeds", "2", "--out", str(out)]
    command += ["--cache-dir", str(base / "cache")]
    finished = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert finished.returncode == 0, f"bench.run failed:\n{finished.stderr[-4000:]}"
    return out, finished.stdout


@pytest.mark.slow
def test_summary_rows_have_the_schema(quick_run: tuple[Path, str]):
    out, _ = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"].keys() >= MACHINE_KEYS
    assert summary["mode"] == "quick"
    assert summary["rows"]
    for row in summary["rows"]:
        assert row.keys() >= set(ROW_FIELDS), row
        assert isinstance(row["details"], dict)
        for name in ("accuracy", "latency_ms", "budget_ms", "fit", "wall_s"):
            assert row[name] is None or isinstance(row[name], int | float), (name, row)
    for target in summary["targets"]:
        assert target["result"] in ("pass", "miss", "n/a")


@pytest.mark.slow
def test_search_rows_cover_the_three_strategies(quick_run: tuple[Path, str]):
    out, _ = quick_run
    summary = json.loads((out / "summary.json").read_text())
    search = [r for r in summary["rows"] if r["benchmark"] == "search_quality"]
    assert summary["seeds"] == 2
    assert sorted((r["details"]["seed"], r["strategy"]) for r in search) == [
        (seed, strategy) for seed in (0, 1) for strategy in ("archtree", "greedy", "uniform")
    ]
    # One unpruned model per seed, each trained and validated on that seed's split.
    unpruned = summary["sections"]["search_quality"]["data"]["models"]["builtin:vgg"]
    assert len(unpruned["val_accuracy_by_seed"]) == 2
    assert unpruned["val_accuracy"] == pytest.approx(sum(unpruned["val_accuracy_by_seed"]) / 2)
    # Each seed's searches ran with that seed (it splits the data and orders the fine-tuning).
    for row in search:
        if row["fit"] is not None:
            name = f"vgg-70-{row['strategy']}-s{row['details']['seed']}"
            report = json.loads((out / "search" / name / "report.json").read_text())
            assert report["search"]["settings"]["seed"] == row["details"]["seed"]
    for row in search:
        assert row["model"] == "builtin:vgg"
        if row["fit"] is None:  # an unreachable budget carries the engine's message
            assert row["details"]["error"]
            continue
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["latency_ms"] > 0 and row["budget_ms"] > 0
        assert row["candidates"] >= 1 and row["measurements"] >= 1
        assert row["details"]["ft_steps_total"] >= 0
        # The images it got wrong, for paired comparisons: as many as its accuracy says.
        wrong, samples = row["details"]["val_wrong"], row["details"]["val_samples"]
        assert len(set(wrong)) == len(wrong) and all(0 <= i < samples for i in wrong)
        assert row["accuracy"] == pytest.approx(1 - len(wrong) / samples)


@pytest.mark.slow
def test_a_run_replaces_the_answers_of_the_run_before(quick_run: tuple[Path, str]):
    out, _ = quick_run
    answers = sorted(p.name for p in (out / "search").iterdir() if p.is_dir())
    assert answers and all(name.endswith(("-s0", "-s1")) for name in answers), answers
    assert (out / "search" / "notes.txt").read_text() == "kept"


def test_every_section_ran_or_says_why_not(quick_run: tuple[Path, str]):
    out, stdout = quick_run
    sections = json.loads((out / "summary.json").read_text())["sections"]
    assert set(sections) == {"search_quality", "measurement", "service", "scaling"}
    for name, section in sections.items():
        assert section["status"] in ("ok", "skipped"), (name, section)
        if section["status"] == "skipped":
            assert section["note"], name
    assert "== Search quality ==" in stdout and "== Targets ==" in stdout


@pytest.mark.slow
def test_markdown_and_plots_are_written(quick_run: tuple[Path, str]):
    out, _ = quick_run
    text = (out / "summary.md").read_text()
    assert "## Targets" in text and "Search quality" in text
    plots = sorted(out.glob("*.png"))
    assert out / "search_vgg.png" in plots
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG_MAGIC, plot
        assert f"]({plot.name})" in text


def test_wrk_output_is_parsed_into_milliseconds():
    stats = parse_wrk(WRK_OUTPUT)
    assert stats["p50_ms"] == pytest.approx(276.6)
    assert stats["p99_ms"] == pytest.approx(1490.0)
    assert stats["requests_per_s"] == pytest.approx(312.69)
    assert stats["requests"] == 638 and stats["non_2xx"] == 3


def test_targets_compare_strategies_at_the_lowest_budget():
    def search_row(fraction: float, strategy: str, accuracy: float | None, fit: float | None):
        return make_row(
            "search_quality",
            "builtin:resnet",
            budget_fraction=fraction,
            strategy=strategy,
            accuracy=accuracy,
            fit=fit,
        )

    rows = [
        search_row(0.5, "archtree", 0.95, 0.97),
        search_row(0.5, "greedy", 0.94, 0.99),
        search_row(0.5, "uniform", 0.90, 0.90),
        search_row(0.35, "archtree", None, None),
        search_row(0.35, "greedy", None, None),
        search_row(0.35, "uniform", None, None),
    ]
    targets = {t["target"]: t for t in evaluate_targets(rows)}
    assert targets["budget fit in [0.93, 1.00]"]["result"] == "miss"
    fit = targets["budget fit in [0.93, 1.00]"]["value"]
    assert "3 rows without a result" in fit
    assert "(archtree 1/1, greedy 1/1, uniform 0/1)" in fit
    assert targets["resnet: archtree >= uniform + 2 points at 35%"]["result"] == "n/a"
    assert targets["resnet: archtree never below greedy"]["result"] == "pass"
    assert targets["2 workers >= 1.6x faster than 1"]["result"] == "n/a"


def scored_row(fraction: float, strategy: str, wrong: list[int], seed: int = 0):
    """A ResNet search row whose answer errs on the images `wrong` of 100."""
    return make_row(
        "search_quality",
        "builtin:resnet",
        budget_fraction=fraction,
        strategy=strategy,
        accuracy=1 - len(wrong) / 100,
        fit=0.97,
        seed=seed,
        val_wrong=wrong,
        val_samples=100,
    )


def test_strategies_are_compared_image_by_image_with_an_interval():
    # At 50 % archtree and greedy err on the same 5 images: equal, and no doubt about it.
    # At 35 % archtree errs on 6 of its own, greedy on 4 others and uniform on 10 others.
    rows = [
        scored_row(0.5, "archtree", [0, 1, 2, 3, 4]),
        scored_row(0.5, "greedy", [0, 1, 2, 3, 4]),
        scored_row(0.5, "uniform", list(range(10))),
        scored_row(0.35, "archtree", list(range(6))),
        scored_row(0.35, "greedy", list(range(10, 14))),
        scored_row(0.35, "uniform", list(range(20, 30))),
    ]
    gap = accuracy_gap(rows[3], rows[4])
    assert gap.difference == pytest.approx(-0.02) and gap.samples == 100
    # Per-image differences: -1 six times, +1 four times, 0 ninety times.
    sd = ((6 * 0.98**2 + 4 * 1.02**2 + 90 * 0.02**2) / 99) ** 0.5
    assert gap.standard_error == pytest.approx(sd / 10)
    assert accuracy_gap(rows[0], rows[1]).standard_error == 0.0
    targets = {t["target"]: t for t in evaluate_targets(rows)}
    below = targets["resnet: archtree never below greedy"]
    assert below["result"] == "miss" and below["value"] == "50%: +0.0, 35%: -2.0"
    assert below["detail"] == (
        "95 % intervals, paired on the 100 validation images: "
        f"50%: +0.0 +- 0.0, 35%: -2.0 +- {196 * sd / 10:.1f}"
    )
    uniform = targets["resnet: archtree >= uniform + 2 points at 35%"]
    assert uniform["result"] == "pass" and uniform["value"] == "+4.0 points"
    assert uniform["detail"].endswith(
        "35%: +4.0 +- " + f"{196 * accuracy_gap(rows[3], rows[5]).standard_error:.1f}"
    )
    # Rows of an older run, without the images, still give the targets, without intervals.
    for row in rows:
        del row["details"]["val_wrong"]
    assert accuracy_gap(rows[3], rows[4]) is None
    targets = {t["target"]: t for t in evaluate_targets(rows)}
    assert targets["resnet: archtree never below greedy"]["detail"] == ""


def test_with_several_seeds_targets_compare_mean_accuracies_and_pair_each_seed():
    # Seed 0: archtree errs on 2 images fewer than greedy; seed 1: on 4 more (other images).
    rows = [
        scored_row(0.35, "archtree", [0, 1, 2]),
        scored_row(0.35, "greedy", [0, 1, 2, 3, 4]),
        scored_row(0.35, "uniform", list(range(10))),
        scored_row(0.35, "archtree", [50, 51, 52, 53, 54, 55], seed=1),
        scored_row(0.35, "greedy", [50, 51], seed=1),
        scored_row(0.35, "uniform", list(range(50, 60)), seed=1),
    ]
    targets = {t["target"]: t for t in evaluate_targets(rows)}
    below = targets["resnet: archtree never below greedy"]
    # Means: archtree 0.955, greedy 0.965.
    assert below["result"] == "miss" and below["value"] == "35%: -1.0"
    seed0, seed1 = accuracy_gap(rows[0], rows[1]), accuracy_gap(rows[3], rows[4])
    assert (seed0.difference, seed1.difference) == pytest.approx((0.02, -0.04))
    error = (seed0.standard_error**2 + seed1.standard_error**2) ** 0.5 / 2
    assert below["detail"] == (
        "95 % intervals, paired on the 100 validation images of each of 2 seeds: "
        f"35%: -1.0 +- {196 * error:.1f} (+2.0, -4.0)"
    )
    # Rows of different seeds are never paired: their validation images differ.
    assert accuracy_gap(rows[0], rows[4]) is None
    uniform = targets["resnet: archtree >= uniform + 2 points at 35%"]
    assert uniform["result"] == "pass" and uniform["value"] == "+5.5 points"


def test_a_jobs_events_say_where_its_time_went():
    from bench.scaling import job_phases

    def at(time: float, kind: str, **data: object) -> dict[str, object]:
        return {"kind": kind, "time": time, **data}

    events = [
        at(100.0, "queued"),
        at(104.0, "baseline"),
        at(106.5, "depth_started", depth=1),
        at(150.0, "depth_done", depth=1),
        at(151.0, "depth_started", depth=2),
        at(190.0, "depth_done", depth=2),
        at(200.0, "confirm_failed", id="n7"),
        at(230.0, "trim_compared", trimmed="n9", chosen="n8"),
        at(236.0, "filled", answer="n8", id="n10", chosen="n10"),
        at(237.0, "confirmed", id="n10", trims=0),
        at(245.5, "done", id="n10"),
    ]
    assert job_phases(events) == {
        "start_s": 6.5,
        "search_s": 83.5,
        "ending_s": 55.5,
        "confirm_failed": 1,
        "trimmed": True,
        "filled": True,
    }
    quiet_end = [e for e in events if e["kind"] not in ("confirm_failed", "trim_compared")]
    assert job_phases(quiet_end)["trimmed"] is False
    # A widened answer that scored lower was not taken.
    kept_answer = [{**e, "chosen": "n8"} if e["kind"] == "filled" else e for e in events]
    assert job_phases(kept_answer)["filled"] is False
    # A job that failed before its first depth has no spans to give.
    assert job_phases(events[:2]) == {
        "start_s": None,
        "search_s": None,
        "ending_s": None,
        "confirm_failed": 0,
        "trimmed": False,
        "filled": False,
    }


def test_the_speedup_pools_the_runs_of_each_worker_count_and_keeps_each_round():
    from bench.scaling import speedup_row

    def job(wall_s: float, candidates: int) -> dict:
        return make_row("scaling", "builtin:resnet", wall_s=wall_s, candidates=candidates)

    # Run in the order 1, 2, 2, 1 while the machine slows down: each round alone disagrees.
    one = [job(400.0, 16), job(480.0, 16)]
    two = [job(200.0, 16), job(300.0, 20)]
    row = speedup_row("builtin:resnet", one, two)["details"]
    assert row["round_speedups"] == [2.0, pytest.approx(2.0, abs=1e-3)]
    # Pooled: 880 s for 32 candidates against 500 s for 36.
    assert row["speedup"] == pytest.approx((880 / 32) / (500 / 36))
    assert row["wall_ratio"] == pytest.approx(440 / 250)
    targets = {t["target"]: t for t in evaluate_targets([speedup_row("m", one, two)])}
    target = targets["2 workers >= 1.6x faster than 1"]
    assert target["result"] == "pass" and "per round 2.00x, 2.00x" in target["detail"]


def test_a_searchs_events_keep_what_its_ending_did():
    from bench.search_quality import SearchEvents
    from search.interfaces import ListEventSink

    forward = ListEventSink()
    events = SearchEvents(forward)
    events.emit("baseline", latency_ms=10.0, budget_ms=3.5)
    events.emit("reranked", steps=100, nodes=[{"id": "n4"}, {"id": "n5"}])
    events.emit("confirm_failed", id="n4", latency_ms=3.6)
    chosen = {"trimmed": "n9", "trimmed_score": 0.9, "confirmed": "n5", "chosen": "n9"}
    events.emit("trim_compared", **chosen)
    widened = {"answer": "n9", "id": "n10", "groups": ["conv1"], "chosen": "n10"}
    events.emit("filled", **widened)
    assert events.confirm_failed == [("n4", 3.6)]
    assert events.trim_compared == chosen
    assert events.filled == widened
    assert events.rerank_steps == 200 and events.baseline["budget_ms"] == 3.5
    assert [e["kind"] for e in forward.events][-3:] == ["confirm_failed", "trim_compared", "filled"]


def run_after_bench(
    module: str, results: Path, *options: str, timeout: float = 60
) -> subprocess.CompletedProcess:
    """`python -m bench.MODULE --results RESULTS OPTIONS...`, a command that works on a
    finished run, as a user runs it."""
    command = [sys.executable, "-m", f"bench.{module}", "--results", str(results), *options]
    return subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_longer_finetune(
    results: Path, *options: str, timeout: float = 60
) -> subprocess.CompletedProcess:
    return run_after_bench("longer_finetune", results, *options, timeout=timeout)


def run_remeasure(results: Path, *options: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_after_bench("remeasure", results, *options, timeout=timeout)


@pytest.mark.slow
def test_longer_finetune_follows_every_saved_answer(quick_run: tuple[Path, str]):
    out, _ = quick_run
    finished = run_longer_finetune(
        out,
        *("--cache-dir", str(out.parent / "cache"), "--epochs", "0.5", "0.5", "--threads", "1"),
        timeout=RUN_TIMEOUT_S,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    searches = [r for r in summary["rows"] if r["benchmark"] == "search_quality"]
    rows = json.loads((out / "longer-finetune.json").read_text())["rows"]
    assert len(rows) == 3 * len(searches)
    for search in searches:
        seed = search["details"]["seed"]
        stages = sorted(
            (r for r in rows if (r["strategy"], r["seed"]) == (search["strategy"], seed)),
            key=lambda r: r["stage"],
        )
        # The saved answer, reloaded, scores what the run recorded; each stage adds its epochs.
        assert stages[0]["accuracy"] == pytest.approx(search["accuracy"], abs=1e-6)
        first = search["details"]["final_epochs"]
        assert [r["epochs"] for r in stages] == pytest.approx([first, first + 0.5, first + 1.0])
    # Fine-tuning went on: some answer now gets other images wrong than it did.
    assert any(
        r["details"]["val_wrong"] != s["details"]["val_wrong"]
        for r in rows
        for s in rows
        if r["stage"] == 2
        and s["stage"] == 0
        and (r["strategy"], r["seed"]) == (s["strategy"], s["seed"])
    )
    table = (out / "longer-finetune.md").read_text()
    assert "| vgg | 70% |" in table and "archtree - uniform" in table
    assert finished.stdout.count("| vgg | 70% |") == 3


@pytest.mark.parametrize("module", ["longer_finetune", "remeasure"])
def test_a_command_on_a_finished_run_without_one_says_what_to_do(tmp_path: Path, module: str):
    finished = run_after_bench(module, tmp_path)
    assert finished.returncode == 2
    assert "run the benchmark first" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_longer_finetune_names_the_unpruned_weights_it_cannot_find(tmp_path: Path):
    row = make_row("search_quality", "builtin:vgg", budget_fraction=0.7, strategy="archtree")
    row.update(accuracy=0.9, details={"seed": 0})
    (tmp_path / "summary.json").write_text(json.dumps({"seeds": 1, "rows": [row]}))
    answer = tmp_path / "search" / "vgg-70-archtree"
    answer.mkdir(parents=True)
    (answer / "arch.json").write_text("{}")
    missing = tmp_path / "gone" / "vgg-digits-e2-lr0.05-s0.safetensors"
    (answer / "report.json").write_text(json.dumps({"inputs": {"weights": str(missing)}}))
    finished = run_longer_finetune(tmp_path, "--cache-dir", str(tmp_path / "cache"))
    assert finished.returncode == 2
    assert "vgg-digits-e2-lr0.05-s0.safetensors" in finished.stderr
    assert "--cache-dir" in finished.stderr and "Traceback" not in finished.stderr


@pytest.mark.slow
def test_remeasure_times_every_saved_answer_again_in_rounds_that_alternate(
    quick_run: tuple[Path, str],
):
    out, _ = quick_run
    finished = run_remeasure(
        out, "--rounds", "2", "--cache-dir", str(out.parent / "cache"), timeout=RUN_TIMEOUT_S
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    searches = [
        r
        for r in summary["rows"]
        if r["benchmark"] == "search_quality" and r["accuracy"] is not None
    ]
    rows = json.loads((out / "remeasure.json").read_text())["rows"]
    assert len(rows) == len(searches) > 1
    for search in searches:
        (row,) = [
            r
            for r in rows
            if (r["strategy"], r["seed"]) == (search["strategy"], search["details"]["seed"])
        ]
        assert row["run_fit"] == search["fit"]
        assert row["confirmed_fit"] == search["details"]["report_fit"]
        assert len(row["round_fits"]) == 2
        # The same answer against the same unpruned model: a noisy machine moves the ratio by
        # some percent, not by a factor of two.
        for fit in row["round_fits"]:
            assert 0.5 * search["fit"] < fit < 2 * search["fit"]
        fits = sorted([row["run_fit"], *row["round_fits"]])
        assert row["median_fit"] == pytest.approx(fits[1])
        assert row["spread"] == pytest.approx((fits[-1] - fits[0]) / fits[1])
    # The second round takes the answers backward, so each one's timings lie apart.
    timed = [
        line.split()[2].rstrip(":")
        for line in finished.stdout.splitlines()
        if line.startswith("round ")
    ]
    first, second = timed[: len(rows)], timed[len(rows) :]
    assert second == first[::-1] and len(set(first)) == len(rows)
    table = (out / "remeasure.md").read_text()
    assert table.count("| vgg | 70% |") == len(rows)
    assert "as the median of the run's and the rounds' re-measurements" in table


def test_remeasure_refuses_a_damaged_answer_before_timing_any(tmp_path: Path):
    cache = tmp_path / "cache"
    cache.mkdir()
    rows = []
    for strategy in ("archtree", "greedy"):
        row = make_row("search_quality", "builtin:vgg", budget_fraction=0.7, strategy=strategy)
        row.update(accuracy=0.9, fit=0.95, budget_ms=1.0, details={"seed": 0, "baseline_ms": 2})
        rows.append(row)
        answer = tmp_path / "search" / f"vgg-70-{strategy}"
        answer.mkdir(parents=True)
        weights = cache / "vgg-digits-e2-lr0.05-s0.safetensors"
        weights.write_bytes(b"")
        (answer / "report.json").write_text(json.dumps({"inputs": {"weights": str(weights)}}))
        # The first answer is whole as far as this command reads it; the second lost its shape.
        shape = {"input_shape": [1, 8, 8]} if strategy == "archtree" else {"layers": {}}
        (answer / "arch.json").write_text(json.dumps(shape))
    (tmp_path / "summary.json").write_text(json.dumps({"seeds": 1, "rows": rows}))
    finished = run_remeasure(tmp_path, "--cache-dir", str(cache))
    assert finished.returncode == 2
    assert "vgg-70-greedy" in finished.stderr and "arch.json" in finished.stderr
    assert "Traceback" not in finished.stderr
    # Refused before the first timing: nothing was timed, nothing written.
    assert "round 1" not in finished.stdout
    assert not (tmp_path / "remeasure.json").exists()


@pytest.mark.parametrize("rounds", ["0", "21", "two"])
def test_remeasure_refuses_a_number_of_rounds_out_of_range(tmp_path: Path, rounds: str):
    finished = run_remeasure(tmp_path, "--rounds", rounds)
    assert finished.returncode == 2
    assert "--rounds" in finished.stderr and "Traceback" not in finished.stderr


def redraw(out: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m bench.run --redraw --out OUT`, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "bench.run", "--redraw", "--out", str(out), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_redraw_writes_the_plots_and_markdown_again_from_the_summary(
    quick_run: tuple[Path, str], tmp_path: Path
):
    out, _ = quick_run
    copy = tmp_path / "results"
    copy.mkdir()
    (copy / "summary.json").write_text((out / "summary.json").read_text())
    finished = redraw(copy)
    assert finished.returncode == 0, finished.stderr
    assert sorted(p.name for p in copy.glob("*.png")) == sorted(p.name for p in out.glob("*.png"))
    assert (copy / "summary.md").read_text() == (out / "summary.md").read_text()


def test_redraw_without_a_summary_says_what_to_do(tmp_path: Path):
    finished = redraw(tmp_path)
    assert finished.returncode == 2
    assert "run the benchmark first" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_results_or_cache_folder_that_is_a_file_is_refused_before_any_work(tmp_path: Path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    for option in ("--out", "--cache-dir"):
        # --quick --only measurement would run; the check comes first (an error 2 at once).
        finished = subprocess.run(
            [sys.executable, "-m", "bench.run", "--quick", "--only", "measurement",
             "--out", str(tmp_path / "out"), option, str(a_file)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert finished.returncode == 2, finished.stderr
        assert f"{option} {a_file} is a file: give a folder" in finished.stderr
        assert "Traceback" not in finished.stderr
    assert a_file.read_text() == "kept"
    refused = redraw(a_file)
    assert refused.returncode == 2 and "is a file" in refused.stderr, refused.stderr
