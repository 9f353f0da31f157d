"""The GPU run's bookkeeping for benchmarks/gpu.sh: the tests' JSON, and the one-screen summary.

    python benchmarks/gpu_summary.py junit JUNIT_XML OUT_JSON      # pytest's JUnit XML -> tests.json
    python benchmarks/gpu_summary.py report OUTPUT_DIR STAGES_TSV  # summary table, printed last

`report` stamps every JSON file in OUTPUT_DIR with the same `gpu_run` block (device, driver, torch,
triton, python, date: the benchmarks each record a different subset), checks the limits on what a
run may bring back (at most 8 files of at most 16 MiB), and prints the stages, the measurements side
by side with the peers, and which of the targets (issues 11, 13, 21 and 22) were met, missed or not
measured. A second call's folder (`gpu.sh --second`) gets its own summary: the first call's targets
read "not measured" there.
STAGES_TSV has one line per stage: name, budget (s), seconds used, exit status (or "skipped").
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MAX_FILES, MAX_BYTES = 8, 16 * 2**20
TIMEOUT_EXITS = (124, 137)  # `timeout` cut the stage at its budget (137: killed after the grace time)
TARGETS = {  # issues 11, 13, 21 and 22's targets: name -> (threshold, unit); ratios are measured in the same run
    "kernel forward >= 1.3x TFLA": (1.3, "x"),
    "kernel forward+backward >= 1.3x TFLA": (1.3, "x"),
    "kernel forward >= 2x TFLA": (2.0, "x"),
    "kernel forward+backward >= 2x TFLA": (2.0, "x"),
    "kernel forward >= 1.0x chunk_simple_gla": (1.0, "x"),
    "kernel forward+backward >= 1.0x chunk_simple_gla": (1.0, "x"),
    "kernel forward within 1.5x of the byte model": (1.5, "x"),
    "kernel forward+backward within 1.5x of the byte model": (1.5, "x"),
    "decode batch 1 >= 85 % of the weight-read floor": (85, " %"),
    "decode batch 1 >= 1.3x official compiled + graphed": (1.3, "x"),
    "decode batch 256 >= 14k tok/s, bfloat16 state": (14000, " tok/s"),
    "decode batch 256 >= 2x official": (2.0, "x"),
    "prefill, longest prompt, >= 1.15x official": (1.15, "x"),
    "serve 64 concurrent >= 4x one by one": (4.0, "x"),
    "serve 512 concurrent >= 15k tok/s": (15000, " tok/s"),
    "speculative predicted >= 1.5x at acceptance 0.8": (1.5, "x"),
    "int4 batch 1 >= 2x bf16": (2.0, "x"),
    "1.3B training MFU >= 50 %": (50, " %"),
}
AT_MOST = {name for name in TARGETS if " within " in name}
"""The targets met at or below their threshold (the measured time over the model's), not above."""


def environment() -> dict:
    import torch

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, python=platform.python_version(), triton=None, driver=None)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20)
            env["driver"] = done.stdout.strip().splitlines()[0] if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    else:
        env["device"] = f"cpu ({platform.machine()})"
    return env


# ---------------------------------------------------------------------------------------------
# junit: pytest's XML report as JSON
# ---------------------------------------------------------------------------------------------


def junit_to_json(xml_path: Path, out: Path) -> dict:
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failures.append(dict(test=test, kind=outcome.tag, message=(outcome.get("message") or "")[:500]))
    result = dict(gpu_run=environment(), **counts, failures=failures)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def load(out_dir: Path, pattern: str, exclude: str = "\0") -> dict | None:
    """The newest JSON file in out_dir matching pattern (and not containing `exclude`), or None."""
    files = sorted((p for p in out_dir.glob(pattern) if exclude not in p.name), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def stamp(out_dir: Path, env: dict) -> None:
    for path in sorted(out_dir.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "gpu_run" not in data:
            path.write_text(json.dumps({"gpu_run": env, **data}, indent=1) + "\n")


def limit_problems(out_dir: Path) -> list[str]:
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    found = [f"{len(files)} files in {out_dir} (at most {MAX_FILES} come back)"] if len(files) > MAX_FILES else []
    found += [f"{p.name}: {p.stat().st_size / 2**20:.1f} MiB (at most 16 MiB)" for p in files if p.stat().st_size > MAX_BYTES]
    return found


def stage_lines(stages_tsv: Path) -> list[str]:
    lines = [f"{'stage':<14} {'budget s':>8} {'used s':>7}  result"]
    for line in stages_tsv.read_text().splitlines():
        name, budget, used, status = line.split("\t")
        if status == "skipped":
            result = "skipped: no time left"
        elif int(status) == 0:
            result = "ok"
        elif int(status) in TIMEOUT_EXITS:
            result = "cut at its budget (partial or no JSON)"
        else:
            result = f"failed, exit {status} (see gpu.log)"
        lines.append(f"{name:<14} {budget:>8} {used:>7}  {result}")
    return lines


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def kernel_lines(rep: dict, targets: dict) -> list[str]:
    rows = [r for r in rep["rows"] if r["kernel"] == "chunkwise"]
    lines = []
    if rows:
        NH, DK, DV = rows[0]["NH"], rows[0]["DK"], rows[0]["DV"]
        rows = [r for r in rows if (r["NH"], r["DK"], r["DV"]) == (NH, DK, DV)]
        lines.append(f"chunkwise, NH {NH} DK {DK} DV {DV}, {rows[0]['dtype']}, B*S = {rep['tokens']:,}: "
                     "ms (forward / forward+backward), peak MiB")
        by = {(r["provider"], r["S"]): r for r in rows}
        seq_lens = sorted({r["S"] for r in rows})
        names = list(dict.fromkeys(r["provider"] for r in rows))
        width = max(map(len, names + ["provider"]))
        lines.append(f"  {'provider':<{width}}" + "".join(f"{'S ' + str(S):>28}" for S in seq_lens))
        for name in names:
            cells = []
            for S in seq_lens:
                r = by.get((name, S), {})
                cell = "error" if "error" in r else f"{fmt(r.get('fwd_ms'))} / {fmt(r.get('fwdbwd_ms'))}, {fmt(r.get('fwdbwd_peak_mib'), '.0f')}"
                cells.append(f"{cell:>28}")
            lines.append(f"  {name:<{width}}" + "".join(cells))
        model = byte_model(rep, NH, DK, DV, seq_lens)
        lines += model["lines"]
        # the peers against the fastest of our variants at each length (the candidate default)
        ours = [name for name in names if name.startswith("xlstm7b-triton")]
        for phase, label in (("fwd_ms", "forward"), ("fwdbwd_ms", "forward+backward")):
            best = {S: min(((by[(name, S)][phase], name) for name in ours if by.get((name, S), {}).get(phase)), default=(None, None))
                    for S in seq_lens}
            lines.append(f"  fastest of ours, {label}: " + ", ".join(f"S {S} {name} ({fmt(ms)} ms)" for S, (ms, name) in best.items()))
            for peer, keys in (("tfla-exp-chunk128", ("1.3x TFLA", "2x TFLA")), ("fla-simple-gla", ("1.0x chunk_simple_gla",))):
                got = [ratio(by.get((peer, S), {}).get(phase), best[S][0]) for S in seq_lens]
                for key in keys:
                    targets[f"kernel {label} >= {key}"] = None if None in got else min(got)  # every length
            got = [ratio(by.get(("xlstm7b-triton", S), {}).get(phase), model["ms"].get((S, label))) for S in seq_lens]
            targets[f"kernel {label} within 1.5x of the byte model"] = None if None in got else max(got)
    for r in rep["rows"]:
        if r["kernel"] == "step":
            lines.append(f"step kernel ({r['provider']}) batch {r['B']}: {r['ms'] * 1e3:.1f} us, {r['gb_per_s']:.0f} GB/s")
        if r["kernel"] == "profile":
            top = ", ".join(f"{k['name']} {k['us'] / 1e3:.2f}" for k in r["kernels"][:4])
            lines.append(f"profile of ours, {r['phase']}, S {r['S']}: {r['total_us'] / 1e3:.2f} ms in all; {top} ms")
    if rep.get("interrupted"):
        lines.append("(interrupted: the rows above are those measured before the cut)")
    return lines


def byte_model(rep: dict, NH: int, DK: int, DV: int, seq_lens: list[int]) -> dict:
    """Our kernels' time as benchmarks/kernel_resources.py's L2-aware byte model predicts it for the
    card measured (an H200's bandwidth on an H200, an H100 SXM's otherwise), as built at the chunk
    measured, per S: {"ms": {(S, "forward" | "forward+backward"): ms}, "lines": [summary line]}."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import kernel_resources as kr
    except ImportError as e:
        return dict(ms={}, lines=[f"  byte model: not available ({e})"])
    L = rep["chunk_size"]
    built = next((d for d in kr.DESIGNS if d.name.startswith("as built") and d.L == L and not d.fused_forward), None)
    if built is None:
        return dict(ms={}, lines=[f"  byte model: kernel_resources.py has no as-built design for chunk {L}"])
    dev = kr.H200 if "H200" in rep.get("environment", {}).get("device", "") else kr.H100
    ms, cells = {}, []
    for S in seq_lens:
        model = kr.roofline(kr.Shape(T=rep["tokens"], NH=NH, DK=DK, DV=DV, S=min(S, rep["tokens"])), built, dev)
        ms[S, "forward"], ms[S, "forward+backward"] = model["forward_ms"], model["forward+backward_ms"]
        cells.append(f"S {S}: {model['forward_ms']:.2f} / {model['forward+backward_ms']:.2f}")
    return dict(ms=ms, lines=[f"  byte model of ours, chunk {L} ({dev.name}), ms: {'; '.join(cells)}; TFLA published (H100): "
                              f"{kr.TFLA_MS['forward']} / {kr.TFLA_MS['forward+backward']}"])


OURS_BEST_FIRST = ("compiled", "ours", "eager")  # generate's default on CUDA first


def generate_lines(rep: dict, targets: dict) -> list[str]:
    rows = [r for r in rep["rows"] if "error" not in r]

    def get(impl, metric, key, value, field="tok_per_s", state_dtype=None):
        return next((r.get(field) for r in rows if r["impl"] == impl and r["metric"] == metric and r.get(key) == value
                     and (state_dtype is None or r.get("state_dtype") == state_dtype)), None)

    diff = rep.get("logits_rel_diff")
    lines = [f"generate, {rep['preset']} preset, {rep['dtype']}, greedy tokens equal the official's: {rep['same_greedy_tokens']}"
             + ("" if diff is None else f", last logits {diff:.1e} apart")]
    decode = {}  # (batch, state dtype) -> {impl: row}
    for r in (r for r in rows if r["metric"] == "decode"):
        decode.setdefault((r["batch"], r.get("state_dtype", "float32")), {})[r["impl"]] = r
    for (B, sd), got in sorted(decode.items()):
        cells = ", ".join(f"{impl} {r['tok_per_s']:,.1f}" for impl, r in got.items())
        ours = next((got[i] for i in OURS_BEST_FIRST if i in got), None)
        theirs = got.get("official-compiled") or got.get("official")
        vs = "" if not (ours and theirs) else f"; {ours['impl']} / {theirs['impl']} {ratio(ours['tok_per_s'], theirs['tok_per_s']):.2f}x"
        floor = "" if not ours or "floor_fraction" not in ours else (
            f"; {ours['ms_per_token']:.2f} ms per token, {100 * ours['floor_fraction']:.0f} % of the weight-read floor "
            f"({ours['weight_floor_ms']:.2f} ms)")
        lines.append(f"  decode batch {B:>3}, {sd} state (tok/s): {cells}{vs}{floor}")
        if B == 1 and sd == rep.get("state_dtypes", ["float32"])[0] and ours:
            targets["decode batch 1 >= 85 % of the weight-read floor"] = ours.get("floor_fraction") and 100 * ours["floor_fraction"]
            targets["decode batch 1 >= 1.3x official compiled + graphed"] = ratio(ours["tok_per_s"], got.get("official-compiled", {}).get("tok_per_s"))
        if B == 256 and ours:
            if sd == "bfloat16":
                targets["decode batch 256 >= 14k tok/s, bfloat16 state"] = ours["tok_per_s"]
            if theirs:  # the best of the state dtypes, each against the official's with the same
                targets["decode batch 256 >= 2x official"] = max(ratio(ours["tok_per_s"], theirs["tok_per_s"]) or 0,
                                                                 targets.get("decode batch 256 >= 2x official") or 0)
    for r in (r for r in rep["rows"] if r["metric"] == "compile"):
        lines.append(f"  compiled step, batch {r['batch']}: first call {r['seconds']:.1f} s longer, compilation "
                     f"{fmt(r.get('compile_seconds'), '.1f')} s, {r.get('fx_cache_hits')} graphs from inductor's cache"
                     + (f"; FAILED: {r['error'][:80]}" if r.get("error") else ""))
    counts = [r for r in rows if r["metric"] == "kernels_per_token"]
    if counts:
        lines.append("  kernels per token, batch 1: " + ", ".join(f"{r['impl']} {r['kernels']}" for r in counts))
    for S in sorted({r["prompt_tokens"] for r in rows if r["metric"] == "prefill"}):
        ours, theirs = get("ours", "prefill", "prompt_tokens", S), get("official", "prefill", "prompt_tokens", S)
        ttft, their_ttft = (get(impl, "prefill", "prompt_tokens", S, "ttft_s") for impl in ("ours", "official"))
        lines.append(f"  prefill {S:>6}: ours {fmt(ours, ',.0f')} tok/s (TTFT {fmt(ttft and ttft * 1e3, '.0f')} ms), "
                     f"official {fmt(theirs, ',.0f')} (TTFT {fmt(their_ttft and their_ttft * 1e3, '.0f')} ms): "
                     f"{fmt(ratio(ours, theirs))}x")
    for n in sorted({r["new_tokens"] for r in rows if r["metric"] == "memory"}):
        ours, theirs = get("ours", "memory", "new_tokens", n, "peak_mib"), get("official", "memory", "new_tokens", n, "peak_mib")
        lines.append(f"  peak memory generating {n} tokens: ours {fmt(ours, ',.0f')} MiB, official {fmt(theirs, ',.0f')} MiB")
    for r in (r for r in rep["rows"] if r["metric"] == "profile"):
        got = (r["error"][:80] if "error" in r else
               f"wall {r['wall_us'] / 1e3:.2f} ms, device {r['total_us'] / 1e3:.2f} ms in {r['launches']} launches")
        lines.append(f"  profile {r['impl']}, {r['what']}: {got}")
    lines += [f"  {r['impl']} {r['metric']}: {r['error'][:100]}" for r in rep["rows"] if "error" in r and r["metric"] != "profile"]
    prompts = [r["prompt_tokens"] for r in rows if r["metric"] == "prefill"]
    if prompts:
        S = max(prompts)
        targets["prefill, longest prompt, >= 1.15x official"] = ratio(get("ours", "prefill", "prompt_tokens", S), get("official", "prefill", "prompt_tokens", S))
    return lines


def quantize_lines(rep: dict, targets: dict) -> list[str]:
    lines = [f"quantised decoding, {rep['preset']} preset, batch 1:"]
    for r in rep["rows"]:
        if "error" in r:
            lines.append(f"  {r['impl']}: {r['error'][:100]}")
        elif "speedup" in r:
            lines.append(f"  {r['impl']}: {r['tok_per_s']:,.1f} tok/s ({r['speedup']:.2f}x), logits {r['logits_rel_err']:.1e} "
                         f"from the unquantised model's, {100 * r['same_greedy_tokens']:.0f} % of its greedy tokens")
            if r["impl"] == "int4":
                targets["int4 batch 1 >= 2x bf16"] = r["speedup"]
        else:
            lines.append(f"  {r['impl']} (unquantised): {r['tok_per_s']:,.1f} tok/s")
    return lines


def train_lines(rep: dict, targets: dict) -> list[str]:
    lines = []
    for r in rep["throughput"]:
        mfu = None if r["mfu"] is None else r["mfu"] * 100
        compiled = ", compiled" if r.get("compile") else ""
        lines.append(f"train {r['preset']}{compiled}, {r['dtype']}, {r['micro_batch']} x {r['seq_len']} tokens per step: "
                     f"{r['tokens_per_s']:,.0f} tokens/s, MFU {fmt(mfu, '.1f')} %, peak {fmt(r['peak_memory_gb'], '.1f')} GiB")
        if "profile" in r:
            prof = r["profile"]
            lines.append(f"  profile of a step: wall {prof['wall_us'] / 1e3:.1f} ms, device {prof['total_us'] / 1e3:.1f} ms "
                         f"in {prof['launches']} launches")
        if r["preset"] == "1.3b" and mfu is not None:  # the best of the rows (eager, compiled)
            targets["1.3B training MFU >= 50 %"] = max(mfu, targets.get("1.3B training MFU >= 50 %") or 0)
    return lines


def serve_lines(rep: dict, targets: dict) -> list[str]:
    base = next(r for r in rep["rows"] if r["impl"] != "engine")
    mix = rep.get("mix", "prefill")
    lines = [f"serve engine, {rep['model_name']}, {mix}-heavy mix, {rep['state_dtype']} state; generate one by one: "
             f"{base['tok_per_s']:,.0f} tok/s"]
    for r in sorted((r for r in rep["rows"] if r["impl"] == "engine"), key=lambda r: r["concurrency"]):
        if "error" in r:
            lines.append(f"  {r['concurrency']:>4} concurrent: {r['error']}")
            continue
        lines.append(f"  {r['concurrency']:>4} concurrent: {r['tok_per_s']:,.0f} tok/s ({ratio(r['tok_per_s'], base['tok_per_s']):.1f}x), "
                     f"TTFT p50 / p99 {r['ttft_p50_s'] * 1e3:,.0f} / {r['ttft_p99_s'] * 1e3:,.0f} ms")
        if r["concurrency"] == 64:
            targets["serve 64 concurrent >= 4x one by one"] = ratio(r["tok_per_s"], base["tok_per_s"])
        if r["concurrency"] == 512 and (mix == "decode" or "serve 512 concurrent >= 15k tok/s" not in targets):
            targets["serve 512 concurrent >= 15k tok/s"] = r["tok_per_s"]  # on the decode-heavy mix where measured
    return lines


def speculative_lines(rep: dict, targets: dict) -> list[str]:
    rows = [r for r in rep["rows"] if r["kind"] == "cost_model"]
    cells = ", ".join(f"K {r['K']}: {r['predicted_speedup']['0.6']:.2f}x / {r['predicted_speedup']['0.8']:.2f}x" for r in rows)
    graphs = " (steps and verify from CUDA graphs)" if any(r.get("graphs") for r in rows) else ""
    if rows:
        targets["speculative predicted >= 1.5x at acceptance 0.8"] = max(r["predicted_speedup"]["0.8"] for r in rows)
    return [f"speculative cost model{graphs}, {rep['target']} + {rep['draft']} draft, speedup at acceptance 0.6 / 0.8: {cells}"]


def tune_lines(rep: dict) -> list[str]:
    """The fused forward's times next to the two-pass defaults' at each chunk; per chunk, the defaults'
    times and for each launch its fastest setting where one beat them."""
    rows = rep["rows"]
    base = {r["chunk"]: r for r in rows if r["launch"] == "defaults"}
    default_fwd = ", ".join(f"chunk {c} {fmt(r['fwd_ms'])}" for c, r in sorted(base.items()))
    lines = []
    for r in (r for r in rows if r["launch"] == "fused"):
        got = "error" if "error" in r else f"{fmt(r['fwd_ms'])} ms (rel diff {r['rel_diff']:.1e})"
        lines.append(f"tune, fused forward, chunk {r['chunk']} {r['change']}: {got}; two-pass forward ms: {default_fwd}")
    for chunk, b in base.items():
        tried = [r for r in rows if r["chunk"] == chunk and r["launch"] not in ("defaults", "fused")]
        if not tried:
            continue
        lines.append(f"tune, chunk {chunk}, S {b['S']}: defaults {fmt(b['fwd_ms'])} / {fmt(b['fwdbwd_ms'])} ms "
                     "(forward / forward+backward)")
        for launch in dict.fromkeys(r["launch"] for r in tried):
            ok = [r for r in tried if r["launch"] == launch and "error" not in r]
            key = "fwd_vs_default" if launch == "output" else "fwdbwd_vs_default"
            best = max(ok, key=lambda r: r[key], default=None)
            errors = sum(1 for r in tried if r["launch"] == launch and "error" in r)
            verdict = ("no result" if best is None else "the defaults are fastest" if best[key] <= 1.0
                       else f"best {best['change']}: {best[key]:.3f}x")
            lines.append(f"  {launch:<7} {len(ok)} tried, {verdict}" + (f" ({errors} failed)" if errors else ""))
    if rep.get("interrupted"):
        lines.append("(tune interrupted: the settings above are those measured before the cut)")
    return lines


def verdict(name: str, got: float | None) -> str:
    """"met", "missed" or "not measured": the value measured for the target `name` against its threshold."""
    if got is None:
        return "not measured"
    need = TARGETS[name][0]
    return "met" if (got <= need if name in AT_MOST else got >= need) else "missed"


def report(out_dir: Path, stages_tsv: Path) -> None:
    env = environment()
    stamp(out_dir, env)
    lines = [f"== GPU run: {env['device']}, driver {env['driver']}, torch {env['torch']}, triton {env['triton']}, {env['date']}"]
    lines += stage_lines(stages_tsv)
    tests = load(out_dir, "tests.json")
    if tests:
        lines.append(f"tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped")
        lines += [f"  FAILED {f['test']}: {f['message'][:100]}" for f in tests["failures"][:5]]
    targets: dict[str, float | None] = {}  # target name -> the value measured
    for pattern, summarize, exclude in (("kernels*.json", kernel_lines, "\0"), ("generate_*.json", generate_lines, "_quantized"),
                                        ("serve_c*.json", serve_lines, "\0"), ("serve_decode_*.json", serve_lines, "\0"),
                                        ("speculative_*.json", speculative_lines, "\0"),
                                        ("generate_*_quantized.json", quantize_lines, "\0")):
        rep = load(out_dir, pattern, exclude)
        lines += summarize(rep, targets) if rep else [f"({pattern}: no results)"]
    trains = sorted(out_dir.glob("train*.json"))
    for path in trains:
        lines += train_lines(json.loads(path.read_text()), targets)
    lines += [] if trains else ["(train*.json: no results)"]
    rep = load(out_dir, "tune*.json")
    lines += tune_lines(rep) if rep else ["(tune: no results)"]
    lines.append("targets:")
    for name, (need, unit) in TARGETS.items():
        got = targets.get(name)
        lines.append(f"  {name:<52} {verdict(name, got):<13} {'' if got is None else format(got, '.2f') + unit}")
    lines += [f"LIMIT: {p}" for p in limit_problems(out_dir)]
    unknown = set(targets) - set(TARGETS)
    assert not unknown, f"targets without a threshold: {unknown}"
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    j = sub.add_parser("junit", help="pytest's JUnit XML -> JSON")
    j.add_argument("xml", type=Path)
    j.add_argument("out", type=Path)
    r = sub.add_parser("report", help="stamp the JSON files and print the summary")
    r.add_argument("out_dir", type=Path)
    r.add_argument("stages", type=Path)
    args = p.parse_args(argv)
    if args.command == "junit":
        if not args.xml.exists():
            sys.exit(f"no pytest report at {args.xml}: the tests did not get as far as writing it")
        junit_to_json(args.xml, args.out)
    else:
        if not args.out_dir.is_dir():
            sys.exit(f"{args.out_dir} is not a folder")
        report(args.out_dir, args.stages)


if __name__ == "__main__":
    main()
