//! `edgeact serve` as a child process: a daemon kept running, or one run to its exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::broker::{self, Broker};
use super::{bin, root};

/// `edgeact serve` as a child process.
pub struct Daemon {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Daemon {
    pub fn start(broker: &Broker, device: &str, state: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_url(&broker.url(), device, state, extra)
    }

    /// On any broker URL (mqtts:// with TLS settings in `extra`).
    pub fn start_url(url: &str, device: &str, state: &Path, extra: &[&str]) -> Daemon {
        // One log per start, numbered in start order: a restarted daemon (same device, same
        // state folder) gets a file of its own.
        static STARTS: AtomicU64 = AtomicU64::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let stderr_path = state.join(format!("{device}-{n:03}.log"));
        std::fs::create_dir_all(state).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .unwrap();
        let child = Command::new(bin())
            .current_dir(root())
            .args([
                "serve",
                "--broker",
                url,
                "--device-id",
                device,
                "--outbox-dir",
            ])
            .arg(state.join(device))
            .args(["--stats-interval-s", "1"])
            .args(extra)
            .env("RUST_LOG", "edgeact=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child, stderr_path }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        broker::terminate(&mut self.child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `edgeact serve` to its exit (for start-up failures), with a time limit.
/// `env`: extra environment variables. Exit code (None: killed at the limit) and stderr.
pub fn serve_until_exit(args: &[&str], env: &[(&str, &str)], secs: u64) -> (Option<i32>, String) {
    let mut child = Command::new(bin())
        .current_dir(root())
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(_st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            return (None, String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
