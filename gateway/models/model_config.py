"""`models/<model>/config.yaml`: which outputs to return, labels, providers, ranges, checksum."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ModelError


class ModelConfig(BaseModel):
    """Per-model settings (all optional); applies to every version of the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    outputs: list[str] | None = None
    """Output names to return (default: all of the model's outputs)."""
    labels: list[str] | None = None
    """Class labels, index-aligned with the classifier's label output."""
    providers: list[str] | None = None
    """Execution providers for this model (overrides models.providers)."""
    features: list[str] | None = None
    """Names of the columns of a single 2-D input (used by ranges and drift profiles)."""
    ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)
    """Allowed [min, max] per feature name (or column index as a string); outside → rejected."""
    score_output: str | None = None
    """Output whose positive-class column is the prediction score (drift and quality)."""
    sha256: dict[int, str] = Field(default_factory=dict)
    """Expected sha256 of model.onnx per version; a mismatch refuses the file."""


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read `<model_dir>/config.yaml` if present; raise ModelError naming the file and field."""
    path = model_dir / "config.yaml"
    if not path.exists():
        return ModelConfig()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"{path}: cannot read model config: {str(exc).splitlines()[0]}") from None
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ModelError(f"{path}: {loc}: {first['msg']}") from None
