"""Ahead-of-time compilation of the Triton kernels for a GPU target, on any machine (no GPU, no driver).

Triton's CPU interpreter accepts code that the real compiler rejects, and it says nothing about
registers, spills or shared memory. This module compiles every kernel the way a GPU would see it:

    with record_launches(GPUTarget("cuda", 90, 32)) as launches:
        some_launcher(meta_tensors...)       # the real launcher: tiles, warps, dtypes as on a GPU
    reports = [compile_launch(x) for x in unique(launches)]

`record_launches` replaces `JITFunction.run` with a recorder that binds the arguments with the
target's own specialization rules (dtypes, 16-byte alignment, divisibility of integers) and keeps
what the compiler needs instead of launching; the launchers run on meta tensors, so nothing is
allocated. `compile_launch` runs Triton's full pipeline down to the cubin with the ptxas bundled in
the Triton wheel and reads its report: registers, spill stores and loads, stack, the shared memory
Triton allocates, and whether the matrix products lowered to Hopper's wgmma or to mma.sync.

`chunkwise_launches` records every launch of this package's kernels (chunkwise forward and
backward, decoding step) over a matrix of head shapes, chunk sizes, dtypes and reset masks;
`compile_matrix` compiles the distinct ones in parallel worker processes
(`python -m xlstm7b.kernels.aot`) and `violations` says what would fail on the GPU.

Needs the real compiler: the workers run with TRITON_INTERPRET=0 (the interpreter replaces
@triton.jit functions before any of this can see them). Written against the JITFunction internals
of Triton 3.6-3.9 (`create_function_from_signature`, `_pack_args`).
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit

from .chunkwise_triton import chunk_gates, triton_chunk_size
from .chunkwise_triton_bwd import backward
from .chunkwise_triton_fwd import CHUNK_SIZES, FUSED_MAX_CHUNK, forward
from .launch_settings import GRID_LAUNCHES, INTRA_LAUNCHES, interpreting, launch_overrides
from .step_triton import mlstm_step_triton

# Per-block and per-SM limits of the targets we compile for (CUDA programming guide, compute
# capabilities 8.0 and 9.0): dynamic shared memory a block may use, shared memory per SM, registers.
SMEM_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


@dataclasses.dataclass
class Launch:
    """One kernel launch as the compiler sees it, recorded instead of run."""

    kernel: "jit.JITFunction"
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    grid: tuple[int, ...]
    tag: str = ""

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def key(self) -> str:
        """Launches with the same key compile to the same binary."""
        opts = {k: v for k, v in sorted(self.options.items()) if k not in ("debug", "instrumentation_mode")}
        return repr((self.name, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), opts))


@dataclasses.dataclass
class KernelReport:
    """What ptxas and Triton report for one compiled launch, and the target's limits."""

    kernel: str
    tag: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    shared_limit: int
    mma: str
    constexprs: dict
    grid: tuple[int, ...]

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def fits(self) -> bool:
        return self.shared <= self.shared_limit

    @property
    def ctas_per_sm(self) -> int:
        """Resident blocks per SM by registers (allocated per warp in units of 256), warps and shared memory."""
        regs_per_warp = -(-max(self.registers, 1) * 32 // 256) * 256
        by_regs = REGS_PER_SM // (regs_per_warp * self.num_warps)
        by_warps = MAX_WARPS_PER_SM // self.num_warps
        by_smem = SMEM_PER_SM[self.arch] // (self.shared + 1024) if self.shared else by_warps  # 1 KiB reserved per block
        return max(0, min(by_regs, by_warps, by_smem))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["constexprs"] = {str(k): str(v) for k, v in self.constexprs.items()}
        d.update(spills=self.spills, fits=self.fits, ctas_per_sm=self.ctas_per_sm)
        return d


def _check_compiler() -> None:
    if interpreting():
        raise RuntimeError("kernels.aot: TRITON_INTERPRET=1 replaces the kernels with the interpreter's; "
                           "run in a process without it (compile_matrix's workers do)")
    if not hasattr(jit, "create_function_from_signature") or not hasattr(jit.JITFunction, "_pack_args"):
        raise RuntimeError(f"kernels.aot: Triton {triton.__version__} lacks the JITFunction internals this module uses")


@contextlib.contextmanager
def record_launches(target: GPUTarget, tag: str = "") -> Iterator[list[Launch]]:
    """Within the block, every `kernel[grid](...)` call is recorded (not run) as a Launch for `target`.
    Launchers may take meta tensors: only dtypes, alignment (a meta pointer is 0, i.e. aligned as a
    CUDA allocation) and integer values enter the specialization."""
    _check_compiler()
    backend = make_backend(target)
    launches: list[Launch] = []
    binders: dict[int, object] = {}

    def record(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        if id(self) not in binders:
            binders[id(self)] = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binders[id(self)](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        grid = grid(bound) if callable(grid) else grid
        launches.append(Launch(self, signature, constexprs, attrs, dict(options.__dict__), tuple(grid), tag))

    original = jit.JITFunction.run
    jit.JITFunction.run = record
    try:
        yield launches
    finally:
        jit.JITFunction.run = original


def unique(launches: Iterable[Launch]) -> list[Launch]:
    """One launch per distinct binary, in first-seen order; its tag lists the tags of every launch
    that shares the binary (comma-separated), so a check by tag sees all of them."""
    seen: dict[str, Launch] = {}
    for x in launches:
        first = seen.setdefault(x.key, dataclasses.replace(x))
        if x is not first and x.tag not in first.tag.split(","):
            first.tag = f"{first.tag},{x.tag}"
    return list(seen.values())


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: Launch, target: GPUTarget) -> KernelReport:
    """Compiles one recorded launch down to the cubin for `target` and reports its resources.
    Raises what the compiler raises (a CompilationError names the kernel and the line)."""
    src = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    log = io.StringIO()
    knobs = triton.knobs
    # always_compile: ptxas prints its report only when it runs, never for a cached binary
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(src, target=target, options=launch.options)
    text = log.getvalue()
    regs = _PTXAS_USED.search(text)
    spill = _PTXAS_SPILL.search(text)
    if regs is None or spill is None:
        raise RuntimeError(f"kernels.aot: no ptxas report for {launch.name}:\n{text[-2000:]}")
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    arch = target.arch
    return KernelReport(
        kernel=launch.name, tag=launch.tag, arch=arch,
        num_warps=launch.options["num_warps"], num_stages=launch.options["num_stages"],
        registers=int(regs.group(1)), stack=int(spill.group(1)),
        spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
        shared=int(compiled.metadata.shared), shared_limit=SMEM_PER_BLOCK[arch], mma=mma,
        constexprs={launch.kernel.arg_names[k[0]]: v for k, v in launch.constexprs.items()},
        grid=launch.grid,
    )


def violations(report: KernelReport, spill_free: bool) -> list[str]:
    """What would go wrong on the GPU: shared memory above the per-block limit (OutOfResources at
    launch) and, where `spill_free`, register spills to local memory."""
    where = f"{report.kernel} [{report.tag}] sm_{report.arch}"
    out = []
    if not report.fits:
        out.append(f"{where}: {report.shared} B of shared memory, above the {report.shared_limit} B a block may use")
    if spill_free and report.spills:
        out.append(f"{where}: spills {report.spill_stores} B stores / {report.spill_loads} B loads at {report.registers} registers")
    return out


# ---------------------------------------------------------------------------------------------
# The matrix of this package's launches
# ---------------------------------------------------------------------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    """One cell of the matrix: a head shape, chunk size, input dtype, whether there are resets, and
    the variant of the kernels (a key of VARIANTS)."""

    DK: int
    DV: int
    L: int
    dtype: str
    reset: bool
    variant: str = "default"

    @property
    def tag(self) -> str:
        tag = f"DK{self.DK}-DV{self.DV}-L{self.L}-{self.dtype}" + ("-reset" if self.reset else "")
        return tag if self.variant == "default" else f"{tag}-{self.variant}"


VARIANTS = {
    "default": {},
    "tiles": {launch: dict(grid_order="tiles") for launch in GRID_LAUNCHES},
    "local-max": dict(states=dict(local_max=1)),
    "split": dict(states=dict(segments=16)),
    "chunk128-intra": {launch: dict(LB=64, BK=64, BV=64) for launch in INTRA_LAUNCHES},
}
"""The selectable variants of the chunkwise kernels besides the one-pass forward, as launch_overrides:
the per-chunk launches with the tile index fastest, the states pass at each chunk's own stabilizer,
the states passes split over 16 segments of each sequence (chunkwise_triton_split.py,
chunkwise_triton_split_bwd.py: for batch 1 at S 65,536 and chunk 64), chunk 128 tiled in sub-blocks
of 64 (chunkwise_triton_intra.py) with the 64-wide operand tiles of chunk 64."""

VARIANT_CHUNKS = {"chunk128-intra": (128,)}
"""The chunk sizes a variant is built for, where not all of CHUNK_SIZES (the compile matrix and the
tests take it there); a shorter sequence's shorter chunk runs the untiled kernels with its tiles
(LB is capped at the chunk)."""


def variant_chunks(variant: str) -> tuple[int, ...]:
    """The chunk sizes `variant` (a key of VARIANTS) runs at."""
    return VARIANT_CHUNKS.get(variant, CHUNK_SIZES)


def chunkwise_launches(target: GPUTarget, cases: Iterable[Case], B: int = 1, NH: int = 2, S: int = 1031) -> list[Launch]:
    """Records the launches of the chunkwise forward (both forms; the one-pass form in half precision
    up to FUSED_MAX_CHUNK, for sm_90 and up) and backward (through their real launchers, on meta
    tensors) and of the decoding step for every case. S is ragged on purpose (masked tails)."""
    launches = []
    for case in cases:
        dt = DTYPES[case.dtype]
        meta = dict(device="meta")
        q, k = (torch.empty(B, NH, S, case.DK, dtype=dt, **meta) for _ in range(2))
        v = torch.empty(B, NH, S, case.DV, dtype=dt, **meta)
        i, f = (torch.empty(B, NH, S, **meta) for _ in range(2))
        reset = torch.empty(B, S, dtype=torch.bool, **meta) if case.reset else None
        L = triton_chunk_size(case.L, S, dt)  # the chunk this case really runs with
        b, ig, virt, cnt = chunk_gates(i, f, reset, L)
        C0, n0, m0 = torch.empty(B, NH, case.DK, case.DV, **meta), torch.empty(B, NH, case.DK, **meta), torch.empty(B, NH, 1, **meta)
        with record_launches(target, case.tag) as recorded, launch_overrides(**VARIANTS[case.variant]):
            if dt != torch.float32 and L <= FUSED_MAX_CHUNK and target.arch >= 90:  # the one-pass forward, where built for
                with launch_overrides(fused=dict(enabled=1)):
                    forward(q, k, v, b, ig, virt, cnt, C0, n0, m0, L, 1e-6)
            h, C, n, m, mt, den, MS, *_ = forward(q, k, v, b, ig, virt, cnt, C0, n0, m0, L, 1e-6)
            backward(q, k, v, b, ig, virt, cnt, C0, n0, m0, h, C, n, mt, den, MS, None, None,
                     torch.empty_like(h), torch.empty_like(C), torch.empty_like(n), torch.empty_like(m), L, 1e-6)
            step = [t[:, :, 0] for t in (q, k, v, i, f)]
            slots = torch.empty(B, dtype=torch.int64, **meta)  # a serving pool's rows, by slot index
            for by_slot, one_launch in itertools.product((None, slots), (0, 1)):  # both forms of the step
                with launch_overrides(step=dict(one_launch=one_launch)):
                    mlstm_step_triton(*step, (C.clone(), n.clone(), m.clone()), slots=by_slot)
                    if dt == torch.bfloat16:  # serving's bfloat16 state slots
                        mlstm_step_triton(*step, (C.to(dt), n.to(dt), m.clone()), slots=by_slot)
        launches += recorded
    return launches


def _compile_part(plan: dict[int, list[Case]], part: int, parts: int) -> list[dict]:
    """Compiles every `parts`-th distinct (arch, launch) pair of `plan` starting at `part`; a compile
    error becomes an entry with an `error` field."""
    todo = [(arch, launch) for arch, cases in plan.items()
            for launch in unique(chunkwise_launches(GPUTarget("cuda", arch, 32), cases))]
    out = []
    for arch, launch in todo[part::parts]:
        try:
            out.append(compile_launch(launch, GPUTarget("cuda", arch, 32)).as_dict())
        except Exception as e:  # a compile error is a finding to report, not a crash of the run
            out.append(dict(kernel=launch.name, tag=launch.tag, arch=arch, error=f"{type(e).__name__}: {e}"[:4000]))
    return out


def compile_matrix(plan: dict[int, list[Case]], jobs: int = 2) -> list[dict]:
    """Compiles the distinct launches of the cases planned for each arch (compute capability, e.g.
    90 for H100, 80 for A100) in `jobs` worker processes (the compiler and ptxas are single-threaded)
    and returns one dict per launch: KernelReport's fields, or kernel/tag/arch/error."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    spec = json.dumps({str(arch): [dataclasses.asdict(c) for c in cases] for arch, cases in plan.items()})

    def run(part: int) -> list[dict]:
        cmd = [sys.executable, "-m", "xlstm7b.kernels.aot", "--part", f"{part}/{jobs}"]
        proc = subprocess.run(cmd, input=spec, capture_output=True, env=env, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"kernels.aot worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # the workers run at the same time
        return [r for part in pool.map(run, range(jobs)) for r in part]


def main(argv: list[str] | None = None) -> None:
    """Worker of compile_matrix: reads {arch: [case, ...]} as JSON on stdin, writes the JSON list of
    the reports of its part on stdout."""
    p = argparse.ArgumentParser(prog="python -m xlstm7b.kernels.aot", description=main.__doc__)
    p.add_argument("--part", default="0/1", help="compile every N-th distinct (arch, launch) pair from K: K/N")
    args = p.parse_args(argv)
    spec = json.load(sys.stdin)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        part, parts = (int(x) for x in args.part.split("/"))
        out = _compile_part({int(arch): [Case(**c) for c in cases] for arch, cases in spec.items()}, part, parts)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
