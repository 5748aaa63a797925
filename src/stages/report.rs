//! Owns the `report` stage: gathering a run's results and writing the HTML page.
//! Layer: stages — may import every library layer (ground up to pipeline and report); siblings
//! `fetch`, `score_meta` (its sign convention).
//!
//! `report`: one self-contained HTML page of a run's attribution (`report/report.html`), a
//! `summary.json`, and a terminal summary of each query's top documents. Reads the score
//! stage's tables, the manifest's timings, the queries' known sources and, when the
//! `eval-recall` / `eval-lds` stages completed, their results (optional inputs: the report
//! reruns when they appear or change), and the named query sets' scores (`source-tda ask`).

use serde_json::json;

use crate::config::Config;
use crate::error::Result;
use crate::pipeline::{
    complete_sets, record_name, scores_root, set_dir, stage_key_for, Registry, RunDir, Stage,
    StageContext,
};
use crate::report::data::DatasetInfo;
use crate::report::QuerySetReport;
use crate::report::{
    load_eval, load_loss, load_scores, load_timings, read_known_sources, render, summary_json,
    terminal_lines, ReportData, LDS_STAGE, RECALL_STAGE,
};
use crate::util::fsx::{write_atomic, write_json_atomic};

use super::fetch::Fetched;

/// Bumped when the report's content changes, so that old reports are regenerated.
const REPORT_LAYOUT: u32 = 3;

/// The `report` stage.
pub struct ReportStage;

impl Stage for ReportStage {
    fn name(&self) -> &'static str {
        "report"
    }

    fn describe(&self) -> &'static str {
        "write report.html (top documents per query, token shading, timings, evaluation) and a \
         terminal summary"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &["fetch", "score"]
    }

    fn optional_inputs(&self) -> &'static [&'static str] {
        &[RECALL_STAGE, LDS_STAGE]
    }

    fn config_view(&self, c: &Config) -> serde_json::Value {
        json!({
            "layout": REPORT_LAYOUT,
            "run_name": c.run.name,
            "query_id_column": c.data.query.as_ref().map(|q| &q.id_column),
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value> {
        let data = gather(ctx.config, ctx.run, ctx.registry)?;
        let html = render(&data, &crate::util::now_rfc3339());
        write_atomic(&ctx.out("report.html"), html.as_bytes())?;
        ctx.failpoint("after-html")?;
        write_json_atomic(&ctx.out("summary.json"), &summary_json(&data))?;
        let final_path = ctx.run.stage_dir(self.name()).join("report.html");
        if !crate::util::progress::is_quiet() {
            let mut lines = terminal_lines(&data);
            lines.push(format!("report: {}", final_path.display()));
            println!("{}", lines.join("\n"));
        }
        let (found, with) = data.found_counts();
        Ok(json!({
            "queries": data.queries.len(),
            "known_sources_found_at_1": found,
            "queries_with_known_sources": with,
            "eval_recall": data.eval.recall.is_some(),
            "eval_lds": data.eval.lds.is_some(),
            "html_bytes": html.len(),
        }))
    }
}

/// Everything the report shows, read from the run directory (`registry` judges whether each
/// named query set's scores are current).
pub fn gather(config: &Config, run: &RunDir, registry: &Registry) -> Result<ReportData> {
    let fetched = Fetched::load(run)?;
    let mut known = std::collections::BTreeMap::new();
    if let (Some(qc), Some(repo)) = (&config.data.query, fetched.data.get("query")) {
        if let Some(id_col) = &qc.id_column {
            for f in &repo.files {
                known.extend(read_known_sources(&f.path, id_col)?);
            }
        }
    }
    let tables = load_scores(&run.stage_dir("score"), &scores_root(run, None), &known)?;
    let meta = |k: &str| tables.metadata.get(k).cloned().unwrap_or_default();
    let segments = serde_json::from_str(&meta("source_tda.segments")).unwrap_or(json!([]));
    let order = |role: &str| match role {
        "train" => 0,
        "pretrain" => 1,
        "query" => 2,
        _ => 3,
    };
    let mut datasets: Vec<DatasetInfo> = fetched
        .data
        .iter()
        .map(|(role, repo)| DatasetInfo {
            role: role.clone(),
            id: repo.id.clone(),
            commit: repo.commit.clone(),
            n_docs: tables.docs_per_dataset.get(role).copied().unwrap_or(0),
        })
        .collect();
    datasets.sort_by_key(|d| (order(&d.role), d.role.clone()));
    let model_id = match meta("source_tda.model_id") {
        s if s.is_empty() => fetched.model.id.clone(),
        s => s,
    };
    Ok(ReportData {
        run_name: config.run.name.clone().unwrap_or_else(|| "run".into()),
        model_id,
        model_commit: meta("source_tda.model_commit"),
        method: method_label(
            &meta("source_tda.method"),
            &meta("source_tda.preconditioning"),
        ),
        segments,
        segment_columns: tables.segment_columns,
        n_docs: tables.docs_per_dataset.values().sum(),
        datasets,
        queries: tables.queries,
        query_sets: query_sets(config, run, registry)?,
        stages: load_timings(run, "report")?,
        eval: load_eval(run)?,
        loss: load_loss(run)?,
        sign_convention: match meta("source_tda.sign_convention") {
            s if s.is_empty() => super::score_meta::SIGN_CONVENTION.to_string(),
            s => s,
        },
    })
}

/// The named query sets with a complete `score`, each with its queries when its scores are
/// current with the run's fine-tune and curvature (its score record's inputs and config are
/// what they would be now).
fn query_sets(config: &Config, run: &RunDir, registry: &Registry) -> Result<Vec<QuerySetReport>> {
    let manifest = run.manifest()?;
    let score = registry.find("score")?;
    let mut out = Vec::new();
    for name in complete_sets(&manifest, "score") {
        let record = &manifest.stages[&record_name("score", Some(&name))];
        let current = stage_key_for(score, config, &manifest, Some(&name)).is_ok_and(|k| {
            k.config_hash == record.config_hash
                && (k.inputs_hash == record.inputs_hash
                    || k.legacy_inputs_hash == record.inputs_hash)
        });
        let queries = match current {
            true => {
                let known = std::collections::BTreeMap::new();
                let dir = set_dir(run, "score", Some(&name));
                load_scores(&dir, &scores_root(run, Some(&name)), &known)?.queries
            }
            false => Vec::new(),
        };
        out.push(QuerySetReport {
            name,
            current,
            queries,
        });
    }
    Ok(out)
}

/// The method as the report names it: `influence`, or with a refined inverse
/// `influence (EK-FAC refined by 30 CG iterations over 304 documents; largest final relative
/// residual 1.89)` from the tables' `source_tda.preconditioning` (docs/design.md §9).
fn method_label(method: &str, preconditioning: &str) -> String {
    let p: serde_json::Value = serde_json::from_str(preconditioning).unwrap_or(json!({}));
    if p["method"] != "ekfac+cg" {
        return method.to_string();
    }
    let residual = p["final_residual_max"]
        .as_f64()
        .map(|r| crate::util::num::sig(r, 3))
        .unwrap_or_else(|| "?".into());
    format!(
        "{method} (EK-FAC refined by {} CG iterations over {} documents; largest final \
         relative residual {residual})",
        p["iterations"], p["documents"]
    )
}
