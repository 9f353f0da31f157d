"""The Triton decoding step kernel against its PyTorch twin: in place over several steps, with a
bfloat16 state, the states it refuses, the dispatch, and (GPU) captured in a CUDA graph; each in
both forms, two launches (the default) and one (launch_overrides(step=dict(one_launch=1))).

Without CUDA the kernel runs in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from conftest import load_script, rel_err  # noqa: E402

from xlstm7b.kernels import mlstm_step, mlstm_step_, mlstm_step_torch, mlstm_step_torch_  # noqa: E402
from xlstm7b.kernels.launch_settings import launch_overrides, step_one_launch  # noqa: E402
from xlstm7b.kernels import step_triton  # noqa: E402
from xlstm7b.kernels.step_triton import arrivals, mlstm_step_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# B, NH, DK, DV; the last spreads a head over three DV tiles (BV = 8192 // 128 = 64)
STEP_CASES = [(1, 2, 16, 16), (3, 2, 32, 64), (2, 1, 24, 40), (1, 2, 128, 160)]


@pytest.fixture(params=[0, 1], ids=["two-launch", "one-launch"])
def one_launch(request):
    """Runs the test in both forms of the step."""
    with launch_overrides(step=dict(one_launch=request.param)):
        yield request.param


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "B{}-NH{}-DK{}-DV{}".format(*c))
def test_step_matches_torch_in_place(case, one_launch):
    B, NH, DK, DV = case
    g = torch.Generator().manual_seed(0)
    state = (torch.randn(B, NH, DK, DV, generator=g), torch.randn(B, NH, DK, generator=g), torch.randn(B, NH, 1, generator=g))
    state = tuple(t.to(DEVICE) for t in state)
    live = tuple(t.clone() for t in state)
    ptrs = [t.data_ptr() for t in live]
    h_out = torch.empty(B, NH, DV, device=DEVICE)
    for step in range(3):  # carried over several steps; the last at the gate limits
        q, k = (torch.randn(B, NH, DK, generator=g).to(DEVICE) for _ in range(2))
        v = torch.randn(B, NH, DV, generator=g).to(DEVICE)
        i, f = (torch.randn(B, NH, generator=g).to(DEVICE) * 5 for _ in range(2))
        if step == 2:
            i, f = torch.full_like(i, 15.0), torch.where(f > 0, 15.0, -15.0)
        h_ref, state = mlstm_step_torch(q, k, v, i, f, state)
        h, new = mlstm_step_triton(q, k, v, i, f, live, h_out=h_out)
        assert h is h_out and all(a is b for a, b in zip(new, live))
        assert [t.data_ptr() for t in live] == ptrs
        assert rel_err(h, h_ref) < 1e-5
        for a, b in zip(live, state):
            assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("case", STEP_CASES[1:3], ids=lambda c: "B{}-NH{}-DK{}-DV{}".format(*c))
def test_step_bfloat16_state(case, one_launch):
    """C and n stored in bfloat16 (m float32): the kernel updates and reads out in float32 and rounds
    the state once per step; the in-place PyTorch step rounds the same state but reads out in bfloat16
    (a coarser h). Both stay within bfloat16 rounding of the float32 step (h: amplified where |n·q| is small)."""
    B, NH, DK, DV = case
    g = torch.Generator().manual_seed(1)
    ref = (torch.randn(B, NH, DK, DV, generator=g), torch.randn(B, NH, DK, generator=g), torch.randn(B, NH, 1, generator=g))
    ref = tuple(t.to(DEVICE) for t in ref)
    live = (ref[0].bfloat16(), ref[1].bfloat16(), ref[2].clone())
    twin = tuple(t.clone() for t in live)
    for _ in range(3):
        q, k = (torch.randn(B, NH, DK, generator=g).to(DEVICE) for _ in range(2))
        v = torch.randn(B, NH, DV, generator=g).to(DEVICE)
        i, f = (torch.randn(B, NH, generator=g).to(DEVICE) * 5 for _ in range(2))
        h_ref, ref = mlstm_step_torch(q, k, v, i, f, ref)
        h, _ = mlstm_step_triton(q, k, v, i, f, live)
        h_twin = mlstm_step_torch_(q, k, v, i, f, twin)
        assert [t.dtype for t in live] == [torch.bfloat16, torch.bfloat16, torch.float32]
        assert h.dtype == torch.float32 and rel_err(h, h_ref) < 3e-2 and rel_err(h_twin, h_ref) < 3e-2
        for a, b, c in zip(live, twin, ref):
            assert rel_err(a, c) < 1e-2 and rel_err(a, b) < 1e-2


def test_step_rejects_a_state_it_cannot_update():
    q, k = torch.randn(1, 2, 16, device=DEVICE), torch.randn(1, 2, 16, device=DEVICE)
    v, i, f = torch.randn(1, 2, 16, device=DEVICE), torch.randn(1, 2, device=DEVICE), torch.randn(1, 2, device=DEVICE)
    C, n, m = torch.zeros(1, 2, 16, 16, device=DEVICE), torch.zeros(1, 2, 16, device=DEVICE), torch.zeros(1, 2, 1, device=DEVICE)
    for bad in ((C.half(), n.half(), m), (C.bfloat16(), n, m), (C, n, m.bfloat16()), (C.transpose(-1, -2), n, m)):
        with pytest.raises(ValueError, match="mlstm_step"):
            mlstm_step_triton(q, k, v, i, f, bad)


def test_step_dispatch_keeps_state_unless_in_place():
    B, NH, DK, DV = 2, 1, 16, 16
    g = torch.Generator().manual_seed(0)
    q, k, v, i, f = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((B, NH, DK),) * 2 + ((B, NH, DV),) + ((B, NH),) * 2)
    state = tuple(torch.randn(*shape, generator=g).to(DEVICE) for shape in ((B, NH, DK, DV), (B, NH, DK), (B, NH, 1)))
    before = tuple(t.clone() for t in state)
    h_t, s_t = mlstm_step(q, k, v, i, f, state, backend="triton")
    h_c, s_c = mlstm_step(q, k, v, i, f, state, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    assert rel_err(h_t, h_c) < 1e-5 and all(rel_err(a, b) < 1e-5 for a, b in zip(s_t, s_c))
    h_i = mlstm_step_(q, k, v, i, f, state, backend="triton")
    assert rel_err(h_i, h_c) < 1e-5 and all(rel_err(a, b) < 1e-5 for a, b in zip(state, s_c))


def test_n_and_m_are_written_after_every_tile_has_read_them(one_launch):
    """A head over three DV tiles, by slot index, with inactive rows sharing a scratch slot: the
    second launch, or the last tile to arrive on the head's counter, writes its n and m. In one
    launch the scratch slot's tiles count twice; every counter is back at zero after the step."""
    B, NH, DK, DV = 3, 2, 128, 160
    g = torch.Generator().manual_seed(5)
    state = tuple(torch.randn(*s, generator=g).to(DEVICE) for s in ((4, NH, DK, DV), (4, NH, DK), (4, NH, 1)))
    slots = torch.tensor([2, 0, 0], device=DEVICE)
    q, k = (torch.randn(B, NH, DK, generator=g).to(DEVICE) for _ in range(2))
    v = torch.randn(B, NH, DV, generator=g).to(DEVICE)
    i, f = (torch.randn(B, NH, generator=g).to(DEVICE) * 5 for _ in range(2))
    i[1:], f[1:] = float("-inf"), float("inf")
    h_ref, ref = mlstm_step_torch(q[:1], k[:1], v[:1], i[:1], f[:1], tuple(t[2:3] for t in state))
    before = tuple(t.clone() for t in state)
    h, _ = mlstm_step_triton(q, k, v, i, f, state, slots=slots)
    assert rel_err(h[:1], h_ref) < 1e-5 and all(rel_err(a[2:3], b) < 1e-5 for a, b in zip(state, ref))
    assert all(torch.equal(a[[0, 1, 3]], b[[0, 1, 3]]) for a, b in zip(state, before))
    if one_launch:
        assert not arrivals(state[0].device, 4 * NH)[: 4 * NH].any()


RECORD_STEP = """
import json, torch
from triton.backends.compiler import GPUTarget
from xlstm7b.kernels.aot import record_launches
from xlstm7b.kernels.launch_settings import launch_overrides
from xlstm7b.kernels.step_triton import mlstm_step_triton
q, k, v = (torch.empty(1, 8, d, dtype=torch.bfloat16, device="meta") for d in (256, 256, 512))
i, f = (torch.empty(1, 8, device="meta") for _ in range(2))
counts = []
for slots in (None, torch.empty(1, dtype=torch.int64, device="meta")):
    state = (torch.empty(1, 8, 256, 512, device="meta"), torch.empty(1, 8, 256, device="meta"), torch.empty(1, 8, 1, device="meta"))
    with record_launches(GPUTarget("cuda", 90, 32)) as launches, launch_overrides(step=dict(one_launch=ONE_LAUNCH)):
        mlstm_step_triton(q, k, v, i, f, state, slots=slots)
    counts.append([(x.name, x.grid) for x in launches])
print(json.dumps(counts))
"""


def test_launches_of_a_step():
    """At the 7B's heads, with and without slots, as a GPU would see it (recorded on meta tensors in
    a process without the interpreter): 8 heads x 16 DV tiles, then by default the n and m launch."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    for one_launch, want in ((0, [["_step_kernel", [8, 16]], ["_step_nm_kernel", [8]]]), (1, [["_step_kernel", [8, 16]]])):
        script = f"ONE_LAUNCH = {one_launch}\n{RECORD_STEP}"
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        assert json.loads(run.stdout.splitlines()[-1]) == [want] * 2, one_launch


def test_the_step_switch():
    """Off by default; a bad value or name is refused with the allowed ones; under torch.compile the
    switch is a constant of the trace (no graph break in a fullgraph compile)."""
    assert not step_one_launch()
    with launch_overrides(step=dict(one_launch=1)):
        assert step_one_launch()
        with launch_overrides(states=dict(BV=32)):
            assert step_one_launch()
    for bad, match in ((dict(one_launch=2), "one_launch=2 is not allowed"), (dict(one_launch=True), "not allowed"),
                       (dict(BV=32), "step takes one_launch")):
        with pytest.raises(ValueError, match=match):
            with launch_overrides(step=bad):
                pass

    def pick(x):
        return x * 2 if step_one_launch() else x + 1

    with launch_overrides(step=dict(one_launch=1)):
        assert torch.compile(pick, fullgraph=True, backend="eager")(torch.full((2,), 3.0)).tolist() == [6.0, 6.0]


def test_the_benchmark_measures_both_forms(monkeypatch):
    """benchmarks/kernels.py's step rows: one per form and batch, each measured under its setting."""
    kb = load_script("kernels", monkeypatch)
    step, seen = kb.mlstm_step_, []

    def spy(*args, **kwargs):
        seen.append(step_one_launch())
        return step(*args, **kwargs)

    monkeypatch.setattr(kb, "mlstm_step_", spy)
    rows = []
    kb.bench_step(SimpleNamespace(step_shape=(1, 16, 32), step_batches=[1], dry_run=False, reps=25), DEVICE, rows.append)
    assert [r["provider"] for r in rows] == list(kb.STEP_FORMS) == ["xlstm7b-triton", "xlstm7b-triton-one-launch"]
    assert seen == sorted(seen) and set(seen) == {False, True}


@pytest.mark.gpu
def test_step_at_the_7b_head_shape_over_many_tiles(one_launch):
    """Batch 1 at the 7B's heads (16 DV tiles a head, all resident at once): a race between a
    head's tiles and its n and m writes would drift from the reference within a few steps."""
    NH, DK, DV = 8, 256, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    state = (torch.zeros(1, NH, DK, DV, device="cuda"), torch.zeros(1, NH, DK, device="cuda"), torch.zeros(1, NH, 1, device="cuda"))
    ref = tuple(t.clone() for t in state)
    for _ in range(50):
        q, k, v = (torch.randn(1, NH, d, device="cuda", generator=g) for d in (DK, DK, DV))
        i, f = (torch.randn(1, NH, device="cuda", generator=g) * 3 for _ in range(2))
        h, _ = mlstm_step_triton(q, k, v, i, f, state)
        h_ref, ref = mlstm_step_torch(q, k, v, i, f, ref)
        assert rel_err(h, h_ref) < 1e-4
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(state, ref))
    if one_launch:
        assert not arrivals(state[0].device, NH)[:NH].any()


@pytest.mark.gpu
def test_step_cuda_graph(one_launch):
    B, NH, DK, DV = 4, 8, 256, 512
    state = tuple(t.cuda() for t in (torch.zeros(B, NH, DK, DV), torch.zeros(B, NH, DK), torch.zeros(B, NH, 1)))
    ref = tuple(t.clone() for t in state)
    q, k = torch.randn(B, NH, DK, device="cuda"), torch.randn(B, NH, DK, device="cuda")
    v, i, f = torch.randn(B, NH, DV, device="cuda"), torch.randn(B, NH, device="cuda"), torch.randn(B, NH, device="cuda")
    h = torch.empty(B, NH, DV, device="cuda")
    mlstm_step_triton(q, k, v, i, f, tuple(t.clone() for t in state), h_out=h)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mlstm_step_triton(q, k, v, i, f, state, h_out=h)
    for _ in range(3):
        graph.replay()
        h_ref, ref = mlstm_step_torch(q, k, v, i, f, ref)
    torch.cuda.synchronize()
    assert rel_err(h, h_ref) < 1e-4 and rel_err(state[0], ref[0]) < 1e-4


def test_larger_arrival_counters_keep_the_earlier_ones_alive():
    """A CUDA graph captured with the counters of a small state replays their address: growing them
    for a larger state must not free the earlier tensor (its memory could be reused under the graph)."""
    device = torch.device("meta")
    small = arrivals(device, 4)
    large = arrivals(device, 64)
    assert large.numel() == 64 and arrivals(device, 8) is large
    assert any(t is small for t in step_triton._ARRIVALS[device])
