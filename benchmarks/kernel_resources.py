"""What the Triton kernels cost on the GPU, known without one: compile report and roofline model.

    python benchmarks/kernel_resources.py                 # 7B head shape, sm_90 + sm_80: JSON + table
    python benchmarks/kernel_resources.py --check         # exit 1 on a compile error, overflow or spill

1. Compilation (xlstm7b.kernels.aot): every kernel through its real launcher, compiled for sm_90
   (H100/H200) and sm_80 (A100) with the ptxas in the Triton wheel: registers, spills, shared memory
   against the per-block limit, MMA instruction (wgmma or mma.sync), warps, stages and the CTAs that
   fit on one SM.
2. A static cost model of the chunkwise forward and backward at the 7B head shape (NH 8, DK 256,
   DV 512, bf16) and 65,536 tokens: matmul FLOPs and the HBM bytes each launch moves (every operand
   read once, every result written once, plus what a per-chunk launch reads again when the tiles that
   share a chunk's rows run further apart, in its grid order, than the L2 holds), and the roofline
   time of each launch on an H100 SXM (989 TFLOP/s dense bf16, 3.35 TB/s, 50 MB L2) and an H200
   (4.8 TB/s, the same die and L2), for the kernels as built and for the design alternatives (chunk
   size, dtype of the stored chunk states, fused state and output passes, grid order, chunk 128 tiled inside the chunk), at S 8,192
   and 65,536 beside what the H200 measured. Beside the official TFLA kernel's published 8.2 ms
   forward / 21 ms forward+backward.
3. The kernels one layer launches, forward and backward (xlstm7b.kernels.launch_count.count_launches).

Writes benchmarks/results/kernel_resources_7b.json and prints the tables (also saved as .md).
"""

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch
import triton

from xlstm7b.kernels import aot, launch_count  # noqa: E402
from xlstm7b.kernels.chunkwise_triton_fwd import CHUNK_SIZES  # noqa: E402
from xlstm7b.kernels.chunkwise_triton_split import segment_plan  # noqa: E402
from xlstm7b.kernels.launch_settings import INTRA_LAUNCHES, default_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TFLA_MS = {"forward": 8.2, "forward+backward": 21.0}  # official TFLA, exp input gate, chunk 128 (performance anchors)
# One H200, 2026-11-27 (h200-2026-11-27/README.md, run 1): ours at chunk 64 as built then, B*S = 65,536
H200_MEASURED_MS = {8192: {"forward": 5.33, "forward+backward": 19.79}, 65536: {"forward": 5.80, "forward+backward": 21.71}}


@dataclasses.dataclass(frozen=True)
class Device:
    """Peak dense bf16 FLOP/s, HBM bandwidth and L2 size. Both are the GH100 die with 50 MB of L2
    enabled (NVIDIA's H100 SXM figure; the H200 changes the HBM, not the die)."""

    name: str
    flops: float
    bytes_per_s: float
    l2_bytes: float


H100 = Device("H100 SXM", 989e12, 3.35e12, 50e6)
H200 = Device("H200 SXM", 989e12, 4.8e12, 50e6)
PEAK_FLOPS, PEAK_BYTES = H100.flops, H100.bytes_per_s


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
    S: int = 65536  # sequence length (B = T / S)


@dataclasses.dataclass(frozen=True)
class Design:
    """What the HBM traffic depends on: the chunk length, the bytes of a stored chunk-entry state
    element C and of its gradient dC (n and m stay fp32 and are negligible), whether the
    forward's state and output passes are fused (chunk states stay on chip; the backward still
    recomputes them), and the grid order of the per-chunk launches (launch_settings.GRID_ORDERS).
    A fused forward with DV tiles of fused_bv columns (0: all of DV) reads q and k, and computes
    the [L, L] scores, once per tile, and its state tiles carry n as fused_bv more columns (as
    _fused_fwd_kernel does)."""

    name: str
    L: int
    c_bytes: int = 4
    dc_bytes: int = 4
    fused_forward: bool = False
    fused_bv: int = 0
    grid_order: str = "chunks"
    variant: str = "default"
    """A key of aot.VARIANTS whose launch settings replace the defaults (settings): its tiles, and an
    LB below the chunk (chunk128-intra: the launches tiled inside the chunk), where the score work
    above the diagonal is skipped (computed). The programs of a chunk's sub-blocks in dq, dk and dv,
    which read the same entry and end states, run side by side in either grid order: from L2.
    Variant split (states segments P): both states passes over P segments of each sequence
    (chunkwise_triton_split.py, chunkwise_triton_split_bwd.py), reading their operands twice and
    moving the segments' float32 states (or gradients) four times, for a chain of about 2 NC / P + P
    steps (chain)."""


def settings(s: Shape, d: Design) -> dict[str, dict]:
    """The launch settings of the design: launch_settings.default_config for the shape and chunk, the
    variant's over them, LB capped at the chunk as launch_config caps it."""
    cfg = default_config(torch.bfloat16 if s.e == 2 else torch.float32, s.DK, s.DV, d.L)
    for launch, params in aot.VARIANTS[d.variant].items():
        cfg[launch].update(params)
    for launch in INTRA_LAUNCHES:
        cfg[launch]["LB"] = min(cfg[launch]["LB"], d.L)
    return cfg


def computed(L: int, cfg: dict) -> float:
    """The share of a chunk's [L, L] score work a launch with settings `cfg` computes: all of it in one
    block (LB = L), else the sub-blocks up to each block of rows' last row (RB rows; LB in dq, dk, dv)."""
    LB = cfg["LB"]
    RB = min(cfg.get("RB", LB), L)
    return sum(-(-(i + 1) * RB // LB) for i in range(L // RB)) * RB * LB / L**2


def rereads(s: Shape, d: Design, dev: Device) -> dict[str, float]:
    """HBM bytes each per-chunk launch reads again, by launch: the head-dim tiles (or row blocks) of
    one chunk read the same rows (q and k for the output; k and v for the scores; v, dh and dS for
    dq, dk; k and A for dv). The rows stay in L2 for the next tile if the bytes every program issued
    in between touches fit in it (least-recently-used eviction): with grid order "tiles" those
    programs are adjacent, with "chunks" a whole head's chunks apart (S / L programs, or S / RB)."""
    DK, DV, e, L = s.DK, s.DV, s.e, d.L
    S = min(s.S, s.T)  # a sequence holds at most the T tokens
    cfg = settings(s, d)
    qk_bytes, v_bytes = s.T * s.NH * DK * e, s.T * s.NH * DV * e
    tiles_bytes = s.T * s.NH * L * e  # one [L, L] tile per chunk
    out, sc, dqk, dv = (cfg[k] for k in ("output", "scores", "dqk", "dv"))
    RB, RBs = min(out["RB"], L), min(sc["RB"], L)
    # launch: (tiles sharing the rows, their bytes over all chunks, programs per head in the grid's
    # outer index, bytes one program touches)
    shared = {
        "output": (-(-DV // out["BV"]), 2 * qk_bytes, S // RB,
                   (RB + L) * DK * e + DK * out["BV"] * d.c_bytes + (L + RB) * out["BV"] * e),
        "scores": (L // RBs, qk_bytes + v_bytes, S // L, (RBs + L) * DK * e + (L + 2 * RBs) * DV * e + 2 * RBs * L * e),
        "dqk": (-(-DK // dqk["BK"]), 2 * v_bytes + tiles_bytes, S // L,
                2 * L * DV * e + dqk["BK"] * DV * (d.c_bytes + d.dc_bytes) + L * L * e + 4 * L * dqk["BK"] * e),
        "dv": (-(-DV // dv["BV"]), qk_bytes + tiles_bytes, S // L, L * DK * e + DK * dv["BV"] * d.dc_bytes + L * L * e + 2 * L * dv["BV"] * e),
    }
    out = {}
    for launch, (tiles, nbytes, outer, per_program) in shared.items():
        distance = (outer if d.grid_order == "chunks" else 1) * per_program
        out[launch] = (tiles - 1) * nbytes if distance > dev.l2_bytes else 0.0
    return out


def launches(s: Shape, d: Design, dev: Device = H100) -> dict[str, list[tuple[str, float, float]]]:
    """(kernel, FLOPs, bytes) of every launch, forward and backward, mirroring the launchers in
    kernels/chunkwise_triton_{fwd,bwd}.py. FLOPs count the matmuls (2 per multiply-add, the causal
    [L, L] tiles in full, as computed); bytes count each tensor once per launch, plus what the
    per-chunk launches read again past `dev`'s L2 (rereads)."""
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
    again = rereads(s, d, dev)
    cfg = settings(s, d)
    nkb = -(-DK // cfg["dqk"]["BK"])  # dqk's DK tiles: partial sums each
    share = {launch: computed(L, cfg[launch]) for launch in INTRA_LAUNCHES}  # of the causal score work
    chunk_states = [("states", state_flops, qk_bytes + v_bytes + cs + 3 * vec)]
    states_bwd = [("states_bwd", state_flops, qk_bytes + v_bytes + dcs + 6 * vec)]
    if segment_count(s, d) > 1:  # local walks (their ends out), combine (in, entries out), second walks (in)
        seg = T // min(s.S, T) * NH * segment_count(s, d) * DK * DV * 4
        chunk_states = [("states_local", state_flops, qk_bytes + v_bytes + seg + 3 * vec), ("states_combine", 0, 2 * seg),
                        ("states_rewalk", state_flops, qk_bytes + v_bytes + seg + cs + 3 * vec)]
        states_bwd = [("states_bwd_local", state_flops, qk_bytes + v_bytes + seg + 6 * vec), ("states_bwd_combine", 0, 2 * seg),
                      ("states_bwd_rewalk", state_flops, qk_bytes + v_bytes + seg + dcs + 6 * vec)]
    if d.fused_forward:
        tiles_dv = -(-DV // d.fused_bv) if d.fused_bv else 1  # programs per head, each reading q and k
        widen = 2 if d.fused_bv else 1  # the n columns beside each tile's state columns
        fwd = [("states+output", widen * (2 * state_flops + intra_v) + tiles_dv * intra_k,
                tiles_dv * 2 * qk_bytes + 2 * v_bytes + 5 * vec)]
    else:
        fwd = [*chunk_states, ("output", state_flops + share["output"] * (intra_k + intra_v), 2 * qk_bytes + 2 * v_bytes + cs + 5 * vec + again["output"])]
    bwd = [
        *chunk_states,  # recomputed, not stored by the forward
        ("scores", share["scores"] * (intra_k + intra_v), 2 * qk_bytes + 3 * v_bytes + 2 * tiles + 12 * vec + again["scores"]),
        *states_bwd,
        ("dqk", 2 * state_flops + 2 * share["dqk"] * intra_k, 4 * qk_bytes + 2 * v_bytes + cs + dcs + tiles + (6 + 2 * nkb) * vec + again["dqk"]),
        ("dv", state_flops + share["dv"] * intra_v, qk_bytes + 2 * v_bytes + dcs + tiles + 3 * vec + again["dv"]),
        ("gates", 0, (10 + 2 * nkb) * vec),
    ]
    return {"forward": fwd, "backward": bwd}


def segment_count(s: Shape, d: Design) -> int:
    """The segments the states passes run per sequence (1: the single pass; split: kernels'
    segment_plan, capped at the chunks, the last segment possibly shorter)."""
    NC = min(s.S, s.T) // d.L
    return segment_plan(NC, settings(s, d)["states"]["segments"], s.T // min(s.S, s.T) * s.NH)[0]


def chain(s: Shape, d: Design) -> dict:
    """What the roofline cannot see of a states pass (the forward's, its rerun, the backward's):
    the dependent chunk steps one program walks (the single pass: every chunk of its sequence;
    split: its segment, the combine's P steps of an elementwise scale and add, and its segment
    again, less one chunk) and the programs of the launches that walk them (DK tiles x DV tiles x
    sequences x heads, x P split), against the 132 SMs of an H100 or H200."""
    cfg = settings(s, d)["states"]
    NC, heads = min(s.S, s.T) // d.L, s.T // min(s.S, s.T) * s.NH
    tiles = -(-s.DK // cfg["BK"]) * -(-s.DV // cfg["BV"]) * heads
    P = segment_count(s, d)
    if P == 1:
        return dict(steps=NC, programs=tiles)
    NCP = -(-NC // P)
    return dict(steps=2 * NCP - 1 + P, programs=tiles * P)


def roofline(s: Shape, d: Design, dev: Device = H100) -> dict:
    """Per launch and in total: FLOPs, bytes and max(FLOPs / peak, bytes / bandwidth) in ms on `dev`."""
    out = {}
    for phase, rows in launches(s, d, dev).items():
        out[phase] = [
            dict(kernel=k, gflop=f / 1e9, gbyte=b / 1e9, ms=max(f / dev.flops, b / dev.bytes_per_s) * 1e3,
                 bound="compute" if f / dev.flops > b / dev.bytes_per_s else "memory")
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
    Design("L2-aware launch order (grid_order tiles), chunk 64", 64, c_bytes=2, dc_bytes=2, grid_order="tiles"),
    Design("L2-aware launch order (grid_order tiles), chunk 128", 128, c_bytes=2, dc_bytes=2, grid_order="tiles"),
    Design("chunk 128, fused forward, q and k read once (not built)", 128, c_bytes=2, dc_bytes=2, fused_forward=True),
    Design("as built, fused forward (opt-in): chunk 16, 16-wide DV tiles", 16, c_bytes=2, dc_bytes=2, fused_forward=True,
           fused_bv=16),
    Design("chunk 128 tiled in sub-blocks of 64, 64-wide tiles (opt-in: chunk128-intra)", 128, c_bytes=2, dc_bytes=2,
           variant="chunk128-intra"),
    Design("chunk128-intra, grid_order tiles", 128, c_bytes=2, dc_bytes=2, grid_order="tiles", variant="chunk128-intra"),
    Design("states passes split over 16 segments (opt-in: split), chunk 64", 64, c_bytes=2, dc_bytes=2, variant="split"),
]
SEQ_LENS = (8192, 65536)  # the H200 run's two sequence lengths at B*S = 65,536


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def compile_report(archs: list[int], jobs: int) -> list[dict]:
    cases = [aot.Case(256, 512, L, dt, reset) for L in CHUNK_SIZES for dt in aot.DTYPES for reset in (False, True)]
    cases += [aot.Case(256, 512, L, "bf16", False, v) for v in aot.VARIANTS if v != "default" for L in aot.variant_chunks(v)]
    return aot.compile_matrix({arch: cases for arch in archs}, jobs=jobs)


def seq_table(models: dict) -> str:
    """Forward / forward+backward ms of the two-pass designs by device and S, beside the H200's."""
    cols = [(dev, S) for dev in (H100, H200) for S in SEQ_LENS]
    lines = ["| design | " + " | ".join(f"{dev.name}, S {S:,}" for dev, S in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, by in models.items():
        lines.append(f"| {name} | " + " | ".join(f"{by[dev.name, S]['forward_ms']:.2f} / {by[dev.name, S]['forward+backward_ms']:.2f}"
                                               for dev, S in cols) + " |")
    measured = " | ".join(f"{H200_MEASURED_MS[S]['forward']:.2f} / {H200_MEASURED_MS[S]['forward+backward']:.2f}"
                          if dev is H200 else "" for dev, S in cols)
    lines.append(f"| measured, as built then (chunk 64, grid order chunks; H200 run 1) | {measured} |")
    return "\n".join(lines)


def chain_table(designs: list[Design]) -> str:
    """A states pass's chain (chain) by design and S at B*S = 65,536: steps / programs."""
    lines = ["| design | " + " | ".join(f"S {S:,}" for S in SEQ_LENS) + " |", "|---" * (len(SEQ_LENS) + 1) + "|"]
    for d in designs:
        cells = (chain(Shape(S=S), d) for S in SEQ_LENS)
        lines.append(f"| {d.name} | " + " | ".join(f"{c['steps']:,} / {c['programs']:,}" for c in cells) + " |")
    return "\n".join(lines)


def order_table(chunks: dict, tiles: dict) -> str:
    """Per launch: predicted ms with the chunk index fastest and with the tile index fastest."""
    lines = ["| phase | launch | GB, chunks | ms, chunks | GB, tiles | ms, tiles |", "|---|---|---|---|---|---|"]
    for phase in ("forward", "backward"):
        for a, b in zip(chunks[phase], tiles[phase]):
            lines.append(f"| {phase} | {a['kernel']} | {a['gbyte']:.2f} | {a['ms']:.3f} | {b['gbyte']:.2f} | {b['ms']:.3f} |")
    return "\n".join(lines)


def count_table(counts: dict[str, dict]) -> str:
    lines = ["| case | phase | Triton launches | other kernels (aten operators) |", "|---|---|---|---|"]
    for case, by_phase in counts.items():
        for phase, c in by_phase.items():
            ops = ", ".join(f"{k} {v}" for k, v in sorted(c["ops"].items()))
            lines.append(f"| {case} | {phase} | {c['triton']} | {c['torch']}: {ops} |")
    return "\n".join(lines)


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
    two_pass = [d for d in DESIGNS if not d.fused_forward and d.c_bytes == 2]
    by_seq = {d.name: {(dev.name, S): roofline(Shape(S=S), d, dev) for dev in (H100, H200) for S in SEQ_LENS} for d in two_pass}
    counts = {c.tag: launch_count.count_launches(c) for c in (aot.Case(256, 512, 64, "bf16", False), aot.Case(256, 512, 64, "bf16", True))}
    built, tiles = DESIGNS[1], DESIGNS[3]
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        triton=triton.__version__, shape=dataclasses.asdict(shape), devices=[dataclasses.asdict(d) for d in (H100, H200)],
        peaks=dict(flops=PEAK_FLOPS, bytes_per_s=PEAK_BYTES), tfla_published_ms=TFLA_MS, h200_measured_ms=H200_MEASURED_MS,
        kernels=reports, violations=found, designs={d.name: dict(dataclasses.asdict(d), **models[d.name]) for d in DESIGNS},
        by_seq_len={name: {f"{dev}, S {S}": m for (dev, S), m in by.items()} for name, by in by_seq.items()},
        states_chain={d.name: {f"S {S}": chain(Shape(S=S), d) for S in SEQ_LENS} for d in two_pass},
        launches_per_layer=counts,
    )
    text = "\n\n".join([
        f"# Triton kernel resources and roofline, 7B head shape (Triton {triton.__version__})",
        "## Compiled kernels (cases: chunk-dtype[-reset][-variant: aot.VARIANTS]; one row per distinct binary)",
        resource_table(reports),
        "## Roofline at 65,536 tokens (S 65,536) on an H100 SXM (989 TFLOP/s, 3.35 TB/s, 50 MB L2)",
        cost_table(models),
        "## The L2-aware model by sequence length at B*S = 65,536: forward / forward+backward ms "
        "(H200 SXM: 4.8 TB/s, the same 50 MB L2)",
        seq_table(by_seq),
        "## A states pass's sequential chain at B*S = 65,536 (the forward's, its rerun, the backward's): dependent "
        "chunk steps one program walks / programs of the launch (132 SMs on an H100 or H200; the roofline above "
        "cannot see the chain)",
        chain_table(two_pass),
        f"## Per launch at S 65,536 on the H200, chunk 64: grid order chunks ('{built.name}') and tiles",
        order_table(by_seq[built.name][H200.name, 65536], by_seq[tiles.name][H200.name, 65536]),
        f"## Launches of '{DESIGNS[2].name}' (S 65,536, H100)",
        launch_table(models[DESIGNS[2].name]),
        "## Kernels one layer launches (B 1, NH 8, S 4,096, chunk 64, bf16; counted on meta tensors)",
        count_table(counts),
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
