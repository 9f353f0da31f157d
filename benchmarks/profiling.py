"""Where a benchmark's time goes on the device: the shared profiler helper of the benchmark scripts."""

import time

import torch
from torch.profiler import ProfilerActivity, profile


def profile_kernels(run, device: str, top: int = 12) -> dict:
    """One call of run() after one outside the measurements (compilation, caches): its wall time
    (wall_us, unprofiled), and under torch.profiler the device time per kernel (on CPU, CPU time per
    aten op): total_us, launches (kernel launches or op calls) and the `top` kernels by time, each
    with its name, us and calls. wall_us well above total_us means the device waited for launches."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run()
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    wall_us = (time.perf_counter() - t0) * 1e6
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
        sync()
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = sorted(((a.key, getattr(a, field), a.count) for a in prof.key_averages() if getattr(a, field) > 0),
                     key=lambda t: -t[1])
    return dict(wall_us=wall_us, total_us=sum(t for _, t, _ in kernels), launches=sum(c for _, _, c in kernels),
                kernels=[dict(name=n[:80], us=t, calls=c) for n, t, c in kernels[:top]])


# Kernel (CUDA) or op (CPU) name fragments, lower case, by category; the first match wins.
CATEGORIES = {
    # the kernels of kernels/ are named _*_fwd_kernel, _*_bwd_kernel, _step*_kernel (Inductor's are triton_*)
    "mlstm": ("mlstm", "_fwd_kernel", "_bwd_kernel", "_step_kernel", "_step_nm_kernel"),
    "optimizer": ("adam", "_foreach_", "multi_tensor_apply"),
    "matmul": ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
               "aten::_scaled_mm"),
    "memory": ("memcpy", "memset", "nccl", "aten::copy_", "aten::_to_copy"),
}


def category(name: str) -> str:
    """'mlstm', 'optimizer', 'matmul', 'memory' (copies, transfers, collectives) or 'elementwise'
    (everything else: pointwise, reductions, norms, softmax, Inductor's fused kernels)."""
    low = name.lower()
    return next((c for c, parts in CATEGORIES.items() if any(p in low for p in parts)), "elementwise")


def step_breakdown(run, device: str, steps: int = 2) -> list[dict]:
    """Each of `steps` calls of run() (after a warm-up call) under torch.profiler, as one dict per
    call: wall_us, the device time per category (`category`) in us, and idle_us, the part of the
    wall time when no kernel ran (on CUDA the union of kernel intervals on every stream; on CPU the
    wall time less the ops' self time: Python and launch overhead)."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run()
    sync()
    rows = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run()
            sync()
            wall_us = (time.perf_counter() - t0) * 1e6
        times = dict.fromkeys((*CATEGORIES, "elementwise"), 0.0)
        if cuda:
            spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                           if e.device_type == torch.autograd.DeviceType.CUDA)
            busy, reach = 0.0, float("-inf")
            for start, end, name in spans:
                times[category(name)] += end - start
                busy += max(0.0, end - max(start, reach))
                reach = max(reach, end)
        else:
            for a in prof.key_averages():
                times[category(a.key)] += a.self_cpu_time_total
            busy = sum(times.values())
        rows.append({"wall_us": wall_us, **{f"{k}_us": v for k, v in times.items()}, "idle_us": max(0.0, wall_us - busy)})
    return rows
