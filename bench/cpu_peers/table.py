"""Renders the log of bench/cpu_peers/run.sh as one markdown table.

usage: table.py LOG DEFAULT_KERNEL

Per contender and shape: the median over passes of each pass's median of round medians (us).
`ours / TQ2_0` divides our default kernel's time by ggml TQ2_0's (median over passes; the range
over passes in parentheses, each pass its own same-run ratio). `p90/p10`: the spread of single
calls within one process (median over passes), and `p90 - p10`: the same spread in microseconds
(a disturbance of fixed length widens a short call's ratio more than a long one's). A contender whose CHECK exceeded 0.05 (relative
error against the exact product; activation quantization alone gives ~0.004) shows its error
instead of a time.
"""

import re
import statistics
import sys
from collections import defaultdict

log, default = sys.argv[1], sys.argv[2]
res = defaultdict(list)  # (name, shape) -> [(pass, med, p10, p90)]
bad = {}
pass_no = 0
for line in open(log):
    f = line.split()
    if not f:
        continue
    if f[0] == "PASS":
        pass_no = int(f[1])
    elif f[0] == "CHECK" and float(f[3]) > 0.05:
        bad[(f[1], f[2])] = float(f[3])
    elif f[0] == "RESULT":
        res[(f[1], f[2])].append((pass_no, float(f[3]), float(f[4]), float(f[5])))

shapes = list(dict.fromkeys(s for (_, s) in res))
names = list(dict.fromkeys(n for (n, _) in res))
ours = [n for n in names if n.startswith("ours_")]
cols = [("ggml_tq2_0", "ggml TQ2_0"), ("bitnet_i2_s", "bitnet.cpp I2_S"), ("bitnet_tl2", "bitnet.cpp TL2")]
cols += [(n, f"ours {n[5:]}" + (" (default)" if n == f"ours_{default}" else "")) for n in ours]
cols += [("candle_f32", "candle f32")]
cols = [c for c in cols if c[0] in names]


def fmt(us):
    return f"{us:,.0f}" if us >= 1000 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def med(name, shape):
    r = res.get((name, shape))
    return statistics.median(x[1] for x in r) if r else None


def spread(name, shape):
    r = res.get((name, shape))
    return f"{statistics.median(x[3] / x[2] for x in r):.2f}" if r else "-"


def width(name, shape):
    r = res.get((name, shape))
    return fmt(statistics.median(x[3] - x[2] for x in r)) if r else "-"


head = ["M x N x K"] + [c[1] for c in cols]
head += ["ours / TQ2_0 time", "p90/p10 TQ2_0, I2_S, ours", "p90 - p10 us TQ2_0, I2_S, ours"]
print("| " + " | ".join(head) + " |")
print("|" + " --- |" * len(head))
for s in shapes:
    row = [s.replace("x", " x ")]
    for n, _ in cols:
        if (n, s) in bad:
            row.append(f"wrong (err {bad[(n, s)]:.2g})")
        else:
            m = med(n, s)
            row.append(fmt(m) if m is not None else "-")
    o, t = f"ours_{default}", "ggml_tq2_0"
    if med(o, s) and med(t, s):
        per_pass = {p: v for p, v, _, _ in res[(o, s)]}
        tq = {p: v for p, v, _, _ in res[(t, s)]}
        ratios = sorted(per_pass[p] / tq[p] for p in per_pass if p in tq)
        rng = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
        row.append(f"{med(o, s) / med(t, s):.2f}{rng}")
    else:
        row.append("-")
    row.append(", ".join(spread(n, s) for n in ("ggml_tq2_0", "bitnet_i2_s", o)))
    row.append(", ".join(width(n, s) for n in ("ggml_tq2_0", "bitnet_i2_s", o)))
    print("| " + " | ".join(row) + " |")
