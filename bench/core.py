"""The sweep: for each case and target, why it cannot run, or its timing, peak memory and
accuracy against the float64 reference on the same inputs, and the case's achieved sparsity.
`run()` returns a `Result` (rows plus environment) that report.py writes out."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import memory as _memory
from .runners import RUNNERS, runner_for
from .sweep import Case, Preset
from .targets import all_targets
from .inputs import draw_arrays, make_inputs
from .timing import measure


# ---------------------------------------------------------------------------------------------
# the float64 reference on (a subset of) the rows


def reference_rows(cfg: Case, full_scores: int, rows: int) -> list[tuple[int, int]]:
    """Query-row blocks [a, b) the reference computes: all rows when B*H*L*L <= full_scores,
    else `rows` rows in four blocks spread over the sequence, the last block ending at L (the
    longest causal context)."""
    if cfg.scores <= full_scores or rows >= cfg.L:
        return [(0, cfg.L)]
    size = max(1, rows // 4)
    starts = sorted({round(x) for x in np.linspace(0, cfg.L - size, 4)})
    return [(a, a + size) for a in starts]


def reference(q, k, v, blocks, alpha, span, ramp, causal) -> dict:
    """Output and achieved sparsity of the float64 reference on the given query-row blocks
    (query i sits at position i + Lk - Lq, the default offset)."""
    import attnspec.reference as ref

    B, H, L, D = q.shape
    Lk = k.shape[2]
    kv = np.repeat(np.arange(k.shape[1]), H // k.shape[1])
    outs, zeros, entries, allowed_zeros, allowed_entries = [], 0, 0, 0, 0
    for a, b in blocks:
        offset = a + Lk - L
        outs.append(ref.attention(q[:, :, a:b], k, v, alpha=alpha, span=span, ramp=ramp, causal=causal,
                                  q_offset=offset))
        # P itself, for the sparsity: the weighted entmax of SPEC.md 5.1 on the same rows.
        s = np.einsum("bhid,bhjd->bhij", q[:, :, a:b], k[:, kv]) / math.sqrt(D)
        d = (np.arange(b - a)[:, None] + offset - np.arange(Lk)[None, :])
        allowed = d >= 0 if causal else np.ones_like(d, dtype=bool)
        m = None
        if span is not None:
            m = ref.span_mask(b - a, Lk, span, ramp, q_offset=offset)
            if np.ndim(span):  # per-head spans: [H, rows, Lk]
                m = m[None]
            allowed = allowed & (m > 0)
        p = ref.entmax(np.where(allowed, s, -np.inf), alpha, weights=m)
        zeros += int(np.sum(p == 0))
        entries += p.size
        allowed_b = np.broadcast_to(allowed, p.shape)
        allowed_zeros += int(np.sum((p == 0) & allowed_b))
        allowed_entries += int(np.sum(allowed_b))
    return dict(out=np.concatenate(outs, axis=2), sparsity=zeros / max(entries, 1),
                sparsity_allowed=allowed_zeros / max(allowed_entries, 1))


# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    preset: str
    baseline: str
    rows: list
    environment: dict
    options: dict
    overhead: list | None = None  # dispatch_overhead() per framework
    seconds: float = 0.0
    command: str = ""
    targets: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(preset=self.preset, baseline=self.baseline, command=self.command, seconds=self.seconds,
                    environment=self.environment, options=self.options, targets=self.targets,
                    dispatch_overhead=self.overhead, rows=self.rows)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(frameworks) -> dict:
    import attnspec

    env = dict(
        attnspec=attnspec.__version__, spec=attnspec.SPEC_VERSION, git=_git_commit(),
        python=platform.python_version(), platform=platform.platform(), machine=platform.machine(),
        cpu=_cpu_model(), cpu_count=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        load_average_at_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        thread_env={v: os.environ[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                "XLA_FLAGS") if v in os.environ},
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    for name in sorted(frameworks):
        runner = RUNNERS.get(name)
        if runner is not None and runner.unavailable() is None:
            try:
                env.update(runner.environment())
            except Exception as exc:  # an environment probe must not stop the run
                env[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from importlib import metadata

        for pkg in ("entmax", "adasplash", "triton", "matplotlib"):
            try:
                env[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                env[pkg] = None
    except ImportError:
        pass
    return env


class _Progress:
    """tqdm when it is installed, else one plain line per step on stderr."""

    def __init__(self, total, enabled=True):
        self.bar, self.total, self.done, self.enabled = None, total, 0, enabled
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def update(self, label):
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label[:60])
            self.bar.update(1)
        else:
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            sys.stderr.write(f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}\n")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def select_targets(names=None, exclude=()) -> tuple[list, list]:
    """(targets to run, every known name); unknown names raise. Without names: the default
    targets (opt-in yardsticks run only when a preset's sweep or the caller names them)."""
    targets = all_targets()
    known = [t.name for t in targets]
    for name in list(names or []) + list(exclude):
        if name not in known:
            raise ValueError(f"unknown benchmark target {name!r} (known: {', '.join(known)})")
    chosen = [t for t in targets if (t.name in names if names else True) and t.name not in exclude]
    return chosen, known


def run(preset: Preset, *, targets=None, exclude=(), baseline=None, seed=0, progress=True, device=None,
        memory=None, command="", threads=None) -> Result:
    """Run the preset's cases over the targets and return the rows. Each case runs the targets
    its sweep names (default: every default target), narrowed to `targets` when given, and
    always its baseline (the ratios need it in the same run). Excluded targets still get a row
    per case, saying why. baseline: every case's (None: the preset's, per sweep). memory:
    True/False for every case (None: the preset's, per sweep). threads: run every case with
    this many framework threads."""
    start = time.perf_counter()
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    excluded = {n: "excluded on the command line (--exclude)" for n in exclude}
    for n in preset.exclude:
        if (not targets or n not in targets) and n not in excluded:
            excluded[n] = preset.exclude_reason or "excluded by the preset"
    everything, known = select_targets(None, ())
    select_targets(targets, list(excluded))  # unknown names raise
    by_name = {t.name: t for t in everything}
    if baseline is not None and baseline not in known:
        raise ValueError(f"--baseline {baseline!r} is not a benchmark target (known: {', '.join(known)})")
    cases = preset.configs()
    if threads is not None:
        cases = [dataclasses.replace(c, threads=threads) for c in cases]
    plan = []
    for case in cases:
        template = dataclasses.replace(case, threads=None) if threads is not None else case
        named = preset.targets_of(template)
        case_baseline = baseline or preset.baseline_of(template)
        if case_baseline not in known:
            raise ValueError(f"baseline {case_baseline!r} is not a benchmark target (known: {', '.join(known)})")
        names = [t.name for t in everything
                 if (t.name in named if named is not None else (t.default or (targets and t.name in targets)))
                 and (not targets or t.name in targets)]
        if case_baseline not in names:
            names.append(case_baseline)
        shown_excluded = [n for n in names if n in excluded and n != case_baseline]
        run_names = [n for n in names if n not in shown_excluded]
        case_memory = memory if memory is not None else preset.memory_of(template)
        plan.append((case, [by_name[n] for n in run_names], shown_excluded, case_baseline, case_memory))
    chosen = [t for t in everything if any(t in p[1] for p in plan)]
    frameworks = {t.framework for t in chosen}
    any_memory = any(p[4] for p in plan)
    options = dict(repeats=preset.repeats, warmup=preset.warmup, memory=any_memory, clock=preset.clock,
                   memory_modes=list(preset.memory_modes), allocators=list(preset.allocators),
                   max_call_seconds=preset.max_call_seconds, numpy_max_scores=preset.numpy_max_scores,
                   reference_rows=preset.reference_rows, reference_full_scores=preset.reference_full_scores,
                   seed=seed, device=device or preset.device, configs=len(cases), threads=threads,
                   memory_start_method=_memory.start_method(sorted(frameworks)) if any_memory else None)
    rows = []
    bar = _Progress(sum(len(p[1]) + len(p[2]) for p in plan), enabled=progress)
    last_time = {}  # (target, family) -> [(L, median seconds of one call)], L increasing
    reference_cache = {}
    devices = {}
    initial_threads = {name: r.threads() for name, r in RUNNERS.items() if name in frameworks
                       and r.unavailable() is None}
    for cfg, case_targets, case_excluded, case_baseline, case_memory in plan:
        arrays = draw_arrays(cfg, seed)
        inputs_cache = {}
        reference_cache.clear()  # one case at a time: memory stays flat over the sweep
        config_rows = []
        for name in case_excluded:
            t = by_name[name]
            config_rows.append(_row(cfg, name, t.framework, t.kind, status="not run", reason=excluded[name]))
            bar.update(f"{name} {cfg.label()}")
        for target in case_targets:
            row = _run_one(target, cfg, arrays, inputs_cache, devices, preset, device, last_time, reference_cache,
                           seed, case_memory, initial_threads)
            config_rows.append(row)
            bar.update(f"{target.name} {cfg.label()}")
        _ratios(config_rows, case_baseline)
        rows += config_rows
    bar.close()
    for name, n in initial_threads.items():
        if n is not None and cases and any(c.threads for c in cases):
            RUNNERS[name].set_threads(n)
    env = environment(frameworks | {"numpy"})
    env["load_average_at_start"] = load_at_start
    env["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env["devices"] = {framework: list(value) for (framework, _), value in devices.items()}
    baselines = sorted({p[3] for p in plan})
    return Result(preset=preset.name, baseline=baselines[0] if len(baselines) == 1 else ", ".join(baselines),
                  rows=rows, environment=env, options=options, seconds=time.perf_counter() - start, command=command,
                  targets=[dict(name=t.name, framework=t.framework, kind=t.kind, description=t.description)
                           for t in chosen])


def _row(cfg, target, framework, kind, **extra):
    case = cfg.to_dict()
    case["threads_requested"] = case.pop("threads")  # "threads" is what the framework ran with
    row = dict(config=cfg.label(), family=cfg.family().label(), **case, target=target,
               framework=framework, kind=kind, status="ok", reason=None, note=None, median_s=None, q1_s=None,
               q3_s=None, min_s=None, max_s=None, repeats=0, first_call_s=None, compile_s=None, threads=None,
               baseline=None, ratio=None, peak_bytes=None, peak_bytes_by_allocator=None, memory_ratio=None,
               memory_method=None, memory_error=None, sparsity=None, sparsity_allowed=None, max_abs_err=None,
               reference_rows=None, same_function=None)
    row.update(extra)
    return row


def _add_note(row, note):
    row["note"] = note if not row["note"] else f"{row['note']}; {note}"


def _run_one(target, cfg, arrays, inputs_cache, devices, preset, device, last_time, reference_cache, seed, memory,
             initial_threads=None):
    row = _row(cfg, target.name, target.framework, target.kind)

    def stop(status, reason):
        row.update(status=status, reason=reason)
        return row

    why = target.available()
    if why:
        return stop("unavailable", why)
    runner = runner_for(target.framework)
    why = runner.unavailable()
    if why:
        return stop("unavailable", why)
    key = (target.framework, device or preset.device)
    if key not in devices:
        resolved = runner.resolve_device(device or preset.device)
        devices[key] = (resolved, runner.device_reason(resolved))
    dev, why = devices[key]
    row["device"] = dev
    if why:
        return stop("unavailable", why)
    why = runner.dtype_reason(cfg.dtype)
    if why:
        return stop("unsupported", why)
    if target.framework == "numpy" and cfg.scores > preset.numpy_max_scores:
        return stop("skipped", f"NumPy (the float64 reference) runs only up to B*H*Lq*Lk = {preset.numpy_max_scores} "
                               f"score entries here (this call: {cfg.scores}); raise --numpy-max-scores")
    if cfg.threads is not None:
        why = runner.set_threads(cfg.threads)
        if why:
            _add_note(row, f"threads not set: {why}")
    elif (initial_threads or {}).get(target.framework):
        runner.set_threads(initial_threads[target.framework])
    family = (target.name, cfg.family())
    predicted = _predict(last_time.get(family, []), cfg.L)
    if predicted is not None and predicted[0] > preset.max_call_seconds:
        return stop("skipped", f"one call would take about {predicted[0]:.0f} s ({predicted[1]}), above "
                               f"--max-call-seconds {preset.max_call_seconds:g}")
    try:
        if target.framework not in inputs_cache:
            inputs_cache[target.framework] = make_inputs(runner, cfg, dev, seed)[0]
        inputs = inputs_cache[target.framework]
        reasons = target.reasons(cfg, inputs, dev)
        if reasons:
            return stop("unsupported", "; ".join(reasons))
        built = target.build(cfg, inputs, dev)
        prepared = runner.prepare(built.fn, inputs, cfg.mode, vjp=built.vjp, kwargs=built.kwargs)
        t0 = time.perf_counter()
        prepared.step()
        first = time.perf_counter() - t0
        estimate = first
        if built.compiled:  # the first call compiled: time a second one for the estimate
            t0 = time.perf_counter()
            prepared.step()
            estimate = time.perf_counter() - t0
            row["compile_s"] = max(first - estimate, 0.0)
        else:
            row["compile_s"] = prepared.compile_s
        repeats, warmup = preset.repeats, max(preset.warmup - 1, 0)
        if estimate > preset.max_call_seconds:
            repeats, warmup = 1, 0
            _add_note(row, f"1 repeat: one call takes {estimate:.1f} s (> --max-call-seconds)")
        timing = measure(prepared.step, repeats=repeats, warmup=warmup, clock=preset.clock)
        row.update(timing.to_dict())
        row.update(first_call_s=first, threads=runner.threads())
        last_time.setdefault(family, []).append((cfg.L, timing.median))
        # accuracy against the float64 reference of the function this target computes
        ref_kwargs, note = target.computes(cfg)
        blocks = reference_rows(cfg, preset.reference_full_scores, preset.reference_rows)
        ref = _reference(reference_cache, cfg, arrays, blocks, ref_kwargs)
        out = prepared.output()
        out_rows = np.concatenate([out[:, :, a:b] for a, b in blocks], axis=2)
        row.update(max_abs_err=float(np.max(np.abs(out_rows - ref["out"]))) if out_rows.size else 0.0,
                   same_function=note is None,
                   reference_rows="all" if blocks == [(0, cfg.L)] else f"{sum(b - a for a, b in blocks)} of {cfg.L}")
        if note:
            _add_note(row, note)
    except Exception as exc:  # a target that fails is reported with its error, never dropped
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return stop("error", f"{type(exc).__name__}: {message[:300]}")
    # the case's own sparsity (from the reference of the case's function)
    cfg_ref = _reference(reference_cache, cfg, arrays, blocks, cfg.attention_kwargs())
    row.update(sparsity=cfg_ref["sparsity"], sparsity_allowed=cfg_ref["sparsity_allowed"])
    if memory and cfg.mode in preset.memory_modes:
        by_allocator, methods, errors = {}, [], []
        for allocator in preset.allocators:
            result = _memory.measure(cfg, target.name, dev, seed, timeout=max(120.0, 20 * preset.max_call_seconds),
                                     frameworks=(target.framework,), allocator=allocator)
            if "error" in result:
                errors.append(f"{allocator}: {result['error']}")
            else:
                by_allocator[allocator] = result["peak_bytes"]
                methods.append(result["method"])
        if by_allocator:
            row.update(peak_bytes=next(iter(by_allocator.values())), peak_bytes_by_allocator=by_allocator,
                       memory_method=methods[0])
        if errors:
            row["memory_error"] = "; ".join(errors)
    return row


def _predict(history, L):
    """(seconds, how) for one call at length L from the calls measured at smaller L: the growth
    exponent of the last two sizes, clamped to [1, 2] (attention costs between L and L²); from a
    single size, linear growth (a lower bound: small sizes are dominated by fixed costs)."""
    if not history:
        return None
    L1, t1 = history[-1]
    exponent = 1.0
    if len(history) >= 2:
        L0, t0 = history[-2]
        if t0 > 0 and t1 > 0 and L1 != L0:
            exponent = min(max(math.log(t1 / t0) / math.log(L1 / L0), 1.0), 2.0)
    how = f"{t1:.2g} s at L={L1}, growing as L^{exponent:.2g}"
    return t1 * (L / L1) ** exponent, how


def _reference(cache, cfg, arrays, blocks, kwargs):
    key = (cfg.L, cfg.Lk, cfg.B, cfg.H, cfg.Hkv, cfg.D, cfg.dtype, tuple(blocks), tuple(sorted(kwargs.items())))
    if key not in cache:
        q, k, v = arrays[:3]
        cache[key] = reference(q, k, v, blocks, **kwargs)
    return cache[key]


def _ratios(rows, baseline):
    """Each row's time (and peak memory, per allocator) over the baseline's on the same case."""
    base = next((r for r in rows if r["target"] == baseline), None)
    ok = base is not None and base["status"] == "ok" and base["median_s"]
    for row in rows:
        row["baseline"] = baseline
        if row["status"] != "ok":
            continue
        base_memory = (base or {}).get("peak_bytes_by_allocator") or {}
        if row.get("peak_bytes_by_allocator"):
            row["memory_ratio"] = {a: b / base_memory[a] for a, b in row["peak_bytes_by_allocator"].items()
                                   if base_memory.get(a)}
        if ok:
            row["ratio"] = row["median_s"] / base["median_s"]
        else:
            why = "not in this run" if base is None else f"{base['status']}: {base['reason']}"
            row["ratio_note"] = f"no ratio: the baseline {baseline} did not run ({why})"
