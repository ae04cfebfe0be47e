"""Sweep specs: drivers x layers x coefficients (+ random controls) x variants x conditions x questions x seeds.

The same spec is a TOML file (``experiments/specs/*.toml``) or a Python object; unknown keys and bad values
raise a ValueError that names the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from steering.scenario import CONDITIONS

SCORERS = ("forced-choice", "judge")
SPEC_FORMAT = 1
DICT_KEYS = ("engine_kwargs",)  # keys whose value is a table, kept as a dict


@dataclass
class DriverSpec:
    """A driver: a vector file, or a dataset (a packaged driver name or a path) to extract from."""

    name: str
    vector: str | None = None
    dataset: str | None = None
    method: str = "mean_diff"
    normalize: str = "unit"
    n_pairs: int | None = None

    def __post_init__(self) -> None:
        if (self.vector is None) == (self.dataset is None):
            raise ValueError(f"driver {self.name!r}: give exactly one of 'vector' (a file) or 'dataset' (to extract)")
        if self.name == "none" or self.name.startswith("random"):
            raise ValueError(f"driver name {self.name!r} is reserved (baseline / controls); choose another name")


@dataclass
class SweepSpec:
    """A whole grid; see ``experiments/specs/quickstart.toml`` for a commented example."""

    name: str
    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "hf"
    tensor_parallel_size: int = 1  # backend = "vllm": GPUs per engine
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # backend = "vllm": more vllm.LLM arguments
    drivers: list[DriverSpec] = field(default_factory=list)
    control_seeds: list[int] = field(default_factory=list)
    control_like: str | None = None
    layers: list[int] = field(default_factory=list)
    coefficients: list[float] = field(default_factory=list)
    relative: bool = False
    positions: str = "response"
    variants: list[str] = field(default_factory=lambda: ["base"])
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    setting: str = "animal_welfare"
    questions: str = "animal_welfare"
    n_questions: int | None = None
    scorer: str = "forced-choice"
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 32
    max_new_tokens: int = 256
    judge: str = "keyword"
    judge_model: str | None = None
    judge_url: str | None = None
    store: str | None = None

    def __post_init__(self) -> None:
        self.drivers = [d if isinstance(d, DriverSpec) else _build(DriverSpec, d, "drivers") for d in self.drivers]
        _require(bool(self.name), "name", "a run name")
        _require(bool(self.layers), "layers", "at least one layer")
        _require(bool(self.coefficients), "coefficients", "at least one coefficient")
        _require(bool(self.drivers) or bool(self.control_seeds), "drivers", "at least one driver or control")
        _require(self.scorer in SCORERS, "scorer", f"one of {', '.join(SCORERS)}")
        _require(set(self.conditions) <= set(CONDITIONS) and bool(self.conditions), "conditions", str(CONDITIONS))
        _require(self.n_questions is None or self.n_questions > 0, "n_questions", "a positive count")
        _require(self.batch_size > 0, "batch_size", "a positive number")
        _require(isinstance(self.engine_kwargs, dict), "engine_kwargs", "a table of vllm.LLM arguments")
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "a positive number of GPUs")
        engine_only = self.tensor_parallel_size != 1 or bool(self.engine_kwargs)
        _require(self.backend == "vllm" or not engine_only, "backend", "'vllm' for tensor_parallel_size, engine_kwargs")
        names = [d.name for d in self.drivers]
        _require(len(set(names)) == len(names), "drivers", "unique driver names")
        if self.control_seeds and self.control_like is None:
            self.control_like = names[0] if names else None
        _require(not self.control_seeds or self.control_like in names, "control_like", f"one of {names}")

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else Path("runs") / f"{self.name}.sqlite"

    def model_kwargs(self) -> dict[str, Any]:
        """The ``load_model`` arguments of this spec's model."""
        kwargs: dict[str, Any] = dict(dtype=self.dtype, device=self.device, backend=self.backend)
        if self.backend == "vllm":
            kwargs.update(self.engine_kwargs, tensor_parallel_size=self.tensor_parallel_size)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = SPEC_FORMAT
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "spec") -> SweepSpec:
        raw = dict(raw)
        raw.pop("format", None)
        return _build(cls, raw, where)

    @classmethod
    def from_toml(cls, path: str | Path) -> SweepSpec:
        """Read a TOML spec; tables ``[grid]``, ``[questions]``, ``[controls]`` and ``[[drivers]]`` are flattened."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read spec {path}: {exc}") from None
        flat = {k: v for k, v in raw.items() if not isinstance(v, dict) or k in DICT_KEYS}
        for table, prefix in (("grid", ""), ("questions", "q"), ("controls", "c")):
            for key, value in raw.get(table, {}).items():
                name = {
                    "q": {"set": "questions", "n": "n_questions"},
                    "c": {"seeds": "control_seeds", "like": "control_like"},
                }
                flat[name[prefix].get(key, f"{table}.{key}") if prefix else key] = value
        unknown_tables = [
            k for k, v in raw.items() if isinstance(v, dict) and k not in ("grid", "questions", "controls", *DICT_KEYS)
        ]
        if unknown_tables:
            raise ValueError(
                f"{path}: unknown table [{unknown_tables[0]}]; use [grid], [questions], [controls], [engine_kwargs]"
            )
        if "store" in flat and not Path(flat["store"]).is_absolute():
            flat["store"] = str(Path(flat["store"]))
        return cls.from_dict(flat, str(path))


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ValueError(f"spec key {key!r}: expected {what}")


def _build(cls, raw: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None
