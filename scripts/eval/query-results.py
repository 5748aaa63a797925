#!/usr/bin/env python3
"""Load a source-tda run's Parquet outputs with DuckDB and join scores back to text.

    .cache/py/bin/python scripts/eval/query-results.py runs/demo [--top 5] [--json]

Prints, per query, its top proponents (tau > 0: the document helped the model produce the
completion) with their text, and the tokens with the highest scores inside them. Needs only
duckdb (`scripts/assets/setup-test-python.sh` installs it into .cache/py). With --json, prints one
JSON object instead of tables.
"""
import argparse
import json
import pathlib
import sys

import duckdb

TOP_DOCS = """
select s.query_id, q.prompt, q.completion, s.rank, s.train_id, s.dataset, s.tau, s.score,
       d.text
from scores s
join queries q using (query_id)
join train_docs d using (train_id, dataset)
where s.rank <= $top
order by s.query_id, s.rank
"""

# Tokens of each query's top proponents, highest score first (a document's token scores add
# up to its document score).
TOP_TOKENS = """
select query_id, train_id, token_index, token_text, score
from (
  select t.*, row_number() over (partition by t.query_id order by t.score desc) as k
  from token_scores t
  join scores s using (query_id, train_id)
  where s.rank <= $top
)
where k <= $top
order by query_id, score desc
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=pathlib.Path, help="a run directory with a completed score stage")
    ap.add_argument("--top", type=int, default=5, help="documents and tokens per query (default 5)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args()

    score = args.run_dir / "score"
    tables = ["token_scores", "train_docs", "queries"]
    missing = [f"{t}.parquet" for t in tables if not (score / f"{t}.parquet").exists()]
    # The default query set's scores: a hive-partitioned dataset, one part file per shard.
    parts = score / "query_set=default" / "shard=*" / "*.parquet"
    if not list(score.glob("query_set=default/shard=*/*.parquet")):
        missing.append(str(parts.relative_to(score)))
    if missing:
        print(f"{score}: no {', '.join(missing)}; run the score stage "
              f"first (source-tda run PIPELINE --run-dir {args.run_dir})", file=sys.stderr)
        return 2

    con = duckdb.connect()
    for t in tables:
        path = str(score / f"{t}.parquet").replace("'", "''")
        con.execute(f"create view {t} as select * from read_parquet('{path}')")
    path = str(parts).replace("'", "''")
    con.execute(f"create view scores as select * from read_parquet('{path}', hive_partitioning = true)")

    docs = con.execute(TOP_DOCS, {"top": args.top})
    doc_cols = [c[0] for c in docs.description]
    doc_rows = [dict(zip(doc_cols, r)) for r in docs.fetchall()]
    toks = con.execute(TOP_TOKENS, {"top": args.top})
    tok_cols = [c[0] for c in toks.description]
    tok_rows = [dict(zip(tok_cols, r)) for r in toks.fetchall()]

    if args.json:
        print(json.dumps({"top_documents": doc_rows, "top_tokens": tok_rows}, indent=1))
        return 0
    for qid in dict.fromkeys(r["query_id"] for r in doc_rows):
        rows = [r for r in doc_rows if r["query_id"] == qid]
        print(f"\n== {qid}: {rows[0]['prompt']!s}[{rows[0]['completion']!s}]")
        for r in rows:
            text = " ".join(r["text"].split())
            print(f"  #{r['rank']:<2} tau={r['tau']:+.4e}  {r['train_id']:<14} {text[:70]}")
        tokens = [f"{t['token_text']!r} ({t['score']:+.2e}, {t['train_id']})"
                  for t in tok_rows if t["query_id"] == qid]
        print("  top tokens: " + ", ".join(tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
