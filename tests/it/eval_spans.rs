//! Token-span recall on the demo, recomputed by brute force from the score tables (called by
//! `eval::demo_meets_the_recall_target_and_runs_lds`, which runs the demo once for both).

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;

use crate::common;
use crate::common::batches;

/// Token-span recall on the demo (its queries give the answer's character spans in each
/// known source), recomputed for every method by sorting: each token's characters are where
/// its `token_text` in `token_scores.parquet` sits in the document (the texts join back to
/// it; the demo tokenizer adds no special tokens), the spans are those of the shipped
/// `queries.jsonl`.
pub fn demo_token_span_recall_matches_brute_force(run: &Path, summary: &serde_json::Value) {
    let data = common::repo_root().join("assets/hf-cache/datasets--source-tda--demo-facts");
    let commit = std::fs::read_to_string(data.join("refs/main")).unwrap();
    let queries = std::fs::read_to_string(
        data.join("snapshots")
            .join(commit.trim())
            .join("data/queries.jsonl"),
    )
    .unwrap();
    // (query, source) → its spans.
    type Spans = Vec<(usize, usize)>;
    let mut spans: Vec<(String, String, Spans)> = Vec::new();
    for line in queries.lines() {
        let q: serde_json::Value = serde_json::from_str(line).unwrap();
        for (source, list) in q["fact_spans"].as_object().unwrap() {
            let list = list
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s[0].as_u64().unwrap() as usize,
                        s[1].as_u64().unwrap() as usize,
                    )
                })
                .collect();
            spans.push((q["id"].as_str().unwrap().to_string(), source.clone(), list));
        }
    }
    assert_eq!(spans.len(), 24, "8 queries × 3 known sources");
    assert_eq!(summary["fact_span_pairs"], 24);
    let ks = [1usize, 5, 10];
    for m in summary["methods"].as_array().unwrap() {
        let method = m["method"].as_str().unwrap();
        let dir = match method {
            "source" => run.join("score"),
            other => run.join("eval-methods").join(other).join("score"),
        };
        // (query, document) → (token index, text, score) rows.
        type Rows = Vec<(u32, String, f32)>;
        let mut scores: std::collections::HashMap<(String, String), Rows> = Default::default();
        for b in batches(&dir.join("token_scores.parquet")) {
            let col = |n: &str| b.column_by_name(n).unwrap().clone();
            let (q, d, x) = (col("query_id"), col("train_id"), col("token_text"));
            let (q, d, x) = (
                q.as_string::<i32>(),
                d.as_string::<i32>(),
                x.as_string::<i32>(),
            );
            let t = col("token_index");
            let t = t.as_primitive::<UInt32Type>();
            let v = col("score");
            let v = v.as_primitive::<arrow_array::types::Float32Type>();
            for i in 0..b.num_rows() {
                scores
                    .entry((q.value(i).to_string(), d.value(i).to_string()))
                    .or_default()
                    .push((t.value(i), x.value(i).to_string(), v.value(i)));
            }
        }
        let (mut sum, mut measured) = ([0.0f64; 3], 0usize);
        for (q, source, list) in &spans {
            let Some(rows) = scores.get_mut(&(q.clone(), source.clone())) else {
                continue;
            };
            measured += 1;
            rows.sort_by_key(|r| r.0);
            let mut at = 0;
            let mut on = Vec::new();
            for (t, text, _) in rows.iter() {
                let (a, b) = (at, at + text.chars().count());
                at = b;
                if a < b && list.iter().any(|&(s, e)| a < e && s < b) {
                    on.push(*t);
                }
            }
            // The demo's span is "Lake NAME": " Lake" and the name's tokens.
            assert!(on.len() >= 2, "{source}: {on:?}");
            let mut order = rows.clone();
            // Highest score first; among equal scores, tokens off the span first.
            order.sort_by(|a, b| {
                b.2.total_cmp(&a.2)
                    .then(on.contains(&a.0).cmp(&on.contains(&b.0)))
            });
            for (i, &k) in ks.iter().enumerate() {
                let hits = order.iter().take(k).filter(|r| on.contains(&r.0)).count();
                sum[i] += hits as f64 / k.min(on.len()) as f64;
            }
        }
        let t = &m["token_span"];
        assert_eq!(
            t["n_pairs"].as_u64().unwrap() as usize,
            measured,
            "{method}: {t}"
        );
        assert_eq!(
            measured + t["n_pairs_without_token_scores"].as_u64().unwrap() as usize,
            24,
            "{method}: {t}"
        );
        assert!(
            measured > 0,
            "{method}: some known source is in the top_k: {t}"
        );
        for (i, k) in ks.iter().enumerate() {
            let want = sum[i] / measured as f64;
            let got = t["recall"][k.to_string()].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-12,
                "{method} span@{k}: {got} vs {want}"
            );
            let chance = t["chance"][k.to_string()].as_f64().unwrap();
            assert!(chance > 0.0 && chance <= 1.0, "{method}: {t}");
        }
    }
    let rows = batches(&run.join("eval-recall/token_span.parquet"));
    let n: usize = rows.iter().map(|b| b.num_rows()).sum();
    let measured: u64 = summary["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["token_span"]["n_pairs"].as_u64().unwrap())
        .sum();
    assert_eq!(n as u64, measured);
}
