//! Generated queries: with `[data.query] shape = "prompt"` the query stage completes each
//! prompt with the final fine-tuned model and measures −log p(completion | prompt) on it. The
//! demo runs end to end that way, and each completion equals an independent greedy decode
//! (argmax over repeated full forward passes, no KV cache) of the final checkpoint. Each
//! generated token is attributed on its own (issue 25 items 2 and 3): the tokens' document
//! scores add up to the whole completion's, their per-training-token scores to their document
//! scores, and the report shows the generation with its panels in a headless browser.

use crate::common;

use arrow_array::cast::AsArray;
use candle_core::{Device, IndexOp, Tensor};
use source_tda::data::read_prepared;
use source_tda::model::{LoadOptions, Model};
use source_tda::output::parquet::read_batches;

use crate::common::{cli, stderr, write};

fn greedy_by_full_forwards(model: &Model, prompt: &[u32], n: usize, eos: u32) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let x = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&x).unwrap();
        let next = logits
            .i((0, seq.len() - 1))
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        seq.push(next);
        if next == eos {
            break;
        }
    }
    seq[prompt.len()..].to_vec()
}

/// `[query] stop`: a completion is cut after the first token whose decoded text completes a
/// stop string, found here by decoding every prefix of a tokenised sentence by hand.
#[test]
fn stop_strings_cut_a_completion_after_the_token_that_completes_them() {
    use source_tda::stages::query_generate::stop_length;
    let tokenizer = tokenizers::Tokenizer::from_file(common::demo_tokenizer()).unwrap();
    let text = " Lake Thekal. The river Navo flows";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let first_with = |needle: &str| {
        (1..=ids.len())
            .find(|&n| tokenizer.decode(&ids[..n], false).unwrap().contains(needle))
            .unwrap()
    };
    let stop = |s: &[&str]| {
        let s: Vec<String> = s.iter().map(|x| x.to_string()).collect();
        stop_length(&tokenizer, &ids, &s).unwrap()
    };
    assert!(first_with(".") < ids.len());
    assert_eq!(stop(&["."]), first_with("."));
    assert!(tokenizer
        .decode(&ids[..stop(&["."])], false)
        .unwrap()
        .ends_with("."));
    // The earliest of several; a string across tokens; none found: everything.
    assert_eq!(stop(&["river", "."]), first_with("."));
    assert_eq!(stop(&["Thekal"]), first_with("Thekal"));
    assert!(first_with("Thekal") > first_with("Lake"));
    assert_eq!(stop(&["?"]), ids.len());
    assert_eq!(stop(&[]), ids.len());
}

#[test]
fn the_demo_runs_with_generated_queries_that_equal_an_independent_greedy_decode() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::repo_root();
    let cfg = std::fs::read_to_string(root.join("configs/demo-eval.toml")).unwrap();
    let query_section =
        "split = \"queries\"                  # data/queries.jsonl\nshape = \"prompt_completion\"";
    assert!(
        cfg.contains(query_section),
        "the demo config changed: update this test"
    );
    let cfg = cfg
        .replace(query_section, "split = \"queries\"\nshape = \"prompt\"")
        .replace(
            "cache_dir = \"../assets/hf-cache\"",
            &format!("cache_dir = \"{}\"", root.join("assets/hf-cache").display()),
        )
        + "\n[query]\nmax_new_tokens = 12\n"
        + "\n[attribution.generated]\ntop_k = 0\ndetail_docs = 2\n";
    write(&dir.path().join("c.toml"), cfg);
    write(
        &dir.path().join("p.toml"),
        "config = \"c.toml\"\nstages = [\"fetch\", \"prepare\", \"finetune\", \"fit\", \"query\", \"score\", \"report\"]\nrun_dir = \"run\"\n",
    );
    let o = cli(dir.path(), &["-q", "run", "p.toml"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = dir.path().join("run");

    // queries.parquet: the completion text, and `generated` set.
    let batches = read_batches(&run.join("score/queries.parquet")).unwrap();
    let mut completions = Vec::new();
    for b in &batches {
        let c = b.column_by_name("completion").unwrap().as_string::<i32>();
        let g = b.column_by_name("generated").unwrap().as_boolean();
        let m = b
            .column_by_name("measurement")
            .unwrap()
            .as_primitive::<arrow_array::types::Float64Type>();
        for i in 0..b.num_rows() {
            assert!(g.value(i));
            assert!(m.value(i).is_finite() && m.value(i) >= 0.0);
            completions.push(c.value(i).to_string());
        }
    }

    // The same completions by an independent greedy decode of the final checkpoint.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["stages"]["query"]["summary"]["generated"], true);
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("fit/plan.json")).unwrap()).unwrap();
    let final_dir = std::path::PathBuf::from(plan["final_checkpoint"].as_str().unwrap());
    let model = Model::load(&final_dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap())
            .unwrap();
    let eos = config["eos_token_id"].as_u64().unwrap() as u32;
    let tokenizer = tokenizers::Tokenizer::from_file(common::demo_tokenizer()).unwrap();
    let (prompts, _) = read_prepared(&run.join("prepare/query.parquet")).unwrap();
    assert_eq!(prompts.len(), completions.len());
    assert!(!prompts.is_empty());
    for (p, got) in prompts.iter().zip(&completions) {
        assert_eq!(
            p.n_loss_tokens(),
            0,
            "a prompt-only query has no completion yet"
        );
        let want = greedy_by_full_forwards(&model, &p.input_ids, 12, eos);
        assert!(!want.is_empty());
        assert_eq!(
            got,
            &tokenizer.decode(&want, false).unwrap(),
            "{}",
            p.doc_id
        );
    }

    // Scores exist for every generated query.
    let rows: usize = read_batches(&run.join("score/query_set=default/shard=0/part-00000.parquet"))
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert!(rows >= completions.len());
    per_token_scores_add_up(&run, &completions);
    the_report_shows_the_generation(&run, completions.len());
}

fn strings(b: &arrow_array::RecordBatch, c: &str) -> Vec<String> {
    let a = b.column_by_name(c).unwrap().as_string::<i32>();
    (0..b.num_rows()).map(|i| a.value(i).to_string()).collect()
}

fn numbers(b: &arrow_array::RecordBatch, c: &str) -> Vec<f64> {
    let a = b.column_by_name(c).unwrap();
    match a.data_type() {
        arrow_schema::DataType::Float64 => a
            .as_primitive::<arrow_array::types::Float64Type>()
            .values()
            .to_vec(),
        arrow_schema::DataType::Float32 => a
            .as_primitive::<arrow_array::types::Float32Type>()
            .values()
            .iter()
            .map(|&x| x as f64)
            .collect(),
        arrow_schema::DataType::UInt32 => a
            .as_primitive::<arrow_array::types::UInt32Type>()
            .values()
            .iter()
            .map(|&x| x as f64)
            .collect(),
        t => panic!("{c}: {t}"),
    }
}

/// Reads every batch of a table into (string columns, numeric columns) by name.
fn table(path: &std::path::Path, s: &[&str], n: &[&str]) -> (Vec<Vec<String>>, Vec<Vec<f64>>) {
    let mut out_s = vec![Vec::new(); s.len()];
    let mut out_n = vec![Vec::new(); n.len()];
    for b in &read_batches(path).unwrap() {
        for (o, c) in out_s.iter_mut().zip(s) {
            o.extend(strings(b, c));
        }
        for (o, c) in out_n.iter_mut().zip(n) {
            o.extend(numbers(b, c));
        }
    }
    (out_s, out_n)
}

/// gen_tokens: each query's token texts join to its completion and its log p add up to −f(q);
/// gen_scores (top_k = 0: every document): Σ_j score_j(m) = score(m) of the whole completion;
/// gen_token_scores: each (token, document)'s training-token scores add up to its score.
fn per_token_scores_add_up(run: &std::path::Path, completions: &[String]) {
    use std::collections::HashMap;
    let score = run.join("score");
    let (s, n) = table(
        &score.join("queries.parquet"),
        &["query_id", "completion"],
        &["measurement"],
    );
    let (gs, gn) = table(
        &score.join("gen_tokens.parquet"),
        &["query_id", "gen_token_text"],
        &["gen_index", "logprob"],
    );
    for (qi, q) in s[0].iter().enumerate() {
        let mut toks: Vec<(f64, &str, f64)> = (0..gs[0].len())
            .filter(|&i| &gs[0][i] == q)
            .map(|i| (gn[0][i], gs[1][i].as_str(), gn[1][i]))
            .collect();
        toks.sort_by(|a, b| a.0.total_cmp(&b.0));
        let text: String = toks.iter().map(|t| t.1).collect();
        assert_eq!(text, s[1][qi], "{q}");
        assert_eq!(text, completions[qi]);
        let lp: f64 = toks.iter().map(|t| t.2).sum();
        assert!(
            (lp + n[0][qi]).abs() <= 1e-3 * (1.0 + n[0][qi]),
            "{q}: {lp}"
        );
    }
    let (ws, wn) = table(
        &score.join("query_set=default/shard=0/part-00000.parquet"),
        &["query_id", "train_id"],
        &["score"],
    );
    let (ps, pn) = table(
        &score.join("gen_scores.parquet"),
        &["query_id", "train_id"],
        &["gen_index", "score"],
    );
    let mut sums: HashMap<(String, String), f64> = HashMap::new();
    for i in 0..ps[0].len() {
        *sums
            .entry((ps[0][i].clone(), ps[1][i].clone()))
            .or_default() += pn[1][i];
    }
    assert_eq!(
        sums.len(),
        ws[0].len(),
        "top_k = 0: every document per token"
    );
    let max = wn[0].iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(max > 0.0);
    for i in 0..ws[0].len() {
        let got = sums[&(ws[0][i].clone(), ws[1][i].clone())];
        assert!(
            (got - wn[0][i]).abs() <= 1e-3 * max,
            "{} {}: Σ_j {got} vs {}",
            ws[0][i],
            ws[1][i],
            wn[0][i]
        );
    }
    let (ts, tn) = table(
        &score.join("gen_token_scores.parquet"),
        &["query_id", "train_id"],
        &["gen_index", "score"],
    );
    let mut tok_sums: HashMap<(String, u32, String), f64> = HashMap::new();
    for i in 0..ts[0].len() {
        *tok_sums
            .entry((ts[0][i].clone(), tn[0][i] as u32, ts[1][i].clone()))
            .or_default() += tn[1][i];
    }
    let n_tokens = gs[0].len();
    assert_eq!(
        tok_sums.len(),
        2 * n_tokens,
        "detail_docs = 2 for every token"
    );
    for i in 0..ps[0].len() {
        if let Some(t) = tok_sums.get(&(ps[0][i].clone(), pn[0][i] as u32, ps[1][i].clone())) {
            assert!((t - pn[1][i]).abs() <= 1e-3 * max, "{t} vs {}", pn[1][i]);
        }
    }
}

/// summary.json lists each query's generation; in chromium every generated query's block
/// renders with its first token's panel shown by the page's script.
pub(crate) fn the_report_shows_the_generation(run: &std::path::Path, n_queries: usize) {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report/summary.json")).unwrap())
            .unwrap();
    for q in summary["queries"].as_array().unwrap() {
        let g = q["generation"].as_array().unwrap();
        let text: String = g.iter().map(|t| t["text"].as_str().unwrap()).collect();
        assert_eq!(text, q["completion"].as_str().unwrap());
        assert!(g.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0));
        assert!(
            q["improbable"].is_null(),
            "a generated query is never improbable"
        );
    }
    let page = run.join("report/report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("<div class=\"gen\">").count(), n_queries);
    let Some(browser) = crate::report::chromium() else {
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let out = crate::report::headless(
        &browser,
        profile.path(),
        &[
            "--virtual-time-budget=2000",
            "--dump-dom",
            &format!("file://{}", page.display()),
        ],
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("data-ready=\"1\""), "script did not run");
    assert!(
        dom.contains(&format!("data-gen=\"{n_queries}\"")),
        "generation blocks"
    );
    assert_eq!(dom.matches("class=\"g on\"").count(), n_queries);
    // The first token's panel is shown, the others stay hidden.
    assert_eq!(
        dom.matches("<div class=\"genpanel\" data-gi=\"0\">")
            .count(),
        n_queries,
        "first panels shown"
    );
    assert!(dom.contains("<div class=\"genpanel\" data-gi=\"1\" hidden"));
}
