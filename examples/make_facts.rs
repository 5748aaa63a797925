//! Writes a planted-facts evaluation set (`source_tda::eval::facts`): `train.jsonl`,
//! `queries.jsonl` and a README into OUT. Point a config's `[data.train]` and `[data.query]`
//! at the two files (`source = "local"`) and run the pipeline with `eval-recall`.
//!
//! ```sh
//! cargo run --release --example make_facts -- OUT [--seed 1] [--facts 24] [--statements 3] \
//!     [--distractors 2] [--filler 200]
//! ```
//!
//! Draw the set you choose settings on with one seed and the set you report with another.

use clap::Parser;
use source_tda::eval::{generate_facts, write_fact_set, FactsSpec};

/// Writes a planted-facts evaluation set: invented entities, each planted fact stated by a
/// few documents with different templates, distractors naming the same subjects, filler.
#[derive(Parser)]
struct Args {
    /// Output folder (train.jsonl, queries.jsonl, README.md).
    out: std::path::PathBuf,
    /// Seed of every random choice; another seed draws other names.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Planted facts (one query each), over the relations in turn.
    #[arg(long, default_value_t = 24)]
    facts: usize,
    /// Documents stating each fact, each another template (1 ..= 4).
    #[arg(long, default_value_t = 3)]
    statements: usize,
    /// Documents per fact naming its subject with other attributes.
    #[arg(long, default_value_t = 2)]
    distractors: usize,
    /// Documents stating facts that no query asks about.
    #[arg(long, default_value_t = 200)]
    filler: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let spec = FactsSpec {
        seed: a.seed,
        facts: a.facts,
        statements: a.statements,
        distractors: a.distractors,
        filler: a.filler,
    };
    let set = generate_facts(&spec)?;
    write_fact_set(&set, &spec, &a.out)?;
    eprintln!(
        "wrote {} documents and {} queries to {}",
        set.train.len(),
        set.queries.len(),
        a.out.display()
    );
    Ok(())
}
