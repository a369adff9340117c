"""Fine-tune alpha and span of a small Llama-style transformers model on the char-LM corpus.

    python examples/transformers_finetune.py --pretrain-steps 200 --steps 200 --plot spans.png

1. builds a Llama-style byte-level model (transformers' LlamaConfig, random weights, no
   download) and trains it briefly with ordinary softmax attention (alpha = 1, no span): the
   stand-in for a pretrained checkpoint;
2. adds attnspec heads to it (`add_heads`): a learned alpha per head (from 1 + sigmoid(a),
   starting at --alpha) and a learned span per head (z = max_span * theta, from --span-init);
3. fine-tunes (every weight, or with --heads-only just alpha and span) with the adaptive-span
   regulariser, keeping theta in [0, 1] after each step;
4. prints the learned alpha and span of every layer and head, the held-out bits per character
   before and after, and with --plot draws them (needs matplotlib).

The corpus is the char-LM experiment's (Python stdlib files checked against
experiments/corpus/stdlib_py<X.Y>.json). Run from the repository root.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attnspec.integrations.transformers as ats  # noqa: E402
from attnspec.layers.torch import project_spans, span_regularisation  # noqa: E402
from experiments.char_lm import default_manifest, load_corpus  # noqa: E402


def batches(data: np.ndarray, batch: int, context: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - context - 1, size=batch)
        yield torch.from_numpy(np.stack([data[s:s + context] for s in starts]).astype(np.int64))


@torch.no_grad()
def bits_per_char(model, data: np.ndarray, context: int, chars: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(chars, len(data) - context - 1), context):
        ids = torch.from_numpy(data[start:start + context].astype(np.int64))[None]
        total += model(input_ids=ids, labels=ids).loss.item() * (context - 1)
        count += context - 1
    model.train()
    return total / max(count, 1) / math.log(2)


def train(model, data, args, steps, rng, coefficient=0.0):
    params = [p for name, p in model.named_parameters() if not args.heads_only or ".attnspec." in name]
    optimiser = torch.optim.Adam(params, lr=args.lr)
    stream = batches(data, args.batch, args.context, rng)
    for step in range(steps):
        ids = next(stream)
        loss = model(input_ids=ids, labels=ids).loss
        total = loss + (span_regularisation(model, coefficient) if coefficient else 0.0)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        project_spans(model)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}")


def report(model):
    rows = []
    for layer in ats.attention_layers(model):
        heads = layer.attnspec
        alpha = torch.as_tensor(heads.alpha).detach().float().expand(heads.n_heads)
        span = heads.span.detach().float()
        rows.append((layer.layer_idx, alpha.numpy(), span.numpy()))
        print(f"  layer {layer.layer_idx}: alpha [{', '.join(f'{a:.3f}' for a in alpha.tolist())}]  "
              f"span [{', '.join(f'{z:.1f}' for z in span.tolist())}]  (cache bound {heads.cache_bound()})")
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for layer, alpha, span in rows:
        left.plot(range(len(alpha)), alpha, "o-", label=f"layer {layer}")
        right.plot(range(len(span)), span, "o-", label=f"layer {layer}")
    left.set(xlabel="head", ylabel="alpha", title="learned alpha")
    right.set(xlabel="head", ylabel="span z (tokens)", title="learned span")
    left.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=1.5)
    parser.add_argument("--max-span", type=float, default=128.0)
    parser.add_argument("--span-init", type=float, default=0.5)
    parser.add_argument("--ramp", type=float, default=16.0)
    parser.add_argument("--span-coef", type=float, default=2e-5)
    parser.add_argument("--heads-only", action="store_true", help="fine-tune alpha and span only")
    parser.add_argument("--eval-chars", type=int, default=8192)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train_bytes, heldout_bytes, _ = load_corpus(default_manifest())
    train_data = np.frombuffer(train_bytes, dtype=np.uint8)
    heldout = np.frombuffer(heldout_bytes, dtype=np.uint8)
    config = LlamaConfig(vocab_size=256, hidden_size=args.width, intermediate_size=4 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=args.context,
                         attention_dropout=0.0, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    print(f"pretraining with softmax attention (sdpa), {args.pretrain_steps} steps")
    train(model, train_data, argparse.Namespace(**{**vars(args), "heads_only": False}), args.pretrain_steps, rng)
    before = bits_per_char(model, heldout, args.context, args.eval_chars)
    print(f"held-out bits/char, softmax: {before:.3f}")

    ats.add_heads(model, alpha=args.alpha, learn_alpha=True, max_span=args.max_span, span_init=args.span_init,
                  ramp=args.ramp)
    print(f"fine-tuning alpha and span{' only' if args.heads_only else ' and every weight'}, {args.steps} steps")
    train(model, train_data, args, args.steps, rng, coefficient=args.span_coef)
    after = bits_per_char(model, heldout, args.context, args.eval_chars)
    print(f"held-out bits/char, attnspec: {after:.3f} (softmax before: {before:.3f})")
    rows = report(model)
    if args.plot:
        plot(rows, args.plot)
    return dict(before=before, after=after, rows=rows)


if __name__ == "__main__":
    main()
