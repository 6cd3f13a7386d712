//! Shared set-up for the integration tests: the real model, the shipped boards and tasks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use edgeact::config::{self, BoardFile, EngineConfig};
use edgeact::engine::Engine;
use edgeact::task::Task;

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

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgeact"))
}
