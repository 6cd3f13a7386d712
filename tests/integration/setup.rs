//! The README's set-up on the distributions users have (Debian 12/13, Ubuntu 22.04/24.04,
//! nothing but a Rust toolchain): the fetch scripts' Python is 3.8 code that does not need
//! tomllib, fetch-data gets its npm tarball without npm, and scripts/deps stops at once with
//! one line when something cannot be installed. There is no container runtime here, so the
//! older systems are simulated (docs/testing.md says exactly how): a `tomllib` and `tomli`
//! that fail to import shadow the standard library's, and an `npm` that fails if called is
//! first on PATH.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::testkit::root;

/// The scripts `scripts/setup` and `scripts/test` run Python in.
const SETUP_SCRIPTS: [&str; 4] = [
    "scripts/setup",
    "scripts/fetch-model",
    "scripts/fetch-data",
    "scripts/deps",
];

/// The Python code of a shell script: `<<'PY'` here-documents and `python3 -c '...'` blocks.
fn python_blocks(script: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = script.lines();
    while let Some(line) = lines.next() {
        if line.contains("<<'PY'") {
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "PY").collect();
            blocks.push(body.join("\n"));
        }
    }
    let mut rest = script;
    while let Some(i) = rest.find("python3 -c '") {
        let after = &rest[i + "python3 -c '".len()..];
        let end = after.find('\'').unwrap_or(after.len());
        blocks.push(after[..end].to_string());
        rest = &after[end..];
    }
    blocks
}

/// A folder with a `tomllib` and a `tomli` that cannot be imported: on PYTHONPATH it comes
/// before the standard library, as on Python 3.10 without tomli.
fn no_tomllib(dir: &Path) -> PathBuf {
    let py = dir.join("py-no-tomllib");
    std::fs::create_dir_all(&py).unwrap();
    for m in ["tomllib", "tomli"] {
        std::fs::write(
            py.join(format!("{m}.py")),
            format!("raise ImportError('{m} is not on Python 3.8-3.10 (simulated)')\n"),
        )
        .unwrap();
    }
    py
}

/// A bin folder whose `npm` fails loudly: put first on PATH, it hides the real one.
fn no_npm(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin-no-npm");
    std::fs::create_dir_all(&bin).unwrap();
    let npm = bin.join("npm");
    std::fs::write(&npm, "#!/bin/sh\necho 'npm was called' >&2\nexit 99\n").unwrap();
    std::fs::set_permissions(&npm, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn path_with(first: &Path) -> String {
    format!(
        "{}:{}",
        first.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn setup_scripts_python_is_3_8_code_without_tomllib() {
    let mut n = 0;
    for script in SETUP_SCRIPTS {
        let src = std::fs::read_to_string(root().join(script)).unwrap();
        for block in python_blocks(&src) {
            n += 1;
            // ast with feature_version=(3, 8) refuses syntax newer than 3.8 (match, except*,
            // parenthesised context managers); the imports are checked by name.
            let check = Command::new("python3")
                .args([
                    "-c",
                    "import ast, sys\n\
                     src = sys.stdin.read()\n\
                     tree = ast.parse(src, feature_version=(3, 8))\n\
                     names = set()\n\
                     for n in ast.walk(tree):\n\
                     \x20   if isinstance(n, ast.Import): names |= {a.name.split('.')[0] for a in n.names}\n\
                     \x20   if isinstance(n, ast.ImportFrom) and n.module: names.add(n.module.split('.')[0])\n\
                     print(' '.join(sorted(names)))",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(block.as_bytes())?;
                    c.wait_with_output()
                })
                .expect("python3");
            assert!(
                check.status.success(),
                "{script}: a Python block is not 3.8 syntax:\n{block}\n{}",
                text(&check)
            );
            let imports = String::from_utf8_lossy(&check.stdout).to_string();
            for newer in ["tomllib", "tomli", "zoneinfo", "graphlib"] {
                assert!(
                    !imports.split_whitespace().any(|m| m == newer),
                    "{script} imports {newer} (not in Python 3.8's standard library)"
                );
            }
            for newer in [
                ".removeprefix(",
                ".removesuffix(",
                "strict=True",
                "math.lcm",
            ] {
                assert!(
                    !block.contains(newer),
                    "{script} uses {newer} (Python 3.9+)"
                );
            }
        }
    }
    assert!(n >= 6, "found only {n} Python blocks: the extraction broke");
}

#[test]
fn fetch_model_reads_its_manifest_without_tomllib() {
    let model = root().join("models/gemma-3-270m-q4_k_m.gguf");
    if !model.exists() {
        println!(
            "skipped: {} missing (run scripts/fetch-model)",
            model.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let clone = tmp.path().join("clone");
    copy(
        &root().join("scripts/fetch-model"),
        &clone.join("scripts/fetch-model"),
    );
    copy(
        &root().join("models/gemma-3-270m-q4_k_m.toml"),
        &clone.join("models/gemma-3-270m-q4_k_m.toml"),
    );
    // The cache holds the verified model, so nothing is downloaded: this checks the manifest
    // is read and the checksum compared without tomllib.
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(cache.join("models")).unwrap();
    std::os::unix::fs::symlink(
        std::fs::canonicalize(&model).unwrap(),
        cache.join("models/gemma-3-270m-q4_k_m.gguf"),
    )
    .unwrap();
    let out = Command::new(clone.join("scripts/fetch-model"))
        .env("EDGEACT_CACHE", &cache)
        .env("PYTHONPATH", no_tomllib(tmp.path()))
        .env("PATH", path_with(&no_npm(tmp.path())))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sha256 ok"),
        "{}",
        text(&out)
    );
    assert!(clone.join("models/gemma-3-270m-q4_k_m.gguf").exists());
}

#[test]
fn fetch_model_refuses_a_manifest_it_cannot_read_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let clone = tmp.path().join("clone");
    copy(
        &root().join("scripts/fetch-model"),
        &clone.join("scripts/fetch-model"),
    );
    std::fs::create_dir_all(clone.join("models")).unwrap();
    std::fs::write(
        clone.join("models/gemma-3-270m-q4_k_m.toml"),
        "file = \"m.gguf\"\nsha256 = { nested = 1 }\n",
    )
    .unwrap();
    let out = Command::new(clone.join("scripts/fetch-model"))
        .env("EDGEACT_CACHE", tmp.path().join("cache"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{}", text(&out));
    assert!(err.contains("unsupported value for sha256"), "{err}");
}

#[test]
fn fetch_data_gets_the_npm_tarball_without_npm() {
    let data = root().join("data");
    let sums = std::fs::read_to_string(root().join("datasets/SHA256SUMS")).unwrap();
    let names: Vec<&str> = sums
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|n| n.trim_start_matches('*'))
        .collect();
    if names.iter().any(|n| !data.join(n).exists()) {
        println!("skipped: data sets missing (run scripts/fetch-data)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A copy of the clone's fetch-data, so the clone's ./data link is not touched.
    let clone = tmp.path().join("clone");
    copy(
        &root().join("scripts/fetch-data"),
        &clone.join("scripts/fetch-data"),
    );
    copy(
        &root().join("datasets/SHA256SUMS"),
        &clone.join("datasets/SHA256SUMS"),
    );
    // Every output cached except the npm-sourced ones, which must be fetched again.
    let cache = tmp.path().join("cache");
    for n in &names {
        if !n.starts_with("sentiment-en") {
            copy(&data.join(n), &cache.join("data").join(n));
        }
    }
    let out = Command::new(clone.join("scripts/fetch-data"))
        .env("EDGEACT_CACHE", &cache)
        .env("PYTHONPATH", no_tomllib(tmp.path()))
        .env("PATH", path_with(&no_npm(tmp.path())))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && err.contains("registry.npmjs.org") && err.contains("urlopen") {
        println!("skipped: the npm registry is not reachable here: {err}");
        return;
    }
    assert!(out.status.success(), "{}", text(&out));
    assert!(!err.contains("npm was called"), "{err}");
    assert!(err.contains("sentiment_en: fetching"), "{err}");
    for n in ["sentiment-en.jsonl", "sentiment-en-yelp.jsonl"] {
        assert_eq!(
            std::fs::read(cache.join("data").join(n)).unwrap(),
            std::fs::read(data.join(n)).unwrap(),
            "{n}"
        );
    }
}

#[test]
fn fetch_data_reports_a_failed_download_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let clone = tmp.path().join("clone");
    copy(
        &root().join("scripts/fetch-data"),
        &clone.join("scripts/fetch-data"),
    );
    copy(
        &root().join("datasets/SHA256SUMS"),
        &clone.join("datasets/SHA256SUMS"),
    );
    // Nothing listens on port 9 of the loopback: the download fails at once.
    let out = Command::new(clone.join("scripts/fetch-data"))
        .env("EDGEACT_CACHE", tmp.path().join("cache"))
        .env("NPM_REGISTRY", "http://127.0.0.1:9")
        .env("PATH", path_with(&no_npm(tmp.path())))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("fetch-data: http://127.0.0.1:9/sentiment/-/sentiment-5.0.2.tgz: "),
        "{}",
        text(&out)
    );
    assert!(!err.contains("Traceback"), "{err}");
}

/// A bin folder of stand-ins: `dpkg` that knows no package, `apt-get` that cannot reach its
/// sources. Only used as root, where scripts/deps calls apt-get without sudo (sudo would
/// find the real apt-get).
fn broken_apt(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin-broken-apt");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, body) in [
        ("dpkg", "#!/bin/sh\nexit 1\n"),
        (
            "apt-get",
            "#!/bin/sh\necho 'E: Unable to locate package mosquitto' >&2\nexit 100\n",
        ),
    ] {
        std::fs::write(bin.join(name), body).unwrap();
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

#[test]
fn deps_stops_with_one_line_when_it_cannot_install() {
    // No Rust toolchain on PATH.
    let out = Command::new("bash")
        .arg(root().join("scripts/deps"))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    if Path::new("/usr/bin/cargo").exists() || Path::new("/bin/cargo").exists() {
        println!("skipped (no-cargo case): cargo is installed system-wide here");
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}", text(&out));
        assert_eq!(err.trim().lines().count(), 1, "{}", text(&out));
        assert!(err.contains("install a Rust toolchain"), "{err}");
    }
    // Packages missing and apt-get failing.
    let uid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        println!(
            "skipped (apt-get case): not root, scripts/deps would run the real apt-get via sudo"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(root().join("scripts/deps"))
        .env("PATH", path_with(&broken_apt(tmp.path())))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.trim().lines().collect();
    // "installing ..." then the one line that says why it stopped.
    assert_eq!(lines.len(), 2, "{}", text(&out));
    assert!(lines[1].starts_with("deps: apt-get update failed"), "{err}");
}
