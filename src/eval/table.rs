//! Owns the terminal tables of the evaluation summaries.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; no sibling.
//!
//! Terminal tables of the evaluation summaries (`eval-recall/summary.json`,
//! `eval-lds/summary.json`), one row per method.

use serde_json::Value;

fn num(v: &Value) -> String {
    v.as_f64().map_or("—".into(), |x| format!("{x:.3}"))
}

/// The recall table: method, queries, recall@k for each k, MRR.
pub fn recall_table(summary: &Value) -> String {
    let ks: Vec<String> = summary["k"]
        .as_array()
        .map(|a| a.iter().map(|k| k.to_string()).collect())
        .unwrap_or_default();
    let mut out = format!("{:<14} {:>7}", "method", "queries");
    for k in &ks {
        out += &format!(" {:>9}", format!("recall@{k}"));
    }
    out += &format!(" {:>7}\n", "MRR");
    for m in summary["methods"].as_array().into_iter().flatten() {
        out += &format!(
            "{:<14} {:>7}",
            m["method"].as_str().unwrap_or("?"),
            m["n_queries"].to_string()
        );
        for k in &ks {
            out += &format!(" {:>9}", num(&m["recall"][k]));
        }
        out += &format!(" {:>7}\n", num(&m["mrr"]));
    }
    out + &token_span_table(summary, &ks)
}

/// The token-span recall table, when the summary has one (methods with `token_span`):
/// method, pairs measured, token-span recall@k with its chance level in parentheses.
fn token_span_table(summary: &Value, ks: &[String]) -> String {
    let rows: Vec<&Value> = summary["methods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["token_span"].is_object())
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "token-span recall@k of known sources with fact spans (chance)\n{:<14} {:>7}",
        "method", "pairs"
    );
    for k in ks {
        out += &format!(" {:>15}", format!("span@{k}"));
    }
    out += "\n";
    for m in rows {
        let t = &m["token_span"];
        let measured = t["n_pairs"].as_u64().unwrap_or(0);
        let total = measured + t["n_pairs_without_token_scores"].as_u64().unwrap_or(0);
        out += &format!(
            "{:<14} {:>7}",
            m["method"].as_str().unwrap_or("?"),
            format!("{measured}/{total}")
        );
        for k in ks {
            let cell = format!("{} ({})", num(&t["recall"][k]), num(&t["chance"][k]));
            out += &format!(" {cell:>15}");
        }
        out += "\n";
    }
    out
}

/// The LDS table: method, LDS and its bootstrap 95% interval, and, for every method after
/// the first, its LDS minus the first method's with the paired 95% interval (`vs`).
pub fn lds_table(summary: &Value) -> String {
    let methods: Vec<&Value> = summary["methods"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let base = methods.iter().find_map(|m| m["vs"]["method"].as_str());
    let mut out = format!(
        "LDS over {} subsets (α = {}, {} seed(s))\n{:<14} {:>7}  {:<17}",
        summary["subsets"], summary["alpha"], summary["seeds"], "method", "LDS", "95% CI"
    );
    let head = base.map(|b| format!("− {b}"));
    let w = head.as_ref().map_or(7, |h| h.chars().count().max(7));
    if let Some(h) = &head {
        out += &format!("  {h:>w$}  paired 95% CI");
    }
    out = out.trim_end().to_string() + "\n";
    let row = |out: &mut String, label: &str, m: &Value| {
        let ci = &m["ci95"];
        *out += &format!(
            "{label:<14} {:>7}  {:<17}",
            num(&m["lds"]),
            format!("[{}, {}]", num(&ci[0]), num(&ci[1]))
        );
        let vs = &m["vs"];
        if !vs.is_null() {
            *out += &format!(
                "  {:>w$}  [{}, {}]",
                signed(&vs["difference"]),
                signed(&vs["ci95"][0]),
                signed(&vs["ci95"][1])
            );
        }
        *out = out.trim_end().to_string() + "\n";
    };
    for m in methods {
        row(&mut out, m["method"].as_str().unwrap_or("?"), m);
        // Multi-stage runs: the same method from one data role's documents alone.
        for (role, r) in m["by_role"].as_object().into_iter().flatten() {
            row(&mut out, &format!("  {role} only"), r);
        }
    }
    out
}

fn signed(v: &Value) -> String {
    v.as_f64().map_or("—".into(), |x| format!("{x:+.3}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_every_method_and_column() {
        let r = serde_json::json!({"k": [1, 5], "methods": [
            {"method": "source", "n_queries": 8, "recall": {"1": 1.0, "5": 0.5}, "mrr": 1.0},
            {"method": "influence", "n_queries": 8, "recall": {"1": 0.25, "5": null}, "mrr": 0.5}]});
        let t = recall_table(&r);
        assert!(
            t.contains("recall@1") && t.contains("recall@5") && t.contains("MRR"),
            "{t}"
        );
        assert!(
            t.contains("source") && t.contains("1.000") && t.contains("0.250"),
            "{t}"
        );
        assert!(t.contains("—"), "{t}");
        assert!(
            t.contains("source               8"),
            "counts right-aligned: {t}"
        );
        assert!(!t.contains("token-span"), "no fact spans, no table: {t}");
        let r = serde_json::json!({"k": [1, 5], "methods": [
            {"method": "source", "n_queries": 8, "recall": {"1": 1.0, "5": 0.5}, "mrr": 1.0,
             "token_span": {"n_pairs": 20, "n_pairs_without_token_scores": 4,
                            "recall": {"1": 0.75, "5": 0.9}, "chance": {"1": 0.2, "5": 0.6}}}]});
        let t = recall_table(&r);
        assert!(t.contains("token-span recall@k"), "{t}");
        assert!(t.contains("20/24") && t.contains("0.750 (0.200)"), "{t}");
        let l = serde_json::json!({"subsets": 64, "alpha": 0.5, "seeds": 1, "methods": [
            {"method": "source", "lds": 0.41, "ci95": [0.3, 0.52]}]});
        let t = lds_table(&l);
        assert!(t.contains("64 subsets") && t.contains("0.410") && t.contains("[0.300, 0.520]"));
        assert!(!t.contains("paired"), "one method, nothing to compare: {t}");
        let l = serde_json::json!({"subsets": 64, "alpha": 0.5, "seeds": 1, "methods": [
            {"method": "source", "lds": 0.41, "ci95": [0.3, 0.52]},
            {"method": "influence", "lds": 0.35, "ci95": [0.2, 0.5],
             "vs": {"method": "source", "difference": -0.06, "ci95": [-0.1, -0.02]}}]});
        let t = lds_table(&l);
        assert!(t.contains("− source") && t.contains("paired 95% CI"), "{t}");
        assert!(t.contains("-0.060  [-0.100, -0.020]"), "{t}");
    }
}
