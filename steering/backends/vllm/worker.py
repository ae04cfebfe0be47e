"""vLLM backend, the workers: per-request steering and capture inside vLLM's workers, driven by ``Plan``.

``SteeringWorkerExtension`` is mixed into every worker by ``LLM(worker_extension_cls=WORKER_EXTENSION)`` and called
by method name through ``collective_rpc``. It wraps the model runner's ``execute_model`` to learn new and finished
requests from the ``SchedulerOutput`` (each new request's ``wire.RequestSpec`` becomes a ``LiveRequest``), and puts
a forward hook on every decoder layer. Once per step it maps each token of the flattened ``[num_tokens, d]`` batch
to its request and absolute position from the runner's CPU-side metadata (no device sync), and drives one ``Plan``
per ordered request composition (cached): one ``Intervention`` per (layer, slot, vector, operation, mode) with
per-row coefficients (0 for rows that do not use it) or per-row ranges, ``plan.begin(positions [N], layout,
rows=rows [N])`` once per step, then ``plan.edit(layer, stream)`` at each touched layer. vLLM's layers return
``(hidden, residual)`` and leave the add to the next layer's fused add-norm; a touched layer returns
``(0, hidden + residual)`` instead, so the next layer computes ``0 + stream``, bit for bit what transformers computes.

Needs ``enforce_eager=True`` (hooks hold per-step Python state: CUDA graphs / torch.compile would freeze or skip
them) and the V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``; the V2 path is untested). Under tensor parallelism
each decoder layer's output is replicated on every rank (row-parallel layers all-reduce), every rank gets the same
``SchedulerOutput``, builds the same plan and applies the same edit; only rank 0 keeps captures. Every private vLLM
name and attribute used here goes through ``compat`` (version range, checks, accessors); vLLM is imported lazily.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from steering.backends.vllm import compat
from steering.backends.vllm.wire import EXTRA_KEY, Range, RequestSpec, SteerItem, pack, resolve_positions, unpack
from steering.hooks.intervention import Intervention
from steering.hooks.layers import find_layers
from steering.hooks.norms import token_norms
from steering.hooks.plan import Plan
from steering.hooks.positions import OPEN, Positions, RowLayout

WORKER_EXTENSION = f"{__name__}.SteeringWorkerExtension"
PLAN_CACHE = 64  # request compositions whose Plan is kept (LRU)


@dataclass
class LiveRequest:
    """Worker-side view of one request's ``RequestSpec`` (built once, when the request first appears)."""

    key: str
    prompt_len: int
    response_start: int | None
    steer: tuple[SteerItem, ...]
    ranges: list[list[Range]]  # per steer item: absolute ranges (for touched-layer tests and the oracle)
    cap_layers: frozenset[int]
    cap_pos: np.ndarray
    cap_norm: bool
    record: bool

    @classmethod
    def of(cls, spec: RequestSpec) -> LiveRequest:
        return cls(
            key=spec.key,
            prompt_len=spec.prompt_len,
            response_start=spec.response_start,
            steer=spec.steer,
            ranges=[item.ranges(spec.prompt_len, spec.response_start) for item in spec.steer],
            cap_layers=frozenset(spec.capture_layers),
            cap_pos=np.asarray(sorted(spec.capture_positions), dtype=np.int64),
            cap_norm=spec.capture_norms,
            record=spec.record,
        )

    @property
    def active(self) -> bool:
        return bool(self.steer or self.cap_layers or self.record)


@dataclass
class WorkerStats:
    """Counters of one worker, returned by ``steer_stats``."""

    steps: int = 0
    steered_steps: int = 0
    plans_built: int = 0
    pos_checks: int = 0
    pos_mismatches: int = 0
    plan_s: float = 0.0
    hook_s: float = 0.0


@dataclass
class WorkerState:
    """Everything the extension keeps on one worker between steps."""

    n_layers: int
    reader: bool  # this rank keeps captures (tensor-parallel rank 0)
    reqs: dict[str, LiveRequest] = field(default_factory=dict)  # vLLM request id -> its live request
    vectors: dict[str, Tensor] = field(default_factory=dict)  # vector id -> float32 CPU [d] (each Plan places it)
    plans: OrderedDict = field(default_factory=OrderedDict)  # composition (request ids) -> _Composition (LRU)
    active: bool = False  # inside a scheduled step's execute_model
    step: _Step | bool | None = None  # this step's _Step (False: nothing to do), built by the first hook needing it
    captures: dict[str, dict] = field(default_factory=dict)  # key -> {layer: {position: tensor [d] or norm}}
    records: dict[str, dict] = field(default_factory=dict)  # key -> {"computed": [...], layer: [...]}
    hooked: int = 0
    stats: WorkerStats = field(default_factory=WorkerStats)


@dataclass
class _Composition:
    """An ordered set of requests (one step's batch order) and the Plan of their steering.

    ``ranges``: per planned layer, every steered range of every request as arrays ``(request index, start, end)``
    (end ``OPEN`` when open), so a step finds its touched layers with a few vectorized tests. ``capturing`` /
    ``recording``: indices of the requests that capture / record.
    """

    reqs: list[LiveRequest | None]
    plan: Plan | None
    layout: RowLayout
    ranges: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    capturing: list[int] = field(default_factory=list)
    recording: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, reqs: list[LiveRequest | None], vectors: dict[str, Tensor], n_layers: int) -> _Composition:
        layout = _composition_layout(reqs)
        comp = cls(reqs, _build_plan(reqs, layout, vectors, n_layers), layout)
        per_layer: dict[int, list[tuple[int, int, int]]] = {}
        for i, req in enumerate(reqs):
            if req is None:
                continue
            for item, ranges in zip(req.steer, req.ranges):
                per_layer.setdefault(item.layer, []).extend((i, s, OPEN if e is None else e) for s, e in ranges)
            if req.cap_layers and req.cap_pos.size:
                comp.capturing.append(i)
            if req.record:
                comp.recording.append(i)
        comp.ranges = {
            layer: tuple(np.array(col, dtype=np.int64) for col in zip(*items)) for layer, items in per_layer.items()
        }
        return comp


@dataclass
class _Step:
    """One forward step: the flattened token layout and what each layer has to do."""

    comp: _Composition
    n_tokens: int
    positions: np.ndarray  # [N] absolute position of each token
    rows: np.ndarray  # [N] index of each token's request in comp.reqs
    starts: np.ndarray  # [n + 1] first token of each request
    edit_layers: set[int] = field(default_factory=set)  # planned layers with a touched token this step
    captures: dict[int, tuple[Tensor, list[tuple[str, int, bool]]]] = field(default_factory=dict)
    record_rows: list[tuple[str, int, int]] = field(default_factory=list)  # (key, first row, last row + 1)
    positions_t: Tensor | None = None


def _build_plan(
    reqs: list[LiveRequest | None], layout: RowLayout, vectors: dict[str, Tensor], n_layers: int
) -> Plan | None:
    """One ``Plan`` for an ordered composition: an ``Intervention`` per (layer, slot, vector, operation, mode).

    ``slot`` = the item's rank among its request's items on that layer, so each request's own order is kept (items
    of one slot touch disjoint rows, so their relative order does not matter). ``add`` with a position mode uses
    the mode itself (vectorized masks from the composition's ``RowLayout``) and a per-row coefficient that is 0 for
    the other rows; other items (explicit ranges, ablation, which ignores coefficients) get per-row ranges, empty
    for the other rows.
    """
    n = len(reqs)
    groups: dict[tuple, dict[int, tuple[float, Any]]] = {}
    for i, req in enumerate(reqs):
        if req is None:
            continue
        slots: dict[int, int] = {}
        for item in req.steer:
            slot = slots[item.layer] = slots.get(item.layer, -1) + 1
            mode = item.positions if isinstance(item.positions, str) and item.operation == "add" else None
            key = (item.layer, slot, item.vector, item.operation, mode)
            groups.setdefault(key, {})[i] = (item.coefficient, item.positions)
    if not groups:
        return None
    interventions = []
    for layer, _, vid, op, mode in sorted(groups, key=lambda k: (k[0], k[1])):
        members = groups[(layer, _, vid, op, mode)]
        coef = torch.zeros(n, dtype=torch.float32)
        for i, (c, _pos) in members.items():
            coef[i] = c
        if mode is not None:
            positions = Positions(mode=mode)
        else:
            per_row = tuple(
                tuple(resolve_positions(members[i][1], reqs[i].prompt_len, reqs[i].response_start))
                if i in members
                else ()
                for i in range(n)
            )
            positions = Positions(ranges=per_row, per_row=True)
        coefficient = 1.0 if op == "ablate" else coef
        interventions.append(Intervention(layer, vectors[vid], coefficient, positions, op))
    return Plan(interventions, n_layers, None, layout)


def _composition_layout(reqs: list[LiveRequest | None]) -> RowLayout:
    """Each request's ``prompt_len`` / ``response_start`` (``response`` is refused at the driver for a request
    without one; rows without a request get 0)."""
    prompt_len = torch.tensor([r.prompt_len if r else 0 for r in reqs], dtype=torch.long)
    response = [r.response_start if r and r.response_start is not None else (r.prompt_len if r else 0) for r in reqs]
    return RowLayout(prompt_len=prompt_len, response_start=torch.tensor(response, dtype=torch.long))


class _OwnAttributes(type):
    """``dir(cls)`` lists only what the class and its own bases define, not ``object``'s attributes: vLLM refuses an
    extension whose ``dir`` shares a name with the worker, and nnsight, once imported, puts ``save`` on every
    object, so a process that used nnsight could otherwise never start an engine with our extension."""

    def __dir__(cls) -> list[str]:
        return sorted({name for klass in cls.__mro__ if klass is not object for name in vars(klass)})


class SteeringWorkerExtension(metaclass=_OwnAttributes):
    """Mixed into each vLLM worker (``LLM(..., worker_extension_cls=WORKER_EXTENSION)``); ``self`` is the worker.

    RPC methods (``llm.collective_rpc(name, args=...)``; names are prefixed because vLLM refuses an extension
    attribute that clashes with the worker's): ``steer_install``, ``steer_put_vectors``, ``steer_drop_vectors``,
    ``steer_pop``, ``steer_forget``, ``steer_stats``.
    """

    # ---- RPC ------------------------------------------------------------------------------------------------
    def steer_install(self) -> dict:
        """Wrap the runner's ``execute_model`` and hook every decoder layer this rank owns. Idempotent; returns
        ``{"layers": hooked layers, "n_layers": decoder blocks, "d_model": width}``."""
        runner = self.model_runner
        if getattr(self, "_steer", None) is None:
            compat.require()
            compat.check_runner(runner)
            reader = compat.tp_rank() == 0
            layers = find_layers(runner.get_model())
            self._steer = WorkerState(n_layers=len(layers), reader=reader)
            self._steer_wrap_runner(runner)
            hooked = 0
            for index, layer in enumerate(layers):
                if compat.is_pp_missing(layer):  # pipeline parallel: another rank owns this layer
                    continue
                layer.register_forward_hook(self._steer_make_hook(index))
                hooked += 1
            self._steer.hooked = hooked
        config = runner.model_config.hf_text_config
        return {"layers": self._steer.hooked, "n_layers": self._steer.n_layers, "d_model": config.hidden_size}

    def steer_put_vectors(self, table: dict[str, list]) -> int:
        """Store ``pack``-ed float32 vectors [d] by id (checked: 1-D, finite)."""
        for vid, packed in table.items():
            vec = unpack(packed).to(torch.float32).reshape(-1).clone()
            if not torch.isfinite(vec).all():
                raise ValueError(f"vector {vid} contains NaN or inf")
            self._steer.vectors[vid] = vec
        return len(self._steer.vectors)

    def steer_drop_vectors(self, ids: list[str] | None = None) -> int:
        vectors = self._steer.vectors
        for vid in list(vectors) if ids is None else ids:
            vectors.pop(vid, None)
        self._steer.plans.clear()
        return len(vectors)

    def steer_pop(self, keys: list[str]) -> dict:
        """``{"captures": {key: {layer: {position: packed [d] | norm}}}, "records": {key: {...}}}`` for ``keys``,
        removed from this rank (non-reader ranks have no captures)."""
        caps, recs = self._steer.captures, self._steer.records
        out_caps = {}
        for key in keys:
            by_layer = caps.pop(key, None)
            if by_layer is not None:
                out_caps[key] = {
                    layer: {p: (v if isinstance(v, float) else pack(v)) for p, v in by_pos.items()}
                    for layer, by_pos in by_layer.items()
                }
        out_recs = {}
        for key in keys:
            rec = recs.pop(key, None)
            if rec is not None:
                out_recs[key] = {str(k): sorted(int(p) for p in v) for k, v in rec.items()}
        return {"captures": out_caps, "records": out_recs}

    def steer_forget(self, keys: list[str] | None = None) -> int:
        """Drop captures and records of ``keys`` (all with ``None``), e.g. after an aborted call."""
        for name in ("captures", "records"):
            store = getattr(self._steer, name)
            for key in list(store) if keys is None else keys:
                store.pop(key, None)
        return len(self._steer.reqs)

    def steer_stats(self) -> dict:
        st = self._steer
        stats = dict(asdict(st.stats), plan_s=round(st.stats.plan_s, 4), hook_s=round(st.stats.hook_s, 4))
        return {"live_requests": len(st.reqs), "vectors": len(st.vectors), "plans": len(st.plans), **stats}

    # ---- runner wrapping ------------------------------------------------------------------------------------
    def _steer_wrap_runner(self, runner: Any) -> None:
        original = runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            if kwargs.get("dummy_run"):  # V2 profile / DP dummy batches: nothing to steer
                return original(scheduler_output, *args, **kwargs)
            self._steer_track(scheduler_output)
            st = self._steer
            st.active, st.step = True, None
            try:
                return original(scheduler_output, *args, **kwargs)
            finally:
                st.active, st.step = False, None

        runner.execute_model = execute_model
        compat.wrap_prepare_inputs(runner)  # Model Runner V2 only (untested)

    def _steer_track(self, scheduler_output: Any) -> None:
        """Register new requests' specs and forget finished ones (``SchedulerOutput`` is the same for V1 and V2)."""
        reqs = self._steer.reqs
        finished, new = compat.new_requests(scheduler_output)
        for rid in finished:
            reqs.pop(rid, None)
        for rid, extra_args in new:
            extra = (extra_args or {}).get(EXTRA_KEY)
            if extra:
                req = LiveRequest.of(RequestSpec.from_wire(extra))
                missing = {item.vector for item in req.steer} - set(self._steer.vectors)
                if missing:
                    raise RuntimeError(f"request {req.key} uses vectors not sent to this worker: {sorted(missing)}")
                reqs[rid] = req
            else:
                reqs.pop(rid, None)

    # ---- per step -------------------------------------------------------------------------------------------
    def _steer_composition(self, req_ids: list[str]) -> _Composition:
        st = self._steer
        key = tuple(req_ids)
        comp = st.plans.get(key)
        if comp is not None:
            st.plans.move_to_end(key)
            return comp
        reqs = [st.reqs.get(rid) for rid in req_ids]
        reqs = [r if r is not None and r.active else None for r in reqs]
        comp = _Composition.build(reqs, st.vectors, st.n_layers)
        st.stats.plans_built += 1
        st.plans[key] = comp
        while len(st.plans) > PLAN_CACHE:
            st.plans.popitem(last=False)
        return comp

    def _steer_step(self) -> _Step | None:
        """This step's layout and work, built once (by the first hook of the step), from CPU-side state only."""
        st = self._steer
        if st.step is not None:
            return st.step or None
        st.stats.steps += 1
        if not any(r.active for r in st.reqs.values()):
            st.step = False
            return None
        t0 = time.thread_time()
        req_ids, qsl, computed = compat.runner_layout(self.model_runner)
        counts = np.diff(qsl)
        keep = counts > 0  # every scheduled request has tokens; guard anyway (rows index the kept ones)
        if not keep.all():
            req_ids = [r for r, k in zip(req_ids, keep) if k]
            computed, counts = computed[keep], counts[keep]
        n = len(req_ids)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        rows = np.repeat(np.arange(n, dtype=np.int64), counts)
        positions = computed[rows] + (np.arange(int(starts[-1]), dtype=np.int64) - starts[rows])
        comp = self._steer_composition(req_ids)
        step = _Step(comp, int(starts[-1]), positions, rows, starts)
        plan = comp.plan
        first, last = positions[starts[:-1]], positions[starts[1:] - 1] + 1  # each request's positions this step
        for layer, (idx, lo, hi) in comp.ranges.items():
            if bool(np.any((lo < last[idx]) & (hi > first[idx]))):
                step.edit_layers.add(layer)
        cap_rows: dict[int, tuple[list[int], list[tuple[str, int, bool]]]] = {}
        for i in comp.capturing:
            req, lo, hi = comp.reqs[i], int(starts[i]), int(starts[i + 1])
            hit = np.nonzero(np.isin(positions[lo:hi], req.cap_pos))[0]
            for layer in req.cap_layers:
                rows_l, keys_l = cap_rows.setdefault(layer, ([], []))
                rows_l.extend((hit + lo).tolist())
                keys_l.extend((req.key, int(positions[lo + h]), req.cap_norm) for h in hit)
        for i in comp.recording:
            req, lo, hi = comp.reqs[i], int(starts[i]), int(starts[i + 1])
            step.record_rows.append((req.key, lo, hi))
            st.records.setdefault(req.key, {}).setdefault("computed", []).extend(positions[lo:hi].tolist())
        step.captures = {
            layer: (torch.tensor(r, dtype=torch.long), k) for layer, (r, k) in cap_rows.items() if r and st.reader
        }
        if step.edit_layers:
            step.positions_t = torch.from_numpy(positions)
            plan.begin(step.positions_t, comp.layout, rows=torch.from_numpy(rows))
            st.stats.steered_steps += 1
        st.step = step
        st.stats.plan_s += time.thread_time() - t0
        return step

    def _steer_make_hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            st = self._steer
            if not st.active:
                return None  # profile / warm-up / dummy forward: not a scheduled step
            step = self._steer_step()
            if step is None or (index not in step.edit_layers and index not in step.captures):
                return None
            t0 = time.thread_time()
            try:
                return self._steer_layer(index, step, args, output)
            finally:
                st.stats.hook_s += time.thread_time() - t0

        return hook

    def _steer_layer(self, index: int, step: _Step, args: tuple, output: Any) -> Any:
        st = self._steer
        pair = isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], Tensor)
        hidden = output[0] if isinstance(output, tuple) else output
        residual = output[1] if pair else None
        n = step.n_tokens
        edit = index in step.edit_layers
        if not edit:  # capture only: add just the selected rows
            rows, keys = step.captures[index]
            flat_h = _flat(hidden, n)
            picked = flat_h.index_select(0, rows.to(flat_h.device))
            if residual is not None:
                picked = picked + _flat(residual, n).index_select(0, rows.to(flat_h.device))
            self._steer_store(index, picked, keys)
            return None
        stream = hidden + residual if residual is not None else hidden  # the residual stream (edited in place)
        view = _flat(stream, n)
        record = bool(step.record_rows)
        if record:
            self._steer_check_positions(step, args)
            before = view.clone()
        edited = step.comp.plan.edit(index, view)
        if edited is not view:
            view.copy_(edited)
        if record:
            changed = (view != before).any(-1).cpu().numpy()
            for key, lo, hi in step.record_rows:
                hit = np.nonzero(changed[lo:hi])[0]
                if hit.size:
                    rec = st.records.setdefault(key, {})
                    rec.setdefault(index, []).extend(step.positions[lo + hit].tolist())
        if index in step.captures:
            rows, keys = step.captures[index]
            self._steer_store(index, view.index_select(0, rows.to(view.device)), keys)
        if residual is None:
            return None  # edited in place
        return (torch.zeros_like(stream), stream, *output[2:])

    def _steer_store(self, index: int, picked: Tensor, keys: list[tuple[str, int, bool]]) -> None:
        caps = self._steer.captures
        picked = picked.detach()
        norms = token_norms(picked).cpu() if any(norm for *_, norm in keys) else None
        cpu = picked.cpu() if not all(norm for *_, norm in keys) else None
        for j, (key, pos, norm) in enumerate(keys):
            caps.setdefault(key, {}).setdefault(index, {})[pos] = float(norms[j]) if norm else cpu[j].clone()

    def _steer_check_positions(self, step: _Step, args: tuple) -> None:
        """Oracle (record mode): the CPU-side layout must equal the positions tensor the model itself receives
        (vLLM's decoder layers take ``(positions, hidden, residual)``)."""
        given = args[0] if args and isinstance(args[0], Tensor) else None
        if given is None or given.dtype not in (torch.int32, torch.int64) or given.dim() != 1:
            return
        got = given[: step.n_tokens].cpu().numpy()
        st = self._steer.stats
        st.pos_checks += 1
        if not np.array_equal(got, step.positions):
            st.pos_mismatches += 1


def _flat(t: Tensor, n: int) -> Tensor:
    """The ``[n, d]`` view of a layer's token rows (``[1, N, d]`` from the Transformers modeling backend; rows past
    ``n`` are padding)."""
    if t.dim() == 3:
        t = t[0]
    return t if t.shape[0] == n else t[:n]
