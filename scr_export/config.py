"""The SCR configuration: k, λ, the intervened layer range, the diagnostic layer range, the border rule."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from .errors import ConfigError

BORDER_RULES = ("exclude", "include")


def _layer_range(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        parts = value.replace("..", ":").split(":")
        try:
            value = tuple(int(p) for p in parts)
            if len(value) == 1:
                value = (value[0], value[0])
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a layer range",
                              f"write it as FIRST..LAST (inclusive, 0-based), e.g. {name}=0..11") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{name}={value!r} is not a layer range",
                          f"give two integers FIRST, LAST (inclusive, 0-based), e.g. {name}=(0, 11)")
    first, last = int(value[0]), int(value[1])
    if first < 0 or last < first:
        raise ConfigError(f"{name}=({first}, {last}) is empty or negative",
                          "layer ranges are 0-based and inclusive: 0 <= FIRST <= LAST")
    return first, last


@dataclasses.dataclass(frozen=True)
class SCRConfig:
    """Hyper-parameters of Spatial Credit Redistribution (SCR.md).

    k            sources per image (the most-attended candidate cells)
    lam          λ: sources are scaled by 1/λ, neighbours receive (λ−1)·h[donor]; λ = 1 is the unmodified model
    layers       (first, last) decoder layers, inclusive and 0-based, whose outputs are redistributed
    diag_layers  (first, last) decoder layers whose attention forms the diagnostic map
    border       "exclude" (SCR.md: border cells are never sources) or "include"
    """

    k: int = 32
    lam: float = 1.10
    layers: tuple[int, int] = (0, 11)
    diag_layers: tuple[int, int] = (8, 16)
    border: str = "exclude"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k={self.k!r} is not a positive integer", "k is the number of sources per image, e.g. k=32")
        try:
            lam = float(self.lam)
        except (TypeError, ValueError):
            raise ConfigError(f"lambda={self.lam!r} is not a number", "use a float >= 1, e.g. lambda=1.10") from None
        if not math.isfinite(lam) or lam < 1.0:
            raise ConfigError(f"lambda={self.lam!r} is out of range",
                              "λ must be finite and >= 1 (1.10 is the paper's value; 1 disables SCR)")
        if self.border not in BORDER_RULES:
            raise ConfigError(f"border={self.border!r} is unknown", f"use one of {', '.join(BORDER_RULES)}")
        object.__setattr__(self, "lam", lam)
        object.__setattr__(self, "layers", _layer_range("layers", self.layers))
        object.__setattr__(self, "diag_layers", _layer_range("diag_layers", self.diag_layers))

    # -- derived values -------------------------------------------------------------------------------------------
    @property
    def source_scale(self) -> float:
        return 1.0 / self.lam

    @property
    def neighbour_weight(self) -> float:
        return self.lam - 1.0

    @property
    def is_identity(self) -> bool:
        return self.lam == 1.0

    def layer_indices(self) -> range:
        return range(self.layers[0], self.layers[1] + 1)

    def diag_layer_indices(self) -> range:
        return range(self.diag_layers[0], self.diag_layers[1] + 1)

    def clamped(self, num_layers: int) -> "SCRConfig":
        """This config fitted to a decoder of ``num_layers`` layers (last layer L = num_layers - 1).

        ``diag_layers`` is clamped to the model's depth, as SCR.md prescribes: each bound becomes min(bound, L).
        A diagnostic range that lies wholly past the end (e.g. the default 8..16 on a 6-layer model) therefore becomes
        L..L: the deepest layer the model has, the one nearest to the layers asked for.

        ``layers`` is never changed: SCR.md clamps only the diagnostic range, and quietly intervening at fewer layers
        than asked would change what SCR does. A ``layers`` range that reaches past L is a :class:`ConfigError`.
        """
        if num_layers < 1:
            raise ConfigError(f"the decoder has {num_layers} layers", "a model with at least one decoder layer is needed")
        last = num_layers - 1
        first, end = self.layers
        if first > last:
            raise ConfigError(f"layers={self.layers} starts past the decoder's last layer {last} "
                              f"(the model has {num_layers} decoder layers)",
                              f"choose a range within 0..{last}, e.g. --layers 0..{min(end - first, last)}")
        if end > last:
            raise ConfigError(f"layers={self.layers} ends past the decoder's last layer {last} "
                              f"(the model has {num_layers} decoder layers); SCR layer ranges are not clamped",
                              f"choose a range within 0..{last}, e.g. --layers {first}..{last}")
        diag = (min(self.diag_layers[0], last), min(self.diag_layers[1], last))
        return dataclasses.replace(self, diag_layers=diag)

    def replace(self, **changes: Any) -> "SCRConfig":
        return dataclasses.replace(self, **changes)

    # -- JSON -----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "lambda": self.lam, "layers": list(self.layers),
                "diag_layers": list(self.diag_layers), "border": self.border}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SCRConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"an SCR config must be a JSON object, got {type(data).__name__}",
                              'write e.g. {"k": 32, "lambda": 1.1, "layers": [0, 11], "diag_layers": [8, 16]}')
        known = {"k", "lambda", "layers", "diag_layers", "border"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown SCR config keys: {', '.join(unknown)}", f"allowed keys: {', '.join(sorted(known))}")
        kwargs: dict[str, Any] = {}
        if "k" in data:
            kwargs["k"] = data["k"]
        if "lambda" in data:
            kwargs["lam"] = data["lambda"]
        for key in ("layers", "diag_layers"):
            if key in data:
                value = data[key]
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        if "border" in data:
            kwargs["border"] = data["border"]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "SCRConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the SCR config is not valid JSON ({exc})", "check the file's syntax") from None
        return cls.from_dict(data)
