"""The benchmarks' ratio table: one value per row and its ratio to the baseline row's, as markdown."""

from __future__ import annotations


def print_ratio_table(values: dict[str, float], baseline: str, *, row: str, value: str) -> None:
    base = values[baseline]
    print(f"| {row} | {value} | ratio vs baseline |")
    print("|---|---|---|")
    for name, x in values.items():
        print(f"| {name} | {x:.1f} | {x / base:.2f}x |")
