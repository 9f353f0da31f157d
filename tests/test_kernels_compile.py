"""Every Triton kernel compiled by the real compiler for the GPUs users run (sm_90: H100/H200,
sm_80: A100), on this CPU: the interpreter runs the tests, but it accepts code the compiler rejects
and says nothing about registers or shared memory.

Through the real launchers, so the tiles, warps and dtypes are the ones a GPU gets: the chunkwise
forward and backward and the decoding step, for every preset's head shape, every chunk size the
Triton backend takes, bf16, fp16 and fp32 inputs, with and without resets at the 7B and 1.3B head
shapes, and every variant of aot.VARIANTS at those two shapes in bf16 (at the chunks it is built for). Fails on any compile error,
on shared memory above the target's per-block limit (the launch would fail), and at the 7B and 1.3B
head shapes on register spills. Each distinct binary is compiled once, in two processes.

Resets change the gate arithmetic, not the tiles: the smaller presets' head shapes are compiled
without them (their reset code is the large shapes', whose compile errors would show there). sm_80
compiles the 1.3B and 7B head shapes (whose tiles the 125m, 350m and toy presets share), without
resets: the smaller presets' tiles are no larger in any dimension, at the same chunk and warps, so
their shared memory is no larger either, and compile errors would show on sm_90 already.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from conftest import load_script  # noqa: E402
from xlstm7b.config import ModelConfig, preset_names  # noqa: E402
from xlstm7b.kernels import aot  # noqa: E402
from xlstm7b.kernels.chunkwise_triton_fwd import CHUNK_SIZES  # noqa: E402

ARCHS = (90, 80)
HEAD_SHAPES = sorted({(c.qk_head_dim, c.v_head_dim) for c in map(ModelConfig.from_preset, preset_names())})
SPILL_FREE = {(c.qk_head_dim, c.v_head_dim) for c in map(ModelConfig.from_preset, ("7b", "1.3b"))}

def cases(shapes, resets=(False, True), dtypes=tuple(aot.DTYPES), variant="default") -> list[aot.Case]:
    return [aot.Case(DK, DV, L, dtype, reset, variant) for DK, DV in shapes for L in CHUNK_SIZES for dtype in dtypes
            for reset in resets]


# The variants (aot.VARIANTS) differ from the default in a few lines of the launches they change:
# compiled at the large shapes in bf16, the dtype they are for.
VARIANT_CASES = [c for v in aot.VARIANTS if v != "default" for c in cases(sorted(SPILL_FREE), (False,), ("bf16",), v)
                 if c.L in aot.variant_chunks(v)]

KERNELS = {
    "_fused_fwd_kernel", "_states_fwd_kernel", "_output_fwd_kernel", "_states_bwd_kernel", "_scores_bwd_kernel",
    "_dqk_bwd_kernel", "_dv_bwd_kernel", "_gates_bwd_kernel", "_step_kernel", "_step_nm_kernel",
    "_output_intra_kernel", "_scores_intra_kernel", "_dqk_intra_kernel", "_dv_intra_kernel",
    "_states_local_kernel", "_states_combine_kernel", "_states_rewalk_kernel", "_states_grad_local_kernel",
    "_states_grad_combine_kernel", "_states_grad_rewalk_kernel",
}


def spill_free(tags: str) -> bool:
    """Whether a binary serves a head shape that must not spill (its tags name every case it serves)."""
    return any(f"DK{DK}-DV{DV}-" in tags for DK, DV in SPILL_FREE)


def as_report(d: dict) -> aot.KernelReport:
    return aot.KernelReport(**{k: d[k] for k in aot.KernelReport.__dataclass_fields__})


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    small = [shape for shape in HEAD_SHAPES if shape not in SPILL_FREE]
    return aot.compile_matrix({90: cases(sorted(SPILL_FREE)) + cases(small, resets=(False,)) + VARIANT_CASES,
                               80: cases(sorted(SPILL_FREE), resets=(False,)) + VARIANT_CASES}, jobs=2)


def test_matrix_covers_the_presets():
    assert (256, 512) in HEAD_SHAPES and (128, 256) in HEAD_SHAPES and len(HEAD_SHAPES) >= 3
    assert SPILL_FREE == {(256, 512), (128, 256)}


def test_every_kernel_compiles(reports):
    errors = [f"{r['kernel']} [{r['tag']}] sm_{r['arch']}: {r['error']}" for r in reports if "error" in r]
    assert not errors, "\n".join(errors)
    for arch in ARCHS:  # the one-pass forward is built for Hopper
        assert {r["kernel"] for r in reports if r["arch"] == arch} == KERNELS - ({"_fused_fwd_kernel"} if arch < 90 else set())


def test_shared_memory_fits_and_no_spills_at_the_large_shapes(reports):
    found = [v for r in reports if "error" not in r for v in aot.violations(as_report(r), spill_free(r["tag"]))]
    assert not found, "\n".join(found)


def test_tiles_first_launches_compiled(reports):
    """Every per-chunk launch of the tiles-first cases compiled as such, with the tile index on the
    grid's first axis, for both archs and every chunk size."""
    tiles = [r for r in reports if "error" not in r and r["constexprs"].get("TILES_FIRST") == "True"]
    for arch in ARCHS:
        for L in CHUNK_SIZES:
            found = {r["kernel"] for r in tiles if r["arch"] == arch and f"-L{L}-bf16-tiles" in r["tag"]}
            assert found == {"_output_fwd_kernel", "_scores_bwd_kernel", "_dqk_bwd_kernel", "_dv_bwd_kernel"}, (arch, L)
    assert all(tag.endswith("-tiles") for r in tiles for tag in r["tag"].split(","))  # no default launch among them
    for r in tiles:  # the tile index on the first grid axis
        c = {k: int(v) for k, v in r["constexprs"].items() if k in ("L", "RB", "BK", "BV")}
        DK, DV = (int(x) for x in re.match(r"DK(\d+)-DV(\d+)-", r["tag"]).groups())
        tiles_of = {"_output_fwd_kernel": -(-DV // c["BV"]), "_dv_bwd_kernel": -(-DV // c["BV"]),
                    "_dqk_bwd_kernel": -(-DK // c["BK"]), "_scores_bwd_kernel": c["L"] // c.get("RB", 1)}
        assert r["constexprs"]["TILES_FIRST"] == "True" and r["grid"][0] == tiles_of[r["kernel"]], r


def test_local_max_states_pass_compiled(reports):
    """The states pass at each chunk's own stabilizer, for both archs and every chunk size."""
    local = [r for r in reports if "error" not in r and r["constexprs"].get("LOCAL_MAX") == "True"]
    for arch in ARCHS:
        for L in CHUNK_SIZES:
            assert {r["kernel"] for r in local if r["arch"] == arch and f"-L{L}-bf16-local-max" in r["tag"]} == {"_states_fwd_kernel"}
    assert all(tag.endswith("-local-max") for r in local for tag in r["tag"].split(","))


SPLIT_KERNELS = {"_states_local_kernel", "_states_combine_kernel", "_states_rewalk_kernel", "_states_grad_local_kernel",
                 "_states_grad_combine_kernel", "_states_grad_rewalk_kernel"}


def test_split_states_pass_compiled(reports):
    """The states passes split over segments (chunkwise_triton_split.py, chunkwise_triton_split_bwd.py):
    their three launches each, forward and backward, for both archs, every chunk size and the 7B and
    1.3B head shapes (spills and shared memory are checked with the others), none of them serving a
    case without the split, and on sm_90 the local and second walks' state products on wgmma, as the
    single passes'."""
    split = [r for r in reports if "error" not in r and r["kernel"] in SPLIT_KERNELS]
    for arch in ARCHS:
        for L in CHUNK_SIZES:
            for DK, DV in SPILL_FREE:
                found = {r["kernel"] for r in split if r["arch"] == arch and f"DK{DK}-DV{DV}-L{L}-bf16-split" in r["tag"]}
                assert found == SPLIT_KERNELS, (arch, L, DK)
    assert all(tag.endswith("-split") for r in split for tag in r["tag"].split(","))
    assert all(r["mma"] == "wgmma" for r in split if r["arch"] == 90 and "combine" not in r["kernel"])


def test_intra_chunk_tiled_launches_compiled(reports):
    """The chunk-128 variant tiled in sub-blocks of 64 (chunkwise_triton_intra.py): its four tiled
    launches with 64-wide operand tiles, for both archs at the 7B and 1.3B head shapes (spills and
    shared memory are checked with the others), and no launch of another case among them."""
    tiled = [r for r in reports if "error" not in r and r["kernel"].endswith("_intra_kernel")]
    for arch in ARCHS:
        for DK, DV in SPILL_FREE:
            found = {r["kernel"] for r in tiled if r["arch"] == arch and f"DK{DK}-DV{DV}-L128-bf16-chunk128-intra" in r["tag"]}
            assert found == {"_output_intra_kernel", "_scores_intra_kernel", "_dqk_intra_kernel", "_dv_intra_kernel"}, (arch, DK)
    assert all(tag.endswith("-chunk128-intra") for r in tiled for tag in r["tag"].split(","))
    for r in tiled:
        assert {k: r["constexprs"][k] for k in ("L", "LB", "BK", "BV")} == {"L": "128", "LB": "64", "BK": "64", "BV": "64"}, r


BACKWARD_KERNELS = ("_scores_bwd_kernel", "_states_bwd_kernel", "_dqk_bwd_kernel", "_dv_bwd_kernel", "_gates_bwd_kernel")


def test_launches_per_layer():
    """The backward is six Triton launches with no per-position PyTorch op around them (the gate
    vectors' autograd aside); the forward two. A training step runs the states pass twice, with
    activation checkpointing too. Counted on meta tensors in a process without the interpreter."""
    spec = json.dumps([dict(DK=256, DV=512, L=64, dtype="bf16", reset=r) for r in (False, True)])
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "xlstm7b.kernels.launch_count"], input=spec, capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for counts in json.loads(run.stdout):
        assert counts["forward"]["triton"] == 2 and counts["backward"]["triton"] == 6, counts
        assert counts["backward"]["torch"] <= 8, counts["backward"]["ops"]  # the gate vectors' autograd
        assert counts["forward"]["torch"] <= 14, counts["forward"]["ops"]  # the gate vectors
        # the states pass: in the forward and the backward; under activation checkpointing in the
        # forward and its recomputation, whose chunk states the backward takes
        plain, recompute = counts["step"]["plain"], counts["step"]["recompute"]
        assert plain["_states_fwd_kernel"] == 2 and plain["_output_fwd_kernel"] == 1, plain
        assert recompute["_states_fwd_kernel"] == 2 and recompute["_output_fwd_kernel"] == 2, recompute
        assert {k: v for k, v in recompute.items() if k.endswith("_bwd_kernel")} == {
            k: v for k, v in plain.items() if k.endswith("_bwd_kernel")} == {k: 1 for k in BACKWARD_KERNELS}


def test_step_by_slot_index_compiled(reports):
    """The decoding step on a serving pool's rows by slot index (its two kernels), for both archs and
    every head shape compiled there, and the one-launch step (aot compiles both forms) at the 7B's
    heads, with and without slots; their spills and shared memory are checked with the others."""
    for arch in ARCHS:
        ok = [r for r in reports if "error" not in r and r["arch"] == arch]
        by_slot = [r for r in ok if r["constexprs"].get("HAS_SLOTS") == "True"]
        assert {r["kernel"] for r in by_slot} == {"_step_kernel", "_step_nm_kernel"}, arch
        assert any("DK256-DV512-" in r["tag"] for r in by_slot), arch
        one_launch = [r for r in ok if r["constexprs"].get("ONE_LAUNCH") == "True" and "DK256-DV512-" in r["tag"]]
        assert len(one_launch) >= 4 and {r["constexprs"]["HAS_SLOTS"] for r in one_launch} == {"True", "False"}, arch


def test_hopper_state_products_use_wgmma(reports):
    """In half precision the chunk-state products (64-row tiles) lower to wgmma at every chunk size."""
    for r in reports:
        if r["arch"] == 90 and r["kernel"] in ("_states_fwd_kernel", "_states_bwd_kernel") and "DK256-DV512" in r["tag"]:
            if "bf16" in r["tag"] or "fp16" in r["tag"]:
                assert r["mma"] == "wgmma", r


# ---------------------------------------------------------------------------------------------
# The checks can fail: three deliberately broken kernels through the same compilation.
# ---------------------------------------------------------------------------------------------

BROKEN = textwrap.dedent('''
    import json, torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from xlstm7b.kernels import aot

    SCALE = 0.5  # a plain Python float: the interpreter reads it, the compiler refuses it

    @triton.jit
    def plain_float_global(X, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(X + o, tl.load(X + o) * SCALE)

    @triton.jit
    def big_dot(A, B, C, K, M: tl.constexpr, N: tl.constexpr, BK: tl.constexpr):
        m, n = tl.arange(0, M), tl.arange(0, N)
        acc = tl.zeros([M, N], dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            acc += tl.dot(tl.load(A + m[:, None] * K + k[None, :]), tl.load(B + k[:, None] * N + n[None, :]))
        tl.store(C + m[:, None] * N + n[None, :], acc)

    target = GPUTarget("cuda", 90, 32)
    bf16 = dict(device="meta", dtype=torch.bfloat16)
    with aot.record_launches(target) as launches:
        plain_float_global[(1,)](torch.empty(64, device="meta"), N=64)
        # operand tiles of 64 x 512 and 512 x 64, 3 pipeline stages: ~384 KiB of shared memory
        big_dot[(1,)](torch.empty(64, 4096, **bf16), torch.empty(4096, 64, **bf16), torch.empty(64, 64, device="meta"),
                      4096, M=64, N=64, BK=512, num_warps=4, num_stages=3)
        # a 256 x 256 fp32 accumulator is 512 registers a thread at 4 warps
        big_dot[(1,)](torch.empty(256, 4096, **bf16), torch.empty(4096, 256, **bf16), torch.empty(256, 256, device="meta"),
                      4096, M=256, N=256, BK=16, num_warps=4, num_stages=2)
    out = []
    for launch in launches:
        try:
            out.append(aot.violations(aot.compile_launch(launch, target), spill_free=True))
        except Exception as e:
            out.append(f"{type(e).__name__}: {e}")
    print(json.dumps(out))
''')


def test_the_checks_catch_broken_kernels(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(BROKEN)
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    plain, overflow, spills = json.loads(run.stdout.strip().splitlines()[-1])
    assert isinstance(plain, str) and "SCALE" in plain and "constexpr" in plain, plain
    assert any("shared memory" in v for v in overflow), overflow
    assert any("spills" in v for v in spills), spills


# ---------------------------------------------------------------------------------------------
# The roofline model of benchmarks/kernel_resources.py against independent counts
# ---------------------------------------------------------------------------------------------


def test_cost_model_matches_the_anchors(monkeypatch):
    kr = load_script("kernel_resources", monkeypatch)
    s = kr.Shape()  # 7B head shape, 65,536 tokens, bf16
    fwd = kr.launches(s, kr.Design("fp32 C", 64))["forward"]
    # ~0.33 TFLOP of matmul work in the forward (the performance anchors' floor)
    assert 0.32e12 < sum(f for _, f, _ in fwd) < 0.34e12
    # q, k, v read and h written: 1.61 GB at least, and the chunk-entry states on top
    io = 2 * s.T * s.NH * (s.DK + s.DV) * s.e
    assert sum(b for *_, b in kr.launches(s, kr.Design("fused", 64, fused_forward=True))["forward"]) >= io
    # storing C in bf16 saves two bytes per element of every chunk-entry state, written once, read once
    bf16 = kr.launches(s, kr.Design("bf16 C", 64, c_bytes=2))["forward"]
    saved = sum(b for *_, b in fwd) - sum(b for *_, b in bf16)
    assert saved == 2 * (s.T // 64) * s.NH * s.DK * s.DV * 2
    model = kr.roofline(s, kr.Design("bf16 C", 64, c_bytes=2))
    assert all(r["bound"] == "memory" for r in model["forward"])  # the states dominate: memory-bound
    assert model["forward+backward_ms"] > model["forward_ms"] > sum(b for *_, b in bf16) / kr.PEAK_BYTES * 1e3 - 1e-9


def test_l2_model_reproduces_the_slowdown_with_s(monkeypatch):
    """At B*S = 65,536 the H200 measured the as-built kernels (chunk index fastest) 9 % slower in the
    forward at S 65,536 than at 8,192: between the tiles of a chunk a whole head's chunks run, 8x more
    of them at the longer S, past the L2. The model predicts that direction from the grid order and
    L2 size alone, no slowdown with the tile index fastest, and none with an L2 that holds everything."""
    kr = load_script("kernel_resources", monkeypatch)
    built, tiles = (next(d for d in kr.DESIGNS if d.L == 64 and d.c_bytes == 2 and d.grid_order == o and not d.fused_forward)
                    for o in ("chunks", "tiles"))
    for phase in ("forward_ms", "forward+backward_ms"):
        short, long = (kr.roofline(kr.Shape(S=S), built, kr.H200)[phase] for S in (8192, 65536))
        assert long > 1.05 * short
        measured = kr.H200_MEASURED_MS[65536][phase[:-3]] / kr.H200_MEASURED_MS[8192][phase[:-3]]
        assert measured > 1 and long / short > 1  # the same direction as measured
        flat = [kr.roofline(kr.Shape(S=S), tiles, kr.H200)[phase] for S in (8192, 65536)]
        assert flat[0] == flat[1] == short
    huge = kr.Device("all-L2", kr.H200.flops, kr.H200.bytes_per_s, 1e15)
    assert not any(kr.rereads(kr.Shape(), built, huge).values())
    again = kr.rereads(kr.Shape(), built, kr.H200)
    assert again["output"] == 7 * 2 * 65536 * 8 * 256 * 2  # q and k read by 8 DV tiles (BV 64), 1024 programs apart


def test_cost_model_of_the_intra_chunk_tiling(monkeypatch):
    """chunk128-intra in the byte model (a design of it in DESIGNS): at two sub-blocks 3/4 of chunk
    128's score work (the blocks above the diagonal skipped), the same HBM bytes in each launch's own
    reads, and with 64-wide tiles in place of 32 half as many head-dim tiles of the output and dq, dk
    re-reading a chunk's rows past the L2 in the order "chunks" (none in the order "tiles", as for
    chunk 128 as built)."""
    kr = load_script("kernel_resources", monkeypatch)
    s, dev = kr.Shape(), kr.H200
    built, intra = (kr.Design(v, 128, c_bytes=2, dc_bytes=2, variant=v) for v in ("default", "chunk128-intra"))
    assert any(d.variant == "chunk128-intra" for d in kr.DESIGNS)
    assert {k: kr.computed(128, cfg) for k, cfg in kr.settings(s, intra).items() if k in kr.INTRA_LAUNCHES} == dict.fromkeys(kr.INTRA_LAUNCHES, 0.75)
    assert kr.computed(128, kr.settings(s, built)["scores"]) == 1.0
    score_flops = {"output": 128 * (s.DK + s.DV), "scores": 128 * (s.DK + s.DV), "dqk": 2 * 128 * s.DK, "dv": 128 * s.DV}
    huge = kr.Device("all-L2", dev.flops, dev.bytes_per_s, 1e15)
    for phase in ("forward", "backward"):
        for (k, f_built, b_built), (_, f_intra, b_intra) in zip(*(kr.launches(s, d, huge)[phase] for d in (built, intra))):
            assert f_built - f_intra == 0.25 * 2 * s.T * s.NH * score_flops.get(k, 0), k
            assert b_intra == b_built or k in ("dqk", "gates") and b_intra < b_built, k  # fewer DK tiles' partial sums
    again_built, again_intra = (kr.rereads(s, d, dev) for d in (built, intra))
    assert again_intra["output"] == again_built["output"] * 7 / 15  # 8 DV tiles of 64 in place of 16 of 32
    assert again_intra["dqk"] == again_built["dqk"] * 3 / 7  # 4 DK tiles of 64 in place of 8 of 32
    assert again_intra["dv"] == again_built["dv"]  # 64-wide DV tiles in both
    tiles = kr.Design("tiles", 128, c_bytes=2, dc_bytes=2, grid_order="tiles", variant="chunk128-intra")
    assert not any(kr.rereads(s, tiles, dev).values())
    assert kr.roofline(s, intra, dev)["forward+backward_ms"] < kr.roofline(s, built, dev)["forward+backward_ms"]


def test_cost_model_of_the_split_states_passes(monkeypatch):
    """The split variant in the byte model (a design of it in DESIGNS): each states pass (the
    forward's, its rerun, the backward's) as three launches that do its state products twice, read
    its operands (and per-position vectors) twice and move the segments' float32 states four times; a
    chain of 2 NC / P - 1 + P steps on P times the programs."""
    kr = load_script("kernel_resources", monkeypatch)
    s, dev = kr.Shape(), kr.H200  # batch 1, S 65,536: 1,024 chunks of 64, 16 segments of 64
    built, split = (kr.Design(v, 64, c_bytes=2, dc_bytes=2, variant=v) for v in ("default", "split"))
    assert any(d.variant == "split" for d in kr.DESIGNS)
    seg = s.NH * 16 * s.DK * s.DV * 4
    operands = s.T * s.NH * (s.DK + s.DV) * s.e  # k and v, or q and dh
    by = {d: {k: (f, b) for phase in ("forward", "backward") for k, f, b in kr.launches(s, d, dev)[phase]} for d in (built, split)}
    vec = s.T * s.NH * 4  # a float32 per-position vector
    for single, parts, vectors in (("states", ("states_local", "states_combine", "states_rewalk"), 3),
                                   ("states_bwd", ("states_bwd_local", "states_bwd_combine", "states_bwd_rewalk"), 6)):
        flops, nbytes = (sum(by[split][k][i] for k in parts) for i in (0, 1))
        assert flops == 2 * by[built][single][0]
        assert nbytes == by[built][single][1] + operands + 4 * seg + vectors * vec  # the gate vectors read twice too
    assert [k for k, *_ in kr.launches(s, split, dev)["forward"]] == ["states_local", "states_combine", "states_rewalk", "output"]
    assert kr.chain(s, built) == dict(steps=1024, programs=256)
    assert kr.chain(s, split) == dict(steps=2 * 64 - 1 + 16, programs=16 * 256)
    assert kr.chain(kr.Shape(S=64 * 5), split) == dict(steps=2 * 1 - 1 + 5, programs=5 * 256 * 204)  # capped at 5 chunks
