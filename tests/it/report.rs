//! The `report` stage on the embedded demo: the page names every query's known source at the
//! top, is self-contained, renders in a real headless browser (Debian's chromium), picks up
//! evaluation results that appear after it ran (and drops them when they go), and the DuckDB
//! example (scripts/eval/query-results.py) reads the same answers from the Parquet outputs.
//!
//! One demo run is shared by the tests of this file (made once, then copied where a test
//! changes the run directory).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use source_tda::output::{write_table, Column};
use source_tda::pipeline::{Manifest, OutputFile, StageRecord, StageStatus};

struct Demo {
    _dir: tempfile::TempDir,
    run: PathBuf,
    stdout: String,
}

fn demo() -> &'static Demo {
    static DEMO: OnceLock<Demo> = OnceLock::new();
    DEMO.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let pipeline = common::demo_eval_pipeline(dir.path());
        let out = common::cli(
            &common::repo_root(),
            &[
                "run",
                pipeline.to_str().unwrap(),
                "--run-dir",
                run.to_str().unwrap(),
            ],
            &[
                ("HF_ENDPOINT", "http://127.0.0.1:1"),
                ("HOME", dir.path().to_str().unwrap()),
            ],
        );
        assert!(out.status.success(), "{}", common::stderr(&out));
        Demo {
            _dir: dir,
            run,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        }
    })
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Each demo query's top proponent, from summary.json.
fn top_ids(summary: &Value) -> Vec<(String, String)> {
    summary["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["query_id"].as_str().unwrap().to_string(),
                q["proponents"][0]["train_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn report_shows_each_querys_known_source_at_the_top_in_a_self_contained_page() {
    let d = demo();
    let summary = read_json(&d.run.join("report/summary.json"));
    let queries = summary["queries"].as_array().unwrap();
    assert_eq!(queries.len(), 8);
    for q in queries {
        let id = q["query_id"].as_str().unwrap();
        let k = id.trim_start_matches("q-");
        let top = &q["proponents"][0];
        // The demo's known answers: query q-K's planted fact is stated in planted-K-*.
        assert!(
            top["train_id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("planted-{k}-")),
            "{q}"
        );
        assert_eq!(top["known"], true, "{q}");
        assert_eq!(q["best_known_rank"], 1);
        assert_eq!(q["found_at_top"], true);
        assert!(top["tau"].as_f64().unwrap() > 0.0);
        let known: Vec<&str> = q["known_sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(known.len(), 3, "{q}");
        // Opponents, when shown, have τ < 0 in ascending order.
        let opp: Vec<f64> = q["opponents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["tau"].as_f64().unwrap())
            .collect();
        assert!(opp.iter().all(|t| *t < 0.0) && opp.windows(2).all(|w| w[0] <= w[1]));
    }
    assert_eq!(summary["known_sources_found_at_1"]["found"], 8);
    known_sources_far_down_are_flagged(&summary, &d.stdout);
    assert_eq!(summary["method"], "source");
    assert_eq!(summary["eval"]["lds"], false);

    let html = std::fs::read_to_string(d.run.join("report/report.html")).unwrap();
    for q in queries {
        assert!(html.contains(q["prompt"].as_str().unwrap()));
        assert!(html.contains(q["completion"].as_str().unwrap().trim()));
    }
    // Token shading, the legend, segment columns, timings of every stage before report.
    assert!(html.contains("class=\"t\" style=\"background:#"));
    assert!(html.contains("class=\"legend\""));
    assert!(html.contains("segment 0 (pretrain)"));
    for stage in ["fetch", "prepare", "finetune", "fit", "query", "score"] {
        assert!(
            html.contains(&format!("<td class=\"id\">{stage}</td>")),
            "{stage}"
        );
    }
    assert!(html.contains("Known sources at #1"));
    assert!(!html.contains("Attribution quality"), "no eval ran");
    // Self-contained: nothing is loaded from elsewhere.
    for needle in ["<link", " src=", "http://", "https://", "@import", "url("] {
        assert!(!html.contains(needle), "report loads `{needle}`");
    }
    // The terminal summary: a line per query with its known-source mark and top documents.
    assert!(
        d.stdout.contains("known sources ranked #1 for 8 of 8"),
        "{}",
        d.stdout
    );
    for (q, top) in top_ids(&summary) {
        assert!(d.stdout.contains(&format!("{q} ✓:")), "{}", d.stdout);
        assert!(d.stdout.contains(&top));
    }
}

pub(crate) fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let how = "install Debian's chromium (`apt-get install -y chromium`; .ci/run does)";
    if std::env::var_os("CI").is_some() {
        panic!("no chromium on PATH: {how}");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n=== SKIPPED (browser test): no chromium on PATH: {how} ===\n"
    );
    None
}

pub(crate) fn headless(browser: &Path, profile: &Path, args: &[&str]) -> std::process::Output {
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .env("HOME", profile)
        .output()
        .expect("chromium runs")
}

/// A given completion is flagged improbable exactly when its mean −log p per token
/// (queries.parquet's measurement / n_completion_tokens) is above ln 10, and the page says so
/// beside the query. The demo's given completions are facts its fine-tune barely learnt.
#[test]
fn improbable_given_completions_are_flagged() {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, UInt32Type};
    let d = demo();
    let mut per_token = std::collections::HashMap::new();
    for b in common::batches(&d.run.join("score/queries.parquet")) {
        let id = b.column_by_name("query_id").unwrap().as_string::<i32>();
        let m = b.column_by_name("measurement").unwrap();
        let n = b.column_by_name("n_completion_tokens").unwrap();
        for i in 0..b.num_rows() {
            let (m, n) = (
                m.as_primitive::<Float64Type>().value(i),
                n.as_primitive::<UInt32Type>().value(i),
            );
            per_token.insert(id.value(i).to_string(), m / f64::from(n));
        }
    }
    let summary = read_json(&d.run.join("report/summary.json"));
    let mut flagged = 0;
    for q in summary["queries"].as_array().unwrap() {
        let want = per_token[q["query_id"].as_str().unwrap()];
        if want > std::f64::consts::LN_10 {
            flagged += 1;
            let got = q["improbable"].as_f64().unwrap();
            assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
        } else {
            assert!(q["improbable"].is_null(), "{q}");
        }
        assert!(
            q["generation"].is_null(),
            "given completions are not generated"
        );
    }
    let html = std::fs::read_to_string(d.run.join("report/report.html")).unwrap();
    assert_eq!(html.matches("⚠ improbable completion").count(), flagged);
}

/// The flags of summary.json counted again from each query's `known_ranks`, and shown in
/// the page's summary card and the terminal summary when some known source ranks below 10.
fn known_sources_far_down_are_flagged(summary: &Value, stdout: &str) {
    let (mut below, mut opp, mut scored) = (0, 0, 0);
    for q in summary["queries"].as_array().unwrap() {
        let ranks = q["known_ranks"].as_array().unwrap();
        assert_eq!(ranks.len(), 3, "{q}");
        assert_eq!(ranks[0]["rank"], q["best_known_rank"]);
        for k in ranks {
            scored += 1;
            let r = k["rank"].as_u64().unwrap();
            if r > 10 {
                below += 1;
                opp += usize::from(k["tau"].as_f64().unwrap() < 0.0);
            }
        }
    }
    let f = &summary["known_sources_flagged"];
    assert_eq!(f["scored"], scored);
    assert_eq!(f["below_top_10"], below);
    assert_eq!(f["opponents"], opp);
    assert!(f["bottom_2_percent"].as_u64().unwrap() <= below as u64);
    let html = std::fs::read_to_string(demo().run.join("report/report.html")).unwrap();
    if below > 0 {
        let w = format!("{below} of {scored} known sources rank below the top 10");
        assert!(html.contains("card warn") && html.contains(&w), "{w}");
        assert!(stdout.contains(&format!("warning: {w}")), "{stdout}");
        assert!(html.contains("⚠ a known source at #"));
    } else {
        assert!(!html.contains("card warn"));
    }
}

#[test]
fn report_shows_the_finetune_loss_per_step_and_epoch_in_tau_units() {
    let d = demo();
    let summary = read_json(&d.run.join("report/summary.json"));
    let manifest = read_json(&d.run.join("manifest.json"));
    let ft = &manifest["stages"]["finetune"]["summary"];
    assert_eq!(summary["loss"]["steps"], ft["steps"]);
    let want: Vec<Value> = ft["stages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["epoch_mean_loss"].as_array().unwrap().clone())
        .collect();
    assert!(!want.is_empty());
    assert_eq!(
        summary["loss"]["epoch_mean_loss"].as_array().unwrap(),
        &want
    );
    let html = std::fs::read_to_string(d.run.join("report/report.html")).unwrap();
    let loss = html.split("id=\"loss\"").nth(1).expect("a loss section");
    assert_eq!(loss.matches("<polyline").count(), 1 + want.len());
    // One unit: τ labels on the bars, the segment columns and the token legend.
    assert!(html.contains("<th>τ by segment</th>"));
    assert!(html.contains("τ, segment "));
    assert!(html.contains("token τ (its score / N)"));
}

#[test]
fn report_renders_in_a_headless_browser() {
    let Some(browser) = chromium() else { return };
    let d = demo();
    let page = d.run.join("report/report.html");
    let url = format!("file://{}", page.display());
    let profile = tempfile::tempdir().unwrap();
    let out = headless(
        &browser,
        profile.path(),
        &["--virtual-time-budget=2000", "--dump-dom", &url],
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The script ran (it marks the body) and the rendered page holds every query's top
    // document and its prompt.
    assert!(dom.contains("data-ready=\"1\""), "script did not run");
    assert!(
        dom.contains("id=\"loss\"") && dom.contains("<polyline"),
        "loss plot"
    );
    let summary = read_json(&d.run.join("report/summary.json"));
    for (q, top) in top_ids(&summary) {
        assert!(dom.contains(&format!("id=\"query-{q}\"")), "{q}");
        assert!(dom.contains(&top), "{q}: {top}");
    }

    // A screenshot, kept beside the report for people (and CI artifacts) to look at.
    let shot = std::env::var_os("SOURCE_TDA_REPORT_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile.path().join("report.png"));
    let out = headless(
        &browser,
        profile.path(),
        &[
            "--window-size=1280,2200",
            &format!("--screenshot={}", shot.display()),
            &url,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{}",
        png.len()
    );
}

/// Copies the parts of a run directory the report stage needs.
fn copy_run(from: &Path, to: &Path) {
    for entry in walk(from) {
        let rel = entry.strip_prefix(from).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        if ["manifest.json", "config.toml", "fetch", "score", "report"].contains(&top.as_ref()) {
            common::write(&to.join(rel), std::fs::read(&entry).unwrap());
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Records `stage` as complete in the manifest with the files under RUN/stage.
fn record_complete(run: &Path, stage: &str) {
    let path = run.join("manifest.json");
    let mut m = Manifest::load(&path).unwrap();
    let mut r: StageRecord = m.stages["score"].clone();
    r.status = StageStatus::Complete;
    r.summary = Value::Null;
    r.outputs = walk(&run.join(stage))
        .into_iter()
        .map(|p| OutputFile {
            path: p.strip_prefix(run).unwrap().to_string_lossy().into_owned(),
            bytes: std::fs::metadata(&p).unwrap().len(),
            sha256: source_tda::util::hash::sha256_file(&p).unwrap(),
        })
        .collect();
    m.stages.insert(stage.to_string(), r);
    m.save(&path).unwrap();
}

/// The eval stages' contract, as a small fixture: recall for two methods, LDS for two
/// methods over 4 subsets × 8 queries.
fn write_eval_fixture(run: &Path, lds_source: f64) {
    common::write(
        &run.join("eval-recall/summary.json"),
        r#"{"k": [1, 5, 10], "methods": [
            {"method": "source", "n_queries": 8, "recall": {"1": 1.0, "5": 1.0, "10": 1.0}, "mrr": 1.0},
            {"method": "influence", "n_queries": 8, "recall": {"1": 0.625, "5": 0.875, "10": 1.0}, "mrr": 0.7135}
        ]}"#,
    );
    common::write(
        &run.join("eval-lds/summary.json"),
        format!(
            r#"{{"subsets": 4, "alpha": 0.5, "seeds": 1, "methods": [
            {{"method": "source", "lds": {lds_source}, "ci95": [0.30, 0.52], "per_query": {{"q-0": 0.4}}}},
            {{"method": "influence", "lds": 0.2468, "ci95": [0.1, 0.35], "per_query": {{}},
              "vs": {{"method": "source", "difference": -0.1357, "ci95": [-0.2468, -0.0123]}}}}
        ]}}"#
        ),
    );
    let (mut m, mut q, mut s, mut seed, mut p, mut y) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for method in ["source", "influence"] {
        for qi in 0..8 {
            for sub in 0..4u32 {
                m.push(method.to_string());
                q.push(format!("q-{qi}"));
                s.push(sub);
                seed.push(0);
                p.push(qi as f64 + 0.1 * sub as f64);
                y.push(2.0 * qi as f64 + 0.05 * sub as f64);
            }
        }
    }
    std::fs::create_dir_all(run.join("eval-lds")).unwrap();
    write_table(
        &run.join("eval-lds/points.parquet"),
        &[
            ("method", Column::Str(m)),
            ("query_id", Column::Str(q)),
            ("subset", Column::U32(s)),
            ("seed", Column::U32(seed)),
            ("predicted", Column::F64(p)),
            ("measured", Column::F64(y)),
        ],
        &[],
    )
    .unwrap();
}

fn report_cmd(run: &Path) -> (bool, String) {
    let out = common::cli(
        &common::repo_root(),
        &[
            "report",
            "--config",
            "configs/demo-eval.toml",
            "--run-dir",
            run.to_str().unwrap(),
        ],
        &[],
    );
    let err = common::stderr(&out);
    assert!(out.status.success(), "{err}");
    (!err.contains("report: up to date (skipped)"), err)
}

#[test]
fn report_reruns_when_eval_results_appear_change_or_go() {
    let d = demo();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    copy_run(&d.run, &run);

    let (ran, err) = report_cmd(&run);
    assert!(!ran, "nothing changed: skipped\n{err}");

    write_eval_fixture(&run, 0.4125);
    record_complete(&run, "eval-recall");
    record_complete(&run, "eval-lds");
    let (ran, err) = report_cmd(&run);
    assert!(ran, "eval results appeared: the report reruns\n{err}");
    let html = std::fs::read_to_string(run.join("report/report.html")).unwrap();
    assert!(html.contains("Attribution quality"));
    assert!(html.contains("<td class=\"num\">0.412</td>"), "source LDS");
    assert!(html.contains("[0.300, 0.520]"));
    assert!(html.contains("<th class=\"num\">recall@5</th>"));
    assert!(
        html.contains("<td class=\"num\">0.625</td>"),
        "influence recall@1"
    );
    assert!(html.contains("0.714"), "influence MRR");
    assert!(
        html.contains("<th class=\"num\">LDS − source</th>"),
        "paired column"
    );
    assert!(
        html.contains("<td class=\"num\">-0.136</td><td class=\"num\">[-0.247, -0.012]</td>"),
        "influence − source with its paired interval"
    );
    assert!(html.contains("over 4 random subsets of 50% of the fine-tuning set"));
    // One scatter panel per method, one point per (query, subset).
    assert_eq!(html.matches("<svg class=\"scatter\"").count(), 2);
    assert_eq!(html.matches("class=\"pt\"").count(), 2 * 8 * 4);
    let summary = read_json(&run.join("report/summary.json"));
    assert_eq!(summary["eval"]["lds_points"], 64);

    let (ran, _) = report_cmd(&run);
    assert!(!ran, "unchanged eval results: skipped");

    write_eval_fixture(&run, 0.5);
    record_complete(&run, "eval-lds");
    let (ran, _) = report_cmd(&run);
    assert!(ran, "changed eval results: rerun");
    let html = std::fs::read_to_string(run.join("report/report.html")).unwrap();
    assert!(html.contains("<td class=\"num\">0.500</td>"));

    // An eval stage that failed (or is running) is not shown.
    let path = run.join("manifest.json");
    let mut m = Manifest::load(&path).unwrap();
    m.stages.get_mut("eval-lds").unwrap().status = StageStatus::Failed;
    m.stages.remove("eval-recall");
    m.save(&path).unwrap();
    let (ran, _) = report_cmd(&run);
    assert!(ran, "eval results went away: rerun");
    let html = std::fs::read_to_string(run.join("report/report.html")).unwrap();
    assert!(!html.contains("Attribution quality"));
}

#[test]
fn malformed_eval_results_are_an_error_naming_the_file() {
    let d = demo();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    copy_run(&d.run, &run);
    common::write(&run.join("eval-recall/summary.json"), r#"{"k": "1"}"#);
    record_complete(&run, "eval-recall");
    let out = common::cli(
        &common::repo_root(),
        &[
            "report",
            "--config",
            "configs/demo-eval.toml",
            "--run-dir",
            run.to_str().unwrap(),
        ],
        &[],
    );
    let err = common::stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("eval-recall/summary.json") && err.contains("eval-recall summary format"),
        "{err}"
    );
}

#[test]
fn duckdb_example_joins_the_top_documents_to_their_text() {
    let Some(py) = common::reference_python("the DuckDB example") else {
        return;
    };
    let d = demo();
    let script = common::repo_root().join("scripts/eval/query-results.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(&d.run)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let docs = v["top_documents"].as_array().unwrap();
    assert_eq!(docs.len(), 8 * 5, "top 5 per query");
    let summary = read_json(&d.run.join("report/summary.json"));
    let texts: std::collections::HashMap<String, String> = summary["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| (q["query_id"].as_str().unwrap().to_string(), q.clone()))
        .map(|(id, q)| (id, q["prompt"].as_str().unwrap().to_string()))
        .collect();
    for (q, top) in top_ids(&summary) {
        let first = docs
            .iter()
            .find(|r| r["query_id"] == q.as_str() && r["rank"] == 1)
            .unwrap();
        assert_eq!(first["train_id"], top.as_str());
        assert_eq!(first["prompt"], texts[&q].as_str());
        // The planted document states the query's completion.
        let completion = first["completion"]
            .as_str()
            .unwrap()
            .trim()
            .trim_end_matches('.');
        assert!(
            first["text"].as_str().unwrap().contains(completion),
            "{first}"
        );
    }
    let toks = v["top_tokens"].as_array().unwrap();
    assert!(!toks.is_empty() && toks.len() <= 8 * 5);
    for w in toks.windows(2) {
        if w[0]["query_id"] == w[1]["query_id"] {
            assert!(w[0]["score"].as_f64() >= w[1]["score"].as_f64());
        }
    }

    // Without --json: readable tables naming each query and its top document.
    let out = Command::new(&py).arg(&script).arg(&d.run).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for (q, top) in top_ids(&summary) {
        assert!(
            text.contains(&format!("== {q}:")) && text.contains(&top),
            "{text}"
        );
    }
    // A run without scores: a clear message, exit status 2.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(&py)
        .arg(&script)
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run the score stage first"));
}
