"""Build the example model repository that `docker compose up` serves (deploy/models) and the rows
its traffic generator sends (deploy/traffic/pool.csv).

    python scripts/build_example_models.py          # needs the dev extra (scikit-learn, skl2onnx)

It reuses the demo's training (demo/models.py): scikit-learn's breast-cancer data (shipped inside
scikit-learn, nothing downloaded), split 60/40, and the demo's three arms — gradient boosting,
a decision stump and naive Bayes on three weak features — exported to ONNX, each as version 1
with its drift reference profile and the calibrated drift thresholds for the compose gateway's
`drift.arl0`. The held-out 40% with their true labels go to pool.csv, so
the traffic generator's rewards are earned on rows the models never saw.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import models  # noqa: E402 - after the path insert

SEED = 2
"""The demo's seed (demo/scenario.py): the same split and the same models."""
ARMS = tuple(spec for spec in models.SPECS if spec.role == "arm")


def write_pool(path: Path, dataset: models.Dataset) -> None:
    """Held-out rows as CSV: the feature columns, then `label`. Each value is float32's shortest
    round-trip text, so parsing it and casting to float32 gives back the same bits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*dataset.feature_names, "label"])
        for row, label in zip(dataset.x_pool, dataset.y_pool, strict=True):
            writer.writerow([*(str(np.float32(v)) for v in row), int(label)])


def _compose_arl0() -> float:
    """`drift.arl0` of the compose gateway's configuration (deploy/config/banditgate.yaml)."""
    from banditgate.config import load_config

    return load_config(ROOT / "deploy" / "config" / "banditgate.yaml", env={}).drift.arl0


def build(repository: Path, pool: Path) -> list[Path]:
    """Replace `repository` with version 1 of every arm; write `pool`. Returns the model files."""
    dataset = models.load_dataset(SEED)
    shutil.rmtree(repository, ignore_errors=True)
    repository.mkdir(parents=True)
    versions = {}
    for spec in ARMS:
        estimator = spec.build(dataset.feature_names, SEED).fit(dataset.x_train, dataset.y_train)
        versions[(spec.model, 1)] = models._version(spec.model, 1, spec.role, spec.description, estimator, dataset,
                                                    dataset.x_pool)
    # the drift thresholds the compose gateway's monitors need (its `drift.arl0`), stored in each
    # reference.json: the gateway then starts watching at once instead of calibrating for seconds
    models.calibrate_references(versions, dataset, arl0=_compose_arl0())
    written = []
    for spec in ARMS:
        version = versions[(spec.model, 1)]
        models.write_model_config(repository, spec.model, dataset.feature_names)
        folder = models.publish(repository, version, dataset)
        for path in folder.iterdir():
            path.chmod(0o644)  # the image's non-root user reads them through a read-only mount
        written.append(folder / "model.onnx")
    write_pool(pool, dataset)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "deploy" / "models")
    parser.add_argument("--pool", type=Path, default=ROOT / "deploy" / "traffic" / "pool.csv")
    args = parser.parse_args(argv)
    for path in build(args.repository, args.pool):
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {path.stat().st_size} bytes")
    print(f"{args.pool}: {args.pool.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
