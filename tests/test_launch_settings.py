"""The chunkwise kernels' launch settings (kernels/launch_settings.py): the grid orders, other tiles
and warps than the defaults against the float64 oracle, the backward with its forward's settings,
the errors for bad settings, and benchmarks/kernels.py's rows of each order.

Without CUDA the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1).
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import load_script  # noqa: E402
from kernel_oracle import DEVICE, check_against_oracle, make_inputs  # noqa: E402

from xlstm7b.kernels import chunkwise_triton_bwd, chunkwise_triton_fwd  # noqa: E402
from xlstm7b.kernels.chunkwise_triton import mlstm_chunkwise_triton  # noqa: E402
from xlstm7b.kernels.launch_settings import GRID_LAUNCHES, grid_meta, launch_config, launch_overrides  # noqa: E402


def test_grid_orders():
    """"tiles" puts the tile index on the grid's first axis, which CUDA runs fastest, and the chunks on
    its second (at most 65,535: a clear error past that); "chunks" the other way round."""
    xs, _ = make_inputs(1, 2, 70, 16, 48)
    with launch_overrides(dv=dict(BV=16, grid_order="tiles")):
        cfg = launch_config(xs[0], xs[2], 16)["dv"]
        grid, meta = grid_meta(cfg, 5, 3, 2)
        assert grid == (3, 5, 2) and meta["TILES_FIRST"] and "grid_order" not in meta
        with pytest.raises(ValueError, match="at most 65,535 chunks.*grid_order 'chunks'"):
            grid_meta(cfg, 65536, 3, 2)
    grid, meta = grid_meta(launch_config(xs[0], xs[2], 16)["dv"], 65536, 3, 2)
    assert grid == (65536, 3, 2) and not meta["TILES_FIRST"]
    assert set(GRID_LAUNCHES) == {"output", "scores", "dqk", "dv"}


OTHER_TILES = dict(
    states=dict(BK=16, BV=32, num_warps=2, num_stages=2), output=dict(RB=16, BK=16, BV=16, num_warps=2),
    scores=dict(RB=16, BK=16, num_stages=1), dqk=dict(BK=16, BV=16), dv=dict(BK=16, BV=16, num_warps=2),
)


def test_launch_overrides_match_the_oracle():
    """Other tiles than launch_config's (head dims that are not multiples of them: masked tails)
    give the same values and gradients; the block's settings apply inside it only."""
    xs, rs = make_inputs(1, 2, 70, 40, 48, init=True, reset=True)
    default = launch_config(xs[0], xs[2], 32)
    with launch_overrides(**OTHER_TILES):
        cfg = launch_config(xs[0], xs[2], 32)
        for kernel, params in OTHER_TILES.items():
            assert {k: cfg[kernel][k] for k in params} == params, kernel
        check_against_oracle(xs, rs, 32)
        with launch_overrides(output=dict(RB=64)):  # nested: added to the outer block's; RB capped at the chunk
            inner = launch_config(xs[0], xs[2], 32)
            assert inner["output"]["RB"] == 32 and inner["states"]["BV"] == 32
    assert launch_config(xs[0], xs[2], 32) == default


def test_the_backward_runs_with_the_forwards_launch_settings(monkeypatch):
    """On CUDA autograd runs the backward on a device thread, outside the caller's launch_overrides
    block: the forward's settings travel with the saved tensors (here: backward after the block)."""
    seen = []
    original = chunkwise_triton_bwd.launch_config
    monkeypatch.setattr(chunkwise_triton_bwd, "launch_config", lambda *args: seen.append(original(*args)) or seen[-1])
    xs, _ = make_inputs(1, 2, 40, 32, 32)
    xs = [x.requires_grad_() for x in xs]
    with launch_overrides(dqk=dict(BK=16)):
        h, _ = mlstm_chunkwise_triton(*xs, chunk_size=16)
    assert launch_config(xs[0], xs[2], 16)["dqk"]["BK"] == 32  # the default, outside the block
    h.sum().backward()
    assert [cfg["dqk"]["BK"] for cfg in seen] == [16]


@pytest.mark.parametrize("kwargs, message", [
    (dict(one_pass=dict(BK=16)), "unknown kernel"),
    (dict(states=dict(RB=16)), "states takes"),
    (dict(fused=dict(BK=32)), "fused takes"),
    (dict(fused=dict(enabled=2)), "not allowed"),
    (dict(dv=dict(BK=24)), "not allowed"),
    (dict(dv=dict(BK=8)), "not allowed"),
    (dict(output=dict(num_warps=3)), "not allowed"),
    (dict(output=dict(num_stages=0)), "not allowed"),
    (dict(output=dict(BV=32.0)), "not allowed"),
    (dict(dqk=dict(grid_order="rows")), "grid_order: one of 'chunks', 'tiles'"),
    (dict(dv=dict(grid_order=1)), "grid_order: one of 'chunks', 'tiles'"),
    (dict(states=dict(grid_order="tiles")), "states takes"),
    (dict(states=dict(local_max=2)), "local_max: 0 or 1"),
    (dict(states=dict(segments=3)), "segments: a power of two 1 to 64"),
    (dict(states=dict(segments=128)), "segments: a power of two 1 to 64"),
    (dict(output=dict(segments=2)), "output takes"),
    (dict(dv=dict(local_max=1)), "dv takes"),
])
def test_launch_overrides_reject_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        with launch_overrides(**kwargs):
            pass


@pytest.mark.parametrize("kwargs, message", [
    (dict(output=dict(LB=24)), "output LB=24 is not allowed \\(tiles: powers of two >= 16"),
    (dict(dqk=dict(LB=8)), "dqk LB=8 is not allowed"),
    (dict(dv=dict(LB=32.0)), "dv LB=32.0 is not allowed"),
    (dict(states=dict(LB=16)), "states takes BK, BV"),
])
def test_intra_chunk_tile_rejected(kwargs, message):
    """LB (the chunk's sub-block, chunkwise_triton_intra.py) is a power of two >= 16, on the launches
    that hold score tiles: else an error naming the choices."""
    with pytest.raises(ValueError, match=message):
        with launch_overrides(**kwargs):
            pass


def test_intra_chunk_tile_capped_at_the_chunk(monkeypatch):
    """A sub-block longer than the chunk (a short sequence runs a shorter chunk: triton_chunk_size)
    is the whole chunk: the untiled kernels run."""
    xs, _ = make_inputs(1, 1, 20, 16, 16)
    with launch_overrides(scores=dict(LB=64), dv=dict(LB=16)):
        cfg = launch_config(xs[0], xs[2], 32)
        assert (cfg["scores"]["LB"], cfg["dv"]["LB"], cfg["dqk"]["LB"]) == (32, 16, 32)
        assert launch_config(xs[0], xs[2], 16)["dv"]["LB"] == 16
    seen = []
    original = chunkwise_triton_bwd.tiled_kernel
    monkeypatch.setattr(chunkwise_triton_bwd, "tiled_kernel", lambda u, i, meta: seen.append(meta["LB"] < meta["L"]) or original(u, i, meta))
    xs = [x.requires_grad_() for x in xs]
    with launch_overrides(scores=dict(LB=64), dqk=dict(LB=64), dv=dict(LB=64)):
        mlstm_chunkwise_triton(*xs, chunk_size=128)[0].sum().backward()  # S 20: chunk 32
    assert seen == [False] * 3


def test_benchmark_dry_run(tmp_path, monkeypatch):
    """The GPU benchmark script parses its arguments and runs end to end on tiny CPU shapes."""
    report = load_script("kernels", monkeypatch).main(["--dry-run", "--profile", "--out", str(tmp_path)])
    assert (tmp_path / "kernels-dry-run.json").exists()
    assert {r["kernel"] for r in report["rows"]} == {"chunkwise", "step", "profile"}
    assert all(r["kernels"] and r["total_us"] > 0 for r in report["rows"] if r["kernel"] == "profile")
    assert all("error" not in r for r in report["rows"])


def test_benchmark_rows_of_the_tiles_order(monkeypatch):
    """benchmarks/kernels.py's "-tiles" rows run every per-chunk launch, forward and backward, with
    the tile index fastest; its plain rows with the default order."""
    kb = load_script("kernels", monkeypatch)
    seen = []
    for module in (chunkwise_triton_fwd, chunkwise_triton_bwd):
        original = module.grid_meta
        monkeypatch.setattr(module, "grid_meta", lambda cfg, *a, f=original: seen.append(cfg["grid_order"]) or f(cfg, *a))
    for order in ("chunks", "tiles"):
        seen.clear()
        x = kb.mlstm_inputs(1, 2, 40, 16, 16, torch.float32, DEVICE, grad=True)
        kb.provider_ours("triton", 16, order)(x)().sum().backward()
        assert seen == [order] * 4  # output; scores, dqk, dv


def test_benchmark_rows_of_the_intra_chunk_variant(monkeypatch):
    """benchmarks/kernels.py's "-chunk128-intra" rows run chunk 128 through the kernels tiled inside the
    chunk, forward and backward, in the row's grid order."""
    kb = load_script("kernels", monkeypatch)
    seen = []
    for module in (chunkwise_triton_fwd, chunkwise_triton_bwd):
        original = module.tiled_kernel
        monkeypatch.setattr(module, "tiled_kernel", lambda untiled, intra, meta, f=original:
                            seen.append((f(untiled, intra, meta)[0].fn.__name__, meta["TILES_FIRST"])) or f(untiled, intra, meta))
    for order in ("chunks", "tiles"):
        seen.clear()
        x = kb.mlstm_inputs(1, 1, 130, 16, 16, torch.float32, DEVICE, grad=True)  # chunk 128 from S 65 on
        kb.provider_ours("triton", 128, order, "chunk128-intra")(x)().sum().backward()
        tiled = ("_output_intra_kernel", "_scores_intra_kernel", "_dqk_intra_kernel", "_dv_intra_kernel")
        assert seen == [(name, order == "tiles") for name in tiled]


def test_benchmark_row_of_the_split_states_pass(monkeypatch):
    """benchmarks/kernels.py's "-split" row runs the states pass split over segments, in the forward
    and in the backward's rerun (16 segments asked, capped at the 3 chunks here)."""
    kb = load_script("kernels", monkeypatch)
    seen = []
    original = chunkwise_triton_fwd.split_chunk_states
    monkeypatch.setattr(chunkwise_triton_fwd, "split_chunk_states", lambda *a, **kw: seen.append(kw["P"]) or original(*a, **kw))
    x = kb.mlstm_inputs(1, 2, 40, 16, 16, torch.float32, DEVICE, grad=True)
    kb.provider_ours("triton", 16, variant="split")(x)().sum().backward()
    assert seen == [3, 3]
    kb.provider_ours("triton", 16)(x)().sum().backward()
    assert seen == [3, 3]  # the default row: the single pass
