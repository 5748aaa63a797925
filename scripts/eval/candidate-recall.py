#!/usr/bin/env python3
"""Recall of the exact top-k among candidate-scored documents.

Usage: candidate-recall.py EXACT_RUN CANDIDATE_RUN [K ...]   (default K: 1 5 10)

EXACT_RUN scored every document; CANDIDATE_RUN is the same run (same fine-tune, fit and
queries) scored with `[attribution.candidates]`. For each query and K it prints the share of
EXACT_RUN's K highest-tau documents that are among CANDIDATE_RUN's K highest (the exact top-K
found), the same for the K lowest (opponents), the largest relative difference of the scores
both runs hold (the candidates are scored exactly, so it should be float noise), and the
scored share and wall time of each run's score stage (from manifest.json).
"""
import json
import sys
from pathlib import Path

import pyarrow.dataset as ds


def scores(run):
    root = Path(run) / "score" / "query_set=default"
    t = ds.dataset(str(root), format="parquet", partitioning="hive").to_table(
        columns=["query_id", "train_id", "dataset", "tau"]
    )
    out = {}
    for q, m, d, tau in zip(*(t.column(c).to_pylist() for c in ["query_id", "train_id", "dataset", "tau"])):
        out.setdefault(q, {})[(d, m)] = tau
    return out


def stage(run, name):
    return json.loads((Path(run) / "manifest.json").read_text())["stages"].get(name, {})


def main():
    exact_run, cand_run = sys.argv[1], sys.argv[2]
    ks = [int(k) for k in sys.argv[3:]] or [1, 5, 10]
    exact, cand = scores(exact_run), scores(cand_run)
    worst = 0.0
    rec = {k: [] for k in ks}
    rec_low = {k: [] for k in ks}
    for q, e in exact.items():
        c = cand.get(q, {})
        for key, v in c.items():
            d = abs(v - e[key]) / max(abs(e[key]), 1e-12)
            worst = max(worst, d)
        e_sorted = sorted(e, key=lambda x: -e[x])
        c_sorted = sorted(c, key=lambda x: -c[x])
        for k in ks:
            rec[k].append(len(set(e_sorted[:k]) & set(c_sorted[:k])) / k)
            rec_low[k].append(len(set(e_sorted[-k:]) & set(c_sorted[-k:])) / k)
    n_q = len(exact)
    summary = stage(cand_run, "score").get("summary", {}).get("candidates", {})
    print(f"queries: {n_q}; candidates: {json.dumps(summary)}")
    for k in ks:
        print(
            f"recall@{k} of the exact top-{k}: {sum(rec[k]) / n_q:.3f}   "
            f"(bottom-{k}: {sum(rec_low[k]) / n_q:.3f}; per query {[round(x, 2) for x in rec[k]]})"
        )
    roles = sorted({d for e in exact.values() for (d, _) in e})
    if len(roles) > 1:
        for role in roles:
            for k in ks:
                got = []
                for q, e in exact.items():
                    c = {key: v for key, v in cand.get(q, {}).items() if key[0] == role}
                    e = {key: v for key, v in e.items() if key[0] == role}
                    top_e = set(sorted(e, key=lambda x: -e[x])[:k])
                    top_c = set(sorted(c, key=lambda x: -c[x])[:k])
                    got.append(len(top_e & top_c) / k)
                print(f"  within `{role}`: recall@{k} {sum(got) / len(got):.3f}")
    print(f"largest relative score difference on shared rows: {worst:.2e}")
    for name, run in [("exact", exact_run), ("candidates", cand_run)]:
        s = stage(run, "score")
        print(f"{name}: score stage {s.get('wall_s', float('nan')):.2f} s wall")
    ix = stage(cand_run, "index")
    if ix:
        print(f"index stage (once per run): {ix.get('wall_s', float('nan')):.2f} s wall, "
              f"{ix.get('summary', {}).get('bytes', 0) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
