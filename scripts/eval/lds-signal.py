#!/usr/bin/env python3
"""Does an `eval lds` ground truth carry a signal? Method-independent checks on the
retraining jobs of a run directory (RUN_DIR/eval-work/**/subset-*-seed-*.json):

- per query, Spearman's rho between the measured loss f(q) of each subset's retrain and the
  number of the query's known source documents (`known_sources`) in that subset: a retrain
  that learns from the planted documents shows a clearly negative rho (more sources, lower
  loss);
- with two or more seeds, per query, Spearman's rho between the measured losses of seed 0
  and seed r over the subsets: the retraining's reproducibility (1 for deterministic runs);
- the spread of the measured losses;
- per known source document, its effect in the retrainings: the mean loss of the subsets
  without it minus the mean loss of the subsets with it, with a standard error (DESIGN.md's
  orientation: > 0 means the document helped, a proponent). With random subsets this
  difference of means is what a linear datamodel's coefficient estimates, so a method that
  ranks a known source as an opponent while this is clearly > 0 is wrong about it.

No method's scores are read, so choosing a fine-tuning setup by these numbers does not tune
anything on the methods' LDS.

    scripts/eval/lds-signal.py RUN_DIR QUERIES.jsonl [--json]

Standard library only.
"""

import glob
import json
import os
import statistics
import sys


def ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0
        i = j + 1
    return r


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den > 0 else float("nan")


def effect(losses, included):
    """(mean loss without the document − mean loss with it, its standard error), or
    (nan, nan) when every subset has it or none does."""
    with_ = [x for x, i in zip(losses, included) if i]
    without = [x for x, i in zip(losses, included) if not i]
    if len(with_) < 2 or len(without) < 2:
        return float("nan"), float("nan")
    se = (statistics.variance(with_) / len(with_)
          + statistics.variance(without) / len(without)) ** 0.5
    return statistics.fmean(without) - statistics.fmean(with_), se


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        sys.exit(__doc__)
    run_dir, queries_path = args
    known = {}
    with open(queries_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                q = json.loads(line)
                known[q["id"]] = set(q.get("known_sources", []))
    files = sorted(glob.glob(os.path.join(run_dir, "eval-work", "**", "subset-*-seed-*.json"),
                             recursive=True))
    if not files:
        sys.exit(f"lds-signal: no retraining results under {run_dir}/eval-work")
    jobs = [json.load(open(p, encoding="utf-8")) for p in files]
    qids = jobs[0]["query_ids"]
    seeds = sorted({j["seed"] for j in jobs})
    by_seed = {r: {j["subset"]: j for j in jobs if j["seed"] == r} for r in seeds}
    subsets = sorted(set.intersection(*(set(by_seed[r]) for r in seeds)))
    out = {"jobs": len(jobs), "subsets": len(subsets), "seeds": seeds, "queries": {}}
    for qi, q in enumerate(qids):
        if not known.get(q):
            continue
        first = by_seed[seeds[0]]
        mean_loss = [statistics.fmean(by_seed[r][s]["measured"][qi] for r in seeds)
                     for s in subsets]
        count = [len(known[q] & set(first[s]["doc_ids"])) for s in subsets]
        row = {
            "rho_loss_vs_sources": spearman(mean_loss, count),
            "loss_mean": statistics.fmean(mean_loss),
            "loss_sd": statistics.pstdev(mean_loss),
        }
        row["source_effects"] = {
            doc: effect(mean_loss, [doc in first[s]["doc_ids"] for s in subsets])
            for doc in sorted(known[q])
        }
        row["rho_seed0_vs_seed"] = {
            str(r): spearman([by_seed[seeds[0]][s]["measured"][qi] for s in subsets],
                             [by_seed[r][s]["measured"][qi] for s in subsets])
            for r in seeds[1:]
        }
        out["queries"][q] = row
    rows = list(out["queries"].values())
    out["mean_rho_loss_vs_sources"] = statistics.fmean(r["rho_loss_vs_sources"] for r in rows)
    if len(seeds) > 1:
        out["mean_rho_across_seeds"] = statistics.fmean(
            v for r in rows for v in r["rho_seed0_vs_seed"].values())
    out["steps"] = sorted({j["steps"] for j in jobs})
    out["final_train_loss_mean"] = statistics.fmean(j["final_loss"] for j in jobs)
    out["wall_s_mean"] = statistics.fmean(j["wall_s"] for j in jobs)
    if "--json" in sys.argv:
        print(json.dumps(out, indent=1))
        return
    print(f"{len(jobs)} jobs, {len(subsets)} subsets, seeds {seeds}, steps {out['steps']}, "
          f"mean job {out['wall_s_mean']:.1f} s, final train loss {out['final_train_loss_mean']:.3f}")
    for q, r in out["queries"].items():
        seed_part = " ".join(f"seed0~{k}: {v:+.3f}" for k, v in r["rho_seed0_vs_seed"].items())
        print(f"{q:8} rho(loss, #sources) {r['rho_loss_vs_sources']:+.3f}  "
              f"loss {r['loss_mean']:.2f} ± {r['loss_sd']:.2f}  {seed_part}")
        print("         effect of each known source (loss without − with, ± s.e.): "
              + ", ".join(f"{d} {e:+.2f} ± {se:.2f}" for d, (e, se) in r["source_effects"].items()))
    print(f"mean rho(loss, #sources) {out['mean_rho_loss_vs_sources']:+.3f}", end="")
    if "mean_rho_across_seeds" in out:
        print(f"   mean rho across seeds {out['mean_rho_across_seeds']:+.3f}", end="")
    print()


if __name__ == "__main__":
    main()
