"""The per-model verbosity prior: how long each model's answers are, relative to the median model.

Reads the `out_chars:<model>` columns of the shared MMLU-Pro correctness data (the length in
characters of each model's answer to the same 12,032 five-shot chain-of-thought prompts),
and prints, per CSV model, the median and 90th percentile answer length, and the median
relative to the median model (the number frugalflow/data/verbosity.toml keeps as `relative`);
then the rows for the built-in catalog models that `MAPPING` below ties to a CSV model, in
the TOML form of the data file. Rows with no answer (blank or 0 characters) are left out.

    python bench/verbosity_prior.py [--data ../shared/data/mmlu-pro/mmlu_pro_correctness.csv.gz]

It prints figures; nothing is written. Regenerate the data file's model rows by hand from
the printed TOML (the reasoning multipliers there are stated assumptions, not from this CSV).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "data" / "mmlu-pro" / "mmlu_pro_correctness.csv.gz"
FALLBACK = Path("/work/shared/data/mmlu-pro/mmlu_pro_correctness.csv.gz")

# Built-in model (its catalog `quality_ref`) -> the CSV model it is measured by, and how close
# that is. Only the exact model, or an earlier version of the same model line and size.
MAPPING: dict[str, tuple[str, str]] = {
    "gpt-4o": ("gpt-4o-2024-05-13", "exact model (2024-05-13 snapshot)"),
    "llama-3.1-8b": ("Meta-Llama-3_1-8B-Instruct", "exact model"),
    "llama-3.3-70b": ("Meta-Llama-3_1-70B-Instruct", "proxy: Llama 3.1 70B Instruct, the "
                      "previous version of the same line and size"),
    "deepseek-chat": ("deepseek-chat-2024-05", "proxy: the deepseek-chat endpoint's 2024-05 "
                      "(V2-era) snapshot"),
    "gemini-2.5-flash": ("gemini-1.5-flash-002", "proxy: Gemini 1.5 Flash 002, an earlier "
                         "version of the Flash line (visible answer only)"),
    "gemini-2.5-flash-lite": ("gemini-1.5-flash-002", "proxy: Gemini 1.5 Flash 002, an earlier "
                              "version of the Flash line"),
    "gemini-2.5-pro": ("gemini-1.5-pro-002", "proxy: Gemini 1.5 Pro 002, an earlier version "
                       "of the Pro line (visible answer only)"),
}


def lengths(path: Path) -> dict[str, list[float]]:
    """Per CSV model, the answer lengths in characters (blank and 0 left out)."""
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        cols = [c for c in reader.fieldnames or [] if c.startswith("out_chars:")]
        out: dict[str, list[float]] = {c.removeprefix("out_chars:"): [] for c in cols}
        for row in reader:
            for c in cols:
                v = row[c]
                if v and float(v) > 0:
                    out[c.removeprefix("out_chars:")].append(float(v))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT if DEFAULT.exists() else FALLBACK)
    args = p.parse_args()
    table = {m: (len(v), statistics.median(v), statistics.quantiles(v, n=10)[8])
             for m, v in lengths(args.data).items() if v}
    median_model = statistics.median(p50 for _, p50, _ in table.values())
    spread = statistics.median(p90 / p50 for _, p50, p90 in table.values())
    print(f"{'CSV model':32} {'n':>6} {'p50 chars':>10} {'p90 chars':>10} {'relative':>9}")
    for m, (n, p50, p90) in sorted(table.items(), key=lambda kv: kv[1][1]):
        print(f"{m:32} {n:6d} {p50:10.0f} {p90:10.0f} {p50 / median_model:9.2f}")
    print(f"\nmedian model: {median_model:.1f} chars (about {median_model / 4:.0f} tokens at 4 "
          f"chars a token); median p90/p50 spread over models: {spread:.2f}\n")
    print(f"median_model_chars = {median_model:.1f}\nspread = {spread:.2f}\n")
    for ref, (col, how) in MAPPING.items():
        n, p50, _ = table[col]
        print(f'[models."{ref}"]\nrelative = {p50 / median_model:.2f}\n'
              f'source = "MMLU-Pro out_chars:{col}, median {p50:.0f} chars over {n} answers; '
              f'{how}"\n')


if __name__ == "__main__":
    main()
