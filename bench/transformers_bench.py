"""A whole transformers model on attnspec against the same model on sdpa: prefill and decode
tokens per second.

    python -m attnspec.bench.transformers_bench --length 1024 --decode 64 --repeats 3 --json result.json

One Llama-style model (random weights, built from a config) with its weights copied into each
arm, so every arm computes with the same numbers:
- sdpa: attn_implementation="sdpa" (the peer);
- attnspec alpha=1: attnspec at softmax, no span (the same function as sdpa);
- attnspec alpha=1.5: entmax15, no span;
- attnspec span=256: alpha = 1, span 256 (ramp 32), decoding with span_cache (the cache keeps
  ceil(z + R) - 1 = 287 positions).
Prefill: one forward over B x length tokens; decode: `decode` greedy steps of one token each
from a prefilled cache (the prefill not timed). Reported as tokens/s and as the ratio to sdpa
in the same run; --json also writes the command, the CPU, the versions and the load before and
after, and a Markdown report next to the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ARMS = ("sdpa", "attnspec alpha=1", "attnspec alpha=1.5", "attnspec span=256")


def _settings(arm):
    if arm == "attnspec alpha=1.5":
        return dict(alpha=1.5)
    if arm == "attnspec span=256":
        return dict(max_span=256.0, span_init=1.0, ramp=32.0)
    return {}


def build(arm, args, state=None):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import attnspec.integrations.transformers as ats

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=4 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.length + args.decode + 8,
                         attention_dropout=0.0)
    torch.manual_seed(0)
    if arm == "sdpa":
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    else:
        ats.configure(config, **_settings(arm))
        model = AutoModelForCausalLM.from_config(config)
    if state is not None:
        model.load_state_dict(state, strict=False)  # the attnspec heads are not in the sdpa state
    return model.to(args.device).eval()


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _best(fn, repeats, device):
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _decode_seconds(model, arm, ids, args):
    """Seconds for args.decode greedy one-token steps after a prefill of ids (not timed)."""
    from transformers import DynamicCache

    import attnspec.integrations.transformers as ats

    cache = DynamicCache(config=model.config) if arm == "sdpa" else ats.span_cache(model)
    logits = model(input_ids=ids, cache=cache).logits
    _sync(args.device)
    start = time.perf_counter()
    for _ in range(args.decode):
        token = logits[:, -1:].argmax(-1)
        logits = model(input_ids=token, cache=cache).logits
    _sync(args.device)
    return time.perf_counter() - start


def measure(args) -> list[dict]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    reference = build("sdpa", args)
    state = reference.state_dict()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=g).to(args.device)
    rows = []
    for arm in args.arms:
        model = reference if arm == "sdpa" else build(arm, args, state)
        with torch.no_grad():
            model(input_ids=ids)  # warm-up
            prefill = _best(lambda: model(input_ids=ids), args.repeats, args.device)
            decode_time = min(_decode_seconds(model, arm, ids, args) for _ in range(args.repeats))
        rows.append(dict(arm=arm, prefill_tokens_per_s=args.batch * args.length / prefill,
                         decode_tokens_per_s=args.batch * args.decode / decode_time, prefill_s=prefill,
                         decode_s=decode_time))
    base = rows[0] if rows and rows[0]["arm"] == "sdpa" else None
    for row in rows:
        if base is not None:
            row["prefill_vs_sdpa"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
            row["decode_vs_sdpa"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return rows


def table(rows) -> str:
    lines = [f"{'arm':<20} {'prefill tok/s':>14} {'vs sdpa':>8} {'decode tok/s':>13} {'vs sdpa':>8}"]
    for r in rows:
        lines.append(f"{r['arm']:<20} {r['prefill_tokens_per_s']:>14.0f} {r.get('prefill_vs_sdpa', float('nan')):>8.3f} "
                     f"{r['decode_tokens_per_s']:>13.1f} {r.get('decode_vs_sdpa', float('nan')):>8.3f}")
    return "\n".join(lines)


def _uptime() -> str | None:
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(args) -> dict:
    """What a result needs to be read: versions, the CPU, threads, and the load."""
    import torch
    import transformers

    import attnspec

    from .core import _cpu_model, _git_commit

    return dict(torch=torch.__version__, transformers=transformers.__version__, attnspec=attnspec.__version__,
                git=_git_commit(), python=platform.python_version(), cpu=_cpu_model(), cpu_count=os.cpu_count(),
                threads=torch.get_num_threads(), device=args.device,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def markdown(result) -> str:
    env, c = result["environment"], result["config"]
    lines = [
        "# A whole transformers model: attnspec against sdpa",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {env['cpu']} ({env['cpu_count']} CPUs), device {env['device']}, torch threads {env['threads']}; "
        f"torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}; attnspec {env['attnspec']}"
        + (f" ({env['git']})" if env.get("git") else "") + f"; {env['date']}.",
        "",
        f"Load average before / after: {result['load_before']} / {result['load_after']} "
        f"(`uptime` before: `{result.get('uptime_before')}`; after: `{result.get('uptime_after')}`). With other work on the machine the times are noisy; "
        "the ratios compare arms measured back to back in the same run.",
        "",
        f"Model: Llama-style, {c['layers']} layers, width {c['width']}, {c['heads']} query heads / {c['kv_heads']} "
        f"key-value heads (head dim {c['width'] // c['heads']}), vocabulary {c['vocab']}, random weights from a "
        "config, the same weights in every arm, float32. "
        f"Prefill: one forward over B = {c['batch']} x L = {c['length']} tokens (best of {c['repeats']}). "
        f"Decode: {c['decode']} greedy one-token steps after a prefill of L tokens (not timed), best of "
        f"{c['repeats']}; sdpa decodes with transformers' DynamicCache, the attnspec arms with "
        "`span_cache(model)` (it keeps everything without a span, ceil(z + R) - 1 = 287 positions per layer with "
        "span 256, ramp 32).",
        "",
        "| arm | prefill tok/s | prefill vs sdpa | decode tok/s | decode vs sdpa |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {r['prefill_tokens_per_s']:.0f} | {r.get('prefill_vs_sdpa', float('nan')):.3f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r.get('decode_vs_sdpa', float('nan')):.3f} |")
    lines += ["", "Ratios are tokens/s of the arm over tokens/s of sdpa (above 1: faster than sdpa). sdpa computes "
              "softmax without a span; the alpha = 1.5 arm computes a different function (entmax15), timed for "
              "scale."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """The command line (exit status 0); `run` returns the rows."""
    run(argv)
    return 0


def run(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=1024, help="prompt length")
    parser.add_argument("--decode", type=int, default=32, help="new tokens per generate")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--json", help="also write the result as JSON to this path, and as Markdown next to it "
                                       "(the same path ending in .md)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.arms[0] != "sdpa":
        args.arms = ["sdpa"] + [a for a in args.arms if a != "sdpa"]
    command = "python -m attnspec.bench.transformers_bench " + " ".join(shlex.quote(a) for a in argv)
    load_before = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    uptime_before = _uptime()
    rows = measure(args)
    load_after = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print(f"B={args.batch} L={args.length} decode={args.decode} layers={args.layers} width={args.width} "
          f"heads={args.heads}/{args.kv_heads} device={args.device} load before {load_before} after {load_after}")
    print(table(rows))
    if args.json:
        result = dict(benchmark="transformers", command=command, config=vars(args), environment=environment(args),
                      load_before=load_before, load_after=load_after, uptime_before=uptime_before,
                      uptime_after=_uptime(), rows=rows)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        md = os.path.splitext(args.json)[0] + ".md"
        with open(md, "w") as f:
            f.write(markdown(result))
        print(f"wrote {args.json}, {md}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
