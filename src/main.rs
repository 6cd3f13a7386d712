//! The `edgeact` command line: parses arguments, validates them into a config, runs the
//! mode, and maps every error to an exit code in one place.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use edgeact::app::{self, AppError, ClassifyConfig, Inputs};
use edgeact::budget::KvCacheType;
use edgeact::classify::ScorePath;
use edgeact::config::{self, BoardFile};
use edgeact::engine::EngineError;
use edgeact::scoring::AbstainRule;
use edgeact::task::Task;

/// Offline language-model agent for small boards: classifies text with a local GGUF model
/// under a memory budget, and explains every result.
#[derive(Parser)]
#[command(name = "edgeact", version, about, long_about = None)]
struct Cli {
    /// Log more (-v: info, -vv: debug, -vvv: llama.cpp's own log too). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify texts (arguments), a JSON-lines file (--input) or JSON lines on stdin;
    /// prints one JSON result per input.
    Classify(ClassifyArgs),
    /// Check the model file and print the memory estimate for a board, loading nothing.
    Plan(BoardArgs),
    /// Measure load time, peak RSS and classifications/s of each scoring path on a
    /// JSON-lines file (figures printed, nothing asserted).
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Task to measure.
    #[arg(long, short, default_value = "sentiment")]
    task: String,
    /// JSON-lines requests (a `label` field, when present, gives accuracy too).
    #[arg(long, default_value = "tests/data/sentiment-obvious.jsonl")]
    data: PathBuf,
    /// At most this many requests.
    #[arg(long, default_value_t = 40)]
    limit: usize,
    /// Requests per micro-batch on the batched path.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    board: BoardArgs,
}

#[derive(Args)]
struct BoardArgs {
    /// Board profile: a name from board-configs/ (or $EDGEACT_BOARD_DIR,
    /// /etc/edgeact/board-configs) or a path to a .toml file.
    #[arg(long, env = "EDGEACT_BOARD", default_value = "x86-dev")]
    board: String,
    /// GGUF model file (overrides the board's model_path; its checksum is then not enforced
    /// unless --model-sha256 is given).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Expected sha256 of the model file.
    #[arg(long)]
    model_sha256: Option<String>,
    /// Threads for decoding and prompt processing.
    #[arg(long)]
    threads: Option<u32>,
    /// Memory budget in MiB for weights, KV cache and buffers.
    #[arg(long)]
    memory_budget_mib: Option<u64>,
    /// Context size in tokens.
    #[arg(long)]
    n_ctx: Option<u32>,
    /// Shrink n_ctx to fit the budget instead of refusing.
    #[arg(long)]
    allow_ctx_shrink: bool,
    /// KV cache element type.
    #[arg(long, value_parser = ["f16", "q8_0"])]
    kv_cache_type: Option<String>,
    /// Layers to offload to a GPU (builds with the vulkan or cuda feature).
    #[arg(long)]
    gpu_layers: Option<u32>,
}

impl BoardArgs {
    fn overrides(&self) -> BoardFile {
        BoardFile {
            model_path: self.model.clone(),
            // A model given on the command line is checked only against a sha given with it.
            model_sha256: self.model_sha256.clone(),
            threads: self.threads,
            threads_batch: self.threads,
            memory_budget_mib: self.memory_budget_mib,
            n_ctx: self.n_ctx,
            allow_ctx_shrink: self.allow_ctx_shrink.then_some(true),
            kv_cache_type: self.kv_cache_type.as_deref().map(|s| match s {
                "q8_0" => KvCacheType::Q8_0,
                _ => KvCacheType::F16,
            }),
            gpu_layers: self.gpu_layers,
            ..Default::default()
        }
    }

    fn engine_config(&self) -> Result<config::EngineConfig, AppError> {
        let mut cfg = config::load_board(&self.board, &config::board_dirs(), &self.overrides())?;
        if self.model.is_some() && self.model_sha256.is_none() {
            cfg.model_sha256 = None;
        }
        Ok(cfg)
    }
}

#[derive(Args)]
struct ClassifyArgs {
    /// Texts to classify; without any, reads --input or JSON lines from stdin.
    texts: Vec<String>,
    /// Task: a name from tasks/ (or $EDGEACT_TASK_DIR, /etc/edgeact/tasks) or a path.
    #[arg(long, short, default_value = "sentiment")]
    task: String,
    /// JSON-lines file of requests ({"id": .., "text": .., other fields}); `-` for stdin.
    #[arg(long, short)]
    input: Option<PathBuf>,
    /// Apply contextual calibration (overrides the task file).
    #[arg(long, conflicts_with = "no_calibrate")]
    calibrate: bool,
    /// Do not apply contextual calibration (overrides the task file).
    #[arg(long)]
    no_calibrate: bool,
    /// Abstain when the top probability is below this (overrides the task file).
    #[arg(long)]
    min_confidence: Option<f64>,
    /// Abstain when top minus second probability is below this (overrides the task file).
    #[arg(long)]
    min_margin: Option<f64>,
    /// Score every label from scratch (no prefix reuse, no batching): a reference for checks.
    #[arg(long)]
    naive: bool,
    /// Requests scored together in one micro-batch (JSON-lines input).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Pretty-print each result.
    #[arg(long)]
    pretty: bool,
    #[command(flatten)]
    board: BoardArgs,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,llama-cpp-2=off",
        1 => "info,llama-cpp-2=warn",
        2 => "debug,llama-cpp-2=warn",
        _ => "debug,llama-cpp-2=info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(cli: Cli) -> Result<(), AppError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Plan(b) => app::plan(&b.engine_config()?, &mut out),
        Command::Bench(a) => app::bench(
            app::BenchConfig {
                engine: a.board.engine_config()?,
                task: Task::find(&a.task, &config::task_dirs())?,
                data: a.data,
                limit: a.limit,
                batch_size: a.batch_size,
            },
            &mut out,
        ),
        Command::Classify(a) => {
            let engine = a.board.engine_config()?;
            let task = Task::find(&a.task, &config::task_dirs())?;
            let inputs = match (&a.input, a.texts.is_empty()) {
                (Some(p), _) if p.as_os_str() == "-" => Inputs::Stdin,
                (Some(p), _) => Inputs::File(p.clone()),
                (None, false) => Inputs::Texts(a.texts.clone()),
                (None, true) if !std::io::stdin().is_terminal() => Inputs::Stdin,
                (None, true) => {
                    return Err(AppError::Input {
                        what: "texts".into(),
                        source: std::io::Error::other(
                            "give texts as arguments, --input FILE, or JSON lines on stdin",
                        ),
                    })
                }
            };
            let abstain =
                (a.min_confidence.is_some() || a.min_margin.is_some()).then(|| AbstainRule {
                    min_confidence: a.min_confidence.unwrap_or(task.abstain.min_confidence),
                    min_margin: a.min_margin.unwrap_or(task.abstain.min_margin),
                });
            let cfg = ClassifyConfig {
                engine,
                task,
                inputs,
                calibrate: if a.calibrate {
                    Some(true)
                } else if a.no_calibrate {
                    Some(false)
                } else {
                    None
                },
                abstain,
                path: if a.naive {
                    ScorePath::Naive
                } else {
                    ScorePath::Fast
                },
                batch_size: a.batch_size,
                pretty: a.pretty,
            };
            app::classify(cfg, &mut out)
        }
    }
}

/// Exit codes: 0 ok, 1 internal or I/O, 2 usage or configuration, 3 model (missing,
/// checksum, not GGUF, budget, load), 4 some inputs rejected (the rest were classified).
fn exit_code(e: &AppError) -> u8 {
    match e {
        AppError::Config(_) | AppError::Task(_) | AppError::Setup(_) => 2,
        AppError::Engine(EngineError::Decode(_)) => 1,
        AppError::Engine(_) => 3,
        AppError::SomeRecordsFailed { .. } => 4,
        AppError::Input { .. } | AppError::Output(_) => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeact: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}
