//! The scores dataset through the CLI: every query set's scores are
//! `score/query_set=NAME/shard=0/part-00000.parquet`, which DuckDB and pyarrow.dataset read as
//! one table (hive partitions `query_set`, `shard`) with no unsigned 64-bit column anywhere;
//! `[attribution] keep_top_bottom = K` writes exactly the rows of the full table ranked ≤ K or
//! > N − K, and a rerun of the default set keeps the named sets' folders.

use std::path::Path;

use source_tda::report::table::Table;

use crate::common::{self, cli, stderr, write};
use crate::stages_attribution::{run, setup};

/// (query, train_id, rank, score, tau) of a set's scores, in file order.
type Row = (String, String, u32, f64, f64);

fn rows(root: &Path) -> Vec<Row> {
    let t = Table::read_parts(root).unwrap();
    let (q, d) = (
        t.strings("query_id").unwrap(),
        t.strings("train_id").unwrap(),
    );
    let rank = t.u32s("rank").unwrap();
    let (s, tau) = (t.floats("score").unwrap(), t.floats("tau").unwrap());
    (0..t.len())
        .map(|i| (q[i].clone(), d[i].clone(), rank[i], s[i], tau[i]))
        .collect()
}

#[test]
fn the_scores_dataset_reads_as_one_table_and_keep_top_bottom_keeps_the_ends() {
    let dir = setup("influence", "");
    run(dir.path());
    let runp = dir.path().join("run");
    let default = runp.join("score/query_set=default");
    let full = rows(&default);
    assert_eq!(full.len(), 2 * 24);
    assert_eq!(
        (full[0].0.as_str(), full[0].1.as_str(), full[0].2),
        ("q0", "twin", 1)
    );

    // A named set beside the default one.
    write(
        &dir.path().join("more.jsonl"),
        "{\"id\": \"m0\", \"prompt\": \"Boats from Pokas3 carry\", \"completion\": \" blue glass.\"}\n",
    );
    let o = cli(
        dir.path(),
        &[
            "-q",
            "ask",
            "--run-dir",
            "run",
            "--prompts",
            "more.jsonl",
            "--name",
            "more",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // The top and bottom 3 of each query: the full table's rows ranked ≤ 3 or > 21, same
    // order, same numbers (the factors and queries are the same; only `score` reruns).
    let cfg = std::fs::read_to_string(dir.path().join("c.toml")).unwrap();
    write(
        &dir.path().join("c.toml"),
        format!("{cfg}keep_top_bottom = 3\n"),
    );
    let o = cli(
        dir.path(),
        &["-q", "run", "p.toml", "--allow-config-change"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let kept = rows(&default);
    let want: Vec<&Row> = full.iter().filter(|r| r.2 <= 3 || r.2 > 21).collect();
    assert_eq!(kept.len(), 2 * 6);
    for (k, w) in kept.iter().zip(&want) {
        assert_eq!((&k.0, &k.1, k.2), (&w.0, &w.1, w.2));
        assert!(
            (k.3 - w.3).abs() <= 1e-12 * w.3.abs().max(1e-30),
            "{k:?} vs {w:?}"
        );
    }
    assert_eq!(
        rows(&runp.join("score/query_set=more")).len(),
        24,
        "the set is kept"
    );

    let Some(py) = common::reference_python("the_scores_dataset_reads_as_one_table") else {
        return;
    };
    let script = r#"
import glob, sys, duckdb, pyarrow as pa, pyarrow.dataset as ds, pyarrow.parquet as pq
run = sys.argv[1]
d = f"{run}/score"
parts = f"{d}/query_set=*/shard=*/*.parquet"
con = duckdb.connect()
con.execute(f"create view s as select * from read_parquet('{parts}', hive_partitioning = true)")
per_set = dict(con.execute("select query_set, count(*) from s group by 1").fetchall())
assert per_set == {'default': 12, 'more': 24}, per_set
assert con.execute("select distinct shard from s").fetchall() == [(0,)]
types = dict((r[0], r[1]) for r in con.execute("describe s").fetchall())
assert 'UBIGINT' not in types.values(), types
assert types['query_id'] == types['train_id'] == 'VARCHAR', types
top = con.execute(f"""
  select s.query_set, s.query_id, s.train_id, t.text
  from s join '{d}/train_docs.parquet' t using (train_id)
  where s.rank = 1 and s.query_set = 'default' order by s.query_id""").fetchall()
assert top[0][1] == 'q0' and top[0][2] == 'twin', top
tok = con.execute(f"select sum(score) from '{d}/token_scores.parquet' where query_id='q0' and train_id='twin'").fetchone()[0]

t = ds.dataset(sorted(glob.glob(parts)), format="parquet", partitioning="hive",
               partition_base_dir=d).to_table()
assert t.num_rows == 36, t.num_rows
assert set(t.column('query_set').to_pylist()) == {'default', 'more'}
for f in t.schema:
    assert f.type != pa.uint64(), f
for f in pq.read_schema(f"{run}/finetune/loss.parquet"):
    assert f.type != pa.uint64(), f
assert pq.read_schema(f"{run}/finetune/loss.parquet").field('step').type == pa.int64()
meta = pq.read_metadata(sorted(glob.glob(parts))[0]).metadata
assert b'source_tda.sign_convention' in meta and meta[b'source_tda.format_version'] == sys.argv[2].encode()
print('ok', len(top), tok)
"#;
    let o = std::process::Command::new(&py)
        .args([
            "-c",
            script,
            runp.to_str().unwrap(),
            &source_tda::FORMAT_VERSION.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok 2"));
}

/// Every row of a table, each cell as text: strings as they are, numbers as the bits of their
/// f64 value (f32 and u32 widen exactly), so that equal rows are bitwise equal.
pub(crate) fn bit_rows(t: &Table) -> Vec<Vec<String>> {
    let cols: Vec<Vec<String>> = t
        .column_names()
        .iter()
        .map(|c| match t.strings(c) {
            Ok(s) => s,
            Err(_) => t
                .floats(c)
                .unwrap()
                .iter()
                .map(|x| format!("{:016x}", x.to_bits()))
                .collect(),
        })
        .collect();
    (0..t.len())
        .map(|i| cols.iter().map(|c| c[i].clone()).collect())
        .collect()
}

/// `keep_top_bottom = 3` writes bit for bit the full table's rows ranked ≤ 3 or > N − 3 (every
/// column: scores, τ, ranks, both segments' columns), the same token scores and the same
/// `train_docs.parquet`, with one document per batch so that the scoring passes run the plan
/// in several chunks (score_docs).
#[test]
fn keep_top_bottom_is_the_full_tables_ends_bit_for_bit() {
    let dir = setup("source", "");
    let c = dir.path().join("c.toml");
    let cfg = std::fs::read_to_string(&c).unwrap();
    write(&c, format!("{cfg}\n[batching]\nmax_batch_size = 1\n"));
    run(dir.path());
    let runp = dir.path().join("run");
    let read = |rel: &str| bit_rows(&Table::read(&runp.join(rel)).unwrap());
    let parts = || bit_rows(&Table::read_parts(&runp.join("score/query_set=default")).unwrap());
    let full = parts();
    let (tokens, docs) = (
        read("score/token_scores.parquet"),
        read("score/train_docs.parquet"),
    );
    assert_eq!((full.len(), docs.len()), (2 * 24, 24));
    assert!(full[0].len() >= 9, "two segment columns: {:?}", full[0]);

    write(
        &c,
        cfg.replace("[attribution]\n", "[attribution]\nkeep_top_bottom = 3\n")
            + "\n[batching]\nmax_batch_size = 1\n",
    );
    let o = cli(
        dir.path(),
        &["-q", "run", "p.toml", "--allow-config-change"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let names = Table::read_parts(&runp.join("score/query_set=default"))
        .unwrap()
        .column_names();
    let at = names.iter().position(|c| c == "rank").unwrap();
    let rank = |r: &Vec<String>| f64::from_bits(u64::from_str_radix(&r[at], 16).unwrap()) as u32;
    let want: Vec<&Vec<String>> = full
        .iter()
        .filter(|r| rank(r) <= 3 || rank(r) > 21)
        .collect();
    let kept = parts();
    assert_eq!(kept.len(), 2 * 6);
    assert_eq!(kept.iter().collect::<Vec<_>>(), want);
    assert_eq!(read("score/token_scores.parquet"), tokens);
    assert_eq!(read("score/train_docs.parquet"), docs);
}
