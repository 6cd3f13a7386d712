//! The modes edgeact runs in, each from a validated config: `classify` over texts or JSON
//! lines, and `plan` (the memory budget without loading). `main` maps errors to exit codes.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use serde_json::json;

use crate::classify::input::{self, InputError};
use crate::classify::{Classifier, Request, ScorePath, SetupError};
use crate::model::config::{ConfigError, EngineConfig};
use crate::model::scoring::AbstainRule;
use crate::model::{self, Engine, EngineError};
use crate::spec::{SpecError, Task};
use crate::util::proc::rss_mib;
use crate::util::stats::percentile;

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
    #[error("cannot write results: {0}")]
    Output(std::io::Error),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Mqtt(#[from] crate::serve::mqtt::MqttConfigError),
    #[error(transparent)]
    Outbox(#[from] crate::serve::outbox::OutboxError),
    #[error(transparent)]
    React(#[from] crate::react::ReactError),
    #[error("{failed} of {total} inputs were rejected (see their error records)")]
    SomeRecordsFailed { failed: usize, total: usize },
}

/// The serve layer's errors as the variants main already maps to exit codes (Mqtt 2,
/// Engine 3 or 1, Setup 2, the rest 1), with the same messages.
impl From<crate::serve::ServeError> for AppError {
    fn from(e: crate::serve::ServeError) -> AppError {
        use crate::serve::worker::WorkerError;
        use crate::serve::ServeError;
        let input = |what: String, reason: String| AppError::Input {
            what,
            source: std::io::Error::other(reason),
        };
        match e {
            ServeError::Mqtt(e) => AppError::Mqtt(e),
            ServeError::Outbox(e) => AppError::Outbox(e),
            ServeError::Worker(WorkerError::Engine(e)) => AppError::Engine(e),
            ServeError::Worker(WorkerError::Setup(e)) => AppError::Setup(e),
            ServeError::Worker(WorkerError::ReactTask { path, source }) => {
                input(format!("task {}", path.display()), source.to_string())
            }
            ServeError::Worker(WorkerError::Thread(source)) => AppError::Input {
                what: "inference thread".into(),
                source,
            },
            ServeError::Worker(WorkerError::Died) => input(
                "inference thread".into(),
                "the inference thread died while loading".into(),
            ),
            ServeError::NoBroker => input("broker".into(), "serve over MQTT needs --broker".into()),
            ServeError::MonitorState { path, source } => {
                input(path.display().to_string(), source.to_string())
            }
            ServeError::Stdin(source) => AppError::Input {
                what: "standard input".into(),
                source,
            },
            ServeError::Output(e) => AppError::Output(e),
            ServeError::WorkerStopped => input("inference thread".into(), "stopped".into()),
        }
    }
}

/// Where `classify` takes its requests from.
#[derive(Debug, Clone)]
pub enum Inputs {
    /// Texts given on the command line.
    Texts(Vec<String>),
    /// JSON lines from a file.
    File(PathBuf),
    /// JSON lines from standard input.
    Stdin,
}

#[derive(Debug, Clone)]
pub struct ClassifyConfig {
    pub engine: EngineConfig,
    pub task: Task,
    pub inputs: Inputs,
    /// Overrides the task's calibration switch.
    pub calibrate: Option<bool>,
    pub abstain: Option<AbstainRule>,
    pub path: ScorePath,
    /// Requests per micro-batch.
    pub batch_size: usize,
    pub pretty: bool,
    /// Overrides the task file's method (`[head] method`).
    pub method: Option<crate::spec::Method>,
}

/// Loads the model, prepares the task and writes one JSON line per input to `out`.
pub fn classify(cfg: ClassifyConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let ecfg = crate::spec::config_for_tasks(&cfg.engine, [&cfg.task])?;
    let mut engine = Engine::load(&ecfg, 1)?;
    let mut classifier = crate::classify::head::TaskRunner::new(
        &mut engine,
        cfg.task,
        0,
        cfg.calibrate,
        cfg.abstain,
        cfg.method,
        model::FeatureParams::for_config(&cfg.engine),
    )?;
    let mut total = 0usize;
    let mut failed = 0usize;
    let mut pending: Vec<(usize, Request)> = Vec::new();
    let batch_size = cfg.batch_size.max(1);

    let mut flush = |pending: &mut Vec<(usize, Request)>,
                     engine: &mut Engine,
                     out: &mut dyn Write|
     -> Result<usize, AppError> {
        let reqs: Vec<Request> = pending.iter().map(|(_, r)| r.clone()).collect();
        let results = classifier.classify_many(engine, &reqs, cfg.path);
        let mut bad = 0;
        for ((line, req), res) in pending.drain(..).zip(results) {
            let value = match res {
                Ok(r) => serde_json::to_value(&r).unwrap_or_else(|e| json!({"id": req.id, "error": {"kind": "internal", "message": e.to_string()}})),
                Err(e) => {
                    bad += 1;
                    tracing::warn!(id = %req.id, line, "{e}");
                    json!({"id": req.id, "line": line, "error": {"kind": e.kind(), "message": e.to_string()}})
                }
            };
            write_json(out, &value, cfg.pretty)?;
        }
        Ok(bad)
    };

    let handle_line = |bytes: &[u8],
                       line: usize,
                       pending: &mut Vec<(usize, Request)>,
                       out: &mut dyn Write|
     -> Result<usize, AppError> {
        match input::parse_line(bytes, line) {
            Ok(Some(req)) => {
                pending.push((line, req));
                Ok(0)
            }
            Ok(None) => Ok(0),
            Err(e) => {
                tracing::warn!("{e}");
                write_json(out, &error_record(&e), cfg.pretty)?;
                Ok(1)
            }
        }
    };

    match &cfg.inputs {
        Inputs::Texts(texts) => {
            for (i, t) in texts.iter().enumerate() {
                pending.push((i + 1, Request::text((i + 1).to_string(), t.clone())));
                total += 1;
            }
        }
        Inputs::File(_) | Inputs::Stdin => {
            let (what, reader): (String, Box<dyn BufRead>) = match &cfg.inputs {
                Inputs::File(p) => (
                    p.display().to_string(),
                    Box::new(std::io::BufReader::new(std::fs::File::open(p).map_err(
                        |source| AppError::Input {
                            what: p.display().to_string(),
                            source,
                        },
                    )?)),
                ),
                _ => ("standard input".into(), Box::new(std::io::stdin().lock())),
            };
            let mut reader = reader;
            let mut buf = Vec::new();
            let mut line = 0;
            loop {
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(|source| AppError::Input {
                        what: what.clone(),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                line += 1;
                if buf.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                total += 1;
                failed += handle_line(&buf, line, &mut pending, out)?;
                if pending.len() >= batch_size {
                    failed += flush(&mut pending, &mut engine, out)?;
                }
            }
        }
    }
    while !pending.is_empty() {
        let rest = pending.split_off(pending.len().min(batch_size));
        failed += flush(&mut pending, &mut engine, out)?;
        pending = rest;
    }
    out.flush().map_err(AppError::Output)?;
    if failed > 0 {
        return Err(AppError::SomeRecordsFailed { failed, total });
    }
    Ok(())
}

fn error_record(e: &InputError) -> serde_json::Value {
    json!({"id": null, "line": e.line(), "error": {"kind": e.kind(), "message": e.to_string()}})
}

fn write_json(out: &mut dyn Write, v: &serde_json::Value, pretty: bool) -> Result<(), AppError> {
    let s = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    }
    .map_err(|e| AppError::Output(std::io::Error::other(e)))?;
    writeln!(out, "{s}").map_err(AppError::Output)
}

/// `edgeact plan`: checks the model file and prints the memory estimate, loading nothing.
pub fn plan(cfg: &EngineConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let (sha, shape, fitted) = model::preflight(cfg, 1)?;
    let v = json!({
        "board": cfg.board,
        "model": cfg.model_path,
        "model_sha256": sha,
        "architecture": shape.architecture,
        "n_layer": shape.n_layer,
        "n_vocab": shape.n_vocab,
        "n_ctx": fitted.plan.n_ctx,
        "shrunk_from_ctx": fitted.shrunk_from_ctx,
        "memory_budget_mib": cfg.memory_budget_mib,
        "estimate_mib": fitted.estimate.total_mib(),
        "estimate": fitted.estimate.detail(),
    });
    write_json(out, &v, true)
}

/// Settings of `edgeact bench`.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub engine: EngineConfig,
    pub task: Task,
    /// JSON-lines requests to classify (a `label` field, when present, is scored).
    pub data: PathBuf,
    pub limit: usize,
    pub batch_size: usize,
    /// Requests the naive path runs on (the first ones).
    pub naive_limit: usize,
}

/// `edgeact bench`: load time, memory against the estimate, and classifications per
/// second on each scoring path over the same inputs, printed as a table (nothing asserted).
pub fn bench(cfg: BenchConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let t0 = std::time::Instant::now();
    let mut engine = Engine::load(&crate::spec::config_for_tasks(&cfg.engine, [&cfg.task])?, 1)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = std::time::Instant::now();
    let classifier = Classifier::new(&mut engine, cfg.task, 0, None, None)?;
    let prefix_ms = t1.elapsed().as_secs_f64() * 1e3;
    let text = std::fs::read(&cfg.data).map_err(|source| AppError::Input {
        what: cfg.data.display().to_string(),
        source,
    })?;
    let mut reqs = Vec::new();
    let mut gold = Vec::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if let Ok(Some(r)) = input::parse_line(line, i + 1) {
            gold.push(r.fields.get("label").cloned());
            reqs.push(r);
        }
        if reqs.len() >= cfg.limit {
            break;
        }
    }
    // Rows: (name, path, batch, pruning on). `None`: prefix reuse with each label scored on
    // its own (no label trie). The pruned row only where pruning can change anything.
    let pruning = classifier.task.prune_margin_nats;
    let multi_token = !classifier.trie().decoded.is_empty();
    let mut paths = vec![
        (
            "naive (every label from scratch)",
            Some(ScorePath::Naive),
            1,
            false,
        ),
        ("prefix reuse, labels one by one", None, 1, false),
        ("prefix reuse + label trie", Some(ScorePath::Fast), 1, false),
    ];
    if pruning.is_some() && multi_token {
        paths.push(("+ pruned label search", Some(ScorePath::Fast), 1, true));
    }
    paths.push((
        "+ micro-batching",
        Some(ScorePath::Fast),
        cfg.batch_size.max(1),
        true,
    ));
    writeln!(
        out,
        "model {} | board {} | task {} ({} labels, prefix {} tokens) | {} inputs",
        engine.info.path.display(),
        engine.info.board,
        classifier.task.name,
        classifier.task.labels.len(),
        classifier.prefix_len(),
        reqs.len()
    )
    .map_err(AppError::Output)?;
    writeln!(
        out,
        "load {load_ms:.0} ms (model + context), prefix {prefix_ms:.0} ms ({:?}), estimate {} MiB ({})",
        classifier.prefix_source,
        engine.info.estimate_mib,
        engine.info.estimate.detail()
    )
    .map_err(AppError::Output)?;
    writeln!(
        out,
        "| path | batch | classif/s | p50 ms | p99 ms | decoded tok/request | accuracy | speed-up |\n|---|---|---|---|---|---|---|---|"
    )
    .map_err(AppError::Output)?;
    let mut base_rate = None;
    let mut classifier = classifier;
    for (name, path, batch, prune) in paths {
        classifier.task.prune_margin_nats = if prune { pruning } else { None };
        let mut lat = Vec::new();
        let mut decoded = 0usize;
        let mut correct = 0usize;
        let mut labeled = 0usize;
        // The two slow reference paths run on the first `naive_limit` requests only.
        let n = match path {
            Some(ScorePath::Fast) => reqs.len(),
            _ => cfg.naive_limit.clamp(1, reqs.len().max(1)).min(reqs.len()),
        };
        let start = std::time::Instant::now();
        for (chunk, g) in reqs[..n].chunks(batch).zip(gold[..n].chunks(batch)) {
            let t = std::time::Instant::now();
            let res: Vec<Option<(String, usize)>> = match path {
                Some(path) => classifier
                    .classify_many(&mut engine, chunk, path)
                    .into_iter()
                    .map(|r| r.ok().map(|r| (r.top_label, r.tokens.decoded)))
                    .collect(),
                None => chunk
                    .iter()
                    .map(|r| labels_one_by_one(&classifier, &mut engine, r))
                    .collect(),
            };
            let ms = t.elapsed().as_secs_f64() * 1e3;
            for (r, g) in res.into_iter().zip(g) {
                lat.push(ms);
                if let Some((top_label, n_decoded)) = r {
                    decoded += n_decoded;
                    if let Some(g) = g {
                        labeled += 1;
                        correct += usize::from(&top_label == g);
                    }
                }
            }
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        let base = *base_rate.get_or_insert(rate);
        let acc = if labeled > 0 {
            format!("{:.3}", correct as f64 / labeled as f64)
        } else {
            "-".into()
        };
        let name = if n < reqs.len() {
            format!("{name} (first {n})")
        } else {
            name.to_string()
        };
        writeln!(
            out,
            "| {name} | {batch} | {rate:.2} | {:.1} | {:.1} | {:.1} | {acc} | {:.2}x |",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            decoded as f64 / n.max(1) as f64,
            rate / base
        )
        .map_err(AppError::Output)?;
    }
    if let Some(m) = pruning {
        writeln!(out, "pruning margin {m} nats (task prune_margin_nats)")
            .map_err(AppError::Output)?;
    }
    // Prompt processing inside edgeact, comparable with llama-bench's pp test: a fresh
    // sequence decoded in batches of n, logits for the last token only.
    let mut pp = Vec::new();
    for n in [16usize, 64, 256] {
        if n <= engine.n_batch() {
            pp.push(format!(
                "{:.0} tok/s at batch {n}",
                engine.prompt_rate(512, n)?
            ));
        }
    }
    writeln!(out, "prompt processing: {}", pp.join(", ")).map_err(AppError::Output)?;
    let (peak, now) = rss_mib();
    writeln!(
        out,
        "peak RSS {peak:.0} MiB (now {now:.0} MiB) against an estimate of {} MiB",
        engine.info.estimate_mib
    )
    .map_err(AppError::Output)?;
    Ok(())
}

/// The bench's middle path: the cached prefix is reused, but each label is scored by its own
/// `score` call (the request's suffix decoded again each time, no label trie shared), as a
/// prompt cache without label batching would. Returns the top label (by the task's score,
/// uncalibrated) and the tokens decoded; `None` when the request fails.
fn labels_one_by_one(
    classifier: &Classifier,
    engine: &mut Engine,
    req: &Request,
) -> Option<(String, usize)> {
    let prepared = classifier.prepare(engine, req).ok()?;
    let trie = classifier.trie();
    let mut best: Option<(f64, usize)> = None;
    let mut decoded = 0;
    for (i, path) in trie.paths.iter().enumerate() {
        let tokens: Vec<_> = path.iter().map(|&n| trie.nodes[n].token).collect();
        let one = crate::model::scoring::LabelTrie::new(&[tokens]).ok()?;
        let job = model::ScoreJob {
            // `bench` prepares its one task in prefix slot 0.
            prefix: Some(0),
            tokens: &prepared.tokens,
            trie: &one,
            pruning: None,
        };
        let out = engine.score(std::slice::from_ref(&job)).ok()?.pop()?;
        let label = out.labels.first()?;
        decoded += out.decoded_tokens;
        let score = match classifier.task.score {
            crate::spec::ScoreNorm::Total => label.total,
            crate::spec::ScoreNorm::Mean => label.mean,
        };
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| (classifier.task.labels[i].name.clone(), decoded))
}
