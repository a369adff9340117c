"""A whole transformers model on attnspec against the same model on sdpa: prefill and decode
tokens per second.

    python -m attnspec.bench.transformers_bench --length 1024 --decode 64 --repeats 3

One Llama-style model (random weights, built from a config) with its weights copied into each
arm, so every arm computes with the same numbers:
- sdpa: attn_implementation="sdpa" (the peer);
- attnspec alpha=1: attnspec at softmax, no span (the same function as sdpa);
- attnspec alpha=1.5: entmax15, no span;
- attnspec span=256: alpha = 1, span 256 (ramp 32), decoding with span_cache (the cache keeps
  ceil(z + R) - 1 = 287 positions).
Prefill: one forward over B x length tokens; decode: `decode` greedy steps of one token each
from a prefilled cache (the prefill not timed). Reported as tokens/s and as the ratio to sdpa
in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main(argv=None):
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
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.arms[0] != "sdpa":
        args.arms = ["sdpa"] + [a for a in args.arms if a != "sdpa"]
    rows = measure(args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"B={args.batch} L={args.length} decode={args.decode} layers={args.layers} width={args.width} "
          f"heads={args.heads}/{args.kv_heads} device={args.device} load={load:.2f}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), load=load, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
