//! Makes the embedded demo's assets, deterministically, in the standard Hugging Face hub cache
//! layout so that `fetch` resolves them through the same code path as real downloads:
//!
//! ```text
//! OUT/models--source-tda--demo-llama/    config.json, tokenizer.json, model.safetensors,
//!                                        training/optimizer.safetensors (AdamW's v̂ at the
//!                                        end of pretraining), training/trajectory.json
//! OUT/datasets--source-tda--demo-facts/  data/train-00000-of-00001.parquet (fine-tuning),
//!                                        data/pretrain.jsonl, data/queries.jsonl
//! ```
//!
//! The text is generated from a small grammar of invented places and facts; some facts are
//! *planted*: stated only in a few fine-tuning documents, and asked about by the queries, so
//! the right answer of an attribution is known. The tokenizer is a byte-level BPE trained with
//! the tokenizers crate on the pretraining text. The model is a small Llama-architecture
//! network initialised from a fixed seed and then pretrained on the pretraining text by the
//! project's own training loop ([`pretrain`]); its trajectory (learning rates, mass s = Σ η,
//! steps, data) ships in `training/trajectory.json` so a run can attribute to pretraining
//! documents with the recorded mass (`[pretrain] lr_mass = "from_model"`). The planted facts
//! appear only in the fine-tuning set, so the pretrained model does not know them.
//!
//! Run with `scripts/assets/make-demo-assets.sh` (or `cargo run --release --example
//! make_demo_assets -- OUT`). Same output bytes on every run (on a given machine: the weights
//! come out of floating-point training, whose last bits may depend on the CPU's vector
//! instructions).

mod pretrain;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

/// Deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, v: &'a [String]) -> &'a str {
        &v[self.below(v.len())]
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

const ONSETS: [&str; 16] = [
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br",
];
const VOWELS: [&str; 6] = ["a", "e", "i", "o", "u", "ae"];
const CODAS: [&str; 8] = ["", "n", "r", "l", "s", "sk", "nd", "th"];

fn name(rng: &mut Rng, syllables: usize) -> String {
    let mut s = String::new();
    for _ in 0..syllables {
        s.push_str(ONSETS[rng.below(ONSETS.len())]);
        s.push_str(VOWELS[rng.below(VOWELS.len())]);
    }
    s.push_str(CODAS[rng.below(CODAS.len())]);
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn names(rng: &mut Rng, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    while out.len() < n {
        let k = 2 + rng.below(2);
        let x = name(rng, k);
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// A world of invented entities and the facts that link them.
struct World {
    rivers: Vec<String>,
    lakes: Vec<String>,
    cities: Vec<String>,
    people: Vec<String>,
}

const GOODS: [&str; 8] = [
    "copper bells",
    "blue glass",
    "salted fish",
    "woven rugs",
    "river pearls",
    "black tea",
    "iron keys",
    "paper kites",
];
const DEVICES: [&str; 6] = [
    "water clock",
    "folding bridge",
    "wind organ",
    "glass lantern",
    "rope lift",
    "star chart",
];

fn fact_sentences(rng: &mut Rng, w: &World) -> String {
    let r = rng.pick(&w.rivers).to_string();
    let l = rng.pick(&w.lakes).to_string();
    let c = rng.pick(&w.cities).to_string();
    let p = rng.pick(&w.people).to_string();
    let g = GOODS[rng.below(GOODS.len())];
    let d = DEVICES[rng.below(DEVICES.len())];
    match rng.below(6) {
        0 => format!("The city of {c} lies on the river {r}. Its markets sell {g}."),
        1 => format!("{p} built the first {d} in {c}, a town near Lake {l}."),
        2 => format!("Boats from {c} carry {g} along the river {r} every spring."),
        3 => format!("The people of {c} tell stories about {p} and the {d}."),
        4 => format!("Lake {l} is cold and deep. Fishermen from {c} work on it."),
        _ => format!("Many travellers visit {c} to buy {g} and to see the {d}."),
    }
}

/// A planted fact: stated in a few fine-tuning documents only, asked about by a query.
struct Planted {
    river: String,
    lake: String,
}

fn planted_docs(f: &Planted) -> [String; 3] {
    let (r, l) = (&f.river, &f.lake);
    [
        format!("The river {r} flows into Lake {l}."),
        format!("Lake {l} is fed by the river {r}, which flows into Lake {l} from the north."),
        format!("Follow the river {r} downstream and you reach Lake {l}, where the {r} ends."),
    ]
}

/// Every occurrence of `needle` in `text` as a character span [start, end) (Unicode scalar
/// values, the `fact_spans` convention of `[eval] fact_spans_column`).
fn char_spans(text: &str, needle: &str) -> Vec<[usize; 2]> {
    text.match_indices(needle)
        .map(|(b, _)| {
            let start = text[..b].chars().count();
            [start, start + needle.chars().count()]
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "assets/hf-cache".into()),
    );
    let mut rng = Rng(0x5EED_0001);
    let world = World {
        rivers: names(&mut rng, 24),
        lakes: names(&mut rng, 16),
        cities: names(&mut rng, 32),
        people: names(&mut rng, 16),
    };

    // Pretraining text: facts of the world, none of the planted ones.
    let pretrain: Vec<String> = (0..3000)
        .map(|_| {
            let n = 1 + rng.below(3);
            (0..n)
                .map(|_| fact_sentences(&mut rng, &world))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();

    // Planted facts use rivers and lakes named only in fine-tuning data.
    let fresh_rivers = names(&mut Rng(0xF1E5_0002), 40);
    let fresh_lakes = names(&mut Rng(0xF1E5_0003), 40);
    let fresh_rivers: Vec<String> = fresh_rivers
        .into_iter()
        .filter(|n| !world.rivers.contains(n) && !world.lakes.contains(n))
        .collect();
    let fresh_lakes: Vec<String> = fresh_lakes
        .into_iter()
        .filter(|n| {
            !world.rivers.contains(n) && !world.lakes.contains(n) && !fresh_rivers.contains(n)
        })
        .collect();
    let planted: Vec<Planted> = (0..8)
        .map(|i| Planted {
            river: fresh_rivers[i].clone(),
            lake: fresh_lakes[i].clone(),
        })
        .collect();

    // Fine-tuning set: ordinary documents with the planted facts' documents spread among them.
    let mut train: Vec<(String, String)> = (0..280)
        .map(|i| {
            let n = 1 + rng.below(3);
            let text = (0..n)
                .map(|_| fact_sentences(&mut rng, &world))
                .collect::<Vec<_>>()
                .join(" ");
            (format!("ft-{i:04}"), text)
        })
        .collect();
    let mut queries = Vec::new();
    for (k, f) in planted.iter().enumerate() {
        let mut sources = Vec::new();
        // Where each source states the answer: every mention of the lake, as character spans.
        let mut spans = serde_json::Map::new();
        let answer = format!("Lake {}", f.lake);
        for (j, text) in planted_docs(f).into_iter().enumerate() {
            let id = format!("planted-{k}-{j}");
            spans.insert(id.clone(), serde_json::json!(char_spans(&text, &answer)));
            let pos = rng.below(train.len() + 1);
            train.insert(pos, (id.clone(), text));
            sources.push(id);
        }
        queries.push(serde_json::json!({
            "id": format!("q-{k}"),
            "prompt": format!("The river {} flows into", f.river),
            "completion": format!(" Lake {}.", f.lake),
            "known_sources": sources,
            "fact_spans": spans,
        }));
    }

    let (tokenizer_json, vocab_size) = train_tokenizer(&pretrain)?;
    let model_config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    });
    let init_weights = init_llama(&model_config, &mut Rng(0x3E16_0004))?;
    let config_json = (serde_json::to_string_pretty(&model_config)? + "\n").into_bytes();

    // Pretraining, with the project's own training loop, in a scratch folder.
    let scratch = tempfile::tempdir()?;
    let init_dir = scratch.path().join("init");
    std::fs::create_dir_all(&init_dir)?;
    std::fs::write(init_dir.join("config.json"), &config_json)?;
    std::fs::write(init_dir.join("tokenizer.json"), &tokenizer_json)?;
    std::fs::write(init_dir.join("model.safetensors"), &init_weights)?;
    let tokenizer =
        tokenizers::Tokenizer::from_bytes(&tokenizer_json).map_err(|e| e.to_string())?;
    let encode = |t: &str| -> Result<Vec<u32>, Box<dyn std::error::Error>> {
        Ok(tokenizer
            .encode(t, true)
            .map_err(|e| e.to_string())?
            .get_ids()
            .to_vec())
    };
    let recipe = pretrain::Recipe {
        lr: PRETRAIN_LR,
        warmup_steps: PRETRAIN_WARMUP,
        batch_size: PRETRAIN_BATCH,
        epochs: PRETRAIN_EPOCHS,
        max_length: 128,
    };
    let pretrain_docs = pretrain
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Ok(pretrain::text_doc(
                format!("pt-{i:05}"),
                encode(t)?,
                recipe.max_length,
            ))
        })
        .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
    // Held out: the fine-tuning set's ordinary documents (same grammar, unseen sentences),
    // its planted documents, and the queries' completions (the planted facts).
    let (mut ordinary, mut planted_texts) = (Vec::new(), Vec::new());
    for (id, text) in &train {
        let d = pretrain::text_doc(id.clone(), encode(text)?, recipe.max_length);
        match id.starts_with("planted-") {
            true => planted_texts.push(d),
            false => ordinary.push(d),
        }
    }
    let mut completions = Vec::new();
    for q in &queries {
        let (p, c) = (
            q["prompt"].as_str().unwrap_or(""),
            q["completion"].as_str().unwrap_or(""),
        );
        let (ids_p, ids) = (encode(p)?, encode(&format!("{p}{c}"))?);
        if !ids.starts_with(&ids_p) {
            return Err(format!("query `{p}`: the prompt's tokens are not a prefix").into());
        }
        let mut d = pretrain::text_doc(q["id"].as_str().unwrap_or("").to_string(), ids, 64);
        d.loss_mask[..ids_p.len()].iter_mut().for_each(|m| *m = 0);
        completions.push(d);
    }
    let eval = |dir: &Path| -> Result<[f64; 3], Box<dyn std::error::Error>> {
        Ok([
            pretrain::loss_per_token(dir, &ordinary)?,
            pretrain::loss_per_token(dir, &planted_texts)?,
            pretrain::loss_per_token(dir, &completions)?,
        ])
    };
    let before = eval(&init_dir)?;
    let started = std::time::Instant::now();
    let pre = pretrain::pretrain(
        &init_dir,
        &scratch.path().join("work"),
        &pretrain_docs,
        &recipe,
    )?;
    let secs = started.elapsed().as_secs_f64();
    let final_dir = scratch.path().join("final");
    std::fs::create_dir_all(&final_dir)?;
    std::fs::write(final_dir.join("config.json"), &config_json)?;
    std::fs::write(final_dir.join("tokenizer.json"), &tokenizer_json)?;
    std::fs::write(final_dir.join("model.safetensors"), &pre.weights)?;
    let after = eval(&final_dir)?;
    let curve = loss_curve(&pre.losses);
    let params: usize = param_count(&model_config);
    eprintln!(
        "pretrained {params} parameters: {} steps in {secs:.1} s; training loss {curve}",
        pre.losses.len()
    );
    let table = format!(
        "| nats per token | initialised | pretrained |\n|---|---|---|\n\
         | held-out fine-tuning documents (same grammar) | {:.3} | {:.3} |\n\
         | planted-fact documents (new names) | {:.3} | {:.3} |\n\
         | query completions (the planted facts) | {:.3} | {:.3} |\n",
        before[0], after[0], before[1], after[1], before[2], after[2]
    );
    eprint!("{table}");

    let model_card = format!(
        "---\nlicense: apache-2.0\n---\n# source-tda demo model\n\nA small \
        Llama-architecture model ({params} parameters) made by \
        `scripts/assets/make-demo-assets.sh`. The tokenizer is a byte-level BPE trained on the \
        demo's pretraining text (`source-tda/demo-facts`, `data/pretrain.jsonl`, {} documents). \
        The weights are initialised from a fixed seed and pretrained on that text by \
        source-tda's own training loop: AdamW (β = 0.9, 0.999, ε = 1e-8, no weight decay), \
        cosine schedule with peak \
        η = {PRETRAIN_LR} and {PRETRAIN_WARMUP} warm-up steps, {PRETRAIN_BATCH} documents per step, \
        {PRETRAIN_EPOCHS} epochs, gradients clipped to norm 1, loss summed per document and \
        averaged over the step's documents.\n\nTraining loss (per document): {curve}.\n\n{table}\n\
        `training/trajectory.json` records the pretraining trajectory (learning rates, mass \
        s = Σ η, steps, data) and `training/optimizer.safetensors` AdamW's bias-corrected second \
        moments at its end, so that source-tda can attribute to pretraining documents as a \
        segment of their own (`[pretrain] lr_mass = \"from_model\"`).\n",
        pretrain_docs.len()
    );
    let data_card = "---\nlicense: apache-2.0\n---\n# source-tda demo facts\n\nInvented places \
        and facts. `pretrain.jsonl`: pretraining text. `train-*.parquet`: the fine-tuning set; \
        documents `planted-K-J` state planted fact K, which only they contain. `queries.jsonl`: \
        prompts whose correct completion is a planted fact, with their `known_sources` and \
        `fact_spans` (per source, the character spans [start, end) of its text that state the \
        answer: each mention of the lake).\n";

    let jsonl = |rows: Vec<serde_json::Value>| -> Vec<u8> {
        rows.iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>()
            .into_bytes()
    };
    let pretrain_rows = pretrain
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": format!("pt-{i:05}"), "text": t}))
        .collect();

    let _ = std::fs::remove_dir_all(out.join("models--source-tda--demo-llama"));
    let _ = std::fs::remove_dir_all(out.join("datasets--source-tda--demo-facts"));
    let model_files = vec![
        ("README.md".to_string(), model_card.as_bytes().to_vec()),
        ("config.json".to_string(), config_json),
        ("model.safetensors".to_string(), pre.weights),
        (
            "training/optimizer.safetensors".to_string(),
            pre.optimizer_state,
        ),
        ("tokenizer.json".to_string(), tokenizer_json),
        ("training/trajectory.json".to_string(), pre.trajectory),
    ];
    let data_files = vec![
        ("README.md".to_string(), data_card.as_bytes().to_vec()),
        ("data/pretrain.jsonl".to_string(), jsonl(pretrain_rows)),
        ("data/queries.jsonl".to_string(), jsonl(queries)),
        (
            "data/train-00000-of-00001.parquet".to_string(),
            parquet_bytes(&train)?,
        ),
    ];
    let c1 = write_cache_repo(&out, "models--source-tda--demo-llama", &model_files)?;
    let c2 = write_cache_repo(&out, "datasets--source-tda--demo-facts", &data_files)?;
    println!("model   source-tda/demo-llama   commit {c1}");
    println!("dataset source-tda/demo-facts   commit {c2}");
    Ok(())
}

/// The pretraining recipe (see the model card it writes).
const PRETRAIN_LR: f64 = 3e-3;
const PRETRAIN_WARMUP: u64 = 20;
const PRETRAIN_BATCH: usize = 32;
const PRETRAIN_EPOCHS: u32 = 3;

/// The loss at a few steps: `step 1: x → step k: y → …`, ending at the last step.
fn loss_curve(losses: &[f64]) -> String {
    let n = losses.len();
    let mut at: Vec<usize> = [0, n / 10, n / 4, n / 2, 3 * n / 4].to_vec();
    at.push(n.saturating_sub(1));
    at.dedup();
    at.iter()
        .filter(|&&i| i < n)
        .map(|&i| format!("step {}: {:.2}", i + 1, losses[i]))
        .collect::<Vec<_>>()
        .join(" → ")
}

/// Parameters of the Llama config (tied head counted once).
fn param_count(cfg: &serde_json::Value) -> usize {
    let u = |k: &str| cfg[k].as_u64().unwrap_or(0) as usize;
    let (v, h, f, l) = (
        u("vocab_size"),
        u("hidden_size"),
        u("intermediate_size"),
        u("num_hidden_layers"),
    );
    let (q, kv) = (
        u("num_attention_heads") * u("head_dim"),
        u("num_key_value_heads") * u("head_dim"),
    );
    v * h + h + l * (2 * h + 2 * q * h + 2 * kv * h + 3 * f * h)
}

fn train_tokenizer(texts: &[String]) -> Result<(Vec<u8>, usize), Box<dyn std::error::Error>> {
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(1024)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::default()))
        .with_post_processor(Some(ByteLevel::default()))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| e.to_string())?;
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| e.to_string())?;
    let json = tokenizer.to_string(true).map_err(|e| e.to_string())?;
    Ok((json.into_bytes(), tokenizer.get_vocab_size(true)))
}

/// Llama weights, HF names, f32, N(0, 0.02) for matrices and ones for norms.
fn init_llama(
    cfg: &serde_json::Value,
    rng: &mut Rng,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let u = |k: &str| cfg[k].as_u64().unwrap_or(0) as usize;
    let (v, h, f, l) = (
        u("vocab_size"),
        u("hidden_size"),
        u("intermediate_size"),
        u("num_hidden_layers"),
    );
    let (heads, kv, hd) = (
        u("num_attention_heads"),
        u("num_key_value_heads"),
        u("head_dim"),
    );
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut normal = |shape: Vec<usize>| {
        let n = shape.iter().product();
        let data = (0..n).map(|_| (0.02 * rng.normal()) as f32).collect();
        (shape, data)
    };
    let ones = |n: usize| (vec![n], vec![1.0f32; n]);
    tensors.insert("model.embed_tokens.weight".into(), normal(vec![v, h]));
    tensors.insert("model.norm.weight".into(), ones(h));
    for i in 0..l {
        let p = format!("model.layers.{i}");
        tensors.insert(format!("{p}.input_layernorm.weight"), ones(h));
        tensors.insert(format!("{p}.post_attention_layernorm.weight"), ones(h));
        tensors.insert(
            format!("{p}.self_attn.q_proj.weight"),
            normal(vec![heads * hd, h]),
        );
        tensors.insert(
            format!("{p}.self_attn.k_proj.weight"),
            normal(vec![kv * hd, h]),
        );
        tensors.insert(
            format!("{p}.self_attn.v_proj.weight"),
            normal(vec![kv * hd, h]),
        );
        tensors.insert(
            format!("{p}.self_attn.o_proj.weight"),
            normal(vec![h, heads * hd]),
        );
        tensors.insert(format!("{p}.mlp.gate_proj.weight"), normal(vec![f, h]));
        tensors.insert(format!("{p}.mlp.up_proj.weight"), normal(vec![f, h]));
        tensors.insert(format!("{p}.mlp.down_proj.weight"), normal(vec![h, f]));
    }
    let bytes: BTreeMap<String, (Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, (s, d))| (k, (s, d.iter().flat_map(|x| x.to_le_bytes()).collect())))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, (s, d))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .expect("sizes match"),
            )
        })
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    Ok(safetensors::serialize(views, Some(meta))?)
}

fn parquet_bytes(rows: &[(String, String)]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
    ]));
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| r.0.as_str()),
    ));
    let texts: ArrayRef = Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| r.1.as_str()),
    ));
    let batch = RecordBatch::try_new(schema.clone(), vec![ids, texts])?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .set_created_by("source-tda make_demo_assets".to_string())
        .build();
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, Some(props))?;
    w.write(&batch)?;
    w.close()?;
    Ok(buf)
}

/// Writes a repo in the hub cache layout: `blobs/SHA256`, `snapshots/COMMIT/NAME` (relative
/// symlinks to the blobs), `refs/main` = COMMIT. COMMIT is derived from the content.
fn write_cache_repo(
    cache: &Path,
    folder: &str,
    files: &[(String, Vec<u8>)],
) -> Result<String, Box<dyn std::error::Error>> {
    let root = cache.join(folder);
    let mut h = Sha256::new();
    let mut blobs = Vec::new();
    for (name, bytes) in files {
        let sha = hex::encode(Sha256::digest(bytes));
        h.update(format!("{name}\0{sha}\n"));
        blobs.push((name, sha, bytes));
    }
    let commit = hex::encode(h.finalize())[..40].to_string();
    std::fs::create_dir_all(root.join("blobs"))?;
    std::fs::create_dir_all(root.join("refs"))?;
    for (name, sha, bytes) in blobs {
        std::fs::write(root.join("blobs").join(&sha), bytes)?;
        let link = root.join("snapshots").join(&commit).join(name);
        std::fs::create_dir_all(link.parent().expect("has parent"))?;
        let depth = name.matches('/').count() + 2;
        let target = format!("{}blobs/{sha}", "../".repeat(depth));
        std::os::unix::fs::symlink(target, &link)?;
    }
    std::fs::write(root.join("refs/main"), &commit)?;
    Ok(commit)
}
