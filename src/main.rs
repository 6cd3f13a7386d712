//! The `edgeact` command line: parses arguments, validates them into a config, runs the
//! mode, and maps every error to an exit code in one place.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use edgeact::classify::ScorePath;
use edgeact::cmd::{self, AppError, ClassifyConfig, Inputs};
use edgeact::model::budget::KvCacheType;
use edgeact::model::config::{self, BoardFile};
use edgeact::model::scoring::AbstainRule;
use edgeact::model::EngineError;
use edgeact::react::ReactError;
use edgeact::serve::worker::ServedTask;
use edgeact::serve::{self, mqtt, outbox};
use edgeact::spec::react::ReactSpec;
use edgeact::spec::Task;

/// Offline language-model agent for small boards: classifies text with a local GGUF model
/// under a memory budget, and explains every result.
#[derive(Parser)]
#[command(name = "edgeact", version, about, long_about = None)]
struct Cli {
    /// Log more (-v: info, -vv: debug, -vvv: llama.cpp's own log too). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify texts (arguments), a JSON-lines file (--input) or JSON lines on stdin;
    /// prints one JSON result per input.
    Classify(ClassifyArgs),
    /// Check the model file and print the memory estimate for a board, loading nothing.
    Plan(BoardArgs),
    /// Run the daemon: requests from MQTT (or JSON lines on stdin without --broker),
    /// results, traces, state, errors and stats published back, nothing lost.
    Serve(Box<ServeArgs>),
    /// Evaluate a task (and candidate templates) on labeled JSON lines: accuracy, macro-F1,
    /// per-class precision/recall, confusion, calibration error, coverage, latency; writes
    /// metrics.json, predictions.jsonl, report.md and two SVG plots.
    Eval(EvalArgs),
    /// Choose the template, few-shot examples and calibration on a dev split (macro-F1) and
    /// write the winner as a task file with its measured score.
    Tune(TuneArgs),
    /// Measure load time, peak RSS and classifications/s of each scoring path on a
    /// JSON-lines file (figures printed, nothing asserted).
    Bench(BenchArgs),
    /// Answer with the ReAct loop (grammar-guarded Thought / Action / Observation steps,
    /// allow-listed tools); prints the answer, then the trace as one JSON line.
    React(ReactArgs),
    /// Retrieve from the task's knowledge base, then one answer citing a retrieved passage;
    /// prints the answer, then the result as one JSON line.
    Qa(ReactArgs),
    /// Run a scenario file through the ReAct loop (and the no-grammar baseline, and qa):
    /// retrieval hit rate@k, tool choice, citations, unparsable steps, tokens and seconds.
    ReactEval(ReactEvalArgs),
    /// Accuracy figures of one data set on its test split: zero-shot (with and without
    /// calibration), the K-shot template, the learned head with K per label, and TF-IDF +
    /// logistic regression (K per label and full train), as one Markdown table.
    BenchAccuracy(BenchAccuracyArgs),
    /// Replay timestamped JSON lines through a task's [monitor] rules (labels from the model,
    /// or from a field of the data with --label-field); prints incident messages
    /// (new / update / end) as JSON lines.
    Monitor(MonitorArgs),
    /// Rank candidate items (JSON lines: id, title, description or text) for a profile by
    /// the model's P(yes) with a task that has a [rank] section; prints them best first.
    Rank(RankArgs),
    /// Ranking quality on labelled data: NDCG@k of the model against TF-IDF and random
    /// orderings for each family of intents (profiles from a TOML file).
    RankEval(RankEvalArgs),
    /// Power-loss test helper (hidden): puts messages into the outbox in --dir as fast as
    /// fsync allows and prints `P <seq> <file_bytes>` once each put is durable (see
    /// `edgeact::serve::outbox::stress_writer`); tests/powerloss.rs kills it with SIGKILL.
    #[command(hide = true)]
    OutboxStress(OutboxStressArgs),
}

#[derive(Args)]
struct OutboxStressArgs {
    /// The outbox folder.
    #[arg(long)]
    dir: PathBuf,
    /// Stop after this many puts.
    #[arg(long, default_value_t = u64::MAX)]
    max_puts: u64,
}

#[derive(Args)]
struct ReactArgs {
    /// Questions (each answered in turn).
    questions: Vec<String>,
    /// ReAct task: a name from tasks/ (or $EDGEACT_TASK_DIR, /etc/edgeact/tasks) or a path.
    #[arg(long, short, default_value = "kiosk")]
    task: String,
    /// Session id: earlier turns of this session go into the prompt (within the task's
    /// history_max_tokens) and this turn is recorded.
    #[arg(long)]
    session: Option<String>,
    /// Folder of session files (default: $EDGEACT_STATE_DIR/sessions or ./state/sessions).
    #[arg(long)]
    session_dir: Option<PathBuf>,
    /// Generate steps without the grammar and parse them with regexes (the baseline).
    #[arg(long)]
    no_grammar: bool,
    /// Seed (overrides the task file's).
    #[arg(long)]
    seed: Option<u64>,
    /// Wall-clock limit per question in milliseconds (overrides the task file's).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Pretty-print the trace.
    #[arg(long)]
    pretty: bool,
    #[command(flatten)]
    board: BoardArgs,
}

#[derive(Args)]
struct ReactEvalArgs {
    /// ReAct task with a knowledge base.
    #[arg(long, short, default_value = "kiosk")]
    task: String,
    /// Scenario file (JSON lines: id, question, expect_tool, expect_passage?, expect_fact?).
    #[arg(long, default_value = "kb/kiosk-scenarios.jsonl")]
    scenarios: PathBuf,
    /// At most this many scenarios (an evenly spaced sample).
    #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
    limit: usize,
    /// Also run the loop without the grammar (regex parsing, as peers do).
    #[arg(long)]
    baseline: bool,
    /// Also run the qa mode (retrieve, then one cited answer).
    #[arg(long)]
    qa: bool,
    /// Retrieval hit rate at these k (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    k: Vec<usize>,
    /// Only the retrieval hit rates (BM25 on each question; no model).
    #[arg(long)]
    retrieval_only: bool,
    /// Output folder (default out/react-eval-<task>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed (overrides the task file's).
    #[arg(long)]
    seed: Option<u64>,
    /// Wall-clock limit per question in milliseconds (overrides the task file's).
    #[arg(long)]
    timeout_ms: Option<u64>,
    #[command(flatten)]
    board: BoardArgs,
}

impl ReactArgs {
    fn config(&self) -> Result<edgeact::react::app::ReactConfig, AppError> {
        let mut spec = ReactSpec::find(&self.task, &config::task_dirs())
            .map_err(edgeact::react::ReactError::from)?;
        if let Some(s) = self.seed {
            spec.seed = s;
        }
        if let Some(t) = self.timeout_ms {
            spec.timeout_ms = t;
        }
        Ok(edgeact::react::app::ReactConfig {
            engine: self.board.engine_config()?,
            spec,
            questions: self.questions.clone(),
            session: self.session.clone(),
            session_dir: self.session_dir.clone().unwrap_or_else(|| {
                std::env::var_os("EDGEACT_STATE_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("state"))
                    .join("sessions")
            }),
            grammar: !self.no_grammar,
            pretty: self.pretty,
        })
    }
}

#[derive(Args)]
struct BenchAccuracyArgs {
    /// Task giving the template and labels (its own examples are not used).
    #[arg(long, short)]
    task: String,
    /// Labeled JSON lines with train/dev/test splits (scripts/fetch-data makes them).
    #[arg(long)]
    data: PathBuf,
    /// Test examples at most (an evenly spaced sample).
    #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
    limit: usize,
    /// Dev examples at most, for the K-shot template's calibration choice.
    #[arg(long, default_value_t = 100)]
    dev_limit: usize,
    /// K per label of the template row and of the K-shot baseline.
    #[arg(long, default_value_t = 8)]
    shots: usize,
    /// K per label of the head rows (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    head_k: Vec<usize>,
    /// Rows to run: zero-shot, tuned, head, tfidf (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "zero-shot,tuned,head,tfidf"
    )]
    rows: Vec<String>,
    /// Pooling of the head rows: last, mean or last+mean.
    #[arg(long, default_value = "last")]
    pooling: String,
    /// L2 strength of the head rows.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// Most text tokens kept in the feature prompt.
    #[arg(long, default_value_t = 96)]
    max_text_tokens: usize,
    /// Tokens per feature decode.
    #[arg(long, default_value_t = 64)]
    feature_batch: u32,
    /// Do not read or write the feature cache ($EDGEACT_CACHE/features).
    #[arg(long)]
    no_feature_cache: bool,
    /// Requests per micro-batch of the prompt rows.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    board: BoardArgs,
}

#[derive(Args)]
struct RankArgs {
    /// Task with a [rank] section.
    #[arg(long, short, default_value = "rank-interest")]
    task: String,
    /// Text file with the user profile (interests, history).
    #[arg(long)]
    profile: PathBuf,
    /// JSON lines of candidate items.
    #[arg(long)]
    items: PathBuf,
    /// Items returned at most (overrides the task file).
    #[arg(long)]
    top_k: Option<usize>,
    /// Leave out items scoring below this (overrides the task file).
    #[arg(long)]
    min_score: Option<f64>,
    #[command(flatten)]
    calibration: CalibrateArgs,
    /// Items scored together in one micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    board: BoardArgs,
}

#[derive(Args)]
struct RankEvalArgs {
    /// Task with a [rank] section.
    #[arg(long, short, default_value = "rank-interest")]
    task: String,
    /// Labelled JSON lines (scripts/fetch-data: data/banking77.jsonl).
    #[arg(long, default_value = "data/banking77.jsonl")]
    data: PathBuf,
    /// Families of intents with their profiles.
    #[arg(long, default_value = "datasets/banking77-families.toml")]
    families: PathBuf,
    /// Split the candidates come from (TF-IDF is fitted on the others).
    #[arg(long, default_value = "test")]
    split: String,
    /// Relevant candidates per family.
    #[arg(long, default_value_t = 5)]
    relevant: usize,
    /// Candidates per family, relevant ones included.
    #[arg(long, default_value_t = 30)]
    candidates: usize,
    /// NDCG cut-off.
    #[arg(long, default_value_t = 5)]
    k: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Random orderings averaged for the random baseline.
    #[arg(long, default_value_t = 200)]
    random_runs: usize,
    #[command(flatten)]
    calibration: CalibrateArgs,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Folder for metrics.json.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    board: BoardArgs,
}

#[derive(Args)]
struct MonitorArgs {
    /// Task with a [monitor] section.
    #[arg(long, short, default_value = "city-event")]
    task: String,
    /// JSON lines with `text`, the event time (the section's ts_field, seconds) and key fields.
    #[arg(long)]
    data: PathBuf,
    /// Take each message's label from this field instead of classifying it (no model loaded).
    #[arg(long)]
    label_field: Option<String>,
    /// Load monitor state from this file first and save it at the end.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Requests per micro-batch when classifying.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    board: BoardArgs,
}

/// Every `serve` setting, from the command line or from the `--config` file (same key
/// names, snake_case); the command line wins.
#[derive(Args, serde::Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, default)]
struct ServeSettings {
    /// Broker URL, mqtt://host:port or mqtts://host:port. Without it: JSON lines on stdin.
    #[arg(long)]
    broker: Option<String>,
    /// Device id (default: the host name); names the topic prefix and the client id.
    #[arg(long)]
    device_id: Option<String>,
    /// Tasks to serve (repeat the flag); default: sentiment.
    #[arg(long = "task", short = 't')]
    #[serde(rename = "tasks")]
    task: Vec<String>,
    /// Topic prefix (default edgeact/<device_id>).
    #[arg(long)]
    prefix: Option<String>,
    /// Also take requests from the fleet topic through the shared subscription
    /// $share/<group>/<fleet_prefix>/<task>/request.
    #[arg(long)]
    share_group: Option<String>,
    /// Fleet-wide topic prefix for --share-group (default edgeact/fleet).
    #[arg(long)]
    fleet_prefix: Option<String>,
    /// Context topic whose latest value templates can use as {context.NAME}: NAME=TOPIC (repeat).
    #[arg(long = "context")]
    #[serde(rename = "context_topics")]
    context: Vec<String>,
    /// Requests waiting for the model at most; beyond, requests get an `overloaded` error.
    #[arg(long)]
    queue_capacity: Option<usize>,
    /// Requests scored together when several wait for the same task.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Folder of the durable outbox (default: $EDGEACT_STATE_DIR or ./state).
    #[arg(long)]
    outbox_dir: Option<PathBuf>,
    /// When the outbox forces writes to disk: always, never, or a number of milliseconds.
    #[arg(long)]
    outbox_fsync: Option<String>,
    /// Outbox cap in MiB; beyond it the oldest low-priority messages are dropped (counted).
    #[arg(long)]
    outbox_max_mib: Option<u64>,
    /// Outbox cap on message age in hours.
    #[arg(long)]
    outbox_max_age_h: Option<u64>,
    /// Seconds between <prefix>/stats messages.
    #[arg(long)]
    stats_interval_s: Option<u64>,
    /// Publish Home Assistant device discovery (retained).
    #[arg(long)]
    ha_discovery: Option<bool>,
    /// Largest request payload accepted, in bytes.
    #[arg(long)]
    max_request_bytes: Option<usize>,
    /// CA certificate (PEM) for mqtts://.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mqtts:// with client authentication.
    #[arg(long)]
    client_cert: Option<PathBuf>,
    /// Client key (PEM) for the client certificate.
    #[arg(long)]
    client_key: Option<PathBuf>,
    /// MQTT user name.
    #[arg(long)]
    username: Option<String>,
    /// File whose first line is the MQTT password (never give a password on the command
    /// line); without it, the EDGEACT_MQTT_PASSWORD environment variable is used if set.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// MQTT client id (default edgeact-<device_id>).
    #[arg(long)]
    client_id: Option<String>,
    /// MQTT keep-alive in seconds (at least 1).
    #[arg(long)]
    keep_alive_s: Option<u64>,
    /// Seconds shutdown waits for PUBACKs before leaving the rest in the outbox.
    #[arg(long)]
    drain_timeout_s: Option<u64>,
    /// Personal data redacted from traces, error records and logs before they leave the
    /// device: email, phone, card (Luhn-checked), comma-separated; `none` for nothing.
    /// Default: all three.
    #[arg(long, value_delimiter = ',')]
    redact: Vec<String>,
    /// Extra regex whose matches are redacted too (repeat the flag).
    #[arg(long = "redact-pattern")]
    #[serde(rename = "redact_patterns")]
    redact_pattern: Vec<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// A TOML file with any of the settings below (same names); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: ServeSettings,
    #[command(flatten)]
    board: BoardArgs,
}

impl ServeSettings {
    fn overlay(mut self, over: ServeSettings) -> ServeSettings {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f; } )* };
        }
        take!(
            broker,
            device_id,
            prefix,
            share_group,
            fleet_prefix,
            queue_capacity,
            batch_size,
            outbox_dir,
            outbox_fsync,
            outbox_max_mib,
            outbox_max_age_h,
            stats_interval_s,
            ha_discovery,
            max_request_bytes,
            ca_file,
            client_cert,
            client_key,
            username,
            password_file,
            client_id,
            keep_alive_s,
            drain_timeout_s
        );
        if !over.task.is_empty() {
            self.task = over.task;
        }
        if !over.context.is_empty() {
            self.context = over.context;
        }
        if !over.redact.is_empty() {
            self.redact = over.redact;
        }
        if !over.redact_pattern.is_empty() {
            self.redact_pattern = over.redact_pattern;
        }
        self
    }
}

fn invalid(path: &std::path::Path, key: &str, reason: String) -> AppError {
    AppError::Config(config::ConfigError::Invalid(
        edgeact::util::invalid::Invalid {
            path: path.into(),
            key: key.into(),
            reason,
        },
    ))
}

fn host_name() -> String {
    let raw =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "edgeact".into());
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "edgeact".into()
    } else {
        clean
    }
}

impl ServeArgs {
    fn config(self) -> Result<serve::ServeConfig, AppError> {
        let (s, src) = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| AppError::Input {
                    what: p.display().to_string(),
                    source,
                })?;
                let file: ServeSettings = toml::from_str(&text).map_err(|e| {
                    AppError::Config(config::ConfigError::Parse {
                        path: p.clone(),
                        message: e.to_string().trim().replace('\n', " "),
                    })
                })?;
                (file.overlay(self.settings.clone()), p.clone())
            }
            None => (self.settings.clone(), PathBuf::from("command line")),
        };
        let engine = self.board.engine_config()?;
        let names = if s.task.is_empty() {
            vec!["sentiment".to_string()]
        } else {
            s.task.clone()
        };
        let mut tasks: Vec<ServedTask> = Vec::new();
        let mut monitors = std::collections::BTreeMap::new();
        for n in &names {
            let t = served_task(n)?;
            if tasks.iter().any(|o| o.name() == t.name()) {
                return Err(invalid(
                    &src,
                    "task",
                    format!("task `{}` is listed twice", t.name()),
                ));
            }
            if let ServedTask::Classify(task) = &t {
                if let Some(m) = edgeact::monitor::MonitorConfig::from_task(task)
                    .map_err(monitor_config_error)?
                {
                    monitors.insert(task.name.clone(), m);
                }
            }
            tasks.push(t);
        }
        let device_id = s.device_id.clone().unwrap_or_else(host_name);
        if device_id.is_empty() || device_id.contains(['/', '+', '#']) {
            return Err(invalid(
                &src,
                "device_id",
                format!("`{device_id}` must be non-empty without / + #"),
            ));
        }
        let topics = mqtt::Topics {
            prefix: s
                .prefix
                .clone()
                .unwrap_or_else(|| format!("edgeact/{device_id}")),
            fleet_prefix: s
                .fleet_prefix
                .clone()
                .unwrap_or_else(|| "edgeact/fleet".into()),
            share_group: s.share_group.clone(),
        };
        let mut context_topics = std::collections::BTreeMap::new();
        for c in &s.context {
            let (name, topic) = c
                .split_once('=')
                .ok_or_else(|| invalid(&src, "context", format!("`{c}` is not NAME=TOPIC")))?;
            context_topics.insert(name.trim().to_string(), topic.trim().to_string());
        }
        let fsync = match s.outbox_fsync.as_deref().unwrap_or("always") {
            "always" => outbox::FsyncPolicy::Always,
            "never" => outbox::FsyncPolicy::Never,
            ms => outbox::FsyncPolicy::Interval(std::time::Duration::from_millis(
                ms.parse().map_err(|_| {
                    invalid(
                        &src,
                        "outbox_fsync",
                        format!("`{ms}` is not always, never or a number of milliseconds"),
                    )
                })?,
            )),
        };
        let broker = match &s.broker {
            None => None,
            Some(url) => {
                let (host, port, tls) = mqtt::parse_broker_url(url)?;
                let keep_alive_s = s.keep_alive_s.unwrap_or(15);
                if keep_alive_s < 1 {
                    return Err(invalid(
                        &src,
                        "keep_alive_s",
                        "must be at least 1 second".into(),
                    ));
                }
                let password = match &s.password_file {
                    Some(p) => Some(mqtt::read_password_file(p)?),
                    None => std::env::var("EDGEACT_MQTT_PASSWORD")
                        .ok()
                        .filter(|p| !p.is_empty())
                        .map(mqtt::Secret),
                };
                Some(mqtt::BrokerConfig {
                    host,
                    port,
                    tls,
                    ca_file: s.ca_file.clone(),
                    client_cert: s.client_cert.clone(),
                    client_key: s.client_key.clone(),
                    username: s.username.clone(),
                    password,
                    client_id: s
                        .client_id
                        .clone()
                        .unwrap_or_else(|| format!("edgeact-{device_id}")),
                    keep_alive_s,
                    max_incoming_packet_bytes: 16 * 1024 * 1024,
                    max_outgoing_packet_bytes: 1024 * 1024,
                })
            }
        };
        let redactor = if s.redact.is_empty() && s.redact_pattern.is_empty() {
            edgeact::serve::redact::Redactor::all_kinds()
        } else {
            let kinds = if s.redact.is_empty() {
                vec!["email".into(), "phone".into(), "card".into()]
            } else {
                s.redact.clone()
            };
            edgeact::serve::redact::Redactor::new(&kinds, &s.redact_pattern).map_err(
                |e| match e {
                    edgeact::serve::redact::RedactError::UnknownKind(k) => invalid(
                        &src,
                        "redact",
                        format!("unknown kind `{k}` (known: email, phone, card, none)"),
                    ),
                    edgeact::serve::redact::RedactError::Pattern { pattern, reason } => invalid(
                        &src,
                        "redact_patterns",
                        format!("`{pattern}` is not a valid regex: {reason}"),
                    ),
                },
            )?
        };
        let queue_capacity = s.queue_capacity.unwrap_or(64);
        if queue_capacity == 0 {
            return Err(invalid(&src, "queue_capacity", "must be at least 1".into()));
        }
        Ok(serve::ServeConfig {
            engine,
            tasks,
            monitors,
            device_id,
            topics,
            broker,
            context_topics,
            queue_capacity,
            batch_size: s.batch_size.unwrap_or(8).max(1),
            outbox_dir: s.outbox_dir.clone().unwrap_or_else(|| {
                std::env::var_os("EDGEACT_STATE_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("state"))
            }),
            outbox: outbox::OutboxLimits {
                max_bytes: s.outbox_max_mib.unwrap_or(64) * 1024 * 1024,
                max_age: std::time::Duration::from_secs(
                    s.outbox_max_age_h.unwrap_or(24 * 7) * 3600,
                ),
                fsync,
            },
            stats_interval: std::time::Duration::from_secs(s.stats_interval_s.unwrap_or(30).max(1)),
            ha_discovery: s.ha_discovery.unwrap_or(false),
            max_request_bytes: s.max_request_bytes.unwrap_or(256 * 1024),
            drain_timeout: std::time::Duration::from_secs(s.drain_timeout_s.unwrap_or(10)),
            redactor,
        })
    }
}

#[derive(Args)]
struct EvalArgs {
    /// Task to evaluate.
    #[arg(long, short, default_value = "sentiment")]
    task: String,
    /// Labeled JSON lines: {"text", "label", "split"?} (scripts/fetch-data makes them).
    #[arg(long)]
    data: PathBuf,
    /// Only examples of this split (train, dev, test).
    #[arg(long)]
    split: Option<String>,
    /// At most this many examples.
    #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
    limit: usize,
    /// Other task files to compare on the same data (comma-separated); the best by macro-F1
    /// gets the report.
    #[arg(long, value_delimiter = ',')]
    templates: Vec<String>,
    /// Replace few-shot examples with K per label from --shots-split of the same data.
    #[arg(long)]
    shots: Option<usize>,
    /// Split the few-shot examples are taken from.
    #[arg(long, default_value = "train")]
    shots_split: String,
    #[command(flatten)]
    calibration: CalibrateArgs,
    /// Output folder (default out/eval-<task>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Requests per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    board: BoardArgs,
}

#[derive(Args)]
struct TuneArgs {
    /// Task files to start from (comma-separated names or paths).
    #[arg(long, short, value_delimiter = ',', default_value = "sentiment")]
    task: Vec<String>,
    /// Labeled JSON lines with a `split` field (scripts/fetch-data makes them).
    #[arg(long)]
    data: PathBuf,
    /// K-shot sets to try besides each file's own examples (0 = zero-shot), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,4,8")]
    shots: Vec<usize>,
    /// Split the examples come from.
    #[arg(long, default_value = "train")]
    train_split: String,
    /// Split candidates are scored on.
    #[arg(long, default_value = "dev")]
    dev_split: String,
    /// Dev examples at most (an evenly spaced sample).
    #[arg(long, default_value_t = 200)]
    limit: usize,
    /// Where the winning task file goes (default tasks/<task>-tuned.toml, with --head
    /// tasks/<task>-head.toml and the head beside it as <stem>.head.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Requests per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    head: HeadArgs,
    #[command(flatten)]
    board: BoardArgs,
}

/// The learned head (`tune --head`).
#[derive(Args)]
struct HeadArgs {
    /// Train a logistic-regression head on the model's hidden states instead of choosing
    /// a template.
    #[arg(long)]
    head: bool,
    /// Training examples per label (the first ones of the train split).
    #[arg(long, default_value_t = 8)]
    per_class: usize,
    /// Feature prompt with one {text} (default: PromptEOL).
    #[arg(long, default_value = edgeact::classify::head::PROMPT_EOL)]
    feature_prompt: String,
    /// Poolings to try: last, mean, last+mean (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "last,mean,last+mean")]
    pooling: Vec<String>,
    /// L2 strengths to try (comma-separated; 1 = scikit-learn's C = 1).
    #[arg(long, value_delimiter = ',', default_value = "0.1,1,10")]
    alpha: Vec<f64>,
    /// Most text tokens kept in the feature prompt.
    #[arg(long, default_value_t = 96)]
    max_text_tokens: usize,
    /// Tokens per feature decode (memory: about 2 MiB each for Gemma 3's logits).
    #[arg(long, default_value_t = 64)]
    feature_batch: u32,
    /// Do not read or write the feature cache ($EDGEACT_CACHE/features).
    #[arg(long)]
    no_feature_cache: bool,
}

impl HeadArgs {
    fn poolings(&self) -> Result<Vec<edgeact::classify::head::Pooling>, AppError> {
        self.pooling
            .iter()
            .map(|p| {
                edgeact::classify::head::Pooling::parse(p.trim()).ok_or_else(|| {
                    invalid(
                        std::path::Path::new("command line"),
                        "pooling",
                        format!("`{p}` is not last, mean or last+mean"),
                    )
                })
            })
            .collect()
    }

    fn features(&self, engine: &config::EngineConfig) -> edgeact::model::FeatureParams {
        edgeact::model::FeatureParams {
            n_batch_tokens: self.feature_batch,
            ..edgeact::model::FeatureParams::for_config(engine)
        }
    }
}

#[derive(Args)]
struct BenchArgs {
    /// Task to measure.
    #[arg(long, short, default_value = "sentiment")]
    task: String,
    /// JSON-lines requests (a `label` field, when present, gives accuracy too).
    #[arg(long, default_value = "tests/data/sentiment-obvious.jsonl")]
    data: PathBuf,
    /// At most this many requests.
    #[arg(long, default_value_t = 40)]
    limit: usize,
    /// Requests per micro-batch on the batched path.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Run the (slow) naive reference path on only the first N requests; its speed-up
    /// column stays the baseline. Default: all of them.
    #[arg(long)]
    naive_limit: Option<usize>,
    #[command(flatten)]
    board: BoardArgs,
}

#[derive(Args)]
struct BoardArgs {
    /// Board profile: a name from board-configs/ (or $EDGEACT_BOARD_DIR,
    /// /etc/edgeact/board-configs) or a path to a .toml file.
    #[arg(long, env = "EDGEACT_BOARD", default_value = "x86-dev")]
    board: String,
    /// GGUF model file (overrides the board's model_path; its checksum is then not enforced
    /// unless --model-sha256 is given).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Expected sha256 of the model file.
    #[arg(long)]
    model_sha256: Option<String>,
    /// Threads for decoding and prompt processing.
    #[arg(long)]
    threads: Option<u32>,
    /// Memory budget in MiB for weights, KV cache and buffers.
    #[arg(long)]
    memory_budget_mib: Option<u64>,
    /// Context size in tokens.
    #[arg(long)]
    n_ctx: Option<u32>,
    /// Shrink n_ctx to fit the budget instead of refusing.
    #[arg(long)]
    allow_ctx_shrink: bool,
    /// KV cache element type.
    #[arg(long, value_parser = ["f16", "q8_0"])]
    kv_cache_type: Option<String>,
    /// Layers to offload to a GPU (builds with the vulkan or cuda feature).
    #[arg(long)]
    gpu_layers: Option<u32>,
    /// Do not load or save decoded task prefixes (default folder: the board's
    /// prefix_cache_dir, else $EDGEACT_CACHE/prefix or ~/.cache/edgeact/prefix).
    #[arg(long)]
    no_prefix_cache: bool,
}

impl BoardArgs {
    fn overrides(&self) -> BoardFile {
        BoardFile {
            model_path: self.model.clone(),
            // A model given on the command line is checked only against a sha given with it.
            model_sha256: self.model_sha256.clone(),
            threads: self.threads,
            threads_batch: self.threads,
            memory_budget_mib: self.memory_budget_mib,
            n_ctx: self.n_ctx,
            allow_ctx_shrink: self.allow_ctx_shrink.then_some(true),
            kv_cache_type: self.kv_cache_type.as_deref().map(|s| match s {
                "q8_0" => KvCacheType::Q8_0,
                _ => KvCacheType::F16,
            }),
            gpu_layers: self.gpu_layers,
            ..Default::default()
        }
    }

    fn engine_config(&self) -> Result<config::EngineConfig, AppError> {
        let mut cfg = config::load_board(&self.board, &config::board_dirs(), &self.overrides())?;
        if self.model.is_some() && self.model_sha256.is_none() {
            cfg.model_sha256 = None;
        }
        if self.no_prefix_cache {
            cfg.prefix_cache_dir = None;
        } else if cfg.prefix_cache_dir.is_none() {
            let cache = std::env::var_os("EDGEACT_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/edgeact"))
                });
            cfg.prefix_cache_dir = cache.map(|c| c.join("prefix"));
        }
        Ok(cfg)
    }
}

/// The calibration switch, over the task file's.
#[derive(Args)]
struct CalibrateArgs {
    /// Apply contextual calibration (overrides the task file).
    #[arg(long, conflicts_with = "no_calibrate")]
    calibrate: bool,
    /// Do not apply contextual calibration (overrides the task file).
    #[arg(long)]
    no_calibrate: bool,
}

impl CalibrateArgs {
    /// None: as the task file says.
    fn choice(&self) -> Option<bool> {
        match (self.calibrate, self.no_calibrate) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

#[derive(Args)]
struct ClassifyArgs {
    /// Texts to classify; without any, reads --input or JSON lines from stdin.
    texts: Vec<String>,
    /// Task: a name from tasks/ (or $EDGEACT_TASK_DIR, /etc/edgeact/tasks) or a path.
    #[arg(long, short, default_value = "sentiment")]
    task: String,
    /// JSON-lines file of requests ({"id": .., "text": .., other fields}); `-` for stdin.
    #[arg(long, short)]
    input: Option<PathBuf>,
    #[command(flatten)]
    calibration: CalibrateArgs,
    /// Abstain when the top probability is below this (overrides the task file).
    #[arg(long)]
    min_confidence: Option<f64>,
    /// Abstain when top minus second probability is below this (overrides the task file).
    #[arg(long)]
    min_margin: Option<f64>,
    /// Score every label from scratch (no prefix reuse, no batching): a reference for checks.
    #[arg(long)]
    naive: bool,
    /// Requests scored together in one micro-batch (JSON-lines input).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Pretty-print each result.
    #[arg(long)]
    pretty: bool,
    /// How to classify: prompt (label scores), head (the task's learned head), both
    /// (combined). Default: the task file's `[head] method`, else prompt.
    #[arg(long, value_parser = ["prompt", "head", "both"])]
    method: Option<String>,
    #[command(flatten)]
    board: BoardArgs,
}

fn init_logging(verbose: u8) {
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

fn run(cli: Cli) -> Result<(), AppError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Plan(b) => cmd::plan(&b.engine_config()?, &mut out),
        Command::OutboxStress(a) => Ok(edgeact::serve::outbox::stress_writer(
            &a.dir, a.max_puts, &mut out,
        )?),
        Command::Serve(a) => {
            let cfg = a.config()?;
            if cfg.broker.is_none() {
                let stdin = std::io::stdin();
                return Ok(serve::run_stdio(cfg, stdin.lock(), &mut out)?);
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
        Command::Eval(a) => {
            let mut tasks = vec![Task::find(&a.task, &config::task_dirs())?];
            for t in &a.templates {
                tasks.push(Task::find(t, &config::task_dirs())?);
            }
            let cfg = edgeact::eval::EvalConfig {
                engine: a.board.engine_config()?,
                out: a
                    .out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("out/eval-{}", tasks[0].name))),
                tasks,
                data: a.data,
                split: a.split,
                limit: a.limit,
                shots: a.shots,
                shots_split: a.shots_split,
                calibrate: a.calibration.choice(),
                batch_size: a.batch_size,
            };
            edgeact::eval::eval(cfg, &mut out)
        }
        Command::Tune(a) if a.head.head => {
            let task = Task::find(&a.task[0], &config::task_dirs())?;
            let engine = a.board.engine_config()?;
            let cfg = edgeact::eval::learn::TuneHeadConfig {
                out: a
                    .out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("tasks/{}-head.toml", task.name))),
                task,
                data: a.data,
                train_split: a.train_split,
                dev_split: a.dev_split,
                per_class: a.head.per_class,
                limit: a.limit,
                prompt: a.head.feature_prompt.clone(),
                poolings: a.head.poolings()?,
                alphas: a.head.alpha.clone(),
                max_text_tokens: a.head.max_text_tokens,
                features: a.head.features(&engine),
                cache_dir: if a.head.no_feature_cache {
                    None
                } else {
                    edgeact::eval::learn::default_cache_dir()
                },
                engine,
            };
            edgeact::eval::learn::tune_head(cfg, &mut out)
        }
        Command::Tune(a) => {
            let mut templates = Vec::new();
            for t in &a.task {
                templates.push(Task::find(t, &config::task_dirs())?);
            }
            let cfg = edgeact::eval::tune::TuneConfig {
                engine: a.board.engine_config()?,
                out: a.out.clone().unwrap_or_else(|| {
                    PathBuf::from(format!("tasks/{}-tuned.toml", templates[0].name))
                }),
                templates,
                shots: a.shots,
                data: a.data,
                train_split: a.train_split,
                dev_split: a.dev_split,
                limit: a.limit,
                batch_size: a.batch_size,
            };
            edgeact::eval::tune::tune(cfg, &mut out)
        }
        Command::BenchAccuracy(a) => {
            let engine = a.board.engine_config()?;
            let bad = |key: &str, v: &str| {
                invalid(
                    std::path::Path::new("command line"),
                    key,
                    format!("`{v}` is not one of the choices (see --help)"),
                )
            };
            let pooling = edgeact::classify::head::Pooling::parse(&a.pooling)
                .ok_or_else(|| bad("pooling", &a.pooling))?;
            let mut rows = Vec::new();
            for r in &a.rows {
                rows.push(
                    edgeact::eval::figures::Row::parse(r.trim()).ok_or_else(|| bad("rows", r))?,
                );
            }
            let cfg = edgeact::eval::figures::FiguresConfig {
                task: Task::find(&a.task, &config::task_dirs())?,
                data: a.data,
                train_split: "train".into(),
                dev_split: "dev".into(),
                test_split: "test".into(),
                limit: a.limit,
                dev_limit: a.dev_limit,
                shots: a.shots,
                head_k: a.head_k,
                feature: edgeact::eval::figures::default_feature(pooling, a.max_text_tokens),
                alpha: a.alpha,
                features: edgeact::model::FeatureParams {
                    n_batch_tokens: a.feature_batch,
                    ..edgeact::model::FeatureParams::for_config(&engine)
                },
                cache_dir: if a.no_feature_cache {
                    None
                } else {
                    edgeact::eval::learn::default_cache_dir()
                },
                batch_size: a.batch_size,
                rows,
                engine,
            };
            edgeact::eval::figures::bench_accuracy(cfg, &mut out)
        }
        Command::Bench(a) => cmd::bench(
            cmd::BenchConfig {
                engine: a.board.engine_config()?,
                task: Task::find(&a.task, &config::task_dirs())?,
                data: a.data,
                limit: a.limit,
                batch_size: a.batch_size,
                naive_limit: a.naive_limit.unwrap_or(a.limit),
            },
            &mut out,
        ),
        Command::React(a) => Ok(edgeact::react::app::react(a.config()?, &mut out)?),
        Command::Qa(a) => Ok(edgeact::react::app::qa(a.config()?, &mut out)?),
        Command::ReactEval(a) => {
            let mut spec = ReactSpec::find(&a.task, &config::task_dirs())
                .map_err(edgeact::react::ReactError::from)?;
            if let Some(s) = a.seed {
                spec.seed = s;
            }
            if let Some(t) = a.timeout_ms {
                spec.timeout_ms = t;
            }
            let cfg = edgeact::react::app::EvalConfig {
                engine: a.board.engine_config()?,
                out_dir: a
                    .out
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("out/react-eval-{}", spec.name))),
                spec,
                scenarios: a.scenarios,
                limit: a.limit,
                baseline: a.baseline,
                qa: a.qa,
                ks: a.k,
                retrieval_only: a.retrieval_only,
            };
            Ok(edgeact::react::app::eval(cfg, &mut out)?)
        }
        Command::Rank(a) => {
            let task = Task::find(&a.task, &config::task_dirs())?;
            let rank = rank_section(&task)?;
            let profile =
                std::fs::read_to_string(&a.profile).map_err(|source| AppError::Input {
                    what: a.profile.display().to_string(),
                    source,
                })?;
            let cfg = edgeact::rank::RankRunConfig {
                engine: a.board.engine_config()?,
                task,
                rank,
                profile,
                items: a.items,
                top_k: a.top_k,
                min_score: a.min_score,
                calibrate: a.calibration.choice(),
                batch_size: a.batch_size,
            };
            edgeact::rank::run(cfg, &mut out)
        }
        Command::RankEval(a) => {
            let task = Task::find(&a.task, &config::task_dirs())?;
            let rank = rank_section(&task)?;
            let cfg = edgeact::rank::eval::RankEvalConfig {
                engine: a.board.engine_config()?,
                task,
                rank,
                data: a.data,
                families: a.families,
                split: a.split,
                relevant: a.relevant,
                candidates: a.candidates,
                k: a.k,
                seed: a.seed,
                random_runs: a.random_runs,
                calibrate: a.calibration.choice(),
                batch_size: a.batch_size,
                out: a.out,
            };
            edgeact::rank::eval::run(cfg, &mut out)
        }
        Command::Monitor(a) => {
            let task = Task::find(&a.task, &config::task_dirs())?;
            let Some(monitor) =
                edgeact::monitor::MonitorConfig::from_task(&task).map_err(monitor_config_error)?
            else {
                return Err(invalid(
                    &task.path,
                    "monitor",
                    "the task has no [monitor] section".into(),
                ));
            };
            let engine = match a.label_field {
                Some(_) => None,
                None => Some(a.board.engine_config()?),
            };
            let cfg = edgeact::monitor::replay::ReplayConfig {
                task,
                monitor,
                data: a.data,
                label_field: a.label_field,
                engine,
                state: a.state,
                batch_size: a.batch_size,
            };
            let s = edgeact::monitor::replay::replay(cfg, &mut out)?;
            eprintln!(
                "edgeact monitor: {} messages ({} rejected), {} incident messages, {} incidents, {} open at the end",
                s.messages, s.rejected, s.events, s.incidents, s.open_at_end
            );
            Ok(())
        }
        Command::Classify(a) => {
            let engine = a.board.engine_config()?;
            let task = Task::find(&a.task, &config::task_dirs())?;
            let inputs = match (&a.input, a.texts.is_empty()) {
                (Some(p), _) if p.as_os_str() == "-" => Inputs::Stdin,
                (Some(p), _) => Inputs::File(p.clone()),
                (None, false) => Inputs::Texts(a.texts.clone()),
                (None, true) if !std::io::stdin().is_terminal() => Inputs::Stdin,
                (None, true) => {
                    return Err(AppError::Input {
                        what: "texts".into(),
                        source: std::io::Error::other(
                            "give texts as arguments, --input FILE, or JSON lines on stdin",
                        ),
                    })
                }
            };
            let abstain =
                (a.min_confidence.is_some() || a.min_margin.is_some()).then(|| AbstainRule {
                    min_confidence: a.min_confidence.unwrap_or(task.abstain.min_confidence),
                    min_margin: a.min_margin.unwrap_or(task.abstain.min_margin),
                });
            let cfg = ClassifyConfig {
                engine,
                task,
                inputs,
                calibrate: a.calibration.choice(),
                abstain,
                path: if a.naive {
                    ScorePath::Naive
                } else {
                    ScorePath::Fast
                },
                batch_size: a.batch_size,
                pretty: a.pretty,
                method: a.method.as_deref().and_then(edgeact::spec::Method::parse),
            };
            cmd::classify(cfg, &mut out)
        }
    }
}

/// A task to serve, by name or path: a ReAct task file (`type = "react"`), a ranking task
/// (with `[rank]`) or a classification task.
fn served_task(name: &str) -> Result<ServedTask, AppError> {
    let dirs = config::task_dirs();
    let path = edgeact::spec::find_task_file(name, &dirs);
    let src = path.and_then(|p| std::fs::read_to_string(p).ok());
    if src
        .as_deref()
        .is_some_and(edgeact::spec::react::is_react_file)
    {
        let spec = ReactSpec::find(name, &dirs).map_err(edgeact::react::ReactError::from)?;
        return Ok(ServedTask::React(spec));
    }
    let task = Task::find(name, &dirs)?;
    Ok(match edgeact::rank::RankConfig::from_task(&task) {
        Ok(Some(r)) => ServedTask::Rank(task, r),
        Ok(None) => ServedTask::Classify(task),
        Err(edgeact::rank::RankError::Invalid { path, key, reason }) => {
            return Err(invalid(&path, &key, reason))
        }
        Err(edgeact::rank::RankError::Setup(s)) => return Err(AppError::Setup(s)),
    })
}

/// The task's validated [rank] section; a task without one is a usage error.
fn rank_section(task: &Task) -> Result<edgeact::rank::RankConfig, AppError> {
    match edgeact::rank::RankConfig::from_task(task) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(invalid(
            &task.path,
            "rank",
            "the task has no [rank] section".into(),
        )),
        Err(edgeact::rank::RankError::Invalid { path, key, reason }) => {
            Err(invalid(&path, &key, reason))
        }
        Err(edgeact::rank::RankError::Setup(s)) => Err(AppError::Setup(s)),
    }
}

fn monitor_config_error(e: edgeact::monitor::MonitorError) -> AppError {
    match e {
        edgeact::monitor::MonitorError::Invalid { path, key, reason } => {
            invalid(&path, &key, reason)
        }
        edgeact::monitor::MonitorError::Io { path, source } => AppError::Input {
            what: path.display().to_string(),
            source,
        },
    }
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

/// Exit codes: 0 ok, 1 internal or I/O, 2 usage or configuration, 3 model (missing,
/// checksum, not GGUF, budget, load), 4 some inputs rejected (the rest were classified).
fn exit_code(e: &AppError) -> u8 {
    match e {
        AppError::Config(_) | AppError::Task(_) | AppError::Setup(_) => 2,
        AppError::Engine(EngineError::Decode(_)) => 1,
        AppError::Engine(_) => 3,
        AppError::SomeRecordsFailed { .. } => 4,
        AppError::React(e) => match e {
            ReactError::Engine(EngineError::Decode(_) | EngineError::Grammar(_)) => 1,
            ReactError::Engine(_) => 3,
            ReactError::Output(_) => 1,
            ReactError::Spec(_)
            | ReactError::Kb(_)
            | ReactError::Session(_)
            | ReactError::Scenario(_)
            | ReactError::Usage(_) => 2,
        },
        AppError::Mqtt(_) | AppError::Eval(_) => 2,
        AppError::Input { .. } | AppError::Output(_) | AppError::Outbox(_) => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeact: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}
