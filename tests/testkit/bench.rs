//! For the serve benchmarks in examples/ only (the tests have `testkit::root` and `bin`).

use std::path::PathBuf;

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
