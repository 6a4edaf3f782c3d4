#!/usr/bin/env python3
"""Plots docs/perf-apply-sweep.csv (written by
`cargo run --release -p conv-runtime --example bench_runtime -- --sweep`)
into docs/perf-apply-sweep.png. Needs matplotlib (`pip install matplotlib`)."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "docs/perf-apply-sweep.csv"
dst = sys.argv[2] if len(sys.argv) > 2 else "docs/perf-apply-sweep.png"
rows = list(csv.DictReader(open(src)))
turns = [int(r["turns"]) for r in rows]
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(turns, [float(r["apply_p50_us"]) for r in rows], marker="o", label="apply one delta, p50")
ax.plot(turns, [float(r["apply_p99_us"]) for r in rows], marker="o", label="apply one delta, p99")
ax.plot(turns, [float(r["digest_us"]) for r in rows], marker="s", linestyle="--", label="whole-state digest (replay only)")
ax.axhline(50, color="grey", linewidth=0.8, linestyle=":", label="target: p99 ≤ 50 µs at 400 turns")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("turns already in the conversation (2 KB message + 20 deltas each)")
ax.set_ylabel("µs")
ax.set_title("conv-runtime: cost of one input vs conversation length")
ax.legend(fontsize=8)
ax.grid(True, which="both", linewidth=0.3)
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
