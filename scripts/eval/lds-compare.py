#!/usr/bin/env python3
"""Paired comparison of two eval-lds runs that share their retraining jobs (the same subsets
and measured losses) but scored with different settings, e.g. two `adam_response` values:

    scripts/eval/lds-compare.py RUN_A RUN_B [FIRST LAST] [--resamples=N] [--method-b=NAME]

Reads RUN_{A,B}/eval-lds/points.parquet, takes every method of A and B's `source` (or B's
method NAME with --method-b=NAME, e.g. an influence function with another damping)
relabelled as `source@B` (`NAME@B`), restricted to subsets FIRST..LAST-1 (default: all), and prints each
method's LDS (mean over queries of Spearman's rho between predicted and measured loss) and
the paired percentile-bootstrap 95% interval of the differences (each resample draws one
set of subsets for all methods, as `eval-lds` does for its `- first` column). Refuses runs
whose measured losses differ (they did not share their retrainings).

Needs pyarrow (the test environment's `.cache/py` has it).
"""

import random
import sys

import pyarrow.parquet as pq


def ranks(x):
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0
        i = j + 1
    return r


def pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa = sum((x - ma) ** 2 for x in a)
    sbb = sum((y - mb) ** 2 for y in b)
    return sab / (saa * sbb) ** 0.5 if saa > 0 and sbb > 0 else None


def spearman(a, b):
    return pearson(ranks(a), ranks(b))


def load(run):
    t = pq.read_table(f"{run}/eval-lds/points.parquet").to_pydict()
    out = {}
    for m, q, s, seed, p, y in zip(
        t["method"], t["query_id"], t["subset"], t["seed"], t["predicted"], t["measured"]
    ):
        cell = out.setdefault(m, {}).setdefault(q, {}).setdefault(s, [0.0, 0.0, 0])
        cell[0] = p  # the prediction does not depend on the seed
        cell[1] += y
        cell[2] += 1
    return {
        m: {q: {s: (c[0], c[1] / c[2]) for s, c in qs.items()} for q, qs in mq.items()}
        for m, mq in out.items()
    }


def lds(method, pick):
    rhos = [
        spearman([method[q][s][0] for s in pick], [method[q][s][1] for s in pick])
        for q in method
    ]
    rhos = [r for r in rhos if r is not None]
    return sum(rhos) / len(rhos) if rhos else float("nan")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    resamples = 500
    mb = "source"
    for a in sys.argv[1:]:
        if a.startswith("--resamples="):
            resamples = int(a.split("=", 1)[1])
        if a.startswith("--method-b="):
            mb = a.split("=", 1)[1]
    if len(args) not in (2, 4):
        sys.exit(__doc__)
    a, b = load(args[0]), load(args[1])
    if mb not in b:
        sys.exit(f"{args[1]}: no `{mb}` method in eval-lds/points.parquet")
    methods = dict(a)
    methods[f"{mb}@B"] = b[mb]
    some = next(iter(a.values()))
    for q, subs in some.items():
        for s, (_, y) in subs.items():
            yb = b[mb].get(q, {}).get(s)
            if yb is None or abs(yb[1] - y) > 1e-9 * max(1.0, abs(y)):
                sys.exit(f"the runs' measured losses differ at query {q}, subset {s}")
    subsets = sorted(next(iter(some.values())).keys())
    if len(args) == 4:
        lo, hi = int(args[2]), int(args[3])
        subsets = [s for s in subsets if lo <= s < hi]
    names = list(methods)
    base = {m: lds(methods[m], subsets) for m in names}
    rnd = random.Random(0)
    boots = {m: [] for m in names}
    for _ in range(resamples):
        pick = [rnd.choice(subsets) for _ in subsets]
        for m in names:
            boots[m].append(lds(methods[m], pick))
    lo_i, hi_i = int(0.025 * (resamples - 1)), int(0.975 * (resamples - 1))
    print(f"{len(subsets)} subsets ({subsets[0]}..{subsets[-1]}), {resamples} paired resamples")
    for m in names:
        print(f"  {m:<14} LDS {base[m]:+.3f}")
    first = names[0]
    for m in names[1:]:
        d = sorted(x - y for x, y in zip(boots[m], boots[first]))
        print(f"  {m} - {first}: {base[m] - base[first]:+.3f} [{d[lo_i]:+.3f}, {d[hi_i]:+.3f}]")
    if "influence" in names and first != "influence":
        d = sorted(x - y for x, y in zip(boots[f"{mb}@B"], boots["influence"]))
        print(
            f"  {mb}@B - influence: {base[f'{mb}@B'] - base['influence']:+.3f} "
            f"[{d[lo_i]:+.3f}, {d[hi_i]:+.3f}]"
        )


if __name__ == "__main__":
    main()
