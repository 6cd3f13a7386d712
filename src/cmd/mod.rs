//! The subcommands, one file each, every one run from a validated config ([`Command`]):
//! the configs are built by [`crate::cli`] (or by hand, by a library user), so nothing here
//! parses flags or applies defaults. [`AppError`] is the one error of this layer and above;
//! the layers below return their own, and [`crate::cli::exit_code`] maps it to an exit code.

pub mod bench;
pub mod bench_accuracy;
pub mod classify;
pub mod eval;
pub mod learn;
pub mod monitor;
pub mod plan;
pub mod qa;
pub mod quantize;
pub mod rank;
pub mod rank_eval;
pub mod rank_learn;
pub mod react;
pub mod react_eval;
pub mod serve;
pub mod tune;
pub mod tune_head;

use std::io::Write;

use crate::classify::SetupError;
use crate::model::config::{ConfigError, EngineConfig};
use crate::model::EngineError;
use crate::spec::SpecError;
use crate::util::invalid::Invalid;

pub use classify::{ClassifyConfig, Inputs};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Task(#[from] SpecError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("cannot read {what}: {source}")]
    Input {
        what: String,
        source: std::io::Error,
    },
    /// `classify` without texts, `--input` or piped JSON lines.
    #[error("cannot read texts: give texts as arguments, --input FILE, or JSON lines on stdin")]
    NoTexts,
    #[error("cannot write results: {0}")]
    Output(std::io::Error),
    #[error("cannot write results: {0}")]
    Serialize(serde_json::Error),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Mqtt(#[from] crate::serve::mqtt::MqttConfigError),
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    #[error(transparent)]
    Quantize(#[from] crate::model::quantize::QuantizeError),
    #[error(transparent)]
    React(#[from] crate::react::ReactError),
    #[error("{failed} of {total} inputs were rejected (see their error records)")]
    SomeRecordsFailed { failed: usize, total: usize },
}

/// A bad `[rank]` section is a configuration error naming the file and key.
impl From<crate::rank::RankError> for AppError {
    fn from(e: crate::rank::RankError) -> AppError {
        match e {
            crate::rank::RankError::Setup(s) => AppError::Setup(s),
            crate::rank::RankError::Invalid { path, key, reason } => {
                AppError::Config(ConfigError::Invalid(Invalid { path, key, reason }))
            }
        }
    }
}

/// A bad `[monitor]` section is a configuration error; unreadable (or unwritable) state is
/// an I/O error.
impl From<crate::monitor::MonitorError> for AppError {
    fn from(e: crate::monitor::MonitorError) -> AppError {
        match e {
            crate::monitor::MonitorError::Io { path, source } => AppError::Input {
                what: path.display().to_string(),
                source,
            },
            crate::monitor::MonitorError::Invalid { path, key, reason } => {
                AppError::Config(ConfigError::Invalid(Invalid { path, key, reason }))
            }
        }
    }
}

/// A subcommand with its validated config.
#[derive(Debug)]
pub enum Command {
    Classify(ClassifyConfig),
    /// The engine config for the tasks, and how many there are (one prefix slot each).
    Plan(EngineConfig, usize),
    Quantize(quantize::QuantizeConfig),
    Serve(Box<crate::serve::ServeConfig>),
    Eval(eval::EvalConfig),
    Tune(tune::TuneConfig),
    TuneHead(tune_head::TuneHeadConfig),
    Learn(learn::LearnRunConfig),
    Bench(bench::BenchConfig),
    BenchAccuracy(bench_accuracy::FiguresConfig),
    React(react::ReactConfig),
    Qa(react::ReactConfig),
    ReactEval(react_eval::ReactEvalConfig),
    Monitor(monitor::ReplayConfig),
    Rank(rank::RankRunConfig),
    RankEval(rank_eval::RankEvalConfig),
    RankLearn(rank_learn::RankLearnConfig),
}

/// Runs the command, its results on standard output.
pub fn run(command: Command) -> Result<(), AppError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match command {
        Command::Classify(c) => classify::run(c, &mut out),
        Command::Plan(c, n_tasks) => plan::run(&c, n_tasks, &mut out),
        Command::Quantize(c) => quantize::run(c, &mut out),
        Command::Serve(c) => serve::run(*c, &mut out),
        Command::Eval(c) => eval::run(c, &mut out),
        Command::Tune(c) => tune::run(c, &mut out),
        Command::TuneHead(c) => tune_head::run(c, &mut out),
        Command::Learn(c) => learn::run(c, &mut out),
        Command::Bench(c) => bench::run(c, &mut out),
        Command::BenchAccuracy(c) => bench_accuracy::run(c, &mut out),
        Command::React(c) => Ok(react::run(c, &mut out)?),
        Command::Qa(c) => Ok(qa::run(c, &mut out)?),
        Command::ReactEval(c) => Ok(react_eval::run(c, &mut out)?),
        Command::Monitor(c) => monitor::run(c, &mut out),
        Command::Rank(c) => rank::run(c, &mut out),
        Command::RankEval(c) => rank_eval::run(c, &mut out),
        Command::RankLearn(c) => rank_learn::run(c, &mut out),
    }
}

/// One JSON value as a line (or pretty-printed) of the results.
pub(crate) fn write_json(
    out: &mut dyn Write,
    v: &serde_json::Value,
    pretty: bool,
) -> Result<(), AppError> {
    let s = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    }
    .map_err(AppError::Serialize)?;
    writeln!(out, "{s}").map_err(AppError::Output)
}
