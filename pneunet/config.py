"""Model configuration that travels inside every checkpoint and export sidecar (stdlib only)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def check_known_fields(cls, values: dict[str, Any], what: str) -> None:
    """Refuse a config dict with fields the dataclass ``cls`` does not have (a typo or a newer file)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {what} fields {sorted(unknown)}; known: {sorted(known)}")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and feed it, without re-typing a single number.

    ``mean``/``std`` act on the unit image (grey, [0, 1]); ``threshold`` applies to the calibrated
    pneumonia probability, ``temperature`` divides the logit before the sigmoid.
    """

    architecture: str
    image_size: int
    channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    equalize: bool = True
    labels: tuple[str, str] = ("normal", "pneumonia")
    threshold: float = 0.5
    temperature: float = 1.0
    # The lung-field segmenter the model was trained with ({"onnx_sha256": ...}); empty: no lung fields.
    lungs: dict[str, Any] = field(default_factory=dict)
    # Evidence (calibrated-logit contribution of one feature-map cell) at which the heatmap's colour
    # saturates, fitted on validation; None: the legacy per-image [0, 1] scaling.
    evidence_scale: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        check_known_fields(cls, values, "model config")
        values = dict(values)
        if "labels" in values:
            values["labels"] = tuple(values["labels"])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))
