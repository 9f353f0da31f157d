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
