"""Slow phases in a `cpu_bench --samples FILE` record: how the slow calls cluster.

usage: phases.py FILE [SLOW]

Per contender and shape, in the order the samples were taken: p10 / median / p90 (us), the
share of samples slower than SLOW x the median (default 1.15), and how those slow samples come:
the share of them inside runs of at least 8 consecutive slow samples, and the longest run. A
disturbance that hits single calls gives short runs; a phase of the machine (lasting many
calls) gives long ones.
"""

import sys
from collections import defaultdict

path = sys.argv[1]
slow_factor = float(sys.argv[2]) if len(sys.argv) > 2 else 1.15
series = defaultdict(list)
for line in open(path):
    name, shape, us = line.split()
    series[(name, shape)].append(float(us))

print(f"| contender | M x N x K | p10 / median / p90 us | slower than {slow_factor} x median | of those in runs >= 8 | longest run |")
print("| --- | --- | --- | --- | --- | --- |")
for (name, shape), v in series.items():
    s = sorted(v)
    q = lambda p: s[round(p * (len(s) - 1))]
    med = q(0.5)
    slow = [x > slow_factor * med for x in v]
    runs, r = [], 0
    for is_slow in slow + [False]:
        if is_slow:
            r += 1
        elif r:
            runs.append(r)
            r = 0
    n_slow = sum(slow)
    in_long = sum(x for x in runs if x >= 8)
    share = f"{in_long / n_slow:.0%}" if n_slow else "-"
    print(f"| {name} | {shape.replace('x', ' x ')} | {q(0.1):.1f} / {med:.1f} / {q(0.9):.1f} | "
          f"{n_slow / len(v):.1%} | {share} | {max(runs, default=0)} |")
