"""Sweep specs: drivers x layers x coefficients (+ random controls) x variants x conditions x questions x seeds.

The same spec is a TOML file (``experiments/specs/*.toml``) or a Python object. Every field is checked when the
spec is built, before anything runs: its type strictly (a TOML ``relative = "no"`` or ``n = "1"`` is an error, not
a truthy string or a number in disguise; ``variants = "informative"`` is not a list of letters) and its value.
Every problem raises a ``SpecError`` (a ``ValueError``) that names the key.

Types are declared once, as the dataclass annotations (``Annotated`` with pydantic ``Field`` constraints for
values such as ``batch_size > 0``), and checked with pydantic in strict mode, field by field; the dataclasses
themselves stay plain (``asdict`` / ``fields`` / positional construction work as before). Checks that need more
than one field, or the package's data (prompt variants of the setting), follow in ``validate``.

Layers are plain integers here; a negative layer counts from the end (``-1`` is the last layer) and is resolved
to ``0..n-1`` once the model is known, so the spec makes no range check.
"""

from __future__ import annotations

import functools
import tomllib
import types
import typing
import unicodedata
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from steering.backends import ENGINES
from steering.baseline import is_baseline
from steering.engine_args import check_engine_kwargs, numeric_engine_kwargs
from steering.hooks import MODES
from steering.hooks.intervention import MAX_ADDED
from steering.scenario import CONDITIONS

FORCED_CHOICE, JUDGE = SCORERS = ("forced-choice", "judge")
JUDGES = ("keyword", "local", "endpoint")
POSITIONS = MODES  # the steer positions a sweep can use
"""Steering positions a sweep accepts (the hooks' position modes)."""
SPEC_FORMAT = 1
DICT_KEYS = ("engine_kwargs",)  # keys whose value is a table, kept as a dict

OPERATIONAL_DEFAULTS: dict[str, Any] = {
    "judge_timeout": 60.0,
    "judge_retries": 3,
    "judge_allow_insecure": False,
    "tensor_parallel_size": 1,
    "engine_kwargs": {},
    "trust_remote_code": False,
    "max_rows": 1_000_000,
}
"""Fields that change how a run is carried out but not what it measures (so a run may resume with other values).
`to_dict` leaves them out while they have these defaults, so the spec hash of a run written before they existed
is unchanged; `identity` leaves them out always, except the `engine_kwargs` that change the numbers
(`steering.engine_args.NUMERIC_ENGINE_KEYS`: quantization, kv_cache_dtype, ...). `trust_remote_code` is
operational because the model's files (its code included) are hashed into the run's inputs."""
MAX_COEFFICIENT = MAX_ADDED
"""Largest |coefficient| a spec takes (``steering.hooks.intervention.MAX_ADDED``: beyond it, times any normalised
vector, the model's activations overflow)."""
INPUT_PATH_KEYS = ("vector", "dataset", "questions")
"""Spec keys naming input files: in a TOML spec a relative path is relative to the spec file (outputs such as
``store`` stay relative to the working directory)."""

Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Text = Annotated[str, Field(min_length=1)]


class SpecError(ValueError):
    """A spec key has a wrong type or value; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


DRIVER_KEYS_SINCE_0_3 = ("contrast", "questions")
CONTRASTS = ("condition",)
"""Directions computed from the setting itself rather than from contrast pairs: ``condition`` is the positive
control, mean(monitored) - mean(unmonitored) residual at the answer position (``steering.condition_vector``)."""


@dataclass
class DriverSpec:
    """A driver: a vector file, a dataset (a packaged driver name or a path) to extract from, or a ``contrast``
    computed from the setting (``"condition"``: the positive control, over ``questions``, default the spec's).

    ``n_pairs`` caps the pairs (dataset) or the questions (contrast) used.
    """

    name: Text
    vector: Text | None = None
    dataset: Text | None = None
    contrast: Text | None = None
    questions: Text | None = None
    method: Text = "mean_diff"
    normalize: Text = "unit"
    n_pairs: Positive | None = None

    def __post_init__(self) -> None:
        _check_types(self, f"driver {getattr(self, 'name', '?')!r}: ")
        from steering.vectors import METHODS, NORMALIZATIONS

        where = f"driver {self.name!r}: "
        if sum(x is not None for x in (self.vector, self.dataset, self.contrast)) != 1:
            raise SpecError(
                "vector",
                f"{where}give exactly one of 'vector' (a file), 'dataset' (to extract) or 'contrast' "
                f"({', '.join(CONTRASTS)})",
            )
        if self.contrast is not None:
            _require(self.contrast in CONTRASTS, "contrast", f"one of {', '.join(CONTRASTS)}", self.contrast, where)
        elif self.questions is not None:
            raise SpecError("questions", f"{where}'questions' applies to a 'contrast' driver only")
        if is_baseline(self.name) or self.name.startswith("random"):
            raise SpecError("name", f"driver name {self.name!r} is reserved (baseline / controls); choose another name")
        _require(self.method in METHODS, "method", f"one of {', '.join(METHODS)}", self.method, where)
        _require(
            self.normalize in NORMALIZATIONS, "normalize", f"one of {', '.join(NORMALIZATIONS)}", self.normalize, where
        )


@dataclass
class SweepSpec:
    """A whole grid; see ``experiments/specs/quickstart.toml`` for a commented example.

    ``judge_timeout`` (seconds per request) and ``judge_retries`` (retries after a 5xx / timeout / connection
    error) configure an endpoint judge; ``judge_allow_insecure`` allows sending an API key over plain http to a
    non-local host. ``trust_remote_code`` lets the model folder's own code run (never through ``engine_kwargs``).
    ``max_rows`` caps the rows a run may write (a typo in a grid should not start a 36-million-row sweep).
    """

    name: Text
    model: Text = "default"
    dtype: Text = "float32"
    device: Text = "cpu"
    backend: Text = "hf"
    tensor_parallel_size: Positive = 1  # backend = "vllm": GPUs per engine
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # backend = "vllm": more vllm.LLM arguments
    drivers: list[DriverSpec] = field(default_factory=list)
    control_seeds: list[NonNegative] = field(default_factory=list)
    control_like: Text | None = None
    layers: list[int] = field(default_factory=list)
    coefficients: list[Finite] = field(default_factory=list)
    relative: bool = False
    positions: Text = "response"
    variants: list[Text] = field(default_factory=lambda: ["base"])
    conditions: list[Text] = field(default_factory=lambda: list(CONDITIONS))
    setting: Text = "animal_welfare"
    questions: Text = "animal_welfare"
    n_questions: Positive | None = None
    scorer: Text = "forced-choice"
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: Positive = 32
    max_new_tokens: Positive = 256
    judge: Text = "keyword"
    judge_model: Text | None = None
    judge_url: Text | None = None
    judge_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = OPERATIONAL_DEFAULTS["judge_timeout"]
    judge_retries: NonNegative = OPERATIONAL_DEFAULTS["judge_retries"]
    judge_allow_insecure: bool = OPERATIONAL_DEFAULTS["judge_allow_insecure"]
    store: Text | None = None
    trust_remote_code: bool = OPERATIONAL_DEFAULTS["trust_remote_code"]
    max_rows: Positive = OPERATIONAL_DEFAULTS["max_rows"]

    def __post_init__(self) -> None:
        if isinstance(self.drivers, list):
            self.drivers = [d if isinstance(d, DriverSpec) else _build(DriverSpec, d, "drivers") for d in self.drivers]
        self.validate()

    @property
    def judged(self) -> bool:
        """True when the spec samples and judges (``scorer = "judge"``), False for forced choice: the one test of
        the scorer every consumer reads."""
        return self.scorer == JUDGE

    def validate(self) -> None:
        """Check every field (types strictly, then values and cross-field rules); raise ``SpecError`` naming
        the key. Runs on construction; call it again after changing fields by hand."""
        _check_types(self)
        _check_run_name(self.name)
        _require(bool(self.layers), "layers", "at least one layer")
        _unique(self.layers, "layers")
        _require(bool(self.coefficients), "coefficients", "at least one coefficient")
        _unique([c + 0.0 for c in self.coefficients], "coefficients")
        huge = [c for c in self.coefficients if abs(c) > MAX_COEFFICIENT]
        _require(
            not huge, "coefficients", f"coefficients within +-{MAX_COEFFICIENT:g} (beyond, activations overflow)",
            huge[0] if huge else None,
        )  # fmt: skip
        _require(bool(self.drivers) or bool(self.control_seeds), "drivers", "at least one driver or control")
        _unique(self.control_seeds, "control_seeds")
        _require(self.scorer in SCORERS, "scorer", f"one of {', '.join(SCORERS)}", self.scorer)
        _require(self.positions in POSITIONS, "positions", f"one of {', '.join(POSITIONS)}", self.positions)
        _require(
            self.dtype == "auto" or _is_torch_dtype(self.dtype), "dtype", "'auto' or a torch dtype name", self.dtype
        )
        _require(bool(self.conditions), "conditions", f"a non-empty list of {', '.join(CONDITIONS)}")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        _require(not bad, "conditions", f"a list of {', '.join(CONDITIONS)}", bad[0] if bad else None)
        _unique(self.conditions, "conditions")
        _require(bool(self.seeds), "seeds", "at least one seed")
        _unique(self.seeds, "seeds")
        _require(bool(self.variants), "variants", "at least one prompt variant")
        _unique(self.variants, "variants")
        self._check_variants()
        _require(self.judge in JUDGES, "judge", f"one of {', '.join(JUDGES)}", self.judge)
        if self.judged and self.judge == "local":
            _require(self.judge_model is not None, "judge_model", "a judge model (hub id, folder or 'default')")
        if self.judged and self.judge == "endpoint":
            _require(self.judge_url is not None, "judge_url", "an OpenAI-compatible base URL (http://host:port/v1)")
        if self.judge_url is not None:
            ok = self.judge_url.startswith(("http://", "https://"))
            _require(ok, "judge_url", "a URL starting with http:// or https://", self.judge_url)
        try:
            check_engine_kwargs(self.engine_kwargs)
        except ValueError as exc:
            raise SpecError("engine_kwargs", f"spec key 'engine_kwargs': {exc}") from None
        engine_only = self.tensor_parallel_size != 1 or bool(self.engine_kwargs)
        _require(
            self.backend in ENGINES or not engine_only, "backend", "'vllm' for tensor_parallel_size / engine_kwargs",
            self.backend,
        )  # fmt: skip
        names = [d.name for d in self.drivers]
        _require(len(set(names)) == len(names), "drivers", "unique driver names", names)
        if self.control_seeds and self.control_like is None:
            self.control_like = names[0] if names else None
        _require(
            not self.control_seeds or self.control_like in names, "control_like", f"one of {names}", self.control_like
        )

    def _check_variants(self) -> None:
        from steering.scenario import load_setting

        try:
            setting = load_setting(self.setting)
        except (ValueError, OSError) as exc:
            raise SpecError("setting", f"spec key 'setting': {exc}") from None
        for variant in self.variants:
            try:
                setting.describe(variant)
            except ValueError as exc:
                raise SpecError("variants", f"spec key 'variants': {exc}") from None

    def input_hashes(self) -> dict[str, str]:
        """sha256 of every file the run reads, for ``ResultStore.begin_run(..., inputs=...)`` so a resumed run
        refuses to mix results computed from other data: ``vector:<driver>`` (a vector file's bytes),
        ``dataset:<driver>`` (the dataset a driver is extracted from), ``questions`` (the question set's rows) and
        ``setting`` (the rendered prompts of the spec's variants and conditions)."""
        import hashlib
        import json

        from steering.questions import as_dicts, load_questions
        from steering.scenario import load_setting
        from steering.vectors import dataset_sha256, file_sha256

        def text_sha(value: Any) -> str:
            return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

        out: dict[str, str] = {}
        for driver in self.drivers:
            try:
                if driver.vector is not None:
                    out[f"vector:{driver.name}"] = file_sha256(driver.vector)
                elif driver.dataset is not None:
                    out[f"dataset:{driver.name}"] = dataset_sha256(driver.dataset)
                else:
                    rows = as_dicts(load_questions(driver.questions or self.questions))
                    out[f"contrast:{driver.name}"] = text_sha([driver.contrast, rows])
            except ValueError as exc:
                key = "vector" if driver.vector is not None else "dataset" if driver.dataset else "questions"
                raise SpecError(key, f"driver {driver.name!r}: spec key {key!r}: {exc}") from None
        out["questions"] = text_sha(as_dicts(load_questions(self.questions, require_answers=False)))
        setting = load_setting(self.setting)
        prompts = [
            setting.messages("{question}", condition, variant, scratchpad=scratchpad)
            for variant in self.variants
            for condition in self.conditions
            for scratchpad in (True, False)
        ]
        out["setting"] = text_sha(prompts)
        return out

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else Path("runs") / f"{self.name}.sqlite"

    def n_rows(self) -> int:
        """How many rows a run of this spec writes: (baseline + drivers and controls x layers x coefficients) x
        conditions x variants x questions x seeds (at most: negative layers may coincide with positive ones)."""
        return self.row_counts()["rows"]

    def row_counts(self) -> dict[str, int]:
        """The factors of ``n_rows`` by name, and ``rows``, their product."""
        from steering.questions import load_questions

        n_questions = self.n_questions or len(load_questions(self.questions, require_answers=False))
        cells = 1 + (len(self.drivers) + len(self.control_seeds)) * len(set(self.layers)) * len(self.coefficients)
        counts = dict(cells=cells, conditions=len(self.conditions), variants=len(self.variants))
        counts.update(questions=n_questions, seeds=len(self.seeds))
        rows = 1
        for value in counts.values():
            rows *= value
        return {**counts, "rows": rows}

    def check_size(self) -> int:
        """The number of rows (``n_rows``); raise a ``SpecError`` naming ``max_rows`` when it is larger."""
        counts = self.row_counts()
        if counts["rows"] > self.max_rows:
            factors = " x ".join(f"{v:,} {k}" for k, v in counts.items() if k != "rows")
            raise SpecError(
                "max_rows",
                f"spec {self.name!r} would write {counts['rows']:,} rows ({factors}), more than max_rows = "
                f"{self.max_rows:,}; shrink the grid, or raise max_rows in the spec (--max-rows N on the command "
                "line) if you mean it",
            )
        return counts["rows"]

    def model_kwargs(self) -> dict[str, Any]:
        """The ``load_model`` arguments of this spec's model."""
        kwargs: dict[str, Any] = dict(dtype=self.dtype, device=self.device, backend=self.backend)
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        if self.backend in ENGINES:
            kwargs.update(self.engine_kwargs, tensor_parallel_size=self.tensor_parallel_size)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (``from_dict`` reads it back). Operational fields at their defaults are left
        out (see ``OPERATIONAL_DEFAULTS``), so specs written before they existed keep their hash."""
        out = asdict(self)
        for key, default in OPERATIONAL_DEFAULTS.items():
            if out[key] == default:
                del out[key]
        for driver in out["drivers"]:  # keys added later, left out while unset (older runs keep their hash)
            for key in DRIVER_KEYS_SINCE_0_3:
                if driver[key] is None:
                    del driver[key]
        out["format"] = SPEC_FORMAT
        return out

    def identity(self) -> dict[str, Any]:
        """What the run measures: ``to_dict`` without the operational fields (a judge timeout raised to resume a
        run is the same run). The store's run registration should hash this."""
        out = self.to_dict()
        for key in OPERATIONAL_DEFAULTS:
            out.pop(key, None)
        numeric = numeric_engine_kwargs(self.engine_kwargs)
        if numeric:
            out["engine_kwargs"] = numeric
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "spec") -> SweepSpec:
        raw = dict(raw)
        raw.pop("format", None)
        return _build(cls, raw, where)

    @classmethod
    def from_toml(cls, path: str | Path) -> SweepSpec:
        """Read a TOML spec; tables ``[grid]``, ``[questions]``, ``[controls]`` and ``[[drivers]]`` are flattened.

        Relative input paths (``INPUT_PATH_KEYS``: a driver's ``vector`` / ``dataset`` file, a ``questions`` file)
        are relative to the spec file, wherever it is run from; packaged names (``values``, ``animal_welfare``) stay
        names. A UTF-8 byte-order mark is ignored."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read spec {path}: {exc}") from None
        flat = {k: v for k, v in raw.items() if not isinstance(v, dict) or k in DICT_KEYS}
        spelled: dict[str, str] = {}
        for table, prefix in (("grid", ""), ("questions", "q"), ("controls", "c")):
            if table in raw and not isinstance(raw[table], dict):
                raise SpecError(table, f"{path}: [{table}] must be a table")
            for key, value in raw.get(table, {}).items():
                name = {
                    "q": {"set": "questions", "n": "n_questions"},
                    "c": {"seeds": "control_seeds", "like": "control_like"},
                }
                flat_key = name[prefix].get(key, f"{table}.{key}") if prefix else key
                flat[flat_key] = value
                spelled[flat_key] = f"[{table}] {key}"
        unknown_tables = [
            k for k, v in raw.items() if isinstance(v, dict) and k not in ("grid", "questions", "controls", *DICT_KEYS)
        ]
        if unknown_tables:
            raise ValueError(
                f"{path}: unknown table [{unknown_tables[0]}]; use [grid], [questions], [controls], [engine_kwargs]"
            )
        if isinstance(flat.get("store"), str) and not Path(flat["store"]).is_absolute():
            flat["store"] = str(Path(flat["store"]))
        _resolve_inputs(flat, path.resolve().parent)
        try:
            return cls.from_dict(flat, str(path))
        except SpecError as exc:
            if exc.key in spelled and spelled[exc.key] != exc.key:
                raise SpecError(exc.key, f"{exc} (written as `{spelled[exc.key]}` in the file)") from None
            raise


def _resolve_inputs(flat: dict[str, Any], base: Path) -> None:
    """Make the relative input paths of a TOML spec's keys relative to the spec's folder ``base`` (in place)."""
    from steering.vectors import DRIVERS

    def resolved(value: Any, is_path: bool) -> Any:
        if not (isinstance(value, str) and value and is_path):
            return value
        path = Path(value)
        return value if path.is_absolute() or value.startswith("~") else str(base / path)

    if isinstance(flat.get("questions"), str):
        q = flat["questions"]
        flat["questions"] = resolved(q, q.endswith((".jsonl", ".csv")) or "/" in q or "\\" in q)
    for driver in flat.get("drivers", []) if isinstance(flat.get("drivers"), list) else []:
        if isinstance(driver, dict):
            if "vector" in driver:
                driver["vector"] = resolved(driver["vector"], True)
            if "dataset" in driver:
                driver["dataset"] = resolved(driver["dataset"], driver["dataset"] not in DRIVERS)
            if isinstance(driver.get("questions"), str):
                q = driver["questions"]
                driver["questions"] = resolved(q, q.endswith((".jsonl", ".csv")) or "/" in q or "\\" in q)


# -- checks --------------------------------------------------------------------------------------------------


def _check_run_name(name: str) -> None:
    """A run name becomes file names (``runs/<name>.sqlite``, lock files): refuse what would escape or make folders."""
    bad = (
        "/" in name
        or "\\" in name
        or name.startswith(".")
        or name != name.strip()
        or any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name)
    )
    if bad:
        raise SpecError(
            "name",
            f"spec key 'name': {name!r} cannot name a run: it becomes a file name (runs/<name>.sqlite), so it must "
            "not contain '/', '\\' or control characters, start with '.', or start or end with spaces",
        )


@functools.cache
def _adapters(cls: type) -> dict[str, TypeAdapter]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: TypeAdapter(hints[f.name]) for f in fields(cls) if f.name != "drivers"}


def _check_types(obj: Any, where: str = "") -> None:
    """Validate every field of a spec dataclass against its annotation (pydantic, strict: no coercion)."""
    if hasattr(obj, "drivers") and not (
        isinstance(obj.drivers, list) and all(isinstance(d, DriverSpec) for d in obj.drivers)
    ):
        raise SpecError("drivers", f"spec key 'drivers': expected a list of driver tables, got {obj.drivers!r}")
    for key, adapter in _adapters(type(obj)).items():
        value = getattr(obj, key)
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            index = [p for p in error["loc"] if isinstance(p, int)]
            at = "".join(f"[{i}]" for i in index)
            item = value
            for i in index:
                item = item[i]
            got = f"{item!r} ({type(item).__name__})"
            expected = _describe(typing.get_type_hints(type(obj), include_extras=True)[key])
            raise SpecError(
                key, f"{where}spec key {key!r}{at}: expected {expected}, got {got}: {error['msg'].lower()}"
            ) from None


def _describe(tp: Any, plural: bool = False) -> str:
    """A readable type: ``a list of integers``, ``an integer > 0 or None``."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        text = _describe(base, plural)
        for info in meta:
            for c in getattr(info, "metadata", []):
                if hasattr(c, "gt"):
                    text += f" > {c.gt}"
                elif hasattr(c, "ge"):
                    text += f" >= {c.ge}"
                elif hasattr(c, "min_length"):
                    text = f"non-empty {text}" if plural else text.replace("a ", "a non-empty ", 1)
        return text
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0], plural=True)}"
    names = {type(None): ("None", "None"), str: ("a string", "strings"), int: ("an integer", "integers")}
    names |= {float: ("a number", "numbers"), bool: ("true or false", "booleans")}
    single, many = names.get(tp, (getattr(tp, "__name__", str(tp)),) * 2)
    return many if plural else single


def _is_torch_dtype(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


def _require(ok: bool, key: str, what: str, got: Any = ..., where: str = "") -> None:
    if not ok:
        tail = "" if got is ... else f", got {got!r}"
        raise SpecError(key, f"{where}spec key {key!r}: expected {what}{tail}")


def _unique(values: list, key: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise SpecError(key, f"spec key {key!r}: {v!r} is listed twice; list each value once")
        seen.add(v)


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise SpecError(where, f"{where}: expected a table of keys, got {raw!r}")
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise SpecError(key, f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
    missing = [
        f.name for f in fields(cls) if f.name not in raw and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise SpecError(missing[0], f"{where}: missing key {missing[0]!r}")
    try:
        return cls(**raw)
    except SpecError as exc:
        if str(exc).startswith(where):
            raise
        raise SpecError(exc.key, f"{where}: {exc}") from None
