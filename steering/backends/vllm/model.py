"""``VLLMModel``: the steering API on a vLLM engine (continuous batching, tensor parallelism), every request
carrying its own interventions.

The engine side is the rest of this package (``worker``: the worker extension and its per-step plans; ``scheduler``
and ``plugin``: prefix-cache block keys); this module turns rows and ``Intervention`` objects into per-request
records (``wire.RequestSpec``), submits them as one engine call, and reads captures back.
``load_model(model_id, backend="vllm", tensor_parallel_size=..., **engine_kwargs)`` builds it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import count
from typing import Any

import torch
from torch import Tensor

from steering.backends.base import NORM_TEXTS, Encoded, Prompt, TextModel
from steering.backends.errors import UnsupportedAttribute
from steering.backends.vllm import compat, wire
from steering.backends.vllm.plugin import plugin_declared
from steering.backends.vllm.scheduler import block_keys_installed, install_block_keys
from steering.backends.vllm.wire import RequestSpec, SteerItem
from steering.backends.vllm.worker import WORKER_EXTENSION
from steering.hooks import FIRST_COUNTED, At, Intervention, Positions, RowLayout, mean_norm
from steering.hooks.positions import missing_layout_message

log = logging.getLogger("steering")

Rows = list[list[Intervention]]


CPU_KV_FRACTION = 0.25  # of the memory free when a CPU engine starts, for its KV cache
GiB = 1 << 30


class EngineStartError(RuntimeError):
    """vLLM's engine did not start; the message names the knobs that usually fix it."""


def engine_defaults(engine_kwargs: dict | None = None) -> dict[str, str]:
    """Set the environment vLLM reads when an engine starts, where the user has not; returns what it set.

    * ``VLLM_USE_V2_MODEL_RUNNER=0``: vLLM 0.32 uses Model Runner V2 on GPUs with Triton; it keeps each step's batch
      layout in a local rather than on the runner, and our V2 path (``worker.py``) has not run on a GPU
      yet, while V1 is verified token for token against transformers. Set it to 1 yourself to try V2.
    * On a CPU, ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache): a quarter of the memory free now, at least 1. Without
      it vLLM-CPU reserves ``gpu_memory_utilization`` (0.92) of *all* memory and refuses to start when less is free.
      Not set when ``engine_kwargs`` has ``kv_cache_memory_bytes`` (the variable would override it).
    * On a CPU, ``VLLM_CPU_OMP_THREADS_BIND=nobind``: vLLM's default (``auto``) pins one OpenMP thread per physical
      core of a NUMA node and reserves a core, which fails or slows down in containers and on shared machines; set
      ``auto`` yourself on a dedicated server.
    """
    wanted = {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    if compat.is_cpu():
        if "kv_cache_memory_bytes" not in (engine_kwargs or {}):
            wanted["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(_free_bytes() * CPU_KV_FRACTION / GiB)))
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    set_now = {k: v for k, v in wanted.items() if not os.environ.get(k)}
    os.environ.update(set_now)
    if set_now:
        log.info("vLLM engine defaults (set any of them yourself to change it): %s", set_now)
    return set_now


def _free_bytes() -> int:
    import psutil  # a vLLM dependency

    return int(psutil.virtual_memory().available)


def check_cpu_memory() -> None:
    """Refuse, in one line naming the knob, a CPU KV cache larger than the memory free now (vLLM would print a
    traceback per process and stop)."""
    if not compat.is_cpu():
        return
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    if not value:
        return  # kv_cache_memory_bytes was passed: vLLM checks it
    try:
        space = int(value)
    except ValueError:
        raise ValueError(f"VLLM_CPU_KVCACHE_SPACE={value!r} is not a whole number of GiB; set e.g. 2") from None
    free = _free_bytes() / GiB
    if space * GiB > _free_bytes():
        raise ValueError(
            f"VLLM_CPU_KVCACHE_SPACE={space} GiB of KV cache but only {free:.1f} GiB of memory are free; set "
            f"VLLM_CPU_KVCACHE_SPACE={max(1, int(free * CPU_KV_FRACTION))} (GiB) or free some memory"
        )


def _start_error(exc: BaseException) -> EngineStartError:
    """One line for an engine that did not start, naming the knobs in effect (vLLM's log above has the cause)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    knobs = "VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND" if compat.is_cpu() else "gpu_memory_utilization"
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND") if k in
                    os.environ)  # fmt: skip
    return EngineStartError(
        f"the vLLM engine did not start: {first} (vLLM's log above has the cause; the usual knobs: {knobs}"
        f"{'; now ' + env if env else ''}; free memory {_free_bytes() / GiB:.1f} GiB)"
    )


def load_vllm(
    source: str,
    name: str,
    tokenizer,
    dtype: str | torch.dtype = "float32",
    tensor_parallel_size: int = 1,
    trust_remote_code: bool = False,
    **engine_kwargs: Any,
) -> VLLMModel:
    """A ``VLLMModel`` on a new ``vllm.LLM`` for ``source`` (a hub id or a local folder).

    ``enforce_eager=True`` is forced (steering hooks keep per-step Python state that CUDA graphs and torch.compile
    would freeze), and our worker extension is installed; any other ``engine_kwargs`` go to ``vllm.LLM``
    (``max_model_len``, ``gpu_memory_utilization``, ``enable_prefix_caching``, ``block_size``, ...).
    """
    compat.require()  # the vLLM version and every internal the backend patches, refused by name
    if engine_kwargs.get("enforce_eager") is False:
        raise ValueError("the vLLM backend needs enforce_eager=True (steering hooks cannot run inside CUDA graphs)")
    if engine_kwargs.get("worker_extension_cls") not in (None, WORKER_EXTENSION):
        raise ValueError("the vLLM backend installs its own worker_extension_cls; subclass SteeringWorkerExtension")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    from vllm import LLM

    engine_defaults(engine_kwargs)
    check_cpu_memory()
    install_block_keys()  # the in-process engine's scheduler runs here; a separate EngineCore uses the plugin
    kwargs = dict(
        model=str(source),
        tokenizer=str(source),
        dtype=dtype,
        tensor_parallel_size=int(tensor_parallel_size),
        trust_remote_code=trust_remote_code,
        seed=0,
    )
    kwargs.update(engine_kwargs)
    kwargs.update(enforce_eager=True, worker_extension_cls=WORKER_EXTENSION)
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # noqa: BLE001 - vLLM raises RuntimeError / ValueError / its own types
        raise _start_error(exc) from exc
    return VLLMModel(llm, tokenizer, name)


class VLLMModel(TextModel):
    """The steering API (``generate``, ``capture``, ``intervention``, ``steer``, ``encode``, ``residual_norms``) on a
    vLLM engine. ``.llm`` is the ``vllm.LLM``.

    Every row of a call is one request of one engine call, carrying its own interventions (layers, vectors,
    coefficients, positions, operations), so rows with different steering share continuous batching and the prefix
    cache exactly. There is no ``model.model`` forward pass: the forced-choice scorer needs ``backend="hf"``.
    """

    backend = "vllm"

    def __init__(self, llm, tokenizer=None, name: str | None = None):
        compat.require()
        config = compat.model_config(llm)
        how = (
            "build the engine with load_model(..., backend='vllm'), or LLM(..., enforce_eager=True, "
            f"worker_extension_cls={WORKER_EXTENSION!r})"
        )
        if not getattr(config, "enforce_eager", True):
            raise ValueError(f"steering hooks cannot run inside CUDA graphs / torch.compile: {how}")
        tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        try:
            info = llm.collective_rpc("steer_install")[0]
        except Exception as exc:  # noqa: BLE001 - the engine was built without our worker extension
            if "vllm_compat" in str(exc) or "steering's vLLM backend" in str(exc):
                raise compat.VLLMCompatError(str(exc)) from None  # a worker found a changed vLLM internal
            raise ValueError(f"this vLLM engine has no steering worker extension ({exc}); {how}") from None
        self._init_text(tokenizer, name or config.model, info["n_layers"], info["d_model"])
        self.llm = llm
        self.max_model_len = int(config.max_model_len)
        self.dtype = config.dtype
        self._sent: set[str] = set()  # vector ids on the workers
        self._contexts: list[list[Intervention]] = []
        self._keys = count()
        self.last_outputs: list = []  # vLLM RequestOutputs of the last call, in row order
        self.last_keys: list[str] = []
        inproc = compat.is_inprocess(llm)
        self.prefix = "block_keys" if (inproc and block_keys_installed()) or plugin_declared() else "salt"
        if self.prefix == "salt":
            log.warning(
                "vLLM engine core runs in another process and the steering vllm.general_plugins entry point is not "
                "installed: prefix caching falls back to one cache salt per distinct steering (exact, less sharing); "
                "`pip install -e .` registers the plugin"
            )

    @property
    def model(self):
        """There is no forward pass to call on this backend (no ``model.model``): ``UnsupportedAttribute``."""
        raise UnsupportedAttribute(
            f"{self.name} runs on the vLLM backend, which has no forward pass (model.model(...)); use generate() and "
            "capture(), scorer='judge' in sweeps, or load it with backend='hf'"
        )

    @classmethod
    def batches_continuously(cls) -> bool:
        return True

    # ---- loading (``load_model(..., backend="vllm")``) -------------------------------------------------------
    @classmethod
    def load_engine(
        cls,
        source: str,
        name: str,
        tokenizer,
        dtype: str | torch.dtype = "float32",
        tensor_parallel_size: int = 1,
        trust_remote_code: bool = False,
        gguf_file: str | None = None,
        **engine_kwargs: Any,
    ) -> VLLMModel:
        """``load_vllm``: a new engine for a model folder or hub id (a ``.gguf`` file is refused)."""
        if gguf_file is not None:
            raise ValueError("the vLLM backend loads a model folder or hub id, not a .gguf file; use backend='hf'")
        return load_vllm(source, name, tokenizer, dtype, tensor_parallel_size, trust_remote_code, **engine_kwargs)

    @classmethod
    def check_engine_kwargs(cls, engine_kwargs: dict) -> None:
        """Refuse engine arguments that other parameters set, or that this vLLM does not know (a ValueError naming
        the key, before the tokenizer or the engine loads; vLLM itself raised a TypeError for an unknown one)."""
        from steering.engine_args import RESERVED_ENGINE_KEYS

        for key in engine_kwargs:
            if key in RESERVED_ENGINE_KEYS:
                raise ValueError(
                    f"engine argument {key!r} cannot be set here; use load_model's own parameters (model_id, dtype, "
                    "tensor_parallel_size, trust_remote_code)"
                )
        known = compat.engine_arg_names()
        if known is None:
            return  # load_vllm says how to install vLLM
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise ValueError(f"vLLM has no engine argument {unknown[0]!r}; see vllm.engine.arg_utils.EngineArgs")

    def __repr__(self) -> str:
        return f"VLLMModel({self.name!r}, layers={self.n_layers}, d_model={self.d_model}, backend='vllm')"

    @property
    def context_limit(self) -> int:
        return self.max_model_len

    # ---- steering contexts --------------------------------------------------------------------------------
    @contextmanager
    def steer(self, interventions: Intervention | Sequence[Intervention], layout: RowLayout | None = None) -> Iterator:
        """Context manager: every ``generate`` and ``capture`` inside applies ``interventions`` (before the call's
        own), each call with its own rows' layout (``layout`` is accepted for API compatibility and not needed).
        There is no forward pass to steer on this backend; yields None."""
        ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
        for iv in ivs:
            if not isinstance(iv, Intervention):
                raise ValueError(f"expected Intervention objects, got {type(iv).__name__}")
            iv.check(self.n_layers, self.d_model)
        self._contexts.append(ivs)
        try:
            yield None
        finally:
            self._contexts.remove(ivs)

    # ---- requests -----------------------------------------------------------------------------------------
    def _rows_of(self, prompts: Sequence[Prompt] | Prompt | Encoded) -> tuple[list[list[int]], list[int | None]]:
        if isinstance(prompts, Encoded):
            ids, mask = prompts.input_ids.cpu(), prompts.attention_mask.cpu()
            rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
            rs = prompts.layout.response_start
            return rows, [None] * len(rows) if rs is None else [int(x) for x in rs]
        return self._tokenize(prompts)

    def _per_row(self, interventions: Sequence[Intervention] | Sequence[Sequence[Intervention]], n: int) -> Rows:
        """Each row's interventions: the open ``steer`` contexts', then the call's. ``interventions`` is either a
        list applied to every row (per-row coefficients / ranges pick each row's) or one list per row."""
        shared = [iv for ctx in self._contexts for iv in ctx]
        items = list(interventions)
        if items and all(not isinstance(x, Intervention) for x in items):
            if len(items) != n:
                raise ValueError(f"per-row interventions for {len(items)} rows but there are {n} prompts")
            return [[*shared, *row] for row in items]
        return [[*shared, *items] for _ in range(n)]

    def _steer_items(self, rows: Rows, starts: list[int | None]) -> list[list[SteerItem]]:
        """Per row: its ``SteerItem``s; validates everything and sends
        new vectors to the workers before anything is submitted. A coefficient-0 ``add`` is dropped (the request
        stays unsteered: bit-identical, and its prefix stays shared)."""
        n = len(rows)
        out, vids, new = [], {}, {}
        for b, ivs in enumerate(rows):
            items = []
            for iv in ivs:
                if not isinstance(iv, Intervention):
                    raise ValueError(f"expected Intervention objects, got {type(iv).__name__}")
                layer = iv.check(self.n_layers, self.d_model)
                coef = iv.coefficient
                if isinstance(coef, Tensor):
                    if coef.shape[0] != n:
                        raise ValueError(
                            f"{coef.shape[0]} per-row coefficients but the batch has {n} rows; pass one coefficient "
                            "per row (or a scalar)"
                        )
                    coef = float(coef[b])
                if iv.operation == "add" and coef == 0.0:
                    continue
                spec: Positions = iv.positions
                if spec.mode is not None:
                    pos: Any = spec.mode
                    if spec.mode == "response" and starts[b] is None:
                        raise ValueError(missing_layout_message("response"))
                else:
                    if spec.per_row and len(spec.ranges) != n:
                        raise ValueError(f"positions has ranges for {len(spec.ranges)} rows but the batch has {n}")
                    pos = [list(r) for r in (spec.ranges[b] if spec.per_row else spec.ranges)]
                    if not pos:
                        continue  # this row has no ranges: untouched
                if id(iv.vector) not in vids:
                    vid = wire.vector_id(iv.vector)
                    vids[id(iv.vector)] = vid
                    if vid not in self._sent:
                        new[vid] = wire.pack(iv.vector.detach().to(torch.float32))
                items.append(SteerItem.coerce((layer, vids[id(iv.vector)], coef, iv.operation, pos)))
            out.append(items)
        if new:
            self.llm.collective_rpc("steer_put_vectors", args=(new,))
            self._sent.update(new)
        return out

    def _submit(self, rows: list[list[int]], specs: list[RequestSpec], **params: Any) -> list:
        """One engine call: row ``b`` is a request carrying ``specs[b]`` with ``SamplingParams(**params)`` (a list
        value gives one per row); returns the RequestOutputs in row order. On any error (or Ctrl-C) the call's
        unfinished requests are aborted, so the engine is clean for the next call."""
        from vllm import SamplingParams

        prompts, sampling = [], []
        for b, (ids, spec) in enumerate(zip(rows, specs)):
            extra = spec.wire()
            prompt: dict = {"prompt_token_ids": list(map(int, ids))}
            if self.prefix == "salt" and (salt := wire.cache_salt(extra)) is not None:
                prompt["cache_salt"] = salt
            prompts.append(prompt)
            row = {k: (v[b] if isinstance(v, list) else v) for k, v in params.items()}
            sampling.append(SamplingParams(detokenize=False, extra_args={wire.EXTRA_KEY: extra}, **row))
        keys = [spec.key for spec in specs]
        request_ids: list[str] = []
        try:
            request_ids = compat.enqueue(self.llm, prompts, sampling)
            outputs = compat.wait(self.llm)
        except BaseException:
            self._abort(request_ids, keys)
            raise
        by_id = {o.request_id: o for o in outputs}
        self.last_outputs = [by_id[compat.external_id(rid)] for rid in request_ids]
        self.last_keys = keys
        return self.last_outputs

    def _abort(self, request_ids: list[str], keys: list[str]) -> None:
        try:
            compat.abort_and_drain(self.llm, request_ids)  # the scheduler sees the aborts (workers drop the specs)
            self.llm.collective_rpc("steer_forget", args=(list(keys),))
        except Exception as exc:  # noqa: BLE001 - keep the original error
            log.warning("could not clean up the vLLM engine after an error: %s", exc)

    def _key(self) -> str:
        return f"r{next(self._keys)}"

    def _pop(self, keys: Sequence[str]) -> dict:
        """Captures and records of ``keys`` merged over the workers (TP: rank 0 answers; PP: union of stages)."""
        merged: dict = {"captures": {}, "records": {}}
        for part in self.llm.collective_rpc("steer_pop", args=(list(keys),)):
            for kind in merged:
                for key, by_layer in (part or {}).get(kind, {}).items():
                    merged[kind].setdefault(key, {}).update(by_layer)
        return merged

    # ---- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt] | Prompt,
        max_new_tokens: int = 64,
        interventions: Sequence[Intervention] | Sequence[Sequence[Intervention]] = (),
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        min_new_tokens: int = 0,
        record: bool = False,
    ) -> list[str]:
        """Complete each prompt; returns the new text per prompt. One engine call, one request per row.

        ``interventions``: a list applied to every row (per-row coefficients and per-row ranges pick each row's
        value), or one list per row. Sampling seeds are per request: ``seeds[b]``, else ``seed + b`` (so a row's
        sample does not depend on the other rows of the call); on vLLM-CPU 0.32 seeded sampling fails when a seeded
        request's prefill is chunked (a vLLM bug: CPU generators have no offset). ``min_new_tokens``: no EOS
        before that many tokens (equal work in benchmarks). ``record=True`` logs computed / steered positions for
        ``position_records`` (a test oracle; slower).
        """

        rows, starts = self._rows_of(prompts)
        self.check_context_length(max(len(r) for r in rows), int(max_new_tokens))
        if seeds is not None and len(seeds) != len(rows):
            raise ValueError(f"{len(seeds)} seeds for {len(rows)} prompts; pass one seed per prompt")
        steer = self._steer_items(self._per_row(interventions, len(rows)), starts)
        specs = [
            RequestSpec(self._key(), len(ids), start, tuple(items), record=record)
            for ids, start, items in zip(rows, starts, steer)
        ]
        if do_sample:
            if seeds is None:
                seeds = [None if seed is None else seed + b for b in range(len(rows))]
            sampling = dict(temperature=float(temperature), seed=[None if s is None else int(s) for s in seeds])
        else:
            sampling = dict(temperature=0.0)
        outputs = self._submit(rows, specs, max_tokens=int(max_new_tokens), min_tokens=int(min_new_tokens), **sampling)
        return [self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outputs]

    def position_records(self) -> list[dict]:
        """For the last ``generate(..., record=True)``: per row, ``{"computed": positions the engine computed,
        layer: positions where that layer's steering changed the stream}`` (sorted, with multiplicity), plus
        ``"cached"``: prompt tokens served from the prefix cache."""
        recs = self._pop(self.last_keys)["records"]
        out = []
        for key, o in zip(self.last_keys, self.last_outputs):
            rec = {("computed" if k == "computed" else int(k)): v for k, v in recs.get(key, {}).items()}
            rec["cached"] = int(o.num_cached_tokens or 0)
            out.append(rec)
        return out

    def stats(self) -> list[dict]:
        """Per worker: live requests, vectors, cached plans, steps, and seconds spent building plans / in hooks."""
        return self.llm.collective_rpc("steer_stats")

    # ---- residual stream ----------------------------------------------------------------------------------
    def _read(
        self,
        rows: list[list[int]],
        starts: list[int | None],
        layers: list[int],
        positions: list[list[int]],
        norms: bool = False,
    ) -> list[dict]:
        """Prefill-only requests (``max_tokens=1``) reading ``layers`` at each row's absolute ``positions``, with the
        open steering contexts applied; returns per row ``{layer: {position: [d] tensor | norm}}``."""

        steer = self._steer_items(self._per_row((), len(rows)), starts)
        specs = [
            RequestSpec(self._key(), len(ids), start, tuple(items), tuple(layers), tuple(pos), norms)
            for ids, start, items, pos in zip(rows, starts, steer, positions)
        ]
        # Positions served from the prefix cache are never computed (the last prompt token always is).
        skip = [True if any(p < len(ids) - 1 for p in pos) else None for ids, pos in zip(rows, positions)]
        self._submit(rows, specs, max_tokens=1, temperature=0.0, skip_reading_prefix_cache=skip)
        got = self._pop([spec.key for spec in specs])["captures"]
        out = []
        for b, spec in enumerate(specs):
            per_layer = got.get(spec.key, {})
            row = {}
            for layer in layers:
                by_pos = per_layer.get(layer, {})
                missing = [p for p in positions[b] if p not in by_pos]
                if missing:
                    raise RuntimeError(f"capture at layer {layer} is missing positions {missing[:5]} of row {b}")
                row[layer] = {p: (v if isinstance(v, float) else wire.unpack(v)) for p, v in by_pos.items()}
            out.append(row)
        return out

    @torch.no_grad()
    def capture(self, prompts: Sequence[Prompt] | Encoded, layers: Sequence[int] | str = "all", at="last"):
        """Residual stream ``{layer: [B, d]}`` (``[B, k, d]`` for k indices per row) at decoder-block outputs and
        read positions ``at`` (``steering.hooks.At``: ``last``, ``last-K``, indices, spans), on the CPU in the
        model dtype; open ``steer`` contexts apply. One prefill-only request per row."""
        if not isinstance(prompts, Encoded):
            prompts = self.encode(prompts)
        self.check_context(prompts)
        rows, starts = self._rows_of(prompts)
        layers = self._layers(layers)
        read = At.parse(at, len(rows))
        lengths = torch.tensor([len(r) for r in rows])
        if read.span is not None:
            start, end = read.bounds(lengths)
            positions = [list(range(int(s), int(e))) for s, e in zip(start, end)]
        else:
            target, squeeze = read.targets(lengths)
            positions = target.tolist()
        got = self._read(rows, starts, layers, [sorted(set(p)) for p in positions])
        out = {}
        for layer in layers:
            if read.span is not None:
                means = [torch.stack([got[b][layer][p].float() for p in ps]).mean(0) for b, ps in enumerate(positions)]
                out[layer] = torch.stack(means).to(self.dtype)
            else:
                picked = torch.stack([torch.stack([got[b][layer][p] for p in positions[b]]) for b in range(len(rows))])
                out[layer] = picked[:, 0] if squeeze else picked
        return out

    def residual_norms(self) -> Tensor:
        """Mean L2 norm of the residual stream per layer [n_layers] on fixed neutral text (each row's first token
        skipped), read by the engine."""
        if self._norms is None:
            rows, starts = self._tokenize(list(NORM_TEXTS))
            layers = list(range(self.n_layers))
            got = self._read(rows, starts, layers, [list(range(FIRST_COUNTED, len(r))) for r in rows], norms=True)
            norms = torch.zeros(self.n_layers)
            for layer in layers:
                values = torch.tensor([v for row in got for v in row[layer].values()], dtype=torch.float32)
                norms[layer] = float(mean_norm(values, torch.ones_like(values)))
            self._norms = norms
        return self._norms
