"""Run a sweep spec: resolve driver vectors, score every cell, commit rows to the store question by question.

Each question's rows (all cells x conditions) are written in one transaction once both option orders of every
condition are scored, so a killed sweep loses at most the question in flight and a rerun skips finished ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from steering.compliance import BASELINE, Cell, Conversation, ForcedChoiceScorer
from steering.models import SteeringModel, load_model
from steering.questions import Question, load_questions
from steering.spec import DriverSpec, SweepSpec
from steering.store import KEY_COLUMNS, ResultStore
from steering.vectors import VectorSet, extract, load_pairs

log = logging.getLogger("steering")


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    import steering

    return {"steering": steering.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def resolve_driver(model: SteeringModel, driver: DriverSpec, layers: Sequence[int], progress: bool) -> VectorSet:
    """Load a driver's vector file (checked against the model) or extract it at ``layers`` from its dataset."""
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


def resolve_vectors(spec: SweepSpec, model: SteeringModel, progress: bool = True) -> dict[str, VectorSet]:
    """Every driver's VectorSet plus the random controls (same per-layer norms as ``control_like``)."""
    for layer in spec.layers:
        if not 0 <= layer < model.n_layers:
            raise ValueError(f"spec layer {layer} is out of range: {model.name} has layers 0..{model.n_layers - 1}")
    vectors = {d.name: resolve_driver(model, d, spec.layers, progress) for d in spec.drivers}
    for seed in spec.control_seeds:
        control = vectors[spec.control_like].random_like(seed)
        vectors[control.driver] = control
    return vectors


def build_cells(spec: SweepSpec, vectors: dict[str, VectorSet], model: SteeringModel) -> list[Cell]:
    """One cell per driver x layer x non-zero coefficient; relative coefficients are scaled by the layer norm."""
    norms = model.residual_norms() if spec.relative else None
    cells = []
    for name, vs in vectors.items():
        for layer in spec.layers:
            vector = vs[layer]
            scale = float(norms[layer]) / float(vector.norm()) if norms is not None else 1.0
            cells += [Cell(name, layer, float(c), vector, scale) for c in spec.coefficients if c != 0]
    return cells


def _row_keys(spec: SweepSpec, model: str, variant: str, seed: int, question: str, cells: Sequence[Cell], zero_cells):
    for cell in [*cells, *zero_cells]:
        for condition in spec.conditions:
            row = dict(
                run=spec.name,
                model=model,
                driver=cell.driver,
                layer=cell.layer,
                coefficient=cell.coefficient,
                variant=variant,
                condition=condition,
                question=question,
                seed=seed,
                scorer=spec.scorer,
            )
            yield tuple(row[k] for k in KEY_COLUMNS)


def _zero_cells(spec: SweepSpec, vectors: dict[str, VectorSet]) -> list[Cell]:
    """Coefficient-0 cells: identical to the baseline, stored under each driver and layer so tables are complete."""
    if 0 not in spec.coefficients:
        return []
    return [Cell(name, layer, 0.0) for name in vectors for layer in spec.layers]


def _rows_for(spec, model_name, variant, seed, frame: pd.DataFrame, zero_cells) -> list[dict]:
    rows = [
        _row(spec, model_name, variant, seed, rec, {"letter_mass": round(float(rec["letter_mass"]), 6)})
        for rec in frame.to_dict("records")
    ]
    return _add_zero_cells(rows, zero_cells, spec.conditions)


def _row(spec, model_name, variant, seed, rec: dict, extra: dict) -> dict:
    """A store row from one scored record (driver, layer, coefficient, condition, question, compliance)."""
    compliance = rec["compliance"]
    return dict(
        run=spec.name,
        model=model_name,
        driver=rec["driver"],
        layer=int(rec["layer"]),
        coefficient=float(rec["coefficient"]),
        variant=variant,
        condition=rec["condition"],
        question=rec["question"],
        seed=seed,
        scorer=spec.scorer,
        compliance=None if compliance is None else float(compliance),
        extra=json.dumps(extra),
    )


def _add_zero_cells(rows: list[dict], zero_cells, conditions) -> list[dict]:
    """Copy the baseline rows under each (driver, layer) at coefficient 0: identical by construction."""
    base = {r["condition"]: r for r in rows if r["driver"] == "none"}
    for cell in zero_cells:
        for condition in conditions:
            rows.append(dict(base[condition], driver=cell.driver, layer=cell.layer, coefficient=0.0))
    return rows


def run_sweep(
    spec: SweepSpec | str | Path,
    model: SteeringModel | None = None,
    store: ResultStore | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run (or resume) ``spec``; returns the run's rows as a DataFrame."""
    if not isinstance(spec, SweepSpec):
        spec = SweepSpec.from_toml(spec)
    model = model or load_model(spec.model, dtype=spec.dtype, device=spec.device, backend=spec.backend)
    own_store = store is None
    if own_store and spec.store is None:
        spec.store_path.parent.mkdir(parents=True, exist_ok=True)  # the default runs/ folder
    store = store or ResultStore(spec.store_path)
    try:
        vectors = resolve_vectors(spec, model, progress)  # before registering: a bad spec leaves no trace
        store.begin_run(spec.name, spec.to_dict(), model.name, library_versions())
        cells = [BASELINE, *build_cells(spec, vectors, model)]
        zero_cells = _zero_cells(spec, vectors)
        scorer = ForcedChoiceScorer(model, spec.setting) if spec.scorer == "forced-choice" else _judge_for(spec)
        done = store.done_keys(spec.name)
        plan = []
        for seed in spec.seeds:
            questions = load_questions(spec.questions, n=spec.n_questions, seed=seed if spec.n_questions else None)
            for variant in spec.variants:
                todo = [
                    q
                    for q in questions
                    if not set(_row_keys(spec, model.name, variant, seed, q.id, cells, zero_cells)) <= done
                ]
                plan.append((seed, variant, todo))
        total = sum(len(todo) for *_, todo in plan)
        bar = tqdm(total=total, desc=f"sweep {spec.name}", unit="question", disable=not progress)
        for seed, variant, todo in plan:
            _run_block(spec, model, scorer, store, seed, variant, todo, cells, zero_cells, bar)
        bar.close()
        return store.frame(spec.name)
    finally:
        if own_store:
            store.close()


def _judge_for(spec: SweepSpec):
    from steering.gap import make_judge

    judge_model = load_model(spec.judge_model) if spec.judge_model else None
    return make_judge(spec.judge, judge_model, spec.judge_url)


def _run_judged(spec, model, judge, store, seed: int, variant: str, todo: list[Question], cells, zero_cells, bar):
    """Generate once per (question, condition) with one batch row per cell (steering ``generated`` tokens by
    default), judge every output, and commit the question's rows."""
    from steering.compliance import interventions_for
    from steering.scenario import load_setting

    setting = load_setting(spec.setting)
    for question in todo:
        records = []
        for condition in spec.conditions:
            prompt = setting.messages(question.question, condition, variant, scratchpad=True)
            texts = []
            for lo in range(0, len(cells), spec.batch_size):
                chunk = cells[lo : lo + spec.batch_size]
                ivs = interventions_for(chunk, spec.positions)
                texts += model.generate([prompt] * len(chunk), spec.max_new_tokens, ivs, seed=seed)
            verdicts = judge(texts, [question.question] * len(texts))
            for cell, verdict, text in zip(cells, verdicts, texts):
                records.append(
                    dict(
                        driver=cell.driver,
                        layer=cell.layer,
                        coefficient=cell.coefficient,
                        condition=condition,
                        question=question.id,
                        compliance=verdict.compliance,
                        response=text,
                    )
                )
        rows = [_row(spec, model.name, variant, seed, rec, {"response": rec["response"]}) for rec in records]
        _add_zero_cells(rows, zero_cells, spec.conditions)
        store.write_rows(rows)
        bar.update()


def _run_block(spec, model, scorer, store, seed: int, variant: str, todo: list[Question], cells, zero_cells, bar):
    if not todo:
        return
    if spec.scorer == "judge":
        return _run_judged(spec, model, scorer, store, seed, variant, todo, cells, zero_cells, bar)
    convs = [Conversation(q, c, order) for q in todo for c in spec.conditions for order in (0, 1)]
    per_question = 2 * len(spec.conditions)
    pending: list = []
    for result in scorer.score_conversations(variant, convs, cells, spec.positions, batch_size=spec.batch_size):
        pending.append(result)
        if len(pending) == per_question:
            frame = ForcedChoiceScorer.to_frame(variant, cells, pending)
            store.write_rows(_rows_for(spec, model.name, variant, seed, frame, zero_cells))
            pending = []
            bar.update()
