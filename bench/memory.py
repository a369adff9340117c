"""Peak memory of one call, each in a fresh process: the benchmark's one memory program.

Every (configuration, target) is measured in a new child process that has never run a kernel:
the frameworks are imported once by a multiprocessing fork server (which itself runs nothing),
and each measurement forks a clean child from it; where there is no fork server, a spawned
interpreter. The parent's own peak is never involved: `ru_maxrss` would be inherited by every
child and is not resettable, so it would report the largest call so far, not this one.

In the child: build the target, run one call to warm up (compilation, lazy initialisation,
code pages), free what can be freed (gc, malloc_trim), then
- on CPU: read VmRSS, reset the peak (`/proc/self/clear_refs` <- 5 sets VmHWM to the current
  RSS, Linux >= 4.0), run the measured call, read VmHWM: the call's peak resident growth;
- on an accelerator: the framework's allocator statistics around the measured call
  (torch.cuda.max_memory_allocated after reset_peak_memory_stats; JAX peak_bytes_in_use).
If the peak cannot be reset, the warm-up is skipped and the growth of VmHWM over the first
call is reported instead (it then includes compilation).

allocator="fixed-mmap" sets glibc's mmap threshold to 64 KiB in the child before anything is
allocated for the call (mallopt(M_MMAP_THRESHOLD), as MALLOC_MMAP_THRESHOLD_=65536 would at
start): every large tensor is then mapped on its own and unmapped when freed, so the peak RSS
is the peak of live memory, the same every run. With glibc's default, the threshold rises to
the largest block freed so far, and heap fragmentation makes the same call's peak vary from run
to run: that is what a user sees, and the default.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import multiprocessing
import sys
import traceback

#: What the fork server imports once, per framework (children import anything else themselves).
_PRELOAD = {
    "numpy": ("numpy", "attnspec", "attnspec.bench.core", "attnspec.bench.targets", "attnspec.conformance.peers"),
    "torch": ("torch", "attnspec.backends.torch", "entmax"),
    "jax": ("jax", "jax.numpy"),
}
_context = None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory():
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc: return freed heap pages to the OS
    except (OSError, AttributeError):
        pass


#: glibc's mallopt parameter number of M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3
FIXED_MMAP_THRESHOLD = 65536


def _set_allocator(allocator: str) -> None:
    if allocator == "default":
        return
    if allocator != "fixed-mmap":
        raise ValueError(f"allocator must be default or fixed-mmap; got {allocator!r}")
    try:
        ok = ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, FIXED_MMAP_THRESHOLD)
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"allocator fixed-mmap needs glibc's mallopt ({exc})") from None
    if ok != 1:
        raise RuntimeError("glibc refused mallopt(M_MMAP_THRESHOLD, 65536)")


def measure_in_this_process(cfg, target_name: str, device: str, seed: int, allocator: str = "default") -> dict:
    """The measurement itself (run in the child)."""
    from .inputs import make_inputs
    from .runners import runner_for
    from .targets import find_target

    _set_allocator(allocator)
    target = find_target(target_name)
    runner = runner_for(target.framework)
    if cfg.threads is not None:
        runner.set_threads(cfg.threads)
    inputs = make_inputs(runner, cfg, device, seed)[0]
    built = target.build(cfg, inputs, device)
    prepared = runner.prepare(built.fn, inputs, cfg.mode, vjp=built.vjp, kwargs=built.kwargs)
    result = dict(device=device, allocator=allocator)
    can_reset = _status_kib("VmRSS") is not None and _reset_peak()
    if can_reset or device != "cpu":
        prepared.step()  # warm-up: compilation, lazy initialisation, first-touch code pages
    _release_free_memory()
    token = runner.memory_begin(device)
    if device == "cpu" or token is None:
        if can_reset:
            base = _status_kib("VmRSS")
            _reset_peak()
            method = "peak RSS growth of one call after a warm-up call (VmHWM reset via clear_refs)"
        else:
            base = _status_kib("VmHWM")
            method = "VmHWM growth over the first call (peak reset unavailable: includes compilation)"
        prepared.step()
        peak = _status_kib("VmHWM")
        if base is None or peak is None:
            return dict(error="no /proc/self/status: peak RSS is Linux only")
        result.update(peak_bytes=(peak - base) * 1024, method=method, process_peak_bytes=peak * 1024)
    else:
        prepared.step()
        result.update(peak_bytes=runner.memory_end(device, token), method=f"{target.framework} allocator peak")
    return result


def _child(conn, payload):
    try:
        from .sweep import Case

        result = measure_in_this_process(Case(**payload["cfg"]), payload["target"], payload["device"],
                                         payload["seed"], payload["allocator"])
    except BaseException as exc:  # report, never hang the parent
        result = dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    conn.send(result)
    conn.close()


def _get_context(frameworks=("numpy",)):
    """The fork server, started on first use with the given frameworks preloaded."""
    global _context
    if _context is None:
        if "forkserver" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux"):
            _context = multiprocessing.get_context("forkserver")
            modules = [m for f in ("numpy", *frameworks) for m in _PRELOAD.get(f, ())]
            _context.set_forkserver_preload([m for m in dict.fromkeys(modules) if _installed(m)])
        else:
            _context = multiprocessing.get_context("spawn")
    return _context


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def measure(cfg, target_name: str, device: str, seed: int, timeout: float = 600.0, frameworks=("numpy",),
            allocator: str = "default") -> dict:
    """Peak memory of one call of `target_name` on `cfg`, in a fresh process: a dict with
    peak_bytes and method, or error. `frameworks`: what the fork server should preload if this
    call starts it; allocator: "default" or "fixed-mmap" (glibc settings, see above)."""
    ctx = _get_context(frameworks)
    parent, child = ctx.Pipe(duplex=False)
    payload = dict(cfg=cfg.to_dict(), target=target_name, device=device, seed=seed, allocator=allocator)
    process = ctx.Process(target=_child, args=(child, payload), daemon=True)
    process.start()
    child.close()
    try:
        if parent.poll(timeout):
            return parent.recv()
        return dict(error=f"timed out after {timeout:.0f} s")
    except EOFError:
        return dict(error=f"the measuring process died (exit code {process.exitcode}; out of memory?)")
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        parent.close()


def start_method(frameworks=("numpy",)) -> str:
    return _get_context(frameworks).get_start_method()

