"""Train the benchmark's models once and cache their weights under bench/.cache/.

`python -m bench.train_models [--quick] [--cache-dir DIR]` trains every model the suite needs;
the other sections call `trained_weights`, which trains on a cache miss.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench import CACHE_DIR


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: epochs and learning rate of SGD with cosine decay."""

    epochs: float
    lr: float = 0.05
    seed: int = 0


# Trained until validation accuracy stops rising, so that pruning is judged against a
# converged model. At 3 epochs (ResNet) and 5 (MobileNetV2) the unpruned models scored 0.956
# and 0.960-0.963, and their pruned answers, fine-tuned with distillation for 5 epochs, ended
# above them at every budget; at 12 epochs they score 0.976-0.977 and 0.974.
RECIPES: dict[str, Recipe] = {
    "builtin:resnet": Recipe(epochs=12),
    "builtin:mobilenetv2": Recipe(epochs=12),
    "builtin:vgg": Recipe(epochs=2),
}


def recipe_for(model: str) -> Recipe:
    """The recipe of `model`: its own, or 3 epochs at the default learning rate."""
    return RECIPES.get(model, Recipe(epochs=3))


def seeded_recipe(model: str, seed: int) -> Recipe:
    """The recipe of `model` for the replicate `seed`: trained on that seed's split."""
    return replace(recipe_for(model), seed=seed)


@dataclass
class TrainedModel:
    """Cached weights of a model trained on a dataset, with its validation accuracy."""

    model: str
    data: str
    weights: Path
    val_accuracy: float
    train_s: float
    recipe: Recipe
    cached: bool

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["weights"] = str(self.weights)
        return data


def weights_path(cache_dir: Path, model: str, data: str, recipe: Recipe) -> Path:
    """Where the weights of `model` trained on `data` with `recipe` are cached."""
    name = (
        f"{model.removeprefix('builtin:')}-{data.removeprefix('builtin:')}"
        f"-e{recipe.epochs:g}-lr{recipe.lr:g}-s{recipe.seed}"
    )
    return cache_dir / f"{name}.safetensors"


def trained_weights(
    model: str,
    data: str,
    cache_dir: Path = CACHE_DIR,
    *,
    recipe: Recipe | None = None,
    log: Callable[[str], None] = print,
) -> TrainedModel:
    """Weights of `model` trained on the train split of `data`: cached, or trained now."""
    from search.data_source import load_data
    from search.inputs import load_inputs
    from search.model_source import save_weights
    from search.training import accuracy, train

    recipe = recipe or recipe_for(model)
    path = weights_path(Path(cache_dir), model, data, recipe)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return TrainedModel(
            model, data, path, meta["val_accuracy"], meta["train_s"], recipe, cached=True
        )
    log(f"training {model} on {data} ({recipe.epochs:g} epochs, lr {recipe.lr:g}); cached after")
    inputs = load_inputs(model, data, seed=recipe.seed)
    splits = load_data(data, seed=recipe.seed)
    started = time.monotonic()
    train(
        inputs.model,
        splits.train_x,
        splits.train_y,
        epochs=recipe.epochs,
        lr=recipe.lr,
        seed=recipe.seed,
    )
    train_s = time.monotonic() - started
    val_accuracy = accuracy(inputs.model, splits.val_x, splits.val_y)
    save_weights(inputs.model, path)
    meta_path.write_text(json.dumps({"val_accuracy": val_accuracy, "train_s": train_s}))
    log(f"trained {model} in {train_s:.0f} s: validation accuracy {val_accuracy:.4f}")
    return TrainedModel(model, data, path, val_accuracy, train_s, recipe, cached=False)


def main(argv: list[str] | None = None) -> int:
    from bench.search_quality import FULL, QUICK

    parser = argparse.ArgumentParser(prog="python -m bench.train_models", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick mode's model only")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="weights cache")
    parser.add_argument(
        "--seeds", type=int, default=1, help="one model per seed's split, as bench.run --seeds"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    config = QUICK if args.quick else FULL
    for model in config.models:
        for seed in range(args.seeds):
            trained = trained_weights(
                model,
                config.data,
                args.cache_dir,
                recipe=seeded_recipe(model, seed),
                log=lambda text: print(text, file=sys.stderr),
            )
            accuracy = trained.val_accuracy
            print(
                f"{model:<22} {config.data:<16} seed {seed}  val accuracy {accuracy:.4f}  "
                f"{trained.weights}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
