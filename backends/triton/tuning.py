"""Launch configurations of the Triton kernels per GPU family: tile sizes (shared by the three
kernels, since they fix the tile map the forward saves for the backward) and num_warps /
num_stages per kernel. Pure Python: `select` is unit-tested without a GPU.

The table is keyed by CUDA compute capability: "sm90" (H100, H200), "sm80" (A100) and
"default"; a key "sm8x" would cover the rest of a major version (A10, L4, RTX 30/40: 8.6, 8.9).
A capability (major, minor) takes the first of sm{major}{minor}, sm{major}x, default that the
table has. Within a family the
first entry whose max_head_dim (max(D, Dv)) and dtypes admit the call wins.

Every entry carries its `source`. An entry reading "untuned default" was NOT measured on that
GPU: it is what the kernels used before the table existed (64 x 64 tiles, 4 warps, 2 stages;
32 x 32 above head dim 128), which compiles for sm_80 (tests/test_triton_backend.py,
ATTNSPEC_TRITON_COMPILE=1). `python tools/triton_autotune.py` (a checkout's tool) on a GPU times the
candidates and prints a tuned entry for its family to paste here (its JSON keeps the timings).

ATTNSPEC_TRITON_CONFIG (a JSON object with the fields of an entry's config, e.g.
'{"BLOCK_M": 128, "BLOCK_N": 64, "forward": [8, 3]}', missing fields from the table's choice)
overrides the table for every launch in the process; the autotune sweep uses it. It is read at
each launch, and the backward reads the same value as its forward, as long as it is not changed
between them (the backward checks the tile map's shape and says so if it was).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

#: The kernels whose num_warps / num_stages are chosen separately.
KERNELS = ("forward", "backward_dq", "backward_dkdv")

_UNTUNED = ("untuned default: not measured on this GPU family; the values the kernels used before "
            "the table (run python tools/triton_autotune.py from a checkout on such a GPU)")


def _entries(source):
    return [
        dict(max_head_dim=128, BLOCK_M=64, BLOCK_N=64, forward=[4, 2], backward_dq=[4, 2], backward_dkdv=[4, 2],
             source=source),
        dict(max_head_dim=None, BLOCK_M=32, BLOCK_N=32, forward=[4, 2], backward_dq=[4, 2], backward_dkdv=[4, 2],
             source=source),
    ]


#: family -> entries, first match wins. JSON-compatible values only, so that the autotune
#: sweep's `table_entry` can be pasted in as it is printed.
CONFIGS = {
    "sm90": _entries(_UNTUNED),
    "sm80": _entries(_UNTUNED),
    "default": _entries(_UNTUNED),
}

#: Under the interpreter: small tiles keep the NumPy work per program small; warps and stages
#: mean nothing there.
INTERPRETER = dict(BLOCK_M=16, BLOCK_N=16, forward=[1, 1], backward_dq=[1, 1], backward_dkdv=[1, 1],
                   source="interpreter: fixed")

ENV = "ATTNSPEC_TRITON_CONFIG"


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    #: kernel name -> (num_warps, num_stages)
    launch: tuple
    family: str
    source: str

    def options(self, kernel: str) -> dict:
        warps, stages = dict(self.launch)[kernel]
        return dict(num_warps=warps, num_stages=stages)


def family_keys(capability) -> list[str]:
    """The table keys a CUDA capability (major, minor) tries, most specific first."""
    if capability is None:
        return ["default"]
    major, minor = (int(x) for x in capability)
    return [f"sm{major}{minor}", f"sm{major}x", "default"]


def _power_of_two(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def validate(entry: dict, where: str) -> None:
    """Raise ValueError naming the field of `entry` that a launch could not use."""
    for name in ("BLOCK_M", "BLOCK_N"):
        if name in entry and not (_power_of_two(entry[name]) and entry[name] >= 16):
            raise ValueError(f"{where}: {name}={entry[name]!r} must be a power of two >= 16 (tl.dot's minimum)")
    for kernel in KERNELS:
        if kernel not in entry:
            continue
        value = entry[kernel]
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise ValueError(f"{where}: {kernel}={value!r} must be [num_warps, num_stages]")
        warps, stages = value
        if not (_power_of_two(warps) and warps <= 32):
            raise ValueError(f"{where}: {kernel} num_warps={warps!r} must be a power of two <= 32")
        if not (isinstance(stages, int) and not isinstance(stages, bool) and stages >= 1):
            raise ValueError(f"{where}: {kernel} num_stages={stages!r} must be an integer >= 1")
    dtypes = entry.get("dtypes")
    if dtypes is not None and not (isinstance(dtypes, list) and dtypes
                                   and set(dtypes) <= {"float16", "bfloat16", "float32"}):
        raise ValueError(f"{where}: dtypes={dtypes!r} must be a non-empty list of float16, bfloat16, float32")
    if entry.get("max_head_dim") is not None and not (isinstance(entry["max_head_dim"], int)
                                                     and entry["max_head_dim"] > 0):
        raise ValueError(f"{where}: max_head_dim={entry['max_head_dim']!r} must be a positive integer or None")
    unknown = set(entry) - {"BLOCK_M", "BLOCK_N", "max_head_dim", "dtypes", "source", *KERNELS}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")


def _matches(entry, head_dim, dtype):
    limit = entry.get("max_head_dim")
    return (limit is None or head_dim <= limit) and (entry.get("dtypes") is None or dtype in entry["dtypes"])


def _override(env):
    text = env.get(ENV)
    if not text:
        return None
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV}={text!r} is not JSON: {exc}") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{ENV}={text!r} must be a JSON object")
    validate(entry, ENV)
    return entry


def select(capability, head_dim: int, dtype: str, *, interpreted: bool = False, table=None,
           env=None) -> LaunchConfig:
    """The launch configuration for a call: `capability` is torch.cuda.get_device_capability()
    of the tensors' device, or None (meta tensors: any family's tiles do for shapes);
    `head_dim` is max(D, Dv); `dtype` a torch dtype's name ("bfloat16")."""
    if interpreted:
        return _config(INTERPRETER, "interpreter")
    table = CONFIGS if table is None else table
    env = os.environ if env is None else env
    for key in family_keys(capability):
        for entry in table.get(key, ()):
            if _matches(entry, head_dim, dtype):
                chosen, family = entry, key
                break
        else:
            continue
        break
    else:
        raise LookupError(f"no launch configuration for capability {capability}, head dim {head_dim}, {dtype}: "
                          f"the table's 'default' family must end with an entry for every head dim")
    override = _override(env)
    if override is not None:
        chosen = dict(chosen, **override, source=f"{ENV} override")
    return _config(chosen, family)


def _config(entry, family):
    return LaunchConfig(block_m=entry["BLOCK_M"], block_n=entry["BLOCK_N"],
                        launch=tuple((k, tuple(entry[k])) for k in KERNELS), family=family,
                        source=entry.get("source", ""))


def check_table(table=None) -> None:
    """Every entry valid, and every family ending with an entry that admits any head dim and
    dtype (so that `select` never falls through to another family by accident)."""
    table = CONFIGS if table is None else table
    if "default" not in table:
        raise ValueError("the table needs a 'default' family")
    for key, entries in table.items():
        for i, entry in enumerate(entries):
            validate(entry, f"CONFIGS[{key!r}][{i}]")
            for name in ("BLOCK_M", "BLOCK_N", *KERNELS, "source"):
                if name not in entry:
                    raise ValueError(f"CONFIGS[{key!r}][{i}] lacks {name}")
        last = entries[-1] if entries else {}
        if last.get("max_head_dim") is not None or last.get("dtypes") is not None:
            raise ValueError(f"CONFIGS[{key!r}] must end with an entry for any head dim and dtype")
