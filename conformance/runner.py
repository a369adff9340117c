"""Run the suite against a backend: `check()` builds a Report, `replay()` re-runs a failure."""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
import time
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, find, given, reject, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable

from attnspec import SPEC_VERSION, __version__
from attnspec.dispatch import registry
from attnspec.dispatch.capabilities import GRADIENTS
from attnspec.errors import BackendUnavailableError, UnsupportedCallError
from attnspec.validation import CallInfo

from . import attention, entmax, partial, span, strategies
from ._compare import CheckFailed, Context, Refused
from .cases import load_case, save_case
from .frameworks import framework
from .report import DTYPE_ORDER, CellResult, Failure, Report

#: Examples per (cell, dtype). `ci` is derandomised (the same examples every run) unless a seed
#: is given; `thorough` draws fresh examples each run.
PROFILES = {"ci": 12, "thorough": 150}

ALL_ATTENTION_FEATURES = frozenset().union(*(c.required | c.optional for c in strategies.ATTENTION_CELLS))


@dataclass(frozen=True)
class Plan:
    """A strategy and the checks its examples go through; a cell runs one or more plans."""

    strategy: object
    checks: tuple
    share: float = 1.0  # of the cell's examples


def plans(cell: strategies.Cell, supported, caps=None, dtype=None, sizes=None) -> list:
    """The plans of a cell, drawing only what `caps` (the kernel's Capabilities) declares."""
    if cell.op == "entmax":
        return [Plan(strategies.entmax_cases(cell, supported, caps, dtype), entmax.CHECKS)]
    if cell.op == "span_mask":
        return [Plan(strategies.span_mask_cases(cell, supported), span.CHECKS)]
    if cell.op == "partial":
        return [Plan(strategies.partial_cases(cell, supported), partial.CHECKS)]
    share = sizes.large_share if sizes is not None else 0.0
    out = [Plan(strategies.attention_cases(cell, supported, caps, dtype), attention.CHECKS, 1.0 - share)]
    if share > 0:  # tile-crossing sizes: a plan of their own, so that every cell has some
        out.append(Plan(strategies.attention_cases(cell, supported, caps, dtype, sizes), attention.LARGE_CHECKS,
                        share))
    if cell.name == "span":
        out.append(Plan(strategies.continuity_cases(supported, caps, dtype), (attention.check_continuity,), 0.5))
    return out


def _settings(profile, examples, shrink, seed):
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=max(1, examples), database=None, deadline=None, phases=phases,
                    derandomize=(profile == "ci" and seed is None), print_blob=False,
                    suppress_health_check=list(HealthCheck), report_multiple_bugs=False)


def _run_plan(ctx: Context, plan: Plan, config, seed):
    """Run the plan's checks over its examples; (failing case, CheckFailed) or None."""
    found = {}
    before = ctx.counters["examples"]

    def prop(case):
        ctx.counters["examples"] += 1
        ctx.counters["large"] += bool(getattr(case, "large", False))
        for check_fn in plan.checks:
            try:
                check_fn(ctx, case)
            except Refused as exc:  # the kernel's own checks turned the example down: draw another
                ctx.counters["examples"] -= 1
                ctx.counters["large"] -= bool(getattr(case, "large", False))
                ctx.counters["refused"] += 1
                for reason in exc.reasons:
                    ctx.refusals[reason] = ctx.refusals.get(reason, 0) + 1
                reject()
            except CheckFailed:
                found["case"] = case
                raise
            except UnsupportedCallError as exc:
                found["case"] = case
                raise CheckFailed("declared but refused", str(exc)) from exc
            except Exception as exc:  # a crash is a failure too, with the same reproducer
                found["case"] = case
                raise CheckFailed("error", f"{type(exc).__name__}: {exc}") from exc

    test = config(given(plan.strategy)(prop))
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    try:
        test()
    except CheckFailed as exc:
        return found.get("case"), exc
    except Unsatisfiable:
        pass  # reported below: no example ran
    except Exception as exc:  # e.g. Hypothesis' Flaky: report it with the last failing case
        return found.get("case"), CheckFailed("error", f"{type(exc).__name__}: {exc}")
    if ctx.counters["examples"] == before:  # a cell that checked nothing must not pass
        why = "; ".join(f"{reason} ({n}x)" for reason, n in sorted(ctx.refusals.items())) or (
            "the kernel's declared shapes and alphas leave nothing this cell can draw")
        return None, CheckFailed("no examples", f"no example could be drawn or run: {why}")
    return None


def _describe(case) -> str:
    if case is None:
        return "(none recorded)"
    if case.op == "attention":
        kw = {k: v for k, v in case.kwargs.items() if v is not None and v is not False}
        kw = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in kw.items()}
        return f"q{list(case.q.shape)} k{list(case.k.shape)} v{list(case.v.shape)} {kw} {case.note}"
    if case.op == "entmax":
        alpha = case.alpha.tolist() if hasattr(case.alpha, "tolist") else case.alpha
        return f"x{list(case.x.shape)} alpha={alpha} axis={case.axis} weights={case.weights is not None} {case.note}"
    if case.op == "partial":
        return (f"q{list(case.q.shape)} k{list(case.k.shape)} v{list(case.v.shape)} splits={case.splits.tolist()} "
                f"alpha={case.alpha.tolist()} span={None if case.span is None else case.span.tolist()} "
                f"ramp={case.ramp} causal={case.causal} key_lengths={case.key_lengths} q_offset={case.q_offset} "
                f"key_padding_mask={case.key_padding_mask is not None}")
    return f"Lq={case.Lq} Lk={case.Lk} span={case.span} ramp={case.ramp} q_offset={case.q_offset}"


def _save_failure(directory, backend, cell, dtype, device, case, error) -> tuple:
    os.makedirs(directory, exist_ok=True)
    safe = f"{backend}-{cell.name}-{dtype}".replace(" ", "_").replace("/", "_")
    path = os.path.join(directory, safe + ".npz")
    save_case(case, path, backend=backend, cell=cell.name, dtype=dtype, device=device or "", check=error.check)
    snippet = f"import attnspec.conformance\nattnspec.conformance.replay({path!r})  # raises the failure again"
    return path, snippet


def _refusal_reason(backend, cell, kernel, fw, dtype, device):
    """The backend lacks a feature the cell needs: it must refuse such a call, not run it."""
    missing = sorted(cell.required - frozenset(kernel.capabilities.features))
    reason = "does not declare " + ", ".join(missing)
    if cell.op != "attention":
        return reason
    example = find(strategies.attention_cases(cell, ALL_ATTENTION_FEATURES), lambda case: True,
                   settings=settings(database=None, derandomize=True, max_examples=10,
                                     suppress_health_check=list(HealthCheck)))
    attention.check_refusal(backend, example, dtype, fw, device)  # raises CheckFailed if it ran
    return reason


def resolve_backend(spec: str):
    """A backend name as given, or for 'package.module:attr' the Backend object that attribute
    holds (or returns, if it is a callable), registered nowhere else. Errors name the cause."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"backend {spec!r}: write a registered name, or 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BackendUnavailableError(f"backend {spec!r}: cannot import {module_name}: "
                                      f"{type(exc).__name__}: {exc}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise BackendUnavailableError(f"backend {spec!r}: module {module_name} has no attribute {attr!r}") from None
    if callable(obj) and not isinstance(obj, registry.Backend):
        try:
            obj = obj()
        except Exception as exc:
            raise BackendUnavailableError(f"backend {spec!r}: calling {attr}() failed: "
                                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, registry.Backend):
        raise BackendUnavailableError(f"backend {spec!r}: {attr} is a {type(obj).__name__}, not an attnspec Backend")
    return obj


def _validate_arguments(profile, dtypes, cells, examples):
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not a profile (profiles: {', '.join(PROFILES)})")
    if isinstance(dtypes, str):
        raise TypeError(f"dtypes must be a list of dtype names, e.g. [{dtypes!r}]; got the string {dtypes!r}")
    for dtype in dtypes or ():
        if dtype not in DTYPE_ORDER:
            raise ValueError(f"dtype {dtype!r} is not a dtype the suite checks (dtypes: {', '.join(DTYPE_ORDER)})")
    known = [c.name for c in strategies.CELLS]
    for name in cells or ():
        if name not in known:
            raise ValueError(f"cell {name!r} is not a cell of the suite (cells: {', '.join(known)})")
    if examples is not None and (not isinstance(examples, int) or isinstance(examples, bool) or examples < 1):
        raise ValueError(f"examples must be a positive integer or None; got {examples!r}")


def check(backend="numpy", *, profile: str = "ci", dtypes=None, device=None, seed=None,
          cells=None, artifacts_dir=None, stop_on_first_failure=False, shrink=True, progress=None,
          examples=None, sizes=None) -> Report:
    """Check a backend against SPEC.md; returns a Report (report.passed, .failures).

    backend: a registered backend's name, or a `Backend` object (registered for the run under
    its name, which must not name another backend).
    profile: 'ci' (small, derandomised) or 'thorough' (many fresh examples).
    dtypes: the dtypes to check (default: all the backend declares). device: e.g. 'cuda'.
    cells: names of the cells to run (default all; see strategies.CELLS).
    artifacts_dir: where failing examples are saved (default: a new temporary directory).
    stop_on_first_failure / shrink=False: the fast mode used to prove the suite catches bugs.
    progress: called with (done, total, label) as cells complete.
    examples: examples per (cell, dtype) instead of the profile's count (e.g. fewer for a
    backend that runs slowly here, such as Triton kernels under the interpreter; the report
    states the count it ran).
    sizes: how large the tile-crossing examples get (strategies.Sizes; default: the profile's,
    strategies.PROFILE_SIZES), e.g. smaller for kernels run under an interpreter.
    """
    _validate_arguments(profile, dtypes, cells, examples)
    if isinstance(backend, registry.Backend):
        with _registered(backend):
            return check(backend.name, profile=profile, dtypes=dtypes, device=device, seed=seed, cells=cells,
                         artifacts_dir=artifacts_dir, stop_on_first_failure=stop_on_first_failure, shrink=shrink,
                         progress=progress, examples=examples, sizes=sizes)
    sizes = strategies.PROFILE_SIZES[profile] if sizes is None else sizes
    start = time.perf_counter()
    b = registry.load(backend)
    selected = [c for c in strategies.CELLS if cells is None or c.name in cells]
    report = Report(backend=backend, backend_version=b.version, spec_version=SPEC_VERSION,
                    attnspec_version=__version__, profile=profile, seed=seed, device=device)
    work = []
    for cell in selected:
        kernel = b.kernel(cell.op)
        if kernel is None:
            report.cells.append(CellResult(cell.name, cell.op, "-", "unsupported", f"does not implement '{cell.op}'"))
            continue
        try:
            fw = framework(kernel.capabilities.array_type)
        except NotImplementedError as exc:
            report.cells.append(CellResult(cell.name, cell.op, "-", "unsupported", str(exc)))
            continue
        available = fw.available_dtypes()
        for dtype in dtypes or available:
            if dtype not in kernel.capabilities.dtypes:
                reason = f"dtype {dtype} not declared"
                report.cells.append(CellResult(cell.name, cell.op, dtype, "unsupported", reason))
            elif dtype not in available:
                why = getattr(fw, "unavailable_reason", lambda d: None)(dtype)
                report.cells.append(CellResult(cell.name, cell.op, dtype, "unsupported",
                                               why or f"{fw.name} cannot make {dtype} arrays here"))
            else:
                work.append((cell, kernel, fw, dtype))
    if device is not None:  # asked for by name: checking nothing there would be a silent pass
        for cell, kernel, fw, dtype in work:
            if device not in kernel.capabilities.devices:
                raise ValueError(f"device={device!r}: backend {backend} does not declare it for {cell.op} "
                                 f"(devices: {', '.join(kernel.capabilities.devices)})")
    directory = artifacts_dir or tempfile.mkdtemp(prefix="attnspec-failures-")
    for done, (cell, kernel, fw, dtype) in enumerate(work):
        dev = device or fw.default_device(kernel.capabilities.devices)
        if dev not in kernel.capabilities.devices:  # e.g. a GPU-only backend on a CPU machine
            reason = _device_reason(kernel, fw, dtype, dev)
            report.cells.append(CellResult(cell.name, cell.op, dtype, "unsupported", reason))
            if progress is not None:
                progress(done + 1, len(work), f"{backend} {cell.name} {dtype}: unsupported")
            continue
        result = _run_cell(backend, cell, kernel, fw, dtype, dev, profile, seed, shrink, directory, examples,
                           sizes)
        report.cells.append(result)
        if progress is not None:
            progress(done + 1, len(work), f"{backend} {cell.name} {dtype}: {result.status}")
        if stop_on_first_failure and result.status == "FAIL":
            break
    report.seconds = time.perf_counter() - start
    return report


@contextlib.contextmanager
def _registered(backend):
    """Register a Backend object for one run (unless that very object is registered already)."""
    names = registry.names()
    if backend.name in names:
        entry = registry.entry(backend.name)
        if entry.backend is backend:
            yield
            return
        raise ValueError(f"a backend named '{backend.name}' is already registered (from {entry.source}); "
                         "give the object another name")
    registry.register_backend(backend)
    try:
        yield
    finally:
        registry.unregister_backend(backend.name)


def _device_reason(kernel, fw, dtype, device) -> str:
    """Why a kernel does not run on `device`, in its own words where it has them."""
    call = CallInfo(op=kernel.op, array_type=fw.name, device=device, dtype=dtype)
    reasons = [r for r in kernel.capabilities.reasons(call) if "device" in r]
    return reasons[0] if reasons else f"device {device} not declared (devices: {', '.join(kernel.capabilities.devices)})"


def _run_cell(backend, cell, kernel, fw, dtype, device, profile, seed, shrink, directory, examples=None,
              sizes=None) -> CellResult:
    supported = frozenset(kernel.capabilities.features)
    features = cell.features(supported)
    # The gradients this cell can reach: dz only where spans are drawn, dw where weights are.
    gradients = frozenset(n for n in kernel.gradients
                          if (n != "span" or cell.op == "span_mask" or "span" in features)
                          and (n != "weights" or "weights" in features))
    result = CellResult(cell.name, cell.op, dtype, "pass", gradients_declared=_grad_names(kernel.op, gradients))
    if not cell.required <= supported:
        try:
            result.status, result.reason = "unsupported", _refusal_reason(backend, cell, kernel, fw, dtype, device)
        except CheckFailed as exc:
            result.status = "FAIL"
            result.failure = Failure(backend, cell.name, dtype, exc.check, str(exc), "(refusal check)")
        return result
    ctx = Context(backend=backend, kernel=kernel, framework=fw, dtype=dtype, device=device,
                  gradients=bool(gradients), gradient_names=gradients)
    for plan in plans(cell, supported, kernel.capabilities, dtype, sizes):
        count = max(1, int(round((examples or PROFILES[profile]) * plan.share)))
        outcome = _run_plan(ctx, plan, _settings(profile, count, shrink, seed), seed)
        if outcome is not None:
            case, error = outcome
            result.status = "FAIL"
            npz, snippet = _save_failure(directory, backend, cell, dtype, device, case, error) if case else (None, None)
            result.failure = Failure(backend, cell.name, dtype, error.check, str(error), _describe(case), npz, snippet)
            break
    result.examples = ctx.counters["examples"]
    result.gradient_checks = ctx.counters["gradient_checks"]
    result.gradient_skips = ctx.counters["gradient_skips"]
    result.refused = ctx.counters["refused"]
    result.tile_crossing = ctx.counters["large"]
    result.refusals = dict(ctx.refusals)
    result.gradients_checked = _grad_names(kernel.op, ctx.checked)
    if not ctx.gradients:
        result.gradients_declared = []
    return result


def _grad_names(op, names) -> list:
    """Gradient names in the op's order (GRADIENTS), for the report."""
    return [n for n in GRADIENTS.get(op, ()) if n in names]


def replay(path, backend=None):
    """Re-run the checks of a saved failure on its example; raises ConformanceError (exported
    from attnspec.conformance) if it still fails.
    backend: check another backend than the one that failed (e.g. after a fix, under a new name)."""
    case, context = load_case(path)
    name = backend or context["backend"]
    cell = next(c for c in strategies.CELLS if c.name == context["cell"])
    kernel = registry.load(name).kernel(cell.op)
    fw = framework(kernel.capabilities.array_type)
    ctx = Context(backend=name, kernel=kernel, framework=fw, dtype=context["dtype"],
                  device=context.get("device") or fw.default_device(kernel.capabilities.devices),
                  gradients=bool(kernel.gradients), gradient_names=kernel.gradients)
    if cell.op == "attention":
        checks = (attention.check_continuity,) if case.note.startswith("continuity") else attention.checks_for(case)
    elif cell.op == "entmax":
        checks = entmax.CHECKS
    elif cell.op == "partial":
        checks = partial.CHECKS
    else:
        checks = span.CHECKS
    for check_fn in checks:
        check_fn(ctx, case)
