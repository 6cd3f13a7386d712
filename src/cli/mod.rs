//! The `edgeact` command line: clap's raw arguments ([`args`]), their resolution into
//! validated configs with the product defaults ([`resolve`], [`serve`], [`defaults`]), and
//! the one mapping of errors to exit codes ([`exit_code`]). `main.rs` only wires these.

pub mod args;
pub mod defaults;
pub mod resolve;
pub mod serve;
pub mod threads;

pub use args::Cli;

use crate::cmd::{self, AppError};
use crate::model::quantize::QuantizeError;
use crate::model::EngineError;
use crate::react::ReactError;
use crate::serve::worker::WorkerError;
use crate::serve::ServeError;

/// Resolves the command line into a validated command and runs it.
pub fn run(cli: Cli) -> Result<(), AppError> {
    cmd::run(resolve::command(cli.command)?)
}

/// Exit codes: 0 ok, 1 internal or I/O, 2 usage or configuration, 3 model (missing,
/// checksum, not GGUF, budget, load), 4 some inputs rejected (the rest were classified).
pub fn exit_code(e: &AppError) -> u8 {
    match e {
        AppError::Config(_) | AppError::Task(_) | AppError::Setup(_) => 2,
        AppError::Engine(e) => engine_code(e),
        AppError::SomeRecordsFailed { .. } => 4,
        AppError::React(e) => match e {
            ReactError::Engine(EngineError::Grammar(_)) => 1,
            ReactError::Engine(e) => engine_code(e),
            ReactError::Output(_) => 1,
            ReactError::Spec(_)
            | ReactError::Kb(_)
            | ReactError::Session(_)
            | ReactError::Scenario(_)
            | ReactError::Usage(_) => 2,
        },
        AppError::Mqtt(_) | AppError::Eval(_) => 2,
        AppError::Serve(e) => serve_code(e),
        AppError::Quantize(e) => match e {
            QuantizeError::Missing(_)
            | QuantizeError::Exists(_)
            | QuantizeError::SameFile(_)
            | QuantizeError::Path(_) => 2,
            QuantizeError::Backend(_) | QuantizeError::Io { .. } | QuantizeError::Failed { .. } => {
                1
            }
        },
        AppError::Input { .. }
        | AppError::NoTexts
        | AppError::Output(_)
        | AppError::Serialize(_) => 1,
    }
}

/// The daemon's errors: broker options 2, model 3 (a failed decode 1), a task that cannot
/// be prepared 2; I/O, the outbox, the inference thread and a ReAct task's knowledge base
/// 1 (the last is 2 under `react`: kept as it was).
fn serve_code(e: &ServeError) -> u8 {
    match e {
        ServeError::Mqtt(_) => 2,
        ServeError::Worker(WorkerError::Engine(e)) => engine_code(e),
        ServeError::Worker(WorkerError::Setup(_)) => 2,
        ServeError::Worker(
            WorkerError::ReactTask { .. } | WorkerError::Thread(_) | WorkerError::Died,
        )
        | ServeError::Outbox(_)
        | ServeError::NoBroker
        | ServeError::MonitorState { .. }
        | ServeError::Stdin(_)
        | ServeError::Output(_)
        | ServeError::WorkerStopped => 1,
    }
}

/// A failed decode is internal (1); the rest of the engine's errors are the model's (3).
fn engine_code(e: &EngineError) -> u8 {
    match e {
        EngineError::Decode(_) => 1,
        _ => 3,
    }
}

/// Logs to stderr: warnings by default, more with `-v`s; `RUST_LOG` overrides.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,llama-cpp-2=off",
        1 => "info,llama-cpp-2=warn",
        2 => "debug,llama-cpp-2=warn",
        _ => "debug,llama-cpp-2=info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: under systemd (journald) or into a file they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::mqtt::MqttConfigError;

    /// One error of each kind, and the code tests/cli.rs, tests/bad_input.rs and the README
    /// promise for it.
    #[test]
    fn exit_codes_by_kind() {
        let load = || EngineError::Load {
            path: "m.gguf".into(),
        };
        let decode = || EngineError::Decode("x".into());
        let io = || std::io::Error::other("x");
        let cases: Vec<(AppError, u8)> = vec![
            (AppError::NoTexts, 1),
            (AppError::Output(io()), 1),
            (AppError::Engine(load()), 3),
            (AppError::Engine(decode()), 1),
            (AppError::Engine(EngineError::Grammar("x".into())), 3),
            (
                AppError::SomeRecordsFailed {
                    failed: 1,
                    total: 2,
                },
                4,
            ),
            (AppError::React(ReactError::Usage("x".into())), 2),
            (AppError::React(ReactError::Engine(load())), 3),
            (
                AppError::React(ReactError::Engine(EngineError::Grammar("x".into()))),
                1,
            ),
            (AppError::React(ReactError::Output(io())), 1),
            (AppError::Serve(ServeError::NoBroker), 1),
            (
                AppError::Serve(ServeError::Worker(WorkerError::Engine(load()))),
                3,
            ),
            (
                AppError::Serve(ServeError::Worker(WorkerError::Engine(decode()))),
                1,
            ),
            (
                AppError::Serve(ServeError::Mqtt(MqttConfigError::Invalid {
                    key: "k".into(),
                    reason: "r".into(),
                })),
                2,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(exit_code(&e), code, "{e:?}");
        }
    }
}
