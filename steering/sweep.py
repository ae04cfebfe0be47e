"""Run a sweep spec: resolve driver vectors, score every cell, commit rows to the store question by question.

Each question's rows (all cells x conditions) are written in one transaction once both option orders of every
condition are scored, so a killed sweep loses at most the question in flight and a rerun skips finished ones.
"""

from __future__ import annotations

import itertools
import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from steering.backends import model_class
from steering.backends.protocol import Backend, Unsupported
from steering.baseline import row_layer, zero_rows
from steering.coefficients import relative_scale
from steering.compliance import BASELINE, FORWARD_NEEDED, Cell, Conversation, ForcedChoiceScorer, Readout
from steering.fingerprint import model_fingerprint
from steering.gap import judge_for_spec
from steering.hooks import Intervention, resolve_layer
from steering.models import load_model
from steering.questions import Question, load_questions
from steering.spec import DriverSpec, SweepSpec
from steering.store import KEY_COLUMNS, ResultStore
from steering.vectors import VectorSet, extract, load_pairs

log = logging.getLogger("steering")


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    import torch

    import steering

    return {"steering": steering.__version__, "torch": torch.__version__, "transformers": version("transformers")}


def resolve_driver(
    model: Backend, driver: DriverSpec, layers: Sequence[int], progress: bool, spec: SweepSpec | None = None
) -> VectorSet:
    """Load a driver's vector file (checked against the model), extract it at ``layers`` from its dataset, or
    compute a contrast of the setting (``condition``: on ``spec``'s setting, first variant and questions)."""
    if driver.contrast is not None:
        from steering.condition_vector import condition_vector

        if spec is None:
            raise ValueError(f"driver {driver.name!r} is a contrast of the setting: pass the spec it belongs to")
        questions = load_questions(driver.questions or spec.questions, n=driver.n_pairs)
        return condition_vector(
            model, questions, list(layers), spec.variants[0], spec.setting, driver.normalize, driver.name, progress
        )
    if driver.vector is not None:
        vs = VectorSet.load(driver.vector, model=model)
        missing = [layer for layer in layers if layer not in vs]
        if missing:
            raise ValueError(f"vector file {driver.vector} has no layer(s) {missing}; extract those layers too")
        return vs
    pairs = load_pairs(driver.dataset, split="train")
    if driver.n_pairs is not None:
        pairs = pairs[: driver.n_pairs]
    return extract(
        model,
        pairs,
        layers=list(layers),
        method=driver.method,
        normalize=driver.normalize,
        driver=driver.name,
        progress=progress,
    )


def resolve_vectors(spec: SweepSpec, model: Backend, progress: bool = True) -> dict[str, VectorSet]:
    """Every driver's VectorSet plus the random controls (same per-layer norms as ``control_like``)."""
    layers = spec_layers(spec, model)
    vectors = {d.name: resolve_driver(model, d, layers, progress, spec) for d in spec.drivers}
    for seed in spec.control_seeds:
        control = vectors[spec.control_like].random_like(seed)
        vectors[control.driver] = control
    return vectors


def spec_layers(spec: SweepSpec, model: Backend) -> list[int]:
    """The spec's layers under the one layer rule (negative counts from the end), in the spec's order."""
    return list(dict.fromkeys(resolve_layer(layer, model.n_layers) for layer in spec.layers))


@dataclass
class Grid:
    """A sweep's cells: the baseline, every steered cell, and the coefficient-0 cells, which are copies of the
    baseline stored under each driver and layer so tables are complete (the one place such rows are made)."""

    steered: list[Cell]
    zero: list[Cell]

    @property
    def scored(self) -> list[Cell]:
        """The cells that are actually computed: the baseline first, then each steered cell."""
        return [BASELINE, *self.steered]

    @property
    def stored(self) -> list[Cell]:
        """Every cell that gets rows in the store."""
        return [*self.scored, *self.zero]

    def add_zero_rows(self, rows: list[dict]) -> list[dict]:
        """``rows`` (one question's) plus, per coefficient-0 cell, a copy of each of their baseline rows
        (``steering.baseline.zero_rows``: identical by construction)."""
        if not self.zero:
            return rows
        cells = pd.DataFrame({"driver": [c.driver for c in self.zero], "layer": [c.layer for c in self.zero]})
        return rows + zero_rows(pd.DataFrame(rows), cells).to_dict("records")


def build_grid(spec: SweepSpec, vectors: dict[str, VectorSet], model: Backend) -> Grid:
    """One cell per driver x layer x coefficient; relative coefficients are scaled by the layer's residual norm.

    Every steered cell is checked here, before a run is registered, naming its driver and layer: a zero vector
    (its rows would silently equal the baseline) and a coefficient that would overflow the activations are refused.
    """
    norms = model.residual_norms() if spec.relative else None
    steered, zero = [], []
    for name, vs in vectors.items():
        for layer in spec_layers(spec, model):
            vector = vs[layer]
            where = f"driver {name!r} at layer {layer}"
            if any(c != 0 for c in spec.coefficients) and float(vector.double().norm()) == 0.0:
                raise ValueError(
                    f"the vector of {where} is zero: every steered row would equal the baseline; re-extract it or "
                    "leave the layer out"
                )
            scale = relative_scale(vector, float(norms[layer]), where) if norms is not None else 1.0
            for c in spec.coefficients:
                if c == 0:
                    zero.append(Cell(name, layer, 0.0))
                else:
                    cell = Cell(name, layer, float(c), vector, scale)
                    try:
                        Intervention(layer, vector, cell.absolute)  # the checks every scored row will meet
                    except ValueError as exc:
                        raise ValueError(f"{where}: {exc}") from None
                    steered.append(cell)
    return Grid(steered, zero)


@dataclass
class SweepRun:
    """What every block of one sweep shares: the spec, the model, the store, the grid, the scorer, the progress."""

    spec: SweepSpec
    model: Backend
    store: ResultStore
    grid: Grid
    scorer: Any
    bar: Any = None
    saved: dict[tuple, tuple] = field(default_factory=dict)  # stored (generation, verdict) per row key
    readout: Readout | None = None  # driver directions read at the answer position (forced choice)
    unjudged: int = 0  # rows this run stored without a verdict (the judge failed or its reply was unreadable)

    def row_keys(self, variant: str, seed: int, question: str) -> set[tuple]:
        """Store keys of every row one question gets (all stored cells x conditions)."""
        return {
            tuple(self.row(variant, seed, question, cell, condition, None)[k] for k in KEY_COLUMNS)
            for cell in self.grid.stored
            for condition in self.spec.conditions
        }

    def row(
        self, variant: str, seed: int, question: str, cell: Cell, condition: str, compliance: float | None, **extra
    ) -> dict:
        """A store row for one (cell, condition, question) score."""
        return dict(
            run=self.spec.name,
            model=self.model.name,
            driver=cell.driver,
            layer=row_layer(cell.layer),
            coefficient=float(cell.coefficient),
            variant=variant,
            condition=condition,
            question=question,
            seed=seed,
            scorer=self.spec.scorer,
            compliance=None if compliance is None else float(compliance),
            extra=json.dumps(extra),
        )

    def commit(self, rows: list[dict]) -> None:
        """Write one question's rows (plus its coefficient-0 copies) in one transaction."""
        self.store.write_rows(self.grid.add_zero_rows(rows))
        if self.bar is not None:
            self.bar.update()


def run_sweep(
    spec: SweepSpec | str | Path,
    model: Backend | None = None,
    store: ResultStore | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run (or resume) ``spec``; returns the run's rows as a DataFrame.

    A rerun skips finished rows and re-judges rows stored without a verdict from their saved generations. The run
    records the sha256 of every file it reads and of the model (``steering.fingerprint``), so a resume with changed
    vectors, data or model weights is refused, naming the input.

    Before the model loads: the grid's size is checked against ``spec.max_rows`` and the run is locked (a second
    writer is refused at once). Before the run is registered: every vector and coefficient is checked.
    """
    if not isinstance(spec, SweepSpec):
        spec = SweepSpec.from_toml(spec)
    spec.validate()
    backend = spec.backend if model is None else model.backend
    if not spec.judged and not (model if model is not None else model_class(backend)).can_prefill():
        raise Unsupported(FORWARD_NEEDED.format(name=spec.model, backend=backend))
    inputs = spec.input_hashes()
    log.info("sweep %s: %s rows", spec.name, f"{spec.check_size():,}")
    own_store = store is None
    if own_store and spec.store is None:
        spec.store_path.parent.mkdir(parents=True, exist_ok=True)  # the default runs/ folder
    store = store or ResultStore(spec.store_path)
    try:
        store.lock_run(spec.name)  # a second writer is refused now, not after a long model load
        model = model or load_model(spec.model, **spec.model_kwargs())
        inputs["model"] = model_fingerprint(model)
        vectors = resolve_vectors(spec, model, progress)  # before registering: a bad spec leaves no trace
        grid = build_grid(spec, vectors, model)
        store.begin_run(spec.name, spec.identity(), model.name, library_versions(), inputs=inputs)
        scorer = judge_for_spec(spec) if spec.judged else ForcedChoiceScorer(model, spec.setting)
        run = SweepRun(spec, model, store, grid, scorer)
        if not spec.judged or model.reads_while_generating():
            run.readout = Readout.of_vectors(vectors, spec_layers(spec, model))
        if spec.judged:
            run.saved = saved_generations(store.frame(spec.name))
        done = store.done_keys(spec.name)
        plan = []
        for seed in spec.seeds:
            questions = load_questions(spec.questions, n=spec.n_questions, seed=seed if spec.n_questions else None)
            for variant in spec.variants:
                todo = [q for q in questions if not run.row_keys(variant, seed, q.id) <= done]
                plan.append((seed, variant, todo))
        total = sum(len(todo) for *_, todo in plan)
        run.bar = tqdm(total=total, desc=f"sweep {spec.name}", unit="question", disable=not progress)
        try:
            for seed, variant, todo in plan:
                if todo:
                    score = _run_judged if spec.judged else _run_forced_choice
                    score(run, seed, variant, todo)
        except KeyboardInterrupt:
            log.warning("interrupted after %d of %d questions; rerun to resume", run.bar.n, total)
            raise
        finally:
            run.bar.close()
        if run.unjudged:
            log.warning(
                "%d rows have no verdict (the judge failed or its reply was unreadable); their generations are "
                "kept: rerun the same spec to judge them again",
                run.unjudged,
            )
        return store.frame(spec.name)
    finally:
        if own_store:
            store.close()


def saved_generations(rows: pd.DataFrame) -> dict[tuple, tuple[str, float | None, dict | None]]:
    """Generations already stored, with their verdict (None where the judge failed) and readouts, keyed by (driver,
    layer, coefficient, variant, condition, question, seed): a rerun judges the unjudged ones again instead of
    generating anew, and keeps the verdicts and readouts it has."""
    out = {}
    for row in rows.itertuples(index=False):
        extra = json.loads(row.extra or "{}")
        response = extra.get("response")
        if response is not None:
            key = (row.driver, int(row.layer), float(row.coefficient), row.variant, row.condition, row.question)
            verdict = None if pd.isna(row.compliance) else float(row.compliance)
            out[(*key, int(row.seed))] = (response, verdict, extra.get("readout"))
    return out


def request_seed(seed: int, question: str, condition: str, cell: Cell) -> int:
    """A sampling seed per (seed, question, condition, cell): the same whatever else shares the engine call, so a
    resumed or re-chunked sweep draws the same samples."""
    key = f"{seed}/{question}/{condition}/{cell.driver}/{row_layer(cell.layer)}/{cell.coefficient!r}"
    return zlib.crc32(key.encode())


def _run_judged(run: SweepRun, seed: int, variant: str, todo: list[Question]) -> None:
    """Generate every cell x condition of each question (steering ``generated`` tokens by default), judge the
    outputs and commit each question's rows. Generations stored by an earlier run are reused: only rows without a
    verdict go to the judge again. On an engine with continuous batching (``backend="vllm"``) a chunk of whole
    questions, up to ``batch_size`` requests, is one engine call with a seed per request; a killed sweep loses at
    most the chunk in flight."""
    from steering.judge import Judgement
    from steering.scenario import load_setting

    spec, cells = run.spec, run.grid.scored
    setting = load_setting(spec.setting)
    per_question = len(spec.conditions) * len(cells)
    step = max(1, spec.batch_size // per_question) if run.model.batches_continuously() else 1
    for lo in range(0, len(todo), step):
        chunk = todo[lo : lo + step]
        items = [(q, condition, cell) for q in chunk for condition in spec.conditions for cell in cells]
        known = [
            run.saved.get(
                (cell.driver, row_layer(cell.layer), cell.coefficient, variant, condition, q.id, seed), (None,) * 3
            )
            for q, condition, cell in items
        ]
        texts = [text for text, *_ in known]
        reads = [read for *_, read in known]
        missing = [i for i, text in enumerate(texts) if text is None]
        for i, (text, read) in zip(missing, _generate(run, setting, variant, seed, [items[i] for i in missing])):
            texts[i], reads[i] = text, read
        for k, question in enumerate(chunk):
            part = range(k * per_question, (k + 1) * per_question)
            verdicts = {i: Judgement(known[i][1], None) for i in part if known[i][1] is not None}
            unjudged = [i for i in part if i not in verdicts]
            verdicts.update(
                zip(unjudged, run.scorer([texts[i] for i in unjudged], [question.question] * len(unjudged)))
            )
            rows = []
            for i in part:
                _, condition, cell = items[i]
                extra = {"response": texts[i]}
                if reads[i]:
                    extra["readout"] = reads[i]
                if not verdicts[i].judged:
                    run.unjudged += 1
                    extra["judge_error"] = str(verdicts[i].details.get("error", "unreadable reply"))
                rows.append(run.row(variant, seed, question.id, cell, condition, verdicts[i].compliance, **extra))
            run.commit(rows)


def _generate(run: SweepRun, setting, variant: str, seed: int, items: list[tuple]) -> list[tuple[str, dict]]:
    """(text, scratchpad readouts) for (question, condition, cell) items: one engine call with a seed per request
    on a continuous-batching backend (no readouts); else one batched ``generate`` per prompt, a batch row per cell
    (``batch_size`` rows at most), reading every driver direction at each generated token in the same passes and
    averaging it over the scratchpad (``steering.readouts.scratchpad_means``)."""
    from steering.compliance import interventions_for
    from steering.readouts import scratchpad_means

    spec = run.spec
    prompt = lambda q, condition: setting.messages(q.question, condition, variant, scratchpad=True)  # noqa: E731
    if not items:
        return []
    if run.model.batches_continuously():
        texts = run.model.generate(
            [prompt(q, condition) for q, condition, _ in items],
            spec.max_new_tokens,
            interventions_for([cell for *_, cell in items], spec.positions),
            seeds=[request_seed(seed, q.id, condition, cell) for q, condition, cell in items],
        )
        return [(text, {}) for text in texts]
    by_prompt: dict[tuple[str, str], tuple[Question, list[Cell]]] = {}
    for q, condition, cell in items:  # items come grouped by prompt, so the texts keep their order
        by_prompt.setdefault((q.id, condition), (q, []))[1].append(cell)
    out: list[tuple[str, dict]] = []
    for (_, condition), (q, cells) in by_prompt.items():
        for lo in range(0, len(cells), spec.batch_size):
            chunk = cells[lo : lo + spec.batch_size]
            ivs = interventions_for(chunk, spec.positions)
            prompts = [prompt(q, condition)] * len(chunk)
            if run.readout is None:
                texts = run.model.generate(prompts, spec.max_new_tokens, ivs, seed=seed)
                out += [(text, {}) for text in texts]
                continue
            directions = {layer: rows for layer, rows in run.readout.directions.items() if rows is not None}
            texts, ids, reads = run.model.generate_with_readouts(
                prompts, directions, spec.max_new_tokens, ivs, seed=seed
            )
            out += list(zip(texts, scratchpad_means(run.model.tokenizer, ids, reads, run.readout.labels)))
    return out


def _run_forced_choice(run: SweepRun, seed: int, variant: str, todo: list[Question]) -> None:
    """Score every conversation (question x condition x option order) of the block against every cell, committing
    each question once both orders of every condition are scored. Each row also gets its driver readouts (the
    projection on every driver vector at the answer position, read in the same forward pass)."""
    spec, cells = run.spec, run.grid.scored
    convs = [Conversation(q, c, order) for q in todo for c in spec.conditions for order in (0, 1)]
    per_question = 2 * len(spec.conditions)
    pending: list = []
    results = run.scorer.score_conversations(
        variant, convs, cells, spec.positions, batch_size=spec.batch_size, readout=run.readout
    )
    for result in results:
        pending.append(result)
        if len(pending) == per_question:
            frame = ForcedChoiceScorer.to_frame(variant, cells, pending, run.readout)
            rows = []
            for rec, cell in zip(frame.to_dict("records"), itertools.cycle(cells)):  # cells in order per block
                extra = {"letter_mass": round(float(rec["letter_mass"]), 6)}
                if run.readout is not None:
                    extra["readout"] = {k: round(v, 5) for k, v in rec["readout"].items()}
                rows.append(run.row(variant, seed, rec["question"], cell, rec["condition"], rec["compliance"], **extra))
            run.commit(rows)
            pending = []
