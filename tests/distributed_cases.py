"""Cases and a worker for tests/test_distributed_torch.py: each process runs every case on its
block of the sequence and compares with the call on a single device on the whole sequence."""

from __future__ import annotations

import gc
import os
import traceback

import torch
import torch.distributed as dist

# (name, settings): lengths per world size are chosen by the worker (uneven blocks).
CASES = [
    ("span-halo-causal-softmax", dict(H=2, Hkv=2, alpha=1.0, span=[3.0, 6.0], ramp=2.0, causal=True, max_span=6.0)),
    ("span-halo-both-sides-entmax", dict(H=2, Hkv=2, alpha=[1.3, 1.7], span=[2.5, 4.0], ramp=2.0, causal=False,
                                         max_span=4.0)),
    ("span-wider-than-a-shard", dict(H=2, Hkv=1, alpha=1.5, span=11.0, ramp=3.0, causal=True, max_span=12.0)),
    ("span-wider-both-sides-sparsemax", dict(H=2, Hkv=2, alpha=2.0, span=[9.0, 13.0], ramp=1.5, causal=False,
                                             max_span=13.0)),
    ("mixed-heads-gqa", dict(H=4, Hkv=2, alpha=[1.0, 1.5, 1.2, 2.0], span=[2.0, 40.0, 3.0, 1.0], ramp=2.0,
                             causal=True, max_span=5.0, no_grad_check=True)),
    ("ring-softmax-causal", dict(H=2, Hkv=1, alpha=1.0, span=None, causal=True)),
    ("ring-entmax-mixed-alpha-gqa", dict(H=4, Hkv=2, alpha=[1.0, 1.6, 1.05, 2.0], span=None, causal=False)),
    ("ring-span-too-wide", dict(H=2, Hkv=2, alpha=[1.5, 1.0], span=[8.0, 5.0], ramp=2.0, causal=False,
                                max_span=2.0)),
    ("key-lengths-q-offset", dict(H=2, Hkv=2, alpha=[1.4, 1.0], span=[3.0, 20.0], ramp=2.0, causal=True,
                                  max_span=4.0, key_lengths=[17, 24], q_offset=[2, 0])),
    ("ring-key-lengths", dict(H=2, Hkv=1, alpha=1.5, span=None, causal=False, key_lengths=[11, 24])),
    ("float32-halo-and-ring", dict(H=4, Hkv=2, alpha=[1.0, 1.5, 1.3, 1.0], span=[3.0, 30.0, 2.0, 4.0], ramp=2.0,
                                   causal=True, max_span=4.0, dtype="float32")),
    ("float32-ring-entmax", dict(H=2, Hkv=2, alpha=[1.7, 1.2], span=None, causal=False, dtype="float32")),
    # key_padding_mask (PADDING): batch 0's first 10 keys masked (a whole shard, rows with no
    # readable key under causal), batch 1's first 7 (crossing a shard boundary) and holes.
    ("padding-halo-and-ring", dict(H=4, Hkv=2, alpha=[1.0, 1.5, 1.3, 2.0], span=[3.0, 30.0, 2.0, 4.5], ramp=2.0,
                                   causal=True, max_span=4.5, padding=True)),
    ("padding-ring-softmax-key-lengths", dict(H=2, Hkv=1, alpha=1.0, span=None, causal=False, padding=True,
                                              key_lengths=[20, 24])),
    ("padding-float32-both-sides", dict(H=2, Hkv=2, alpha=[1.5, 1.0], span=[2.5, 9.0], ramp=2.0, causal=False,
                                        max_span=3.0, padding=True, dtype="float32")),
    ("bfloat16-halo-and-ring", dict(H=2, Hkv=1, alpha=[1.5, 1.0], span=[2.0, 30.0], ramp=2.0, causal=True,
                                    max_span=3.0, dtype="bfloat16", key_lengths=[20, 24])),
]

L = 24
LENGTHS = {1: [24], 2: [10, 14], 3: [9, 7, 8], 4: [5, 7, 6, 6]}
EPS_INPUT = {"bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def _inputs(settings, seed):
    dtype = getattr(torch, settings.get("dtype", "float64"))
    g = torch.Generator().manual_seed(seed)
    B, D, Dv = 2, 4, 3
    H, Hkv = settings["H"], settings["Hkv"]
    q = (1.5 * torch.randn(B, H, L, D, generator=g, dtype=torch.float64)).to(dtype)
    k = (1.5 * torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)).to(dtype)
    v = torch.randn(B, Hkv, L, Dv, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(B, H, L, Dv, generator=g, dtype=torch.float64)  # the loss's weights
    if settings.get("key_lengths") is not None:  # padding may hold anything (SPEC.md 5.3)
        for b, n in enumerate(settings["key_lengths"]):
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("inf")
    mask = _padding(settings)
    if mask is not None:
        k[~mask[:, None, :, None].expand_as(k)] = float("nan")
        v[~mask[:, None, :, None].expand_as(v)] = float("inf")
    return q, k, v, w


def _padding(settings):
    """[B, L] bool (True = readable) for cases with padding=True, else None."""
    if not settings.get("padding"):
        return None
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[0, :10] = False
    mask[1, :7] = False
    mask[1, [11, 12, 17, 20]] = False
    return mask


def _param(value, dtype):
    return None if value is None else torch.tensor(value, dtype=dtype, requires_grad=True)


def _grads(fn, q, k, v, w, settings, dtype):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    alpha = _param(settings["alpha"], dtype)
    span = _param(settings.get("span"), dtype)
    out = fn(q, k, v, alpha, span)
    loss = (out.to(torch.float64) * w).sum()
    inputs = [q, k, v, alpha] + ([span] if span is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return [out.detach()] + [g.detach() for g in grads]


def run_case(name, settings, rank, world, seed=0):
    import attnspec
    from attnspec.distributed import torch as cp

    q, k, v, w = _inputs(settings, seed)
    dtype = q.dtype
    kwargs = dict(ramp=settings.get("ramp", 32.0), causal=settings["causal"],
                  key_lengths=None if settings.get("key_lengths") is None else torch.tensor(settings["key_lengths"]),
                  q_offset=None if settings.get("q_offset") is None else torch.tensor(settings["q_offset"]))
    mask = _padding(settings)
    full = {} if mask is None else {"key_padding_mask": mask}
    # The oracle: the single-device torch backend on the whole sequence, in float64 (on the
    # inputs as rounded to the dtype under test).
    expected = _grads(lambda q_, k_, v_, a, s: attnspec.attention(q_, k_, v_, alpha=a, span=s, backend="torch",
                                                                  **kwargs, **full),
                      q.double(), k.double(), v.double(), w, settings, torch.float64)
    lengths = LENGTHS[world]
    start = sum(lengths[:rank])
    sl = slice(start, start + lengths[rank])
    mine = {} if mask is None else {"key_padding_mask": mask[:, sl]}  # this rank's slice
    got = _grads(lambda q_, k_, v_, a, s: cp.attention(q_, k_, v_, alpha=a, span=s, max_span=settings.get("max_span"),
                                                       **kwargs, **mine),
                 q[:, :, sl], k[:, :, sl], v[:, :, sl], w[:, :, sl], settings, dtype)
    if settings.get("no_grad_check"):  # inference: no graph; the same values within the bound
        with torch.no_grad():
            again = cp.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha=torch.tensor(settings["alpha"], dtype=dtype),
                                 span=torch.tensor(settings["span"], dtype=dtype), max_span=settings.get("max_span"),
                                 **kwargs)
    else:
        again = None
    names = ["out", "dq", "dk", "dv", "dalpha", "dspan"]
    local = [expected[0][:, :, sl], expected[1][:, :, sl], expected[2][:, :, sl], expected[3][:, :, sl]] + expected[4:]
    eps_input = EPS_INPUT[settings.get("dtype", "float64")]
    eps_compute = 2.0**-52 if dtype == torch.float64 else 2.0**-23
    finite_k = torch.nan_to_num(k.double(), nan=0.0, posinf=0.0)
    finite_v = torch.nan_to_num(v.double(), nan=0.0, posinf=0.0)
    max_s = float((q.double().abs().amax() * finite_k.abs().amax() * q.shape[-1] ** 0.5))
    rel = 8 * eps_input + 64 * eps_compute * (1 + max_s)
    max_v = float(finite_v.abs().max())
    failures = []
    for n, e, a in zip(names, local, got):
        err = float((a.double() - e.double()).abs().max()) if e.numel() else 0.0
        if settings.get("dtype", "float64") == "float64":
            bound = 1e-12 * max(1.0, float(e.abs().max()))
        elif n == "out":
            bound = rel * max_v
        else:  # SPEC.md section 9, gradients (dout = w)
            bound = 16 * rel * max(float(e.abs().max()), float(w.abs().max()) * max(1.0, max_v))
        if not err <= bound:
            failures.append(f"{name}: {n} differs by {err:.3g} (bound {bound:.3g})")
        if n in ("dk", "dv") and mask is not None:  # masked keys: exactly 0 (SPEC.md 5.3)
            masked = ~mask[:, sl]
            if masked.any() and not bool((a.double().permute(0, 2, 1, 3)[masked] == 0).all()):
                failures.append(f"{name}: {n} of a masked key is not exactly 0")
        if n == "out" and again is not None:
            # Inference may take another (equally exact) path, e.g. torch-decode's sorted solve.
            err = float((again.double() - a.double()).abs().max()) if a.numel() else 0.0
            if not err <= 2 * bound:
                failures.append(f"{name}: under no_grad the output differs by {err:.3g} (bound {2 * bound:.3g})")
    return failures


def refusals(rank, world):
    """Malformed calls raise a clear error on every rank; those a rank can see from its own
    arguments raise before it waits on another (no collective runs)."""
    from attnspec.distributed import torch as cp

    q = torch.zeros(1, 2, LENGTHS[world][rank], 4)
    Lr = q.shape[2]
    # (change, words in the error, whether the check is local)
    checks = [
        (dict(k=q[:, :, :-1] if q.shape[2] > 1 else torch.zeros(1, 2, 2, 4)), "one length", True),
        (dict(span=2.0, max_span=-1.0), "max_span", True),
        (dict(key_lengths=torch.tensor([L + 1])), "key_lengths", False),  # needs the whole length
        (dict(key_lengths=torch.tensor([-1])), "key_lengths", True),
        (dict(key_lengths=torch.tensor([2.0])), "key_lengths", True),
        (dict(key_lengths=torch.tensor([3, 4])), "key_lengths", True),
        (dict(alpha=torch.tensor([1.5, 1.5, 1.5])), "alpha", True),
        (dict(key_padding_mask=torch.ones(1, L, dtype=torch.bool)), "key_padding_mask", True),  # not the slice
        (dict(key_padding_mask=torch.ones(1, Lr)), "key_padding_mask", True),  # not bool
    ]
    failures = []
    collectives = []
    original = dist.all_gather

    def counting(*args, **kwargs):
        collectives.append(1)
        return original(*args, **kwargs)

    for change, words, local in checks:
        kwargs = dict(k=q)
        kwargs.update(change)
        k = kwargs.pop("k")
        collectives.clear()
        dist.all_gather = counting
        try:
            cp.attention(q, k, k, **kwargs)
        except (ValueError, TypeError) as error:
            if words not in str(error):
                failures.append(f"refusal {change}: the error does not name {words!r}: {error}")
            if local and collectives:
                failures.append(f"refusal {change}: raised only after a collective")
        else:
            failures.append(f"refusal {change}: no error")
        finally:
            dist.all_gather = original
    return failures


def worker(rank, world, init_file, result_dir, only):
    torch.set_num_threads(1)
    from attnspec.distributed import torch as cp

    cp.RING_TILE_ELEMENTS, cp.RING_MIN_TILE = 1, 4  # many query tiles per ring block (uneven last tiles)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    failures = []
    try:
        for name, settings in CASES:
            if only and name not in only:
                continue
            try:
                failures += run_case(name, settings, rank, world)
            except Exception:
                failures.append(f"{name}: raised\n{traceback.format_exc()}")
                raise
        if not only:
            failures += refusals(rank, world)
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
        # Every rank is done with every collective before any rank tears down, and the last
        # references to gloo work objects (which hold Python tensors) go while the interpreter
        # is fully alive: a gloo worker thread releasing one during interpreter shutdown aborts.
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
