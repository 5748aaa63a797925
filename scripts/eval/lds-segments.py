#!/usr/bin/env python3
"""Which of Source's segments carries its LDS? A diagnostic on one finished eval-lds run:

    scripts/eval/lds-segments.py RUN_DIR

For each segment column of the scores (RUN_DIR/score/query_set=default/shard=*/*.parquet;
`segment_K_STAGE`; they add up to `score`), the LDS that column alone would have: per query, Spearman's rho between the
predicted loss -sum_{m in S} tau_K(q, m) and the measured loss over the retraining jobs of
RUN_DIR/eval-lds/summary.json's `jobs_dir` (seeds averaged), then the mean over queries; with
each column's mean |tau| over (query, training document) pairs, and the LDS of the sums of the
last k fine-tuning segments. Segments whose scores are all 0 on the fine-tuning documents (the
pretraining segment) have no LDS ("-"). Not a method: it reads a finished run's outputs and
changes nothing.

Needs pyarrow (the test environment's `.cache/py` has it); Spearman's rho is lds-compare.py's.
"""

import glob
import importlib.util
import json
import os
import sys

import pyarrow.parquet as pq

_spec = importlib.util.spec_from_file_location(
    "lds_compare", os.path.join(os.path.dirname(os.path.abspath(__file__)), "lds-compare.py")
)
lds_compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lds_compare)


def load_jobs(run):
    """Per subset: its documents and, per query, the measured loss averaged over seeds."""
    with open(f"{run}/eval-lds/summary.json") as f:
        jobs_dir = json.load(f)["jobs_dir"]
    subsets = {}
    for path in sorted(glob.glob(f"{run}/{jobs_dir}/subset-*-seed-*.json")):
        with open(path) as f:
            job = json.load(f)
        docs, sums = subsets.setdefault(job["subset"], (job["doc_ids"], {}))
        for q, y in zip(job["query_ids"], job["measured"]):
            c = sums.setdefault(q, [0.0, 0])
            c[0] += y
            c[1] += 1
    if not subsets:
        sys.exit(f"{run}/{jobs_dir}: no retraining jobs (run `source-tda eval lds` first)")
    return [(docs, {q: s / n for q, (s, n) in sums.items()}) for docs, sums in subsets.values()]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    run = sys.argv[1]
    t = pq.ParquetDataset(f"{run}/score/query_set=default", partitioning="hive").read().to_pydict()
    columns = [c for c in t if c.startswith("segment_")] + ["score"]
    tau = {}
    for i, dataset in enumerate(t["dataset"]):
        if dataset == "train":
            tau[(t["query_id"][i], t["train_id"][i])] = {c: t[c][i] for c in columns}
    jobs = load_jobs(run)
    queries = sorted(jobs[0][1])

    def lds(score):
        rhos = []
        for q in queries:
            predicted = [-sum(score(tau[(q, m)]) for m in docs) for docs, _ in jobs]
            rho = lds_compare.spearman(predicted, [measured[q] for _, measured in jobs])
            if rho is not None:
                rhos.append(rho)
        return sum(rhos) / len(rhos) if rhos else None

    def show(x):
        return "-" if x is None else f"{x:+.3f}"

    print(f"{len(jobs)} subsets, {len(queries)} queries, {len(tau) // len(queries)} documents")
    for c in columns:
        mean_abs = sum(abs(v[c]) for v in tau.values()) / len(tau)
        print(f"  {c:<22} LDS {show(lds(lambda v: v[c]))}  mean |tau| {mean_abs:.4g}")
    finetune = [c for c in columns if c.startswith("segment_") and c.endswith("_finetune")]
    for k in range(2, len(finetune) + 1):
        last = finetune[-k:]
        print(f"  last {k} fine-tuning segments  LDS {show(lds(lambda v: sum(v[c] for c in last)))}")


if __name__ == "__main__":
    main()
