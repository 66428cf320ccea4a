"""The benchmark's numbers: medians and ranges per (backend, variant, budget), the ratios, markdown tables, the plot.

Ratios, all computed from the median records (a speedup > 1 means faster):

    prefill_speedup          unpruned prefill / pruned prefill, same backend and variant (unpruned = budget N)
    prefill_speedup_theory   (N + T) / (k + T): the linear layers' share, T = the prompt's non-image tokens
    ttft_speedup             unpruned TTFT / pruned TTFT, same backend and variant
    ppm_share                PPM + selection / unpruned prefill, same backend and variant
    *_vs_torch               PyTorch eager / this backend, same budget (prefill, TTFT, decode per token), both on
                             the first variant (torch runs the unquantized model only)
    *_vs_base                the first variant / this one, same backend and budget (prefill, decode per token);
                             decoder_size_vs_base: this decoder's bytes on disk / the first variant's
"""

from __future__ import annotations

import statistics
from pathlib import Path

from covipal.errors import CovipalError

TIMED = ("preprocess_ms", "vision_ms", "prune_ms", "ppm_select_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token",
         "peak_mem_mb", "device_mem_mb")
REFERENCE = "torch"


def summarize(samples: list[dict], backend: str, budget: int, num_visual: int, extra: dict) -> dict:
    """The record of one (backend, budget): the median of each timed field, its [min, max], and `extra`."""
    record: dict = {"backend": backend, "budget": budget, "tokens_total": num_visual,
                    "tokens_kept": samples[0]["tokens_kept"], "prefill_length": samples[0]["prefill_length"],
                    "repeats": len(samples), **extra}
    ranges = {}
    for name in TIMED:
        values = [s[name] for s in samples if s[name] is not None]
        record[name] = round(statistics.median(values), 3) if values else None
        if values:
            ranges[name] = [round(min(values), 3), round(max(values), 3)]
    record["range"] = ranges
    return record


def ratios(records: list[dict], text_tokens: int, base_variant: str) -> list[dict]:
    """One row of ratios per record (see the module docstring); None where the reference row is missing."""
    by_key = {(r["backend"], r["variant"], r["budget"]): r for r in records}
    rows = []
    for r in records:
        full = by_key.get((r["backend"], r["variant"], r["tokens_total"]))
        torch = (by_key.get((REFERENCE, base_variant, r["budget"]))
                 if r["backend"] != REFERENCE and r["variant"] == base_variant else None)
        base = by_key.get((r["backend"], base_variant, r["budget"])) if r["variant"] != base_variant else None
        rows.append({
            "backend": r["backend"], "variant": r["variant"], "budget": r["budget"],
            "prefill_speedup": _div(full and full["prefill_ms"], r["prefill_ms"]),
            "prefill_speedup_theory": (r["tokens_total"] + text_tokens) / (r["tokens_kept"] + text_tokens),
            "ttft_speedup": _div(full and full["ttft_ms"], r["ttft_ms"]),
            "ppm_share": _div(r["ppm_select_ms"], full and full["prefill_ms"]),
            "prefill_vs_torch": _div(torch and torch["prefill_ms"], r["prefill_ms"]),
            "ttft_vs_torch": _div(torch and torch["ttft_ms"], r["ttft_ms"]),
            "decode_vs_torch": _div(torch and torch["decode_ms_per_token"], r["decode_ms_per_token"]),
            "prefill_vs_base": _div(base and base["prefill_ms"], r["prefill_ms"]),
            "decode_vs_base": _div(base and base["decode_ms_per_token"], r["decode_ms_per_token"]),
            "decoder_size_vs_base": _div(r["decoder_mb"], base and base["decoder_mb"]),
        })
    return rows


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def records_table(records: list[dict]) -> str:
    """Markdown: medians with [min-max] per (backend, variant, budget)."""
    head = ["backend", "weights", "budget", "prefill len", "vision ms", "prune ms", "PPM+sel ms", "prefill ms",
            "TTFT ms", "decode ms/tok", "peak RSS MB", "ONNX/engine MB", "decoder MB"]
    rows = []
    for r in records:
        cells = [_cell(r, name) for name in ("vision_ms", "prune_ms", "ppm_select_ms", "prefill_ms", "ttft_ms",
                                             "decode_ms_per_token", "peak_mem_mb")]
        sizes = ["-" if r[name] is None else f"{r[name]:.0f}" for name in ("model_mb", "decoder_mb")]
        rows.append([r["backend"], r["variant"], f"{r['tokens_kept']}/{r['tokens_total']}", str(r["prefill_length"]),
                     *cells, *sizes])
    if any(r["device_mem_mb"] is not None for r in records):
        head.append("GPU MB")
        for row, r in zip(rows, records):
            row.append("-" if r["device_mem_mb"] is None else f"{r['device_mem_mb']:.0f}")
    return _markdown(head, rows)


def ratios_table(rows: list[dict]) -> str:
    """Markdown: speedups against the unpruned row, PyTorch eager and (quantized variants) the first variant."""
    head = ["backend", "weights", "budget", "prefill speedup (theory)", "TTFT speedup", "PPM+sel / unpruned prefill",
            "prefill vs torch", "TTFT vs torch", "decode vs torch"]
    variants = any(r["decode_vs_base"] is not None for r in rows)
    if variants:
        head += ["prefill vs first weights", "decode vs first weights", "decoder size vs first weights"]
    body = []
    for r in rows:
        body.append([r["backend"], r["variant"], str(r["budget"]),
                     f"{_x(r['prefill_speedup'])} ({_x(r['prefill_speedup_theory'])})", _x(r["ttft_speedup"]),
                     "-" if r["ppm_share"] is None else f"{100 * r['ppm_share']:.2f}%",
                     _x(r["prefill_vs_torch"]), _x(r["ttft_vs_torch"]), _x(r["decode_vs_torch"])])
        if variants:
            body[-1] += [_x(r["prefill_vs_base"]), _x(r["decode_vs_base"]), _x(r["decoder_size_vs_base"])]
    return _markdown(head, body)


def lane(backend: str, variant: str) -> str:
    """The name of one measured (backend, variant) pair: "ort int4"."""
    return f"{backend} {variant}"


def _lane(record: dict) -> str:
    return lane(record["backend"], record["variant"])


def _cell(record: dict, name: str) -> str:
    value = record[name]
    if value is None:
        return "-"
    low, high = record["range"][name]
    return f"{_num(value)} [{_num(low)}-{_num(high)}]" if record["repeats"] > 1 else _num(value)


def _num(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c) for c in column) for column in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def require_matplotlib() -> None:
    """Refuse --plot up front when matplotlib is missing (it is in the `tools` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CovipalError("--plot needs matplotlib: pip install 'covipal-export[tools]' (or matplotlib)") from None


def plot(records: list[dict], text_tokens: int, title: str, out: Path) -> None:
    """Three panels against the budget k: prefill (with the theoretical (k+T)/(N+T) scaling of the unpruned
    prefill, dashed), TTFT split into its stages, and decode ms per token; bars show min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = list(dict.fromkeys(_lane(r) for r in records))
    fig, (ax_prefill, ax_ttft, ax_decode) = plt.subplots(1, 3, figsize=(15, 4.5))
    for lane in lanes:
        rows = sorted((r for r in records if _lane(r) == lane), key=lambda r: r["tokens_kept"])
        kept = [r["tokens_kept"] for r in rows]
        for ax, name in ((ax_prefill, "prefill_ms"), (ax_decode, "decode_ms_per_token")):
            medians = [r[name] for r in rows]
            errors = [[m - r["range"][name][0] for m, r in zip(medians, rows)],
                      [r["range"][name][1] - m for m, r in zip(medians, rows)]]
            color = ax.errorbar(kept, medians, yerr=errors, marker="o", capsize=3, label=lane).lines[0].get_color()
        full = next((r for r in rows if r["tokens_kept"] == r["tokens_total"]), None)
        if full is not None:
            theory = [full["prefill_ms"] * (k + text_tokens) / (full["tokens_total"] + text_tokens) for k in kept]
            ax_prefill.plot(kept, theory, linestyle="--", color=color, linewidth=1)
    bars = [r for lane in lanes for r in sorted((r for r in records if _lane(r) == lane),
                                                key=lambda r: -r["tokens_kept"])]
    labels = [f"{_lane(r)}\nk={r['tokens_kept']}" for r in bars]
    bottom = [0.0] * len(bars)
    for name in ("preprocess_ms", "vision_ms", "prune_ms", "prefill_ms"):
        heights = [r[name] or 0.0 for r in bars]
        ax_ttft.bar(labels, heights, bottom=bottom, label=name.removesuffix("_ms"))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_prefill.set(title="prefill (dashed: (k+T)/(N+T) x unpruned)", xlabel="visual tokens kept k", ylabel="ms")
    ax_ttft.set(title="time to first token, by stage", ylabel="ms")
    ax_ttft.tick_params(axis="x", labelsize=7)
    ax_decode.set(title="decode per token", xlabel="visual tokens kept k", ylabel="ms")
    for ax in (ax_prefill, ax_ttft, ax_decode):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
