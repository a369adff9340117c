"""Writing a benchmark result: JSON (everything), a Markdown table, PNG plots."""

from __future__ import annotations

import json
import math
import os


def _ms(seconds):
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _mib(nbytes):
    return "—" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _memory(row):
    """Peak MiB (per allocator when several were measured) and its ratio to the baseline's."""
    by = row.get("peak_bytes_by_allocator") or {}
    ratios = row.get("memory_ratio") or {}
    if len(by) <= 1:
        ratio = next(iter(ratios.values()), None)
        return _mib(row.get("peak_bytes")), "—" if ratio is None else f"{ratio:.3g}"
    return (" / ".join(f"{_mib(b)} ({a})" for a, b in by.items()),
            " / ".join(f"{ratios[a]:.3g}" if a in ratios else "—" for a in by))


def _err(x):
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.1e}"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(result) -> str:
    """One table per configuration: every target, with its ratio to the baseline or why it did
    not run."""
    d = result.to_dict() if hasattr(result, "to_dict") else result
    env = d["environment"]
    lines = [f"# attnspec bench: preset `{d['preset']}`", ""]
    if d.get("command"):
        lines += [f"Command: `{d['command']}`", ""]
    if d.get("provenance"):
        lines += [f"Provenance: {d['provenance']}.", ""]
    if d.get("regenerate"):
        lines += [f"To measure again: `{d['regenerate']}`", ""]
    device = ", ".join(sorted({str(v[0]) for v in env.get("devices", {}).values()})) or "cpu"
    lines += [
        f"Machine: {env.get('cpu')} ({env.get('cpus_usable')} usable CPUs), device {device}"
        + (f" ({env['cuda_device']})" if env.get("cuda_device") else "")
        + f"; Python {env.get('python')}, torch {env.get('torch', '—')}, jax {env.get('jax', '—')}, "
          f"entmax {env.get('entmax') or '—'}; attnspec {env.get('attnspec')} ({env.get('git') or 'no git'}).",
        f"Threads: torch {env.get('torch_threads', '—')} by default"
        + (f", every case run with {d['options']['threads']} (--threads)" if d["options"].get("threads") else "")
        + (f", environment {env['thread_env']}" if env.get("thread_env") else "")
        + f". Load average at start {_load(env.get('load_average_at_start'))}, at end "
          f"{_load(env.get('load_average_at_end'))}. {env.get('date', '')}",
        "",
        f"Times are the median of {d['options']['repeats']} calls after a warm-up (IQR: interquartile range) by "
        f"the {'process CPU' if d['options'].get('clock') == 'process' else 'wall'} clock, "
        f"`× {d['baseline']}` is the ratio to `{d['baseline']}` on the same case in this run; "
        "peak memory is the growth during one call in a fresh process (per glibc allocator setting when "
        "several are shown), `mem ×` its ratio to the baseline's; `max|err|` is the largest "
        "absolute error of the output against the float64 reference on the same (rounded) inputs, over the "
        "rows named in `ref rows`; the zero probabilities (sparsity) are those of the configuration's "
        "function (reference), of all Lq×Lk entries and of the allowed ones (causal, inside the span).",
        "",
    ]
    by_config = {}
    for row in d["rows"]:
        by_config.setdefault(row["config"], []).append(row)
    for config, rows in by_config.items():
        sparse = next((r for r in rows if r.get("sparsity") is not None), None)
        head = f"### {config}"
        if sparse is not None:
            head += (f" — zero probabilities: {100 * sparse['sparsity']:.1f} % of all, "
                     f"{100 * sparse['sparsity_allowed']:.1f} % of the allowed keys")
        base = rows[0].get("baseline") or d["baseline"]
        lines += [head, "",
                  f"| target | kind | median ms | IQR ms | × {base} | compile s | peak MiB | mem × | max\\|err\\| "
                  "| ref rows | notes |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in rows:
            if r["status"] == "ok":
                iqr = None if r["q3_s"] is None else r["q3_s"] - r["q1_s"]
                ratio = "—" if r.get("ratio") is None else f"{r['ratio']:.3g}"
                compile_s = "—" if r.get("compile_s") is None else f"{r['compile_s']:.2f}"
                notes = [x for x in (r.get("note"), r.get("ratio_note"),
                                     r.get("memory_error") and f"memory: {r['memory_error']}") if x]
                peak, memory_ratio = _memory(r)
                lines.append(f"| {r['target']} | {r['kind']} | {_ms(r['median_s'])} | {_ms(iqr)} | {ratio} | "
                             f"{compile_s} | {peak} | {memory_ratio} | {_err(r['max_abs_err'])} | "
                             f"{r.get('reference_rows') or '—'} | {_cell('; '.join(notes))} |")
            else:
                lines.append(f"| {r['target']} | {r['kind']} | — | — | — | — | — | — | — | — | "
                             f"{r['status']}: {_cell(r['reason'])} |")
        lines.append("")
    for overhead in d.get("dispatch_overhead") or []:
        lines += [f"### Dispatch overhead ({overhead['framework']})", "", overhead_markdown(overhead), ""]
    return "\n".join(lines)


def overhead_markdown(o) -> str:
    lines = [f"Tiny input {o['shape']} ({o['framework']}), fastest of {o['rounds']} rounds of {o['number']} calls, "
             f"by the wall clock and by the thread's CPU time; target ≤ {o['target_us']:g} µs.", "",
             "| what | µs per call (wall) | µs per call (CPU) |", "| --- | ---: | ---: |"]
    for key, label in (("validation", "validation alone"), ("selection", "selection alone (cached)"),
                       ("null_direct", "no-op kernel, called directly"),
                       ("null_dispatched", "no-op kernel, through attnspec.attention"),
                       ("overhead", "**dispatch overhead** (difference)")):
        lines.append(f"| {label} | {o[key + '_us']:.2f} | {o[key + '_cpu_us']:.2f} |")
    for b in o.get("backends", []):
        lines.append(f"| {b['backend']}: direct kernel call / dispatched (wall) | {b['direct_us']:.1f} / "
                     f"{b['dispatched_us']:.1f} | |")
    return "\n".join(lines)


def _load(x):
    return "—" if not x else ", ".join(f"{v:.1f}" for v in x)


def _keys(row):
    """The x axis: the key length (the sequence length of self-attention, the cache of a decode)."""
    return row.get("Lk") or row["L"]


def plot(result, path) -> str | None:
    """Time and peak memory against L (log-log), one line per target, one row of panels per
    configuration family. Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    d = result.to_dict() if hasattr(result, "to_dict") else result
    families = {}
    for row in d["rows"]:
        if row["status"] == "ok" and row.get("median_s") is not None:
            families.setdefault(row["family"], {}).setdefault(row["target"], []).append(row)
    if not families:
        return None
    if all(len(rows) <= 1 for by_target in families.values() for rows in by_target.values()):
        return _plot_ratios(d, path, plt)
    has_memory = any(r.get("peak_bytes") is not None for r in d["rows"])
    ncols = 2 if has_memory else 1
    fig, axes = plt.subplots(len(families), ncols, figsize=(6.5 * ncols, 3.6 * len(families)), squeeze=False)
    targets = sorted({t for f in families.values() for t in f})
    colours = {t: plt.cm.tab10(i % 10) for i, t in enumerate(targets)}
    for i, (family, by_target) in enumerate(families.items()):
        for name, rows in sorted(by_target.items()):
            rows = sorted(rows, key=_keys)
            style = dict(marker="o", color=colours[name], label=name,
                         linestyle="-" if rows[0]["kind"] == "attnspec" else "--")
            axes[i][0].plot([_keys(r) for r in rows], [r["median_s"] * 1e3 for r in rows], **style)
            if has_memory:
                mem = [r for r in rows if r.get("peak_bytes") is not None and r["peak_bytes"] > 0]
                if mem:
                    axes[i][1].plot([_keys(r) for r in mem], [r["peak_bytes"] / 2**20 for r in mem], **style)
        axes[i][0].set_ylabel("median time (ms)")
        axes[i][0].set_title(family, fontsize=8)
        if has_memory:
            axes[i][1].set_ylabel("peak memory of one call (MiB)")
            axes[i][1].set_title(family, fontsize=8)
        for ax in axes[i]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("Lk, keys (Lq = Lk unless the title says Lq != Lk)")
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].legend(fontsize=7)
    env = d["environment"]
    fig.suptitle(f"attnspec bench --preset {d['preset']}: {env.get('cpu')}, "
                 f"{', '.join(sorted({str(v[0]) for v in env.get('devices', {}).values()}))} "
                 f"(solid: attnspec backends, dashed: peers)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_ratios(d, path, plt) -> str:
    """Cases that share no family (each its own shape, as in a crossover table): one panel of
    each target's time ratio to the baseline against the case's size, one line per (target, α)."""
    lines = {}
    for row in d["rows"]:
        if row["status"] == "ok" and row.get("ratio") is not None:
            lines.setdefault((row["target"], row["alpha"]), []).append(
                (row["B"] * row["H"] * row["L"] * (row.get("Lk") or row["L"]), row["ratio"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, ((target, alpha), points) in enumerate(sorted(lines.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=plt.cm.tab10(i % 10),
                label=f"{target}, α={alpha:g}")
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set(xscale="log", yscale="log", xlabel="score entries B·H·Lq·Lk of the case",
           ylabel=f"time / {d['baseline']} (same case, same run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    env = d["environment"]
    ax.set_title(f"attnspec bench --preset {d['preset']}: {env.get('cpu')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result, prefix, *, plots=True) -> dict:
    """PREFIX.json, PREFIX.md and (with matplotlib) PREFIX.png; returns the paths written."""
    directory = os.path.dirname(prefix)
    if directory:
        os.makedirs(directory, exist_ok=True)
    paths = {}
    d = result.to_dict() if hasattr(result, "to_dict") else result
    with open(prefix + ".json", "w") as f:
        json.dump(d, f, indent=1, default=_json_default, allow_nan=True)
    paths["json"] = prefix + ".json"
    with open(prefix + ".md", "w") as f:
        f.write(markdown(d) + "\n")
    paths["markdown"] = prefix + ".md"
    if plots:
        png = plot(d, prefix + ".png")
        if png:
            paths["plot"] = png
    return paths


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    return str(x)
