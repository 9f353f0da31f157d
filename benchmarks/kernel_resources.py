"""What the Triton kernels cost on the GPU, known without one: compile report and roofline model.

    python benchmarks/kernel_resources.py                 # 7B head shape, sm_90 + sm_80: JSON + table
    python benchmarks/kernel_resources.py --check         # exit 1 on a compile error, overflow or spill

1. Compilation (xlstm7b.kernels.aot): every kernel through its real launcher, compiled for sm_90
   (H100/H200) and sm_80 (A100) with the ptxas in the Triton wheel: registers, spills, shared memory
   against the per-block limit, MMA instruction (wgmma or mma.sync), warps, stages and the CTAs that
   fit on one SM.
2. A static cost model of the chunkwise forward and backward at the 7B head shape (NH 8, DK 256,
   DV 512, bf16) and 65,536 tokens: matmul FLOPs and the fewest HBM bytes each launch must move
   (every operand read once, every result written once), and the roofline time of each launch on an
   H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s), for the kernels as built and for the design
   alternatives (chunk size, dtype of the stored chunk states, fused state and output passes).
   Beside the official TFLA kernel's published 8.2 ms forward / 21 ms forward+backward.

Writes benchmarks/results/kernel_resources_7b.json and prints the tables (also saved as .md).
"""

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import triton

from xlstm7b.kernels import aot  # noqa: E402
from xlstm7b.kernels.chunkwise_triton_fwd import CHUNK_SIZES  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
PEAK_BYTES = 3.35e12  # H100 SXM HBM3
TFLA_MS = {"forward": 8.2, "forward+backward": 21.0}  # official TFLA, exp input gate, chunk 128 (performance anchors)


# ---------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    T: int = 65536  # tokens (B * S)
    NH: int = 8
    DK: int = 256
    DV: int = 512
    e: int = 2  # bytes of an input element (bf16)


@dataclasses.dataclass(frozen=True)
class Design:
    """What the HBM traffic depends on: the chunk length, the bytes of a stored chunk-entry state
    element C and of its gradient dC (n and m stay fp32 and are negligible), and whether the
    forward's state and output passes are fused (chunk states stay on chip; the backward still
    recomputes them). A fused forward with DV tiles of fused_bv columns (0: all of DV) reads q and
    k, and computes the [L, L] scores, once per tile, and its state tiles carry n as fused_bv more
    columns (as _fused_fwd_kernel does)."""

    name: str
    L: int
    c_bytes: int = 4
    dc_bytes: int = 4
    fused_forward: bool = False
    fused_bv: int = 0


def launches(s: Shape, d: Design) -> dict[str, list[tuple[str, float, float]]]:
    """(kernel, FLOPs, bytes) of every launch, forward and backward, mirroring the launchers in
    kernels/chunkwise_triton_{fwd,bwd}.py. FLOPs count the matmuls (2 per multiply-add, the causal
    [L, L] tiles in full, as computed); bytes count each tensor once per launch."""
    T, NH, DK, DV, e, L = s.T, s.NH, s.DK, s.DV, s.e, d.L
    NC = T // L  # chunks per head (B * S = T, chunked per sequence; the same count for any B)
    qk_bytes = T * NH * DK * e  # one of q, k, dq, dk
    v_bytes = T * NH * DV * e  # one of v, h, dh, dv
    cs = NC * NH * DK * DV * d.c_bytes  # every chunk-entry C
    dcs = (NC + 1) * NH * DK * DV * d.dc_bytes  # the gradient of every chunk boundary's C
    tiles = NC * NH * L * L * e  # one [L, L] tile per chunk (A or dS)
    vec = T * NH * 4  # one per-position fp32 vector (m_t, den, ...)
    state_flops = 2 * T * NH * DK * DV  # one k v^T (or q C) product over all tokens
    intra_k, intra_v = 2 * T * NH * L * DK, 2 * T * NH * L * DV  # q k^T (DK) or A v (DV) over the chunk
    chunk_states = ("states", state_flops, qk_bytes + v_bytes + cs + 3 * vec)
    if d.fused_forward:
        tiles_dv = -(-DV // d.fused_bv) if d.fused_bv else 1  # programs per head, each reading q and k
        widen = 2 if d.fused_bv else 1  # the n columns beside each tile's state columns
        fwd = [("states+output", widen * (2 * state_flops + intra_v) + tiles_dv * intra_k,
                tiles_dv * 2 * qk_bytes + 2 * v_bytes + 5 * vec)]
    else:
        fwd = [chunk_states, ("output", state_flops + intra_k + intra_v, 2 * qk_bytes + 2 * v_bytes + cs + 5 * vec)]
    bwd = [
        chunk_states,  # recomputed, not stored by the forward
        ("states_bwd", state_flops, qk_bytes + v_bytes + dcs + 5 * vec),
        ("scores", intra_k + intra_v, 2 * qk_bytes + 2 * v_bytes + 2 * tiles + 6 * vec),
        ("dqk", 2 * state_flops + 2 * intra_k, 4 * qk_bytes + 2 * v_bytes + cs + dcs + tiles + 6 * vec),
        ("dv", state_flops + intra_v, qk_bytes + 2 * v_bytes + dcs + tiles + 3 * vec),
    ]
    return {"forward": fwd, "backward": bwd}


def roofline(s: Shape, d: Design) -> dict:
    """Per launch and in total: FLOPs, bytes and max(FLOPs / peak, bytes / bandwidth) in ms."""
    out = {}
    for phase, rows in launches(s, d).items():
        out[phase] = [
            dict(kernel=k, gflop=f / 1e9, gbyte=b / 1e9, ms=max(f / PEAK_FLOPS, b / PEAK_BYTES) * 1e3,
                 bound="compute" if f / PEAK_FLOPS > b / PEAK_BYTES else "memory")
            for k, f, b in rows
        ]
    fwd = sum(r["ms"] for r in out["forward"])
    out["forward_ms"] = fwd
    out["forward+backward_ms"] = fwd + sum(r["ms"] for r in out["backward"])
    return out


DESIGNS = [
    Design("chunk 64, fp32 chunk states (before bf16 ones)", 64),
    Design("as built, chunk 64: bf16 chunk states and gradients", 64, c_bytes=2, dc_bytes=2),
    Design("as built, chunk 128", 128, c_bytes=2, dc_bytes=2),
    Design("chunk 128, fused forward, q and k read once (not built)", 128, c_bytes=2, dc_bytes=2, fused_forward=True),
    Design("as built, fused forward (opt-in): chunk 16, 16-wide DV tiles", 16, c_bytes=2, dc_bytes=2, fused_forward=True,
           fused_bv=16),
]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def compile_report(archs: list[int], jobs: int) -> list[dict]:
    cases = [aot.Case(256, 512, L, dt, reset) for L in CHUNK_SIZES for dt in aot.DTYPES for reset in (False, True)]
    return aot.compile_matrix({arch: cases for arch in archs}, jobs=jobs)


def resource_table(reports: list[dict]) -> str:
    head = "| kernel | arch | cases | regs | spills (B) | shared (KiB) / limit | MMA | warps | stages | CTAs/SM |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(reports, key=lambda r: (r["arch"], r["tag"].split(",")[0], r["kernel"])):
        cases = r["tag"].replace("DK256-DV512-", "")
        if "error" in r:
            lines.append(f"| {r['kernel']} | sm_{r['arch']} | {cases} | compile error: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['kernel']} | sm_{r['arch']} | {cases} | {r['registers']} | {r['spills']} | "
            f"{r['shared'] / 1024:.0f} / {r['shared_limit'] / 1024:.0f} | {r['mma']} | {r['num_warps']} | "
            f"{r['num_stages']} | {r['ctas_per_sm']} |"
        )
    return "\n".join(lines)


def cost_table(models: dict[str, dict]) -> str:
    lines = ["| design | forward (ms) | forward+backward (ms) | vs TFLA fwd / fwd+bwd |", "|---|---|---|---|"]
    for name, m in models.items():
        f, fb = m["forward_ms"], m["forward+backward_ms"]
        lines.append(f"| {name} | {f:.2f} | {fb:.2f} | {TFLA_MS['forward'] / f:.1f}x / {TFLA_MS['forward+backward'] / fb:.1f}x |")
    return "\n".join(lines)


def launch_table(model: dict) -> str:
    lines = ["| phase | launch | GFLOP | GB | roofline (ms) | bound |", "|---|---|---|---|---|---|"]
    for phase in ("forward", "backward"):
        for r in model[phase]:
            lines.append(f"| {phase} | {r['kernel']} | {r['gflop']:.0f} | {r['gbyte']:.2f} | {r['ms']:.3f} | {r['bound']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="90,80", help="compute capabilities to compile for (default 90,80)")
    p.add_argument("--jobs", type=int, default=2, help="compiler processes")
    p.add_argument("--check", action="store_true", help="exit 1 on a compile error, shared-memory overflow or spill")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for kernel_resources_7b.json and .md")
    args = p.parse_args(argv)

    reports = compile_report([int(a) for a in args.arch.split(",")], args.jobs)
    found = [f"{r['kernel']} [{r['tag']}] sm_{r['arch']}: {r['error']}" for r in reports if "error" in r]
    found += [v for r in reports if "error" not in r
              for v in aot.violations(aot.KernelReport(**{k: r[k] for k in aot.KernelReport.__dataclass_fields__}), True)]
    shape = Shape()
    models = {d.name: roofline(shape, d) for d in DESIGNS}
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        triton=triton.__version__, shape=dataclasses.asdict(shape),
        peaks=dict(flops=PEAK_FLOPS, bytes_per_s=PEAK_BYTES), tfla_published_ms=TFLA_MS,
        kernels=reports, violations=found, designs={d.name: dict(dataclasses.asdict(d), **models[d.name]) for d in DESIGNS},
    )
    text = "\n\n".join([
        f"# Triton kernel resources and roofline, 7B head shape (Triton {triton.__version__})",
        "## Compiled kernels (cases: chunk-dtype[-reset]; one row per distinct binary)",
        resource_table(reports),
        "## Roofline at 65,536 tokens on an H100 SXM (989 TFLOP/s, 3.35 TB/s)",
        cost_table(models),
        f"## Launches of '{DESIGNS[1].name}'",
        launch_table(models[DESIGNS[1].name]),
        f"## Launches of '{DESIGNS[2].name}'",
        launch_table(models[DESIGNS[2].name]),
        "Violations: " + ("none" if not found else "\n" + "\n".join(found)),
    ])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_resources_7b.json").write_text(json.dumps(report, indent=1))
    (args.out / "kernel_resources_7b.md").write_text(text + "\n")
    if args.check and found:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
