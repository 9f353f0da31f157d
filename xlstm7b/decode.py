"""Decoding primitives: prompts in a batch, the decoding state, prefill, and the step runners.

    ids, mask = batch_prompts(prompts, config, device)
    state = decoding_state(None, config, B, device)
    logits = prefill(model, ids, mask, state, chunk=8192)          # [B, V]; `state` now holds the prompt
    step = step_runner(model, state, cuda_graph=False, compile=False)
    logits = step(token, active)                                  # one token, `state` updated in place

A step runner is `model.step` bound to one state (and optionally one `cell_inputs` buffer it fills
every step): eager, captured in a CUDA graph (on CUDA with compile=True, the default where a graph is
captured: inductor's compilation of the step, captured), or compiled by inductor for CPU.

Compilation costs time once per model and kind of call (`StepCompilation.compile_seconds` says how
much): the compiled code is kept for later calls in the process, and inductor's FX graph cache
(`torch._inductor.config.fx_graph_cache`, on by default, in TORCHINDUCTOR_CACHE_DIR) serves the
generated kernels to later processes, which then only trace. A compilation that fails (no C++
compiler, an inductor or Triton error) warns once and the step runs uncompiled.
"""

import time
import types
import warnings
import weakref

import torch

from .model import XLSTM, check_token_ids
from .state import State


def batch_prompts(input_ids, config, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts ([B, S], [S] or a list of 1-D sequences of any lengths) -> ids [B, S] on `device` and
    mask [B, S] (False at left padding; None without any). An empty prompt becomes the BOS token."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], [S] or a list of 1-D sequences, got shape {list(input_ids.shape)}")
        rows = list(input_ids) if input_ids.shape[1] == 0 else None
    else:
        rows = list(input_ids)
    if rows is not None:
        if not rows:
            raise ValueError("input_ids is an empty list; pass at least one prompt (an empty prompt is fine)")
        rows = [torch.as_tensor(r).reshape(-1) for r in rows]
        # An empty prompt has no last position to predict from: start a document with BOS.
        rows = [r if r.numel() else torch.tensor([config.bos_token_id]) for r in rows]
        for r in rows:
            _check_integer(r)
        S = max(r.numel() for r in rows)
        input_ids = torch.full((len(rows), S), config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.bool)
        for b, r in enumerate(rows):  # left padding: every row's last prompt token is at S - 1
            input_ids[b, S - r.numel():] = r
            mask[b, S - r.numel():] = True
        mask = None if bool(mask.all()) else mask.to(device)
    else:
        mask = None
    _check_integer(input_ids)
    check_token_ids(input_ids, config.vocab_size)
    return input_ids.to(device=device, dtype=torch.long), mask


def _check_integer(ids: torch.Tensor) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")


def decoding_state(state: State | None, config, B: int, device, dtype: torch.dtype = torch.float32) -> State:
    """The state decoding writes into in place (contiguous; C and n in `dtype`, m in float32, as the
    fused step kernel takes them): the empty one, or a copy of the given one, which is never modified."""
    if state is not None and (not isinstance(state, State) or state.batch_size != B or len(state) != config.num_blocks):
        raise ValueError(f"state must be a State with {config.num_blocks} layers and batch size {B} (one row per prompt)")
    if state is None:
        return State.zeros(config, B, device=device, dtype=dtype).stored_as(dtype)
    return state.to(device=device).stored_as(dtype, copy=True)


def prefill(model: XLSTM, ids: torch.Tensor, mask: torch.Tensor | None, state: State, chunk: int) -> torch.Tensor:
    """Runs the prompt into `state` (in place), piece by piece; returns the last position's logits [B, V]."""
    # Pieces on kernel-chunk boundaries give the same chunking as one pass over the whole prompt.
    L = model.config.chunk_size
    chunk = max(L, chunk // L * L)
    for start in range(0, ids.shape[1], chunk):
        piece = slice(start, start + chunk)
        logits, new = model(ids[:, piece], state, mask=None if mask is None else mask[:, piece], last_logits_only=True)
        state.copy_(new)
    return logits[:, -1]


def token_buffer(B: int, n: int, pad_token_id: int, device) -> torch.Tensor:
    """The [B, n] token ids generation writes, filled with the pad id; a ValueError naming
    max_new_tokens when it does not fit in memory."""
    try:
        return torch.full((B, n), pad_token_id, dtype=torch.long, device=device)
    except RuntimeError as e:  # torch's allocators (CPU and CUDA out of memory alike)
        raise ValueError(f"max_new_tokens: the output of {B} x {n} token ids ({B * n * 8 / 2**30:,.1f} GiB) does not fit "
                         "in memory; generate fewer tokens per call and continue from the returned state") from e


def check_finite(nonfinite: torch.Tensor, model: XLSTM, where: str, *, role: str = "model") -> None:
    """Raises a FloatingPointError naming the likely cause when the bool flag `nonfinite` (a host
    sync) says that `model` produced NaN or inf logits `where`; the cause is looked for only then."""
    if not bool(nonfinite):
        return
    bad = [name for name, p in model.named_parameters() if not bool(p.isfinite().all())]
    if bad:
        cause = (f"its weights hold NaN or inf values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the "
                 "checkpoint is damaged or its training diverged; load a good checkpoint")
    elif model.lm_head.weight.dtype == torch.float16:
        cause = "its activations overflowed float16; run it in bfloat16 or float32 (--dtype)"
    else:
        cause = "its weights are finite, so the state passed in or the activations are not; check the state, or run in float32"
    raise FloatingPointError(f"the {role} produced non-finite logits (NaN or inf) {where}: {cause}")


def step_runner(model: XLSTM, state: State, *, cuda_graph: bool, compile: bool | None = None,
                cell_inputs: torch.Tensor | None = None, batch: int | None = None):
    """`model.step` on `state` as `step(token, active=None) -> logits`: captured, compiled or eager.
    With `cell_inputs` (a `model.cell_inputs_buffer(B)`), every step fills it. compile=None: compiled
    where the step is captured in a CUDA graph (on CUDA the compiled graph replays far fewer kernels),
    eager elsewhere (on CPU compilation is opt-in: seconds to a minute for a faster step).
    With `batch`, it steps `batch` tokens on the rows of `state` (a pool of any size) that each call
    names: `step(token, active, slots)`, slots int64 [batch] as `XLSTM.step` takes them."""
    if compile is None:
        compile = cuda_graph and state.device.type == "cuda"
    if cuda_graph:
        return CUDAGraphStep(model, state, cell_inputs, compile=compile, batch=batch)
    if compile and state.device.type == "cuda":
        raise ValueError("on CUDA the compiled step is captured in a CUDA graph: pass cuda_graph=True with compile=True")
    if compile:
        return CompiledStep(model, state, cell_inputs, batch=batch)

    def eager_step(token: torch.Tensor, active: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        return model.step(token, state, active, cell_inputs, slots)

    return eager_step


class StepCompilation:
    """`XLSTM.step` compiled by `torch.compile(**options)`, called as `XLSTM.step` is. The first call
    compiles: compile_seconds is its time (compilation, then one step), cache_hits how many graphs
    inductor's FX graph cache served (compiled in an earlier process). If compiling fails, it warns
    once and runs the uncompiled step from then on (`error` holds why), never compiling again."""

    def __init__(self, options: dict | None = None):
        self.fn = torch.compile(own_copy(XLSTM.step), dynamic=False, options=options)
        self.compile_seconds: float | None = None
        self.cache_hits = 0
        self.error: Exception | None = None

    def __call__(self, model: XLSTM, token, state: State, active=None, cell_inputs=None, slots=None) -> torch.Tensor:
        if self.error is not None:
            return XLSTM.step(model, token, state, active, cell_inputs, slots)
        if self.compile_seconds is not None:
            return self.fn(model, token, state, active, cell_inputs, slots)
        hits = _cache_hits()
        t0 = time.perf_counter()
        try:
            logits = self.fn(model, token, state, active, cell_inputs, slots)
        except Exception as e:  # inductor, Triton or the C++ toolchain: the step itself still runs
            self.error = e
            first = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"compiling the decode step failed ({type(e).__name__}: {first}); decoding uncompiled",
                          RuntimeWarning, stacklevel=2)
            return XLSTM.step(model, token, state, active, cell_inputs, slots)
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        self.compile_seconds = time.perf_counter() - t0
        self.cache_hits = _cache_hits() - hits
        return logits


def _cache_hits() -> int:
    return torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]


def own_copy(fn: types.FunctionType) -> types.FunctionType:
    """fn with a code object of its own: dynamo keeps compiled graphs per code object, so each copy
    (one per model) has its own cache, and many models never exhaust one cache's recompile limit."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)


class CompiledStep:
    """`model.step` on `state` compiled by inductor for CPU: the weights frozen into the compiled
    code and the norms, gates and cell fused into a few loops. Up to `GEMM_TEMPLATE_MAX_BATCH` rows
    the matrix products are inductor's C++ GEMM templates (max-autotune, CPP backend), which stream
    the weights far faster than MKL's matrix-vector products (slow on AMD CPUs); above it, where the
    products are compute-bound, MKL's packed GEMMs are faster and are kept.

    Frozen weights are constants of the compiled code, so a compilation serves one model and one
    version of its weights: each model gets its own copies of `XLSTM.step`'s code object (dynamo
    keeps compiled graphs per code object) and a fingerprint of its parameters; an in-place weight
    update (an optimizer step, load_state_dict) compiles anew. That makes the guards on the model's
    modules redundant, and they are skipped: they cost more than the step at batch 1.
    """

    GEMM_TEMPLATE_MAX_BATCH = 16
    _compiled: "weakref.WeakKeyDictionary[XLSTM, tuple[tuple, dict[bool, StepCompilation]]]" = weakref.WeakKeyDictionary()

    def __init__(self, model: XLSTM, state: State, cell_inputs: torch.Tensor | None = None, batch: int | None = None):
        self.model, self.state, self.cell_inputs = model, state, cell_inputs
        fingerprint = tuple((p.data_ptr(), p._version) for p in model.parameters())
        entry = self._compiled.get(model)
        if entry is None or entry[0] != fingerprint:
            entry = self._compiled[model] = fingerprint, {}
        templates = (state.batch_size if batch is None else batch) <= self.GEMM_TEMPLATE_MAX_BATCH
        if templates not in entry[1]:
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            if templates:
                options |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}
            entry[1][templates] = StepCompilation(options)
        self.compilation = entry[1][templates]

    def __call__(self, token: torch.Tensor, active: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        # Freezing is read when dynamo hands the graph over, which torch.compile's options do not reach.
        with torch._inductor.config.patch(freezing=True):
            return self.compilation(self.model, token, self.state, active, self.cell_inputs, slots)


_cuda_compiled: "weakref.WeakKeyDictionary[XLSTM, dict[tuple, StepCompilation]]" = weakref.WeakKeyDictionary()


def cuda_compiled_step(model: XLSTM, state: State, cell_inputs: torch.Tensor | None = None,
                       batch: int | None = None) -> StepCompilation:
    """`model.step` compiled by inductor for CUDA, once per model and kind of call (batch size, rows
    stepped by slot index, state dtype, with or without `cell_inputs`): each kind has its own copy of the function, so a server's
    many batch buckets never meet dynamo's recompile limit (8 graphs per code object), past which it
    would run the step uncompiled. Unlike the CPU compilation the weights are not frozen: they stay
    inputs, so an in-place update of them is seen. The Triton step kernel is traced as a user-defined
    kernel. The cache holds compiled functions, not the model, so a model nobody holds is freed."""
    kinds = _cuda_compiled.setdefault(model, {})
    kind = (state.batch_size, batch, state.dtype, cell_inputs is not None)
    if kind not in kinds:
        kinds[kind] = StepCompilation()
    return kinds[kind]


def step_compilations(model: XLSTM) -> list[StepCompilation]:
    """The compilations of `model.step` made so far in this process (CPU: for the current weights),
    with their compile_seconds, cache_hits and error."""
    cpu = CompiledStep._compiled.get(model)
    return [*(cpu[1].values() if cpu else ()), *_cuda_compiled.get(model, {}).values()]


class CUDAGraphStep:
    """`model.step` captured once in a CUDA graph over static buffers and replayed per token: one
    launch instead of hundreds of small kernels, which dominate batch-1 decoding time. It always
    runs with an `active` mask from a buffer of its own: the one given, or all True when a call
    gives none (never the mask of an earlier call).

    With compile=True the captured step is inductor's compilation of it (`cuda_compiled_step`): the
    norms, gate activations, casts and residual adds fused into a few kernels, so the graph replays
    far fewer of them (the eager step has dozens of small elementwise kernels per block).

    With `batch` (at most the state's rows) it steps `batch` tokens on the rows of `state` named by a
    `slots` buffer, which persists between calls as `active` does: one graph serves any rows. Its
    warm-up and capture run with every row inactive, which leaves the state as it is, so a large pool
    is never copied."""

    def __init__(self, model: XLSTM, state: State, cell_inputs: torch.Tensor | None = None, compile: bool = False,
                 batch: int | None = None):
        self.compilation = cuda_compiled_step(model, state, cell_inputs, batch) if compile else None
        step = model.step if self.compilation is None else lambda *args: self.compilation(model, *args)
        B, device = state.batch_size if batch is None else batch, state.device
        self.token = torch.zeros(B, dtype=torch.long, device=device)
        self.active = torch.full((B,), batch is None, dtype=torch.bool, device=device)
        self.slots = None if batch is None else torch.arange(B, device=device)
        # Warm-up and capture run the step on the real state buffers: restore them afterwards.
        saved = state.clone() if batch is None else None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
            for _ in range(2):  # with compile, the first compiles
                step(self.token, state, self.active, cell_inputs, self.slots)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.token, state, self.active, cell_inputs, self.slots)
        if saved is not None:
            state.copy_(saved)
        self.active.fill_(True)

    def __call__(self, token: torch.Tensor, active: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        if (slots is None) != (self.slots is None):  # a stale slots buffer would step other rows
            raise ValueError("this CUDA-graph step runs by slot index (step_runner(batch=...)): pass slots on every call"
                             if slots is None else "slots given to a CUDA-graph step built without batch=: pass batch= to step_runner")
        self.token.copy_(token)
        if active is None:
            self.active.fill_(True)
        else:
            self.active.copy_(active)
        if slots is not None:
            self.slots.copy_(slots)
        self.graph.replay()
        return self.logits  # overwritten by the next replay: sample from it before that
