//! What the serve benchmarks (`bench_serve`, `soak`) share: a free loopback port, a
//! Mosquitto of their own on it, and stopping a child process with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The repo root and the release `edgeact` binary. The root is the working directory (the
/// benchmarks run from the repo root), not CARGO_MANIFEST_DIR: a cached build of an example
/// may come from another clone (CI's) that is gone by now.
pub fn repo_and_binary() -> (PathBuf, PathBuf) {
    let root = std::env::current_dir().expect("current directory");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let bin = target.join("release/edgeact");
    (root, bin)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts Mosquitto on 127.0.0.1:`port` with its config in `dir` (anonymous clients, a
/// deep queue) plus the `extra` config lines, and waits until it accepts connections.
pub fn start_broker(dir: &Path, port: u16, extra: &str) -> Child {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let conf = dir.join("m.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n{extra}"
        ),
    )
    .unwrap();
    let c = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

/// SIGTERM, then wait: the daemon and Mosquitto shut down cleanly.
pub fn stop(c: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(c.id().to_string())
        .status();
    let _ = c.wait();
}
