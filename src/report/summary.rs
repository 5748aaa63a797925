//! Owns `summary_json` and `terminal_lines`: the report's summaries.
//! Layer: report — may import every floor from the ground up to pipeline and, in this folder,
//! data.rs, text.rs.
//!
//! The report's machine- and human-readable summaries: `summary.json` and the lines printed
//! at the end of the stage (top documents per query, one line each).

use serde_json::json;

use super::data::ReportData;
use super::text::num;

/// How many top documents per query the terminal summary lists.
pub const TERMINAL_TOP: usize = 3;

/// `summary.json`: run facts, per query the known sources, the best rank of one, and the
/// shown proponents and opponents (id, rank, τ, score), plus which eval results were shown.
pub fn summary_json(d: &ReportData) -> serde_json::Value {
    let (found, with) = d.found_counts();
    let docs = |v: &[super::data::DocEntry]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|x| {
                json!({"train_id": x.train_id, "dataset": x.dataset, "rank": x.rank,
                       "tau": x.tau, "score": x.score, "known": x.known})
            })
            .collect()
    };
    json!({
        "run": d.run_name,
        "model": {"id": d.model_id, "commit": d.model_commit},
        "method": d.method,
        "segments": d.segments,
        "curvature_acts": crate::attribution::acting::acting_sentence(&d.segments),
        "datasets": d.datasets,
        "n_docs": d.n_docs,
        "known_sources_found_at_1": {"found": found, "queries_with_known_sources": with},
        "known_sources_flagged": d.known_flags(),
        "loss": d.loss.as_ref().map(|l| json!({
            "steps": l.steps.len(),
            "epoch_mean_loss": l.epochs.iter().map(|e| e.2).collect::<Vec<_>>(),
        })),
        "queries": d.queries.iter().map(|q| json!({
            "query_id": q.query_id,
            "prompt": q.prompt,
            "completion": q.completion,
            "measurement": q.measurement,
            "known_sources": q.known_sources,
            "best_known_rank": q.best_known_rank,
            "known_ranks": q.known_ranks,
            "found_at_top": q.found_at_top(),
            "proponents": docs(&q.proponents),
            "opponents": docs(&q.opponents),
            "improbable": q.improbable,
            "generation": generation(q),
        })).collect::<Vec<_>>(),
        "query_sets": d.query_sets.iter().map(|set| json!({
            "name": set.name,
            "current": set.current,
            "queries": set.queries.iter().map(|q| json!({
                "query_id": q.query_id,
                "prompt": q.prompt,
                "completion": q.completion,
                "measurement": q.measurement,
                "proponents": docs(&q.proponents),
                "opponents": docs(&q.opponents),
                "improbable": q.improbable,
                "generation": generation(q),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "eval": {
            "recall": d.eval.recall.is_some(),
            "lds": d.eval.lds.is_some(),
            "lds_points": d.eval.points.len(),
        },
    })
}

/// A generated query's tokens with log p and their top proponents' ids (null otherwise).
fn generation(q: &super::data::QueryReport) -> serde_json::Value {
    match &q.generation {
        Some(g) => g
            .iter()
            .map(|t| {
                json!({"gen_index": t.gen_index, "text": t.text, "logprob": t.logprob,
                       "proponents": t.docs.iter().map(|d| &d.train_id).collect::<Vec<_>>(),
                       "token_scores": t.docs.iter().filter(|d| d.tokens.is_some()).count()})
            })
            .collect(),
        None => serde_json::Value::Null,
    }
}

/// Shortens `s` to at most `n` characters (with an ellipsis), on one line.
fn clip(s: &str, n: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= n {
        one_line
    } else {
        let mut o: String = one_line.chars().take(n.saturating_sub(1)).collect();
        o.push('…');
        o
    }
}

/// The terminal summary: a header, then per query its prompt → completion and one line per
/// top document (rank, τ, id, known-source mark, the start of its text).
pub fn terminal_lines(d: &ReportData) -> Vec<String> {
    let mut out = vec![format!(
        "report: {} · model {} · method {} · {} segments · {} documents · {} queries",
        d.run_name,
        d.model_id,
        d.method,
        d.segment_columns.len(),
        d.n_docs,
        d.queries.len()
    )];
    if let Some(line) = crate::attribution::acting::acting_sentence(&d.segments) {
        out.push(line);
    }
    let (found, with) = d.found_counts();
    if with > 0 {
        out.push(format!(
            "known sources ranked #1 for {found} of {with} queries with known sources"
        ));
        if let Some(w) = d.known_flags().warning() {
            out.push(format!("warning: {w}"));
        }
    }
    for q in &d.queries {
        let mark = match q.found_at_top() {
            Some(true) => " ✓",
            Some(false) => " ✗",
            None => "",
        };
        out.push(format!(
            "{}{mark}: {}{}",
            q.query_id,
            clip(&q.prompt, 60),
            clip(&q.completion, 40)
        ));
        for doc in q.proponents.iter().take(TERMINAL_TOP) {
            out.push(format!(
                "  #{:<3} τ = {:>10}  {:<14}{} {}",
                doc.rank,
                num(doc.tau),
                doc.train_id,
                if doc.known { " (known)" } else { "" },
                clip(&doc.text, 60)
            ));
        }
    }
    for set in &d.query_sets {
        out.push(match set.current {
            true => format!("query set {}: {} queries", set.name, set.queries.len()),
            false => format!(
                "query set {}: stale (the run changed since); ask again to rescore it",
                set.name
            ),
        });
        for q in &set.queries {
            let top = q.proponents.first();
            out.push(format!(
                "  {}: {}{} ← {}",
                q.query_id,
                clip(&q.prompt, 50),
                clip(&q.completion, 30),
                top.map(|t| format!("{} (τ = {})", t.train_id, num(t.tau)))
                    .unwrap_or_else(|| "—".into())
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_one_line_and_marks_cuts() {
        assert_eq!(clip("a\nb", 10), "a b");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("ab", 2), "ab");
    }
}
