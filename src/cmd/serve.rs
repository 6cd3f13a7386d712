//! `edgeact serve`: the daemon, over MQTT until SIGTERM or SIGINT, or (without a broker)
//! over JSON lines on stdin until it ends.

use std::io::Write;

use super::AppError;
use crate::serve::{self, ServeConfig};

/// Runs the daemon; its stdio mode writes to `out`.
pub fn run(cfg: ServeConfig, out: &mut dyn Write) -> Result<(), AppError> {
    if cfg.broker.is_none() {
        let stdin = std::io::stdin();
        return Ok(serve::run_stdio(cfg, stdin.lock(), out)?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| AppError::Input {
            what: "tokio runtime".into(),
            source,
        })?;
    Ok(rt.block_on(serve::run(cfg, shutdown_signal()))?)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
