//! The integration tests' kit: the real model, the shipped boards and tasks, the `edgeact`
//! binary, Mosquitto and the daemon, TLS material, and the test-only generators (LoRA
//! adapter files, synthetic monitor timelines, the outbox power-loss writer).
//!
//! `broker` is plain std: the serve benchmarks in examples/ include it on its own.

pub mod broker;
pub mod daemon;
pub mod gguf_writer;
pub mod probe;
pub mod stress_writer;
pub mod timeline;
pub mod tls;

use std::path::{Path, PathBuf};

use edgeact::model::config::{self, BoardFile, EngineConfig};
use edgeact::model::Engine;
use edgeact::spec::Task;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The x86-dev board with the model fetched by scripts/fetch-model, made absolute.
pub fn board() -> EngineConfig {
    let mut cfg = config::load_board(
        "x86-dev",
        &[root().join("board-configs")],
        &BoardFile::default(),
    )
    .expect("x86-dev board");
    cfg.model_path = root().join(&cfg.model_path);
    assert!(
        cfg.model_path.exists(),
        "{} is missing: run scripts/fetch-model first",
        cfg.model_path.display()
    );
    cfg
}

pub fn task(name: &str) -> Task {
    Task::load(&root().join("tasks").join(format!("{name}.toml"))).expect("task")
}

pub fn engine(slots: usize) -> Engine {
    Engine::load(&board(), slots).expect("engine")
}

/// The `edgeact` binary cargo built for these tests.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgeact"))
}

/// Runs `edgeact args` from the repository root with no RUST_LOG, the variables `env` set
/// and `stdin` as its whole input, and waits for it. The one way the tests spawn the binary
/// for a single command (the daemon has [`daemon::Daemon`]).
pub fn edgeact(args: &[&str], env: &[(&str, &Path)], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(root())
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edgeact");
    {
        // Dropped at the end of the block: the child reads end-of-file after `stdin`.
        let mut input = child.stdin.take().expect("piped stdin");
        input.write_all(stdin).expect("write stdin");
    }
    child.wait_with_output().expect("wait for edgeact")
}

/// [`edgeact`] with `cache` as its cache folder (features, prefix states) and no input.
pub fn edgeact_with_cache(args: &[&str], cache: &Path) -> std::process::Output {
    edgeact(args, &[("EDGEACT_CACHE", cache)], b"")
}

/// A finished command's standard error as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
