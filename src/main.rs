//! Owns the `source-tda` command line: arguments, the table of stage subcommands, one printer.
//! Layer: main (the top) — may import every library module; holds no library logic.
//!
//! Parses arguments, sets up logging and progress, runs the named stages through the
//! library's runner with the registry of every stage, and prints what happened; errors are
//! printed as the library phrases them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use source_tda::config::{Config, Pipeline, STAGE_ORDER};
use source_tda::error::ExitKind;
use source_tda::pipeline::{
    run_stages, status_rows, verify_run, Outcome, Registry, RunDir, RunOptions, Workers,
};
use source_tda::util::mem::human_bytes;
use source_tda::util::progress::is_quiet;

/// Which fine-tuning documents, and which tokens in them, made my model generate this?
///
/// source-tda attributes a fine-tuned language model's generations to its training documents
/// and tokens with Source (approximate unrolled differentiation) and EK-FAC curvature, as a
/// declared pipeline of stages that writes Parquet:
///
///   fetch → prepare → finetune → fit → query → score → report
///
/// A run is declared by a config (configs/*.toml: model, data, training, attribution) and a
/// pipeline (pipelines/*.toml: a config and the stages to run). Every stage writes into the
/// run directory, records itself in manifest.json, and is skipped on a rerun when its inputs
/// and config are unchanged. A single-stage command, `report` and `status` read the run
/// directory's resolved config.toml when --config is not given.
///
/// Exit status:
///   0  done
///   1  any other error
///   2  usage: the command line is wrong (unknown option, missing argument, no config)
///   3  config or data: a config, pipeline, data set, model or run directory to fix
///   4  a stage failed while it ran (numerics, tensors, kernels, writing outputs)
///   5  a resource limit: attribution.memory_limit_gib, out of memory, disk full
#[derive(Parser, Debug)]
#[command(name = "source-tda", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    /// No progress bars; only warnings and errors.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// More log detail (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a pipeline: its config's stages in order, resuming what is complete.
    Run {
        /// The pipeline file (pipelines/NAME.toml).
        pipeline: PathBuf,
        /// Run directory. Default: the pipeline's `run_dir`, else runs/NAME.
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Run the pipeline's stages up to and including STAGE only.
        #[arg(long, value_name = "STAGE")]
        until: Option<String>,
        #[command(flatten)]
        opts: StageOpts,
        #[command(flatten)]
        workers: WorkerOpts,
    },
    /// Resolve the model and data sets (hub, hub cache or local paths) and hash every file.
    Fetch(OneStage),
    /// Tokenise the data sets into Parquet tables with loss masks.
    Prepare(OneStage),
    /// Fine-tune the model ([train]), saving checkpoints and trajectory.json; resumes an
    /// interrupted fine-tune from its last checkpoint.
    Finetune(OneStage),
    /// Fit EK-FAC curvature per segment of the trajectory ([attribution]).
    ///
    /// With --shard i/n this process runs only its share (every n-th batch) of the pass
    /// that is due, without locking the run directory, and writes partial sums to
    /// RUN_DIR/shards/fit/: the covariance pass first; after `source-tda merge fit` wrote the
    /// eigenbases, the same command runs the eigenvalue-correction pass; a second `merge fit`
    /// completes the stage. See docs/guide.md (shards) and scripts/slurm/, scripts/k8s/.
    #[command(verbatim_doc_comment)]
    Fit {
        #[command(flatten)]
        stage: OneStage,
        /// Run only shard i of n (1 ≤ i ≤ n) of the pass that is due, e.g. --shard 2/4.
        #[arg(long, value_name = "i/n", conflicts_with_all = ["force", "allow_config_change"])]
        shard: Option<String>,
    },
    /// Sketch every document's gradient at each scoring model into the candidate index
    /// ([attribution.candidates]): later query sets score only each query's candidates.
    Index(OneStage),
    /// Combine the partial results of the `--shard i/n` processes of STAGE (`fit`, `score`
    /// or `eval-lds`) in a run directory; idempotent.
    ///
    /// fit: the covariance shards into the eigenbases (then run the Λ shards: the same
    /// `fit --shard i/n` commands), or, once every Λ shard is there, the factors: the run
    /// directory then holds a complete `fit` as an unsharded run would. score: ranks the
    /// shards' rows again into the tables an unsharded `score` writes. eval-lds: runs the
    /// stage once every retraining job has its result. A missing or duplicated shard, or
    /// shards of different counts, configs or versions, are refused, naming what to rerun.
    #[command(verbatim_doc_comment)]
    Merge {
        /// The stage whose shards to merge: `fit`, `score` or `eval-lds`.
        stage: String,
        /// The config file. Default: the run directory's resolved config.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The run directory.
        #[arg(long)]
        run_dir: PathBuf,
    },
    /// Compute the query measurements −log p(completion | prompt) and their gradients at the
    /// final checkpoint.
    Query(OneStage),
    /// Walk the queries back through the segments and write the scores dataset
    /// (query_set=default/shard=0/part-00000.parquet, per document), token_scores.parquet (per token of the top-k documents), queries.parquet and
    /// train_docs.parquet. τ = score / n_train > 0: the document helped (a proponent).
    ///
    /// With --shard i/n this process scores only its share (every n-th batch of each data
    /// set's length-sorted plan), without locking the run directory, into
    /// RUN_DIR/shards/score/; `source-tda merge score` then ranks the shards' rows again and
    /// completes the stage. See docs/design.md §11 and scripts/slurm/, scripts/k8s/.
    #[command(verbatim_doc_comment)]
    Score {
        #[command(flatten)]
        stage: OneStage,
        /// Score only shard i of n (1 ≤ i ≤ n), e.g. --shard 2/4.
        #[arg(long, value_name = "i/n", conflicts_with_all = ["force", "allow_config_change"])]
        shard: Option<String>,
    },
    /// Evaluate attribution quality, comparing [eval] methods side by side: `eval recall`
    /// (recall@k and MRR of the queries' known source documents) or `eval lds` (linear
    /// datamodeling score from retraining on random subsets; resumable, `--shard i/n`).
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Write RUN_DIR/report/report.html (one self-contained page: each query's top
    /// proponents and opponents with segment contributions and token shading, timings and,
    /// when eval stages ran, LDS / recall), summary.json, and print the top documents.
    Report(OneStage),
    /// Ask a finished run new questions: score a file of queries as a named query set,
    /// reusing the run's fine-tune and fitted curvature (only `query` and `score` run, for
    /// the set; then the report, which lists every set).
    ///
    /// FILE is JSONL, CSV or Parquet with a `prompt` column (the model completes each prompt
    /// and its own completion is explained) or `prompt` and `completion` columns (the given
    /// completion is explained), read with the run's [data.query] settings (column names,
    /// chat_template, max_length) when it has them; an `id` column names the queries.
    /// Writes RUN_DIR/query/query_set=NAME/ and RUN_DIR/score/query_set=NAME/ (the same tables
    /// as score/). Several sets coexist; asking again with the same file skips what is done.
    ///
    /// Example:
    ///
    ///   source-tda ask --run-dir runs/demo --prompts my-questions.jsonl --name mine
    #[command(verbatim_doc_comment)]
    Ask {
        /// The finished run directory (fit must be complete).
        #[arg(long)]
        run_dir: PathBuf,
        /// The file of queries.
        #[arg(long, value_name = "FILE")]
        prompts: PathBuf,
        /// The set's name (letters, digits, `_`, `-`, `.`). Default: FILE's name without its
        /// extension.
        #[arg(long)]
        name: Option<String>,
    },
    /// Import a Hugging Face Trainer run as the trajectory instead of fine-tuning here.
    ///
    /// Runs fetch, prepare and finetune (the ones not yet done) with `train.import_from` set
    /// to TRAINER_DIR: reads its checkpoint-N/ folders and trainer_state.json, checks every
    /// logged learning rate against the schedule [train] declares, bias-corrects Adam's
    /// exported second moments, and writes RUN_DIR/finetune/trajectory.json. The config's
    /// [train] declares what the Trainer used (lr, schedule, warmup_steps, optimizer, betas,
    /// loss_normalization = "mean_per_token"). See docs/import-trainer.md.
    ///
    /// Example:
    ///
    ///   source-tda import-trainer out/checkpoints --config configs/my.toml --run-dir runs/my
    #[command(verbatim_doc_comment)]
    ImportTrainer {
        /// The Trainer's output_dir (holding checkpoint-N/ folders).
        trainer_dir: PathBuf,
        #[command(flatten)]
        stage: OneStage,
    },
    /// Show what is done in a run directory, with timings and peak memory.
    ///
    /// With --json, prints one JSON object: {"run_dir", "stages": [{"stage", "status"
    /// (complete, stale, failed, interrupted or not_run), "state" (with the reason),
    /// "wall_s", "peak_rss_bytes", "finished_at"}]}, every stage in pipeline order, each
    /// followed by its named query sets' instances (`score/query_set=NAME`).
    #[command(verbatim_doc_comment)]
    Status {
        /// The run directory.
        #[arg(long)]
        run_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check every file the manifest of a run directory records (presence, size, sha256);
    /// exits non-zero naming each file that changed on disk.
    Verify {
        /// The run directory.
        #[arg(long)]
        run_dir: PathBuf,
    },
    /// Predict each heavy stage's peak memory and disk before running it.
    ///
    /// Builds the model from its config.json alone (no weights are read or downloaded) and
    /// prints, for finetune, fit, query and score, the peak memory the stage will predict
    /// for itself and the bytes it leaves on disk (checkpoints, factor files, query
    /// gradients), with score's layer groups under the memory limit. Exits with status 5,
    /// naming each stage and what to change, when a stage does not fit
    /// --memory-limit-gib (default: the config's attribution.memory_limit_gib).
    ///
    /// The model and counts come from --run-dir (after `fetch` and `prepare`), or from
    /// --model-config and --documents / --queries, e.g. for a model not yet downloaded:
    ///
    ///   source-tda plan configs/my-run.toml --model-config Llama-3.2-1B/config.json \
    ///       --documents 20000 --queries 64 --memory-limit-gib 64
    #[command(verbatim_doc_comment)]
    Plan(Box<PlanArgs>),
    /// Check a config file and print it resolved (defaults filled in, paths absolute).
    Validate {
        /// The config file (configs/NAME.toml).
        config: PathBuf,
    },
    /// Convert a Llama-family GGUF file (llama.cpp's format) into a Hugging Face checkpoint.
    ///
    /// Dequantises every tensor to f32 (F32, F16, Q4_1 and Q8_0 are supported), renames the
    /// tensors to Hugging Face names, undoes llama.cpp's q/k row permutation, and writes
    /// OUT_DIR/config.json (LlamaForCausalLM), OUT_DIR/model.safetensors, OUT_DIR/conversion.json
    /// and, with --tokenizer, OUT_DIR/tokenizer.json. Point a config's `[model] id` at OUT_DIR
    /// to use it.
    ///
    /// Example (SmolLM2-135M-Instruct, offline; see docs/real-models.md):
    ///
    ///   scripts/assets/fetch-test-assets.sh
    ///   source-tda convert-gguf .cache/test-assets/SmolLM2-135M-Instruct.Q4_1.gguf \
    ///       models/smollm2-135m --tokenizer tests/data/kronfluence-smollm2-2l/tokenizer.json
    #[command(verbatim_doc_comment)]
    ConvertGguf {
        /// The GGUF file.
        gguf: PathBuf,
        /// The checkpoint directory to write (created; files in it are replaced).
        out_dir: PathBuf,
        /// A tokenizer.json for this model, copied into OUT_DIR after checking that it loads
        /// and that its tokens match the GGUF's token list. Without it, no tokenizer.json is
        /// written.
        #[arg(long, value_name = "PATH")]
        tokenizer: Option<PathBuf>,
        /// Keep only the first N decoder layers (embeddings, final norm and head are kept):
        /// a small, fast model for tests.
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
enum EvalCommand {
    /// recall@k and MRR of each query's known source documents among the fine-tuning set,
    /// per method; writes RUN_DIR/eval-recall/{summary.json,recall.parquet}.
    Recall(OneStage),
    /// The linear datamodeling score per method: fine-tunes on [eval] subsets random subsets
    /// (fraction alpha, seeds each) with the run's [train], measures each query's loss and
    /// correlates it with −Σ τ over the subset; writes RUN_DIR/eval-lds/{summary.json,
    /// points.parquet}. Finished retraining jobs are kept and skipped on a rerun.
    ///
    /// Retraining runs in worker processes, one single-threaded retraining per core for a
    /// small model (see --workers); the results do not depend on how many.
    ///
    /// With --shard i/n only every n-th job (starting at job i − 1) is trained, in this
    /// process, without locking the run directory, so shards may run at the same time (on
    /// several machines); the last shard (or a later run without --shard) merges once every
    /// job is done.
    #[command(verbatim_doc_comment)]
    Lds {
        #[command(flatten)]
        stage: OneStage,
        /// Run only shard i of n (1 ≤ i ≤ n), e.g. --shard 2/4.
        #[arg(long, value_name = "i/n")]
        shard: Option<String>,
        #[command(flatten)]
        workers: WorkerOpts,
        /// With --shard: never merge (a worker of a running eval-lds stage).
        #[arg(long, hide = true, requires = "shard")]
        no_merge: bool,
    },
}

#[derive(Args, Debug)]
struct OneStage {
    /// The config file (configs/NAME.toml). Default: the run directory's resolved
    /// config.toml, the one it was last run with.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The run directory.
    #[arg(long)]
    run_dir: PathBuf,
    #[command(flatten)]
    opts: StageOpts,
}

#[derive(Args, Debug)]
struct StageOpts {
    /// Rerun this stage and every later one, even if complete.
    #[arg(long, value_name = "STAGE")]
    force: Option<String>,
    /// Accept a run directory made with a different config: rerun the stages the changed
    /// keys affect (without it, such a directory is refused with the list of keys).
    #[arg(long)]
    allow_config_change: bool,
}

#[derive(Args, Debug, Clone, Copy)]
struct WorkerOpts {
    /// Worker processes for eval-lds's retrainings, each on cores / N threads. Default: one
    /// per core when the base model's weights are under 256 MiB (a small model's steps are
    /// bound by per-operation overhead, which threads do not share), else 1 (this process).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
}

impl WorkerOpts {
    fn workers(self) -> Workers {
        Workers {
            exe: std::env::current_exe().ok(),
            count: self.workers.map(usize::from),
        }
    }
}

impl OneStage {
    /// The config (`--config`, else the run directory's stored config.toml) and its path.
    fn load_config(&self) -> Result<(Config, PathBuf)> {
        if let Some(path) = &self.config {
            return Ok((Config::load(path)?, path.clone()));
        }
        let path = self.run_dir.join("config.toml");
        if !path.is_file() {
            return Err(Usage(format!(
                "no --config given, and {} does not exist (this run directory has not been \
                 started); pass --config configs/NAME.toml",
                path.display()
            ))
            .into());
        }
        Ok((Config::load(&path)?, path))
    }
}

/// A command line that cannot be run as given (exit status 2, as clap's own usage errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// The exit status of a failed command: the first library error in the chain decides
/// ([`source_tda::error::Error::exit_kind`]); a [`Usage`] error is 2; anything else 1.
fn exit_status(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(lib) = cause.downcast_ref::<source_tda::Error>() {
            return lib.exit_kind().code();
        }
        if cause.downcast_ref::<Usage>().is_some() {
            return ExitKind::Usage.code();
        }
    }
    ExitKind::Other.code()
}

impl StageOpts {
    fn into_options(self, workers: Workers) -> RunOptions {
        RunOptions {
            force: self.force,
            allow_config_change: self.allow_config_change,
            workers,
        }
    }
}

/// `source-tda plan`'s arguments.
#[derive(Args, Debug)]
struct PlanArgs {
    /// The config file (configs/NAME.toml).
    config: PathBuf,
    /// A run directory where `fetch` and `prepare` ran: its model and data counts.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// The model's config.json (or the folder holding it), instead of the run's.
    #[arg(long, value_name = "PATH")]
    model_config: Option<PathBuf>,
    /// Fine-tuning documents, one count per fine-tuning stage (comma-separated), instead
    /// of the run's prepared data.
    #[arg(long, value_name = "N[,N…]", value_delimiter = ',')]
    documents: Vec<usize>,
    /// Queries, instead of the run's prepared query set.
    #[arg(long, value_name = "Q")]
    queries: Option<usize>,
    /// Check against this memory limit instead of attribution.memory_limit_gib.
    #[arg(long, value_name = "GIB")]
    memory_limit_gib: Option<f64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// A subcommand that runs one stage: its arguments, stage and worker processes.
type OneStageRun = (OneStage, &'static str, Workers);

/// The table of subcommands that run one stage. Any other command comes back as it is.
fn one_stage(command: Command) -> std::result::Result<OneStageRun, Command> {
    let here = Workers::default;
    Ok(match command {
        Command::Fetch(s) => (s, "fetch", here()),
        Command::Prepare(s) => (s, "prepare", here()),
        Command::Finetune(s) => (s, "finetune", here()),
        Command::Fit { stage, shard: None } => (stage, "fit", here()),
        Command::Index(s) => (s, "index", here()),
        Command::Query(s) => (s, "query", here()),
        Command::Score { stage, shard: None } => (stage, "score", here()),
        Command::Eval(EvalCommand::Recall(s)) => (s, "eval-recall", here()),
        Command::Eval(EvalCommand::Lds {
            stage,
            shard: None,
            workers,
            ..
        }) => (stage, "eval-lds", workers.workers()),
        Command::Report(s) => (s, "report", here()),
        other => return Err(other),
    })
}

/// Renders a stage's `summary.json` as a terminal table.
type SummaryTable = fn(&serde_json::Value) -> String;

/// The stages whose `summary.json` is printed as a table after they run.
const SUMMARY_TABLES: [(&str, SummaryTable); 2] = [
    ("eval-recall", source_tda::eval::table::recall_table),
    ("eval-lds", source_tda::eval::table::lds_table),
];

fn main() -> ExitCode {
    source_tda::util::threads::configure_for_compute();
    let cli = Cli::parse();
    init_logging(cli.quiet, cli.verbose);
    source_tda::util::progress::set_quiet(cli.quiet);
    match dispatch(cli.command, &source_tda::stages::registry()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_status(&e))
        }
    }
}

fn init_logging(quiet: bool, verbose: u8) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(use_colour())
        .init();
}

/// Colour only on a terminal, and not with `NO_COLOR` (see `colour_allowed`).
fn use_colour() -> bool {
    use source_tda::util::progress::{colour_allowed, stderr_is_terminal};
    colour_allowed(
        std::env::var_os("NO_COLOR").as_deref(),
        stderr_is_terminal(),
    )
}

fn dispatch(command: Command, stages: &Registry) -> Result<()> {
    let command = match one_stage(command) {
        Ok((s, stage, workers)) => {
            let names = [stage.to_string()];
            let (config, config_path) = s.load_config()?;
            let run_dir = s.run_dir.clone();
            run(
                stages,
                &config,
                &config_path,
                &run_dir,
                &names,
                s.opts.into_options(workers),
            )?;
            return print_summary(&run_dir, stage);
        }
        Err(other) => other,
    };
    match command {
        Command::Run {
            pipeline,
            run_dir,
            until,
            opts,
            workers,
        } => {
            let p = Pipeline::load(&pipeline)?;
            let run_dir = run_dir
                .or_else(|| p.run_dir.clone())
                .unwrap_or_else(|| PathBuf::from("runs").join(p.name()));
            let names = stages_until(&p.stages, until.as_deref(), &pipeline)?;
            let config = Config::load(&p.config)?;
            run(
                stages,
                &config,
                &p.config,
                &run_dir,
                names,
                opts.into_options(workers.workers()),
            )
        }
        Command::Eval(EvalCommand::Lds {
            stage,
            shard: Some(shard),
            no_merge,
            ..
        }) => eval_lds_shard(stages, &stage, &shard, !no_merge),
        Command::Fit {
            stage,
            shard: Some(shard),
        } => fit_shard(stages, &stage, &shard),
        Command::Score {
            stage,
            shard: Some(shard),
        } => score_shard(stages, &stage, &shard),
        Command::Merge {
            stage,
            config,
            run_dir,
        } => {
            let opts = StageOpts {
                force: None,
                allow_config_change: false,
            };
            merge(
                stages,
                &stage,
                &OneStage {
                    config,
                    run_dir,
                    opts,
                },
            )
        }
        Command::ImportTrainer { trainer_dir, stage } => {
            import_trainer(stages, &trainer_dir, stage)
        }
        Command::Ask {
            run_dir,
            prompts,
            name,
        } => {
            let run = RunDir::at(&run_dir)?;
            let asked = source_tda::stages::ask(
                stages,
                &run,
                &prompts,
                name.as_deref(),
                &RunOptions::default(),
            )
            .with_context(|| format!("run directory {}", run.path().display()))?;
            print_outcomes(
                &asked.outcomes,
                &format!(
                    "query set {}: {}",
                    asked.set.name,
                    asked.scores_dir.display()
                ),
            );
            Ok(())
        }
        Command::Status { run_dir, json } => match json {
            true => status_json(stages, &run_dir),
            false => status(stages, &run_dir),
        },
        Command::Verify { run_dir } => verify(&run_dir),
        Command::ConvertGguf {
            gguf,
            out_dir,
            tokenizer,
            layers,
        } => convert_gguf(&gguf, &out_dir, tokenizer.as_deref(), layers),
        Command::Plan(args) => plan(&args),
        Command::Validate { config } => {
            let c = Config::load(&config)?;
            print!("{}", c.to_toml());
            eprintln!("{}: valid", config.display());
            Ok(())
        }
        one => unreachable!("{one:?} runs one stage"),
    }
}

/// `source-tda plan`: the counts and model from the flags, else from the run directory.
fn plan(args: &PlanArgs) -> Result<()> {
    use source_tda::stages::plan::{inputs_from_run, plan_run, PlanInputs};
    let config = Config::load(&args.config)?;
    let (model_config, documents) = (args.model_config.as_deref(), args.documents.clone());
    let from_run = match &args.run_dir {
        Some(r) => Some(inputs_from_run(&config, &RunDir::at(r)?)?),
        None => None,
    };
    let model_config = match (model_config, &from_run) {
        (Some(p), _) if p.is_dir() => p.join("config.json"),
        (Some(p), _) => p.to_path_buf(),
        (None, Some((p, _, _))) => p.clone(),
        (None, None) => {
            return Err(Usage(
                "plan: pass --model-config PATH/config.json, or --run-dir of a run where \
             `fetch` ran"
                    .into(),
            )
            .into())
        }
    };
    let documents = match (documents.is_empty(), &from_run) {
        (false, _) => documents,
        (true, Some((_, d, _))) => d.clone(),
        (true, None) => {
            return Err(Usage(
                "plan: pass --documents N (one count per fine-tuning stage), or --run-dir of \
                 a run where `prepare` ran"
                    .into(),
            )
            .into())
        }
    };
    let queries = args.queries.or(from_run.as_ref().map(|r| r.2)).unwrap_or(1);
    let inputs = PlanInputs {
        documents,
        queries,
        memory_limit_gib: args
            .memory_limit_gib
            .or(config.attribution.memory_limit_gib),
    };
    let plan = plan_run(&config, &model_config, &inputs)?;
    match args.json {
        true => {
            let mut v = plan.to_json();
            // The planner's own peak: the model of zeros is never backed by memory.
            v["planner_peak_rss_bytes"] = source_tda::util::mem::peak_rss_bytes().into();
            println!("{}", serde_json::to_string_pretty(&v)?)
        }
        false => print!("{}", plan.to_table()),
    }
    Ok(plan.check()?)
}

/// The pipeline's stages up to and including `until` (all of them without it).
fn stages_until<'a>(
    all: &'a [String],
    until: Option<&str>,
    pipeline: &Path,
) -> Result<&'a [String]> {
    let Some(until) = until else { return Ok(all) };
    match all.iter().position(|s| s == until) {
        Some(i) => Ok(&all[..=i]),
        None => Err(Usage(format!(
            "--until {until}: `{until}` is not among the stages of {} ({})",
            pipeline.display(),
            all.join(", ")
        ))
        .into()),
    }
}

/// Runs `names` of `config` (read from `config_path`) in `run_dir` and prints the outcomes.
fn run(
    stages: &Registry,
    config: &Config,
    config_path: &Path,
    run_dir: &Path,
    names: &[String],
    opts: RunOptions,
) -> Result<()> {
    let run = RunDir::at(run_dir)?;
    let outcomes = run_in(stages, config, config_path, &run, names, opts)?;
    print_outcomes(
        &outcomes,
        &format!("run directory: {}", run.path().display()),
    );
    Ok(())
}

/// [`run_stages`] with the run directory named in its error.
fn run_in(
    stages: &Registry,
    config: &Config,
    config_path: &Path,
    run: &RunDir,
    names: &[String],
    opts: RunOptions,
) -> Result<Vec<(String, Outcome)>> {
    run_stages(stages, config, config_path, run, names, &opts)
        .with_context(|| format!("run directory {}", run.path().display()))
}

/// The one outcome printer: each stage's outcome, then `last` (unless `--quiet`).
fn print_outcomes(outcomes: &[(String, Outcome)], last: &str) {
    if is_quiet() {
        return;
    }
    for (stage, outcome) in outcomes {
        let word = match outcome {
            Outcome::Ran => "done",
            Outcome::Skipped => "up to date (skipped)",
        };
        eprintln!("{stage:>9}: {word}");
    }
    eprintln!("{last}");
}

/// Prints the terminal table of a stage's summary.json, for the stages of [`SUMMARY_TABLES`].
fn print_summary(run_dir: &Path, stage: &str) -> Result<()> {
    let Some((_, table)) = SUMMARY_TABLES.iter().find(|(s, _)| *s == stage) else {
        return Ok(());
    };
    let path = run_dir.join(stage).join("summary.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    print!("{}", table(&v));
    Ok(())
}

fn eval_lds_shard(stages: &Registry, s: &OneStage, shard: &str, merge: bool) -> Result<()> {
    use source_tda::stages::{run_shard, ShardOutcome};
    let shard = source_tda::eval::Shard::parse(shard)?;
    let (config, config_path) = s.load_config()?;
    let run = RunDir::at(&s.run_dir)?;
    match run_shard(stages, &config, &config_path, &run, shard, merge)
        .with_context(|| format!("run directory {}", run.path().display()))?
    {
        ShardOutcome::Merged { ran } => {
            eprintln!(
                "shard {}/{}: trained {ran} job(s); all done, merged",
                shard.index, shard.count
            );
            print_summary(&s.run_dir, "eval-lds")
        }
        ShardOutcome::Partial { ran, missing } => {
            eprintln!(
                "shard {}/{}: trained {ran} job(s); {missing} job(s) of the evaluation are not \
                 finished yet. When every shard is done, run `source-tda eval lds` without \
                 --shard (or rerun the last shard) to merge.",
                shard.index, shard.count
            );
            Ok(())
        }
    }
}

/// `source-tda fit --shard i/n`.
fn fit_shard(stages: &Registry, s: &OneStage, shard: &str) -> Result<()> {
    let shard = source_tda::util::shard::Shard::parse(shard)?;
    let (config, _) = s.load_config()?;
    let run = RunDir::at(&s.run_dir)?;
    let out = source_tda::stages::fit_shard(stages, &config, &run, shard)
        .with_context(|| format!("run directory {}", run.path().display()))?;
    eprintln!("{}", out.message(shard, &s.run_dir));
    Ok(())
}

/// `source-tda score --shard i/n`.
fn score_shard(stages: &Registry, s: &OneStage, shard: &str) -> Result<()> {
    let shard = source_tda::util::shard::Shard::parse(shard)?;
    let (config, config_path) = s.load_config()?;
    let run = RunDir::at(&s.run_dir)?;
    let out = source_tda::stages::score_shard(stages, &config, &config_path, &run, shard)
        .with_context(|| format!("run directory {}", run.path().display()))?;
    eprintln!("{}", out.message(shard, &s.run_dir));
    Ok(())
}

/// `source-tda merge STAGE`.
fn merge(stages: &Registry, stage: &str, s: &OneStage) -> Result<()> {
    let (config, config_path) = s.load_config()?;
    let run = RunDir::at(&s.run_dir)?;
    let ctx = || format!("run directory {}", run.path().display());
    match stage {
        "fit" => {
            let out = source_tda::stages::merge_fit(stages, &config, &config_path, &run)
                .with_context(ctx)?;
            eprintln!("{}", out.message(&s.run_dir));
        }
        "score" => {
            let out = source_tda::stages::merge_score(stages, &config, &config_path, &run)
                .with_context(ctx)?;
            eprintln!("{}", out.message());
        }
        "eval-lds" => {
            let (n, ran) = source_tda::stages::merge_lds(stages, &config, &config_path, &run)
                .with_context(ctx)?;
            if !ran {
                eprintln!("merge eval-lds: eval-lds is complete and up to date; nothing to merge");
                return Ok(());
            }
            eprintln!("merge eval-lds: {n} retraining jobs merged");
            return print_summary(&s.run_dir, "eval-lds");
        }
        other => {
            return Err(Usage(format!(
                "merge {other}: the stages with shards are `fit`, `score` and `eval-lds`"
            ))
            .into())
        }
    }
    Ok(())
}

fn import_trainer(stages: &Registry, trainer_dir: &Path, s: OneStage) -> Result<()> {
    let (mut config, config_path) = s.load_config()?;
    if !trainer_dir.is_dir() {
        return Err(Usage(format!(
            "{}: no such folder; give the Trainer's output_dir (holding checkpoint-N/)",
            trainer_dir.display()
        ))
        .into());
    }
    config.train.import_from = Some(std::path::absolute(trainer_dir)?);
    // Re-check the config with import_from set (e.g. it excludes [[train.stages]]).
    let base = config_path.parent().unwrap_or(Path::new("."));
    let config = Config::from_str_at(&config.to_toml(), &config_path, base)?;
    let run = RunDir::at(&s.run_dir)?;
    let names: Vec<String> = ["fetch", "prepare", "finetune"].map(String::from).into();
    let outcomes = run_in(
        stages,
        &config,
        &config_path,
        &run,
        &names,
        s.opts.into_options(Workers::default()),
    )?;
    let trajectory = run.path().join("finetune/trajectory.json");
    print_outcomes(&outcomes, &format!("trajectory: {}", trajectory.display()));
    Ok(())
}

fn convert_gguf(
    gguf: &Path,
    out_dir: &Path,
    tokenizer: Option<&Path>,
    layers: Option<usize>,
) -> Result<()> {
    use source_tda::model::gguf::{GgufLlama, ReadOptions};
    let model = GgufLlama::read(gguf, &ReadOptions { layers })?;
    let written = model.write_hf_dir(out_dir, tokenizer)?;
    if tokenizer.is_none() {
        eprintln!(
            "note: no --tokenizer given, so {} has no tokenizer.json; copy this model's \
             tokenizer.json there before using it",
            out_dir.display()
        );
    }
    eprintln!(
        "wrote {} ({} tensors, {} parameters, {} decoder layers)",
        written.dir.display(),
        written.n_tensors,
        written.n_params,
        model.config.num_hidden_layers,
    );
    Ok(())
}

fn status(stages: &Registry, run_dir: &Path) -> Result<()> {
    let run = RunDir::at(run_dir)?;
    let rows = status_rows(stages, &run)?;
    println!("run directory: {}", run.path().display());
    println!(
        "{:<11} {:>9} {:>10}  {:<19}  state",
        "stage", "wall", "peak RSS", "finished"
    );
    for name in STAGE_ORDER {
        match rows.iter().find(|r| r.stage == name) {
            Some(r) => println!(
                "{:<11} {:>9} {:>10}  {:<19}  {}",
                r.stage,
                r.wall_s.map(|s| format!("{s:.2} s")).unwrap_or_default(),
                r.peak_rss_bytes.map(human_bytes).unwrap_or_default(),
                r.finished_at
                    .as_deref()
                    .map(|t| t.get(..19).unwrap_or(t).replace('T', " "))
                    .unwrap_or_default(),
                r.state
            ),
            None => println!("{name:<11} {:>9} {:>10}  {:<19}  not run", "", "", ""),
        }
        for r in set_rows(&rows, name) {
            println!("  {}: {}", r.stage, r.state);
        }
    }
    Ok(())
}

/// The rows of the named query sets' instances of stage `name` (`score/query_set=NAME`).
fn set_rows<'a>(
    rows: &'a [source_tda::pipeline::StatusRow],
    name: &str,
) -> impl Iterator<Item = &'a source_tda::pipeline::StatusRow> {
    let prefix = format!("{name}/");
    rows.iter().filter(move |r| r.stage.starts_with(&prefix))
}

/// `status --json`: every stage in pipeline order, with a one-word `status` for scripts.
fn status_json(stages: &Registry, run_dir: &Path) -> Result<()> {
    let run = RunDir::at(run_dir)?;
    let rows = status_rows(stages, &run)?;
    let row = |r: &source_tda::pipeline::StatusRow| {
        serde_json::json!({
            "stage": r.stage, "status": r.kind(), "state": r.state, "wall_s": r.wall_s,
            "peak_rss_bytes": r.peak_rss_bytes, "finished_at": r.finished_at,
        })
    };
    let mut list: Vec<serde_json::Value> = Vec::new();
    for name in STAGE_ORDER {
        list.push(match rows.iter().find(|r| r.stage == name) {
            Some(r) => row(r),
            None => serde_json::json!({
                "stage": name, "status": "not_run", "state": "not run", "wall_s": null,
                "peak_rss_bytes": null, "finished_at": null,
            }),
        });
        // Then the named query sets' instances of the stage (`score/query_set=NAME`).
        list.extend(set_rows(&rows, name).map(row));
    }
    let out = serde_json::json!({"run_dir": run.path(), "stages": list});
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn verify(run_dir: &Path) -> Result<()> {
    let v = verify_run(&RunDir::at(run_dir)?)?;
    for m in &v.mismatches {
        println!("{:<11} {}", m.stage, m.problem);
    }
    println!(
        "{}: {} recorded file(s), {}, of {} complete stage(s) checked; {} differ",
        v.run_dir.display(),
        v.files,
        human_bytes(v.bytes),
        v.stages.len(),
        v.mismatches.len()
    );
    Ok(v.into_result()?)
}
