//! The memory promise, measured: every shipped task (classify, rank, react) run by the
//! `edgeact` binary on x86-dev peaks at or under the estimate `edgeact plan --task` prints
//! for it, and that estimate is within the board's budget; a served set of tasks peaks under
//! the set's estimate; and `serve` refuses a set whose estimate is over the budget, with the
//! numbers, before it connects.
//!
//! Peak RSS of a child is the kernel's high-water mark of its resident set (`wait4`'s
//! `ru_maxrss`, what `/proc/<pid>/status` shows as VmHWM), read when it exits, through a
//! small forking wrapper ([`PEAK_WRAPPER`]); the daemon reports its own VmHWM in its stats.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::testkit;
use crate::testkit::broker::Broker;
use crate::testkit::daemon::{serve_until_exit, Daemon};
use crate::testkit::probe::{wait_online, Probe};

/// Runs argv[2..] in a forked child of this small Python process and writes the child's
/// `ru_maxrss` (KiB) to argv[1]; exits with the child's status. The test process cannot
/// measure its own children: `Command` spawns with `CLONE_VM`, and at `exec` the kernel
/// folds the parent's high-water mark (several engines loaded by other tests, 2 GB) into
/// the child's `maxrss`. A child forked from a small process starts clean.
const PEAK_WRAPPER: &str = r#"
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(ru.ru_maxrss))
sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
"#;

/// Runs `cmd` to its end: (success, stdout, stderr, peak RSS in MiB).
fn run_with_peak(cmd: &mut Command, dir: &Path) -> (bool, String, String, f64) {
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let peak_path = dir.join("peak-kib");
    let mut wrapped = Command::new("python3");
    wrapped
        .arg("-c")
        .arg(PEAK_WRAPPER)
        .arg(&peak_path)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    if let Some(d) = cmd.get_current_dir() {
        wrapped.current_dir(d);
    }
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    let status = wrapped
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .status()
        .expect("spawn python3 with edgeact");
    let peak_kib: f64 = std::fs::read_to_string(&peak_path)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    (
        status.success(),
        std::fs::read_to_string(out_path).unwrap_or_default(),
        std::fs::read_to_string(err_path).unwrap_or_default(),
        peak_kib / 1024.0,
    )
}

/// `edgeact plan --board x86-dev --task ...`: (estimate MiB, budget MiB, itemised).
fn plan(tasks: &[&str]) -> (f64, f64, String) {
    let mut cmd = Command::new(testkit::bin());
    cmd.current_dir(testkit::root())
        .args(["plan", "--board", "x86-dev"]);
    for t in tasks {
        cmd.args(["--task", t]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "plan {tasks:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["estimate_mib"].as_f64().unwrap(),
        v["memory_budget_mib"].as_f64().unwrap(),
        v["estimate"].as_str().unwrap().to_string(),
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Classify,
    Rank,
    React,
}

/// The shipped tasks and their kinds, from the task files.
fn shipped_tasks() -> Vec<(String, Kind)> {
    let mut tasks = Vec::new();
    for e in std::fs::read_dir(testkit::root().join("tasks")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        // Files that are not tasks (a learned head's weights) have neither labels nor a type.
        let src = std::fs::read_to_string(&path).unwrap();
        let doc: toml::Table = toml::from_str(&src).unwrap();
        let kind = if edgeact::spec::is_react_file(&src) {
            Kind::React
        } else if doc.contains_key("rank") {
            Kind::Rank
        } else if doc.contains_key("labels") {
            Kind::Classify
        } else {
            continue;
        };
        tasks.push((name, kind));
    }
    tasks.sort_by(|a, b| a.0.cmp(&b.0));
    tasks
}

/// Four requests, so they are scored together in one micro-batch (batching raises the peak).
const TEXTS: [&str; 4] = [
    "I was charged twice for the same card payment yesterday",
    "The staff were kind and the food was great",
    "A fire broke out in a warehouse near the harbour this morning",
    "服务很好，下次还来",
];

/// The command that runs one task the way a user would.
fn task_command(name: &str, kind: Kind, dir: &Path) -> Command {
    let mut cmd = Command::new(testkit::bin());
    cmd.current_dir(testkit::root());
    match kind {
        Kind::Classify => {
            let input = dir.join("input.jsonl");
            let lines: String = TEXTS
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    format!(
                        "{}\n",
                        serde_json::json!({"id": format!("t{i}"), "text": t})
                    )
                })
                .collect();
            std::fs::write(&input, lines).unwrap();
            cmd.args(["classify", "--board", "x86-dev", "--task", name, "--input"])
                .arg(input);
        }
        Kind::Rank => {
            let profile = dir.join("profile.txt");
            std::fs::write(
                &profile,
                "Likes cooking Italian food: pasta, pizza, risotto.",
            )
            .unwrap();
            let items = dir.join("items.jsonl");
            let lines: String = [
                (
                    "a",
                    "Fresh pasta course",
                    "Make tagliatelle and ravioli by hand.",
                ),
                (
                    "b",
                    "Car maintenance",
                    "Change the oil and check the brakes.",
                ),
                (
                    "c",
                    "Pizza night",
                    "Neapolitan dough, tomato sauce, wood oven.",
                ),
                (
                    "d",
                    "Tax return help",
                    "Fill in the annual forms before the deadline.",
                ),
            ]
            .iter()
            .map(|(id, title, d)| {
                format!(
                    "{}\n",
                    serde_json::json!({"id": id, "title": title, "description": d})
                )
            })
            .collect();
            std::fs::write(&items, lines).unwrap();
            // `--min-score` makes the model score the items: a task whose fusion does not
            // weigh the model never loads it, and this test measures the model's memory.
            cmd.args([
                "rank",
                "--board",
                "x86-dev",
                "--task",
                name,
                "--min-score",
                "0.001",
            ])
            .arg("--profile")
            .arg(profile)
            .arg("--items")
            .arg(items);
        }
        Kind::React => {
            cmd.args([
                "react",
                "--board",
                "x86-dev",
                "--task",
                name,
                "--seed",
                "7",
                "--session-dir",
            ])
            .arg(dir.join("sessions"))
            // A calculator question: a knowledge-base answer never loads the model (it is
            // loaded at first use), and this test measures the model's memory.
            .arg("What is 7 times 2.50?");
        }
    }
    cmd
}

#[test]
fn each_shipped_task_peaks_under_its_estimate_within_the_board_budget() {
    let tasks = shipped_tasks();
    for kind in [Kind::Classify, Kind::Rank, Kind::React] {
        assert!(
            tasks.iter().any(|(_, k)| *k == kind),
            "no shipped {kind:?} task found: {tasks:?}"
        );
    }
    let mut rows = Vec::new();
    for (name, kind) in &tasks {
        let dir = tempfile::tempdir().unwrap();
        let (estimate, budget, detail) = plan(&[name]);
        let (ok, _out, err, peak) =
            run_with_peak(&mut task_command(name, *kind, dir.path()), dir.path());
        assert!(ok, "{name}: edgeact failed: {err}");
        assert!(
            peak > 100.0,
            "{name}: peak RSS {peak} MiB was not measured (no model?)"
        );
        println!("{name:28} {kind:?}: peak RSS {peak:.1} MiB, estimate {estimate} MiB ({detail}), budget {budget} MiB");
        rows.push((name.clone(), peak, estimate, budget, detail));
    }
    for (name, peak, estimate, budget, detail) in rows {
        assert!(
            peak <= estimate,
            "{name}: peak RSS {peak:.1} MiB over the estimate {estimate} MiB ({detail})"
        );
        assert!(
            estimate <= budget,
            "{name}: estimate {estimate} MiB over the x86-dev budget {budget} MiB"
        );
    }
}

#[test]
fn a_served_set_of_tasks_peaks_under_the_sets_estimate() {
    let set = ["sentiment", "banking77", "city-event", "sentiment-zh"];
    let (estimate, budget, detail) = plan(&set);
    assert!(estimate <= budget, "{estimate} > {budget} ({detail})");
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-mem", &["edgeact/mem/#"]);
    let mut extra = Vec::new();
    for t in set {
        extra.extend(["--task", t]);
    }
    let mut daemon = Daemon::start(&broker, "mem", dir.path(), &extra);
    wait_online(&probe, "edgeact/mem");
    for t in set {
        for (i, text) in TEXTS.iter().enumerate() {
            let req = serde_json::json!({"id": format!("{t}-{i}"), "text": text});
            probe.publish(&format!("edgeact/mem/{t}/request"), req.to_string());
        }
    }
    let n = (set.len() * TEXTS.len()) as u64;
    probe.wait_for(600, "every result, then stats counting them", |g| {
        g.iter().any(|m| {
            m.topic == "edgeact/mem/stats" && m.json()["results_total"].as_u64().unwrap_or(0) >= n
        })
    });
    let stats = probe
        .on("edgeact/mem/stats")
        .into_iter()
        .rfind(|m| m.json()["results_total"].as_u64().unwrap_or(0) >= n)
        .unwrap()
        .json();
    let peak = stats["peak_rss_mib"].as_f64().unwrap();
    println!("served {set:?}: peak RSS {peak} MiB, estimate {estimate} MiB ({detail})");
    assert!(peak > 100.0, "{stats}");
    assert!(
        peak <= estimate,
        "served set: peak RSS {peak} MiB over the estimate {estimate} MiB ({detail})"
    );
    assert!(daemon.terminate().success(), "{}", daemon.log());
}

#[test]
fn serve_refuses_a_task_set_over_the_budget_with_the_numbers() {
    let set = ["sentiment", "banking77"];
    let (estimate, _, _) = plan(&set);
    let budget = (estimate - 1.0) as u64;
    let budget_flag = budget.to_string();
    // Nothing listens on this port: the refusal must come before any connection attempt.
    let (code, log) = serve_until_exit(
        &[
            "--broker",
            "mqtt://127.0.0.1:9",
            "--task",
            "sentiment",
            "--task",
            "banking77",
            "--memory-budget-mib",
            &budget_flag,
        ],
        &[],
        120,
    );
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {log}");
    for want in [
        format!("needs {estimate} MiB"),
        format!("memory_budget_mib is {budget}"),
        "serving 2 tasks: sentiment, banking77".to_string(),
        "weights".to_string(),
    ] {
        assert!(log.contains(&want), "no `{want}` in: {log}");
    }
    // One MiB more and the same set is accepted by the check (it then fails to connect).
    let (estimate_one, _, _) = plan(&["sentiment"]);
    assert!(estimate_one < estimate, "a second task adds a prefix slot");
}
