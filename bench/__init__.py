"""Archtree's benchmark suite: `python -m bench.run` (or `make bench`).

Sections: search quality (`search_quality`), measurement quality (`measurement_quality`),
service overhead (`service_overhead`) and parallel scaling (`scaling`); `report` turns their
rows into tables, `summary.json`, `summary.md` and plots; `train_models` trains the models.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / "bench" / ".cache"
RESULTS_DIR = ROOT / "bench" / "results"
