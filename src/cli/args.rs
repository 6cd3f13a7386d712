//! The command line as clap parses it: raw arguments, nothing validated or defaulted
//! beyond what clap does (the defaults themselves are [`super::defaults`]). Turning them
//! into configs is [`super::resolve`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::defaults as D;
/// Offline language-model agent for small boards: classifies text with a local GGUF model
/// under a memory budget, and explains every result.
#[derive(Parser)]
#[command(name = "edgeact", version, about, long_about = None)]
pub struct Cli {
    /// Log more (-v: info, -vv: debug, -vvv: llama.cpp's own log too). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Classify texts (arguments), a JSON-lines file (--input) or JSON lines on stdin;
    /// prints one JSON result per input.
    Classify(ClassifyArgs),
    /// Check the model file and print the memory estimate for a board, loading nothing.
    Plan(PlanArgs),
    /// Write the board's model (or --model) with another weight type, e.g. q4_0, which
    /// llama.cpp repacks at load for the Arm dot-product and AVX2 kernels; prints the new
    /// file's size and sha256 for the board config. From an already quantized model this
    /// requantizes, which costs accuracy: measure it with `eval` before you switch.
    Quantize(QuantizeArgs),
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
    /// Learn from corrected labels: add a JSON-lines file of {"task", "text", "label"} to the
    /// task's feedback (kept in the state folder, where `serve` keeps its own), retrain the
    /// tuned head, stack or TF-IDF model with it, and replace it only if its dev macro-F1 is
    /// not lower (old and new are printed).
    Learn(LearnArgs),
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
    /// Learn the hybrid ranker's stage weights (lexical, char, model) from rank feedback
    /// events and write them into the task file's [rank.fusion].
    ///
    /// Each line of --feedback is one ranking a user saw: {"task"?, "query", "items":
    /// [{"id", "text"} or {"id", "title", "description"}, ...], "clicked": [ids],
    /// "ignored"?: [ids]} (without "ignored", every item not clicked counts as ignored).
    /// The weights are fitted by pairwise logistic regression (clicked above ignored) from
    /// the task's current weights, and written only when they rank the --dev events (or,
    /// without --dev, the feedback events) at least as well, by NDCG@k; both figures are
    /// printed. The file is replaced atomically; its other lines are kept.
    RankLearn(RankLearnArgs),
}

#[derive(Args)]
pub struct ReactArgs {
    /// Questions (each answered in turn).
    pub questions: Vec<String>,
    /// ReAct task: a name from tasks/ (or $EDGEACT_TASK_DIR, /etc/edgeact/tasks) or a path.
    #[arg(long, short, default_value = D::REACT_TASK)]
    pub task: String,
    /// Session id: earlier turns of this session go into the prompt (within the task's
    /// history_max_tokens) and this turn is recorded.
    #[arg(long)]
    pub session: Option<String>,
    /// Folder of session files (default: $EDGEACT_STATE_DIR/sessions or ./state/sessions).
    #[arg(long)]
    pub session_dir: Option<PathBuf>,
    /// Generate steps without the grammar and parse them with regexes (the baseline).
    #[arg(long)]
    pub no_grammar: bool,
    /// Generate each step (and the qa answer) under the grammar, for larger models; the
    /// default scores the actions and selects the answer from the retrieved passage.
    #[arg(long)]
    pub generate: bool,
    /// Seed (overrides the task file's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Wall-clock limit per question in milliseconds (overrides the task file's).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Pretty-print the trace.
    #[arg(long)]
    pub pretty: bool,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct ReactEvalArgs {
    /// ReAct task with a knowledge base.
    #[arg(long, short, default_value = D::REACT_TASK)]
    pub task: String,
    /// Scenario file (JSON lines: id, question, expect_tool, expect_passage?, expect_fact?).
    #[arg(long, default_value = D::react_eval::SCENARIOS)]
    pub scenarios: PathBuf,
    /// At most this many scenarios (an evenly spaced sample).
    #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
    pub limit: usize,
    /// Also run the loop without the grammar (regex parsing, as peers do).
    #[arg(long)]
    pub baseline: bool,
    /// Also run the qa mode (retrieve, then one cited answer).
    #[arg(long)]
    pub qa: bool,
    /// Only the qa mode (no loop): quick on a dev set.
    #[arg(long)]
    pub qa_only: bool,
    /// Latency benchmark: the scored policy on the kb_search scenarios only, p50/p99
    /// seconds and generated tokens per answer.
    #[arg(long)]
    pub bench: bool,
    /// Retrieval hit rate at these k (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = D::react_eval::HIT_RATE_K)]
    pub k: Vec<usize>,
    /// Only the retrieval hit rates (BM25 on each question; no model).
    #[arg(long)]
    pub retrieval_only: bool,
    /// Output folder (default out/react-eval-<task>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed (overrides the task file's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Wall-clock limit per question in milliseconds (overrides the task file's).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct BenchAccuracyArgs {
    /// Task giving the template and labels (its own examples are not used).
    #[arg(long, short)]
    pub task: String,
    /// Labeled JSON lines {"text", "label", "split"?}; a row without `split` goes to train, dev or
    /// test (70/15/15 %) by a hash of its fields, the same in every command.
    #[arg(long)]
    pub data: PathBuf,
    /// Test examples at most (an evenly spaced sample).
    #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
    pub limit: usize,
    /// Dev examples at most, for the K-shot template's calibration choice.
    #[arg(long, default_value_t = D::bench_accuracy::DEV_LIMIT)]
    pub dev_limit: usize,
    /// K per label of the template row and of the K-shot baseline.
    #[arg(long, default_value_t = D::bench_accuracy::SHOTS)]
    pub shots: usize,
    /// K per label of the head rows (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = D::bench_accuracy::HEAD_K)]
    pub head_k: Vec<usize>,
    /// Rows to run: zero-shot, tuned, head, tfidf (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = D::bench_accuracy::ROWS
    )]
    pub rows: Vec<String>,
    /// Pooling of the head rows: last, mean or last+mean.
    #[arg(long, default_value = D::bench_accuracy::POOLING)]
    pub pooling: String,
    /// L2 strength of the head rows.
    #[arg(long, default_value_t = D::bench_accuracy::ALPHA)]
    pub alpha: f64,
    /// Most text tokens kept in the feature prompt.
    #[arg(long, default_value_t = D::tune::MAX_TEXT_TOKENS)]
    pub max_text_tokens: usize,
    /// Tokens per feature decode.
    #[arg(long, default_value_t = D::tune::FEATURE_BATCH)]
    pub feature_batch: u32,
    /// Do not read or write the feature cache ($EDGEACT_CACHE/features).
    #[arg(long)]
    pub no_feature_cache: bool,
    /// Requests per micro-batch of the prompt rows.
    #[arg(long, default_value_t = D::BATCH_SIZE)]
    pub batch_size: usize,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct RankArgs {
    /// Task with a [rank] section.
    #[arg(long, short, default_value = D::RANK_TASK)]
    pub task: String,
    /// Text file with the user profile (interests, history).
    #[arg(long)]
    pub profile: PathBuf,
    /// JSON lines of candidate items.
    #[arg(long)]
    pub items: PathBuf,
    /// Items returned at most (overrides the task file).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Leave out items scoring below this (overrides the task file).
    #[arg(long)]
    pub min_score: Option<f64>,
    #[command(flatten)]
    pub calibration: CalibrateArgs,
    /// Items scored together in one micro-batch.
    #[arg(long, default_value_t = D::BATCH_SIZE)]
    pub batch_size: usize,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct RankEvalArgs {
    /// Task with a [rank] section.
    #[arg(long, short, default_value = D::RANK_TASK)]
    pub task: String,
    /// Labeled JSON lines {"text", "label", "split"?} (scripts/fetch-data: data/banking77.jsonl).
    #[arg(long, default_value = D::rank_eval::DATA)]
    pub data: PathBuf,
    /// Families of intents with their profiles.
    #[arg(long, default_value = D::rank_eval::FAMILIES)]
    pub families: PathBuf,
    /// Split the candidates come from (TF-IDF is fitted on the others).
    #[arg(long, default_value = D::rank_eval::SPLIT)]
    pub split: String,
    /// Relevant candidates per family.
    #[arg(long, default_value_t = D::rank_eval::RELEVANT)]
    pub relevant: usize,
    /// Candidates per family, relevant ones included.
    #[arg(long, default_value_t = D::rank_eval::CANDIDATES)]
    pub candidates: usize,
    /// NDCG cut-off.
    #[arg(long, default_value_t = D::rank_eval::K)]
    pub k: usize,
    #[arg(long, default_value_t = D::rank_eval::SEED)]
    pub seed: u64,
    /// Random orderings averaged for the random baseline.
    #[arg(long, default_value_t = D::rank_eval::RANDOM_RUNS)]
    pub random_runs: usize,
    /// Candidate draws per family; NDCG is averaged over them (more draws, less noise).
    #[arg(long, default_value_t = D::rank_eval::DRAWS)]
    pub draws: usize,
    /// Do not load the model: score only the first stage (TF-IDF, lexical, char) and their
    /// fusion without the model's P(yes); fast, for choosing the first stage on dev.
    #[arg(long)]
    pub no_model: bool,
    /// Also write every draw as a feedback event (the relevant candidates clicked) to this
    /// JSON-lines file: simulated feedback for `edgeact rank-learn`.
    #[arg(long)]
    pub feedback_out: Option<PathBuf>,
    #[command(flatten)]
    pub calibration: CalibrateArgs,
    #[arg(long, default_value_t = D::BATCH_SIZE)]
    pub batch_size: usize,
    /// Folder for metrics.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct RankLearnArgs {
    /// Task with a [rank] section (its file receives the weights).
    #[arg(long, short, default_value = D::RANK_TASK)]
    pub task: String,
    /// Feedback events to learn from (JSON lines; events for other tasks are skipped).
    #[arg(long)]
    pub feedback: PathBuf,
    /// Held-out feedback events: the learned weights are kept only if they rank these at
    /// least as well as the current weights.
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// Unlabelled texts (JSON lines with "text") the first stage's TF-IDF and expansion are
    /// fitted on: texts like the items ranked.
    #[arg(long, default_value = D::rank_eval::DATA)]
    pub corpus: PathBuf,
    /// NDCG cut-off.
    #[arg(long, default_value_t = D::rank_eval::K)]
    pub k: usize,
    /// Write the weights to this task file instead of the task's own.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print what would be learned; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not load the model: its P(yes) counts 0 and its weight stays as it is.
    #[arg(long)]
    pub no_model: bool,
    #[command(flatten)]
    pub calibration: CalibrateArgs,
    #[arg(long, default_value_t = D::BATCH_SIZE)]
    pub batch_size: usize,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub board: BoardArgs,
    /// Weight type to write: q4_0, iq4_nl, q4_k_s, q4_k_m, q5_k_m or q8_0.
    #[arg(long = "type", value_name = "TYPE")]
    pub ty: String,
    /// Output file (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct MonitorArgs {
    /// Task with a [monitor] section.
    #[arg(long, short, default_value = D::MONITOR_TASK)]
    pub task: String,
    /// JSON lines with `text`, the event time (the section's ts_field, seconds) and key fields.
    #[arg(long)]
    pub data: PathBuf,
    /// Take each message's label from this field instead of classifying it (no model loaded).
    #[arg(long)]
    pub label_field: Option<String>,
    /// Load monitor state from this file first and save it at the end.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Requests per micro-batch when classifying.
    #[arg(long, default_value_t = D::BATCH_SIZE)]
    pub batch_size: usize,
    #[command(flatten)]
    pub board: BoardArgs,
}

/// Every `serve` setting, from the command line or from the `--config` file (same key
/// names, snake_case); the command line wins.
#[derive(Args, serde::Deserialize, Default, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSettings {
    /// Broker URL, mqtt://host:port or mqtts://host:port. Without it: JSON lines on stdin.
    #[arg(long)]
    pub broker: Option<String>,
    /// Device id (default: the host name); names the topic prefix and the client id.
    #[arg(long)]
    pub device_id: Option<String>,
    /// Tasks to serve (repeat the flag); default: sentiment.
    #[arg(long = "task", short = 't')]
    #[serde(rename = "tasks")]
    pub task: Vec<String>,
    /// Topic prefix (default edgeact/<device_id>).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Also take requests from the fleet topic through the shared subscription
    /// $share/<group>/<fleet_prefix>/<task>/request.
    #[arg(long)]
    pub share_group: Option<String>,
    /// Fleet-wide topic prefix for --share-group (default edgeact/fleet).
    #[arg(long)]
    pub fleet_prefix: Option<String>,
    /// Context topic whose latest value templates can use as {context.NAME}: NAME=TOPIC (repeat).
    #[arg(long = "context")]
    #[serde(rename = "context_topics")]
    pub context: Vec<String>,
    /// Requests waiting for the model at most; beyond, requests get an `overloaded` error.
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Classifications scored together at most when several wait for the same task (the
    /// micro-batch follows the queue: a lone request runs alone). Default: as many as one
    /// decode of the board's context holds for the task's labels (max_logit_rows when every
    /// label is one token, half of it otherwise; `edgeact plan` shows both).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Folder of the durable outbox (default: $EDGEACT_STATE_DIR or ./state).
    #[arg(long)]
    pub outbox_dir: Option<PathBuf>,
    /// When the outbox forces writes to disk: always, never, or a number of milliseconds.
    #[arg(long)]
    pub outbox_fsync: Option<String>,
    /// Outbox cap in MiB; beyond it the oldest low-priority messages are dropped (counted).
    #[arg(long)]
    pub outbox_max_mib: Option<u64>,
    /// Outbox cap on message age in hours.
    #[arg(long)]
    pub outbox_max_age_h: Option<u64>,
    /// Seconds between <prefix>/stats messages.
    #[arg(long)]
    pub stats_interval_s: Option<u64>,
    /// Publish Home Assistant device discovery (retained).
    #[arg(long)]
    pub ha_discovery: Option<bool>,
    /// Largest request payload accepted, in bytes.
    #[arg(long)]
    pub max_request_bytes: Option<usize>,
    /// Largest MQTT packet, both ways, in bytes (default 1 MiB): the broker drops bigger
    /// messages for this client; results over it become error records.
    #[arg(long)]
    pub max_packet_bytes: Option<usize>,
    /// ReAct sessions kept at most (least recently used removed first).
    #[arg(long)]
    pub session_max_count: Option<usize>,
    /// Largest ReAct session file in KiB (oldest turns dropped first).
    #[arg(long)]
    pub session_max_kib: Option<usize>,
    /// Hours a ReAct session may stay unused before it is forgotten.
    #[arg(long)]
    pub session_max_age_h: Option<u64>,
    /// CA certificate (PEM) for mqtts://.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mqtts:// with client authentication.
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM) for the client certificate.
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// MQTT user name.
    #[arg(long)]
    pub username: Option<String>,
    /// File whose first line is the MQTT password (never give a password on the command
    /// line); without it, the EDGEACT_MQTT_PASSWORD environment variable is used if set.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// MQTT client id (default edgeact-<device_id>).
    #[arg(long)]
    pub client_id: Option<String>,
    /// MQTT keep-alive in seconds (at least 1).
    #[arg(long)]
    pub keep_alive_s: Option<u64>,
    /// Seconds shutdown waits for PUBACKs before leaving the rest in the outbox.
    #[arg(long)]
    pub drain_timeout_s: Option<u64>,
    /// New corrections on <prefix>/feedback that start a task's retrain (default 20).
    #[arg(long)]
    pub retrain_after: Option<usize>,
    /// Seconds from the first correction not yet learned to its retrain at the latest
    /// (default 900).
    #[arg(long)]
    pub retrain_interval_s: Option<u64>,
    /// Most memory a retrain may use besides the model, in MiB (default 256; never more
    /// than the memory budget leaves beside the model); a larger one is refused with a log
    /// line.
    #[arg(long)]
    pub learn_max_mib: Option<u64>,
    /// Personal data redacted from traces, error records and logs before they leave the
    /// device: email, phone, card (Luhn-checked), comma-separated; `none` for nothing.
    /// Default: all three.
    #[arg(long, value_delimiter = ',')]
    pub redact: Vec<String>,
    /// Extra regex whose matches are redacted too (repeat the flag).
    #[arg(long = "redact-pattern")]
    #[serde(rename = "redact_patterns")]
    pub redact_pattern: Vec<String>,
}

#[derive(Args)]
pub struct ServeArgs {
    /// A TOML file with any of the settings below (same names); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: ServeSettings,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Task to evaluate.
    #[arg(long, short, default_value = D::TASK)]
    pub task: String,
    /// Labeled JSON lines {"text", "label", "split"?}; a row without `split` goes to train, dev or
    /// test (70/15/15 %) by a hash of its fields, the same in every command.
    #[arg(long)]
    pub data: PathBuf,
    /// Only examples of this split (train, dev, test).
    #[arg(long)]
    pub split: Option<String>,
    /// At most this many examples.
    #[arg(long, default_value_t = usize::MAX, hide_default_value = true)]
    pub limit: usize,
    /// Other task files to compare on the same data (comma-separated); the best by macro-F1
    /// gets the report.
    #[arg(long, value_delimiter = ',')]
    pub templates: Vec<String>,
    /// Replace few-shot examples with K per label from --shots-split of the same data.
    #[arg(long)]
    pub shots: Option<usize>,
    /// Split the few-shot examples are taken from.
    #[arg(long, default_value = D::tune::TRAIN_SPLIT)]
    pub shots_split: String,
    #[command(flatten)]
    pub calibration: CalibrateArgs,
    /// Output folder (default out/eval-<task>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Requests per micro-batch.
    #[arg(long, default_value_t = D::BATCH_SIZE)]
    pub batch_size: usize,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct TuneArgs {
    /// Task files to start from (comma-separated names or paths).
    #[arg(long, short, value_delimiter = ',', default_value = D::TASK)]
    pub task: Vec<String>,
    /// Labeled JSON lines {"text", "label", "split"?}; a row without `split` goes to train, dev or
    /// test (70/15/15 %) by a hash of its fields, the same in every command.
    #[arg(long)]
    pub data: PathBuf,
    /// K-shot sets to try besides each file's own examples (0 = zero-shot), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = D::tune::SHOTS)]
    pub shots: Vec<usize>,
    /// Split the examples come from.
    #[arg(long, default_value = D::tune::TRAIN_SPLIT)]
    pub train_split: String,
    /// Split candidates are scored on.
    #[arg(long, default_value = D::tune::DEV_SPLIT)]
    pub dev_split: String,
    /// Dev examples at most (an evenly spaced sample).
    #[arg(long, default_value_t = D::tune::DEV_LIMIT)]
    pub limit: usize,
    /// Where the winning task file goes (default tasks/<task>-tuned.toml, with --head
    /// tasks/<task>-head.toml and the head beside it as <stem>.head.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Requests per micro-batch.
    #[arg(long, default_value_t = D::BATCH_SIZE)]
    pub batch_size: usize,
    /// Methods to choose among on dev: prompt (templates x shots x calibration), tfidf,
    /// head, stack, encoder (stacks with the sentence encoder's embedding; needs
    /// `scripts/fetch-model --encoder`) (comma-separated). Default: prompt,tfidf,head,stack,
    /// and encoder when the encoder is fetched beside the model.
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Prompt candidates with retrieved demonstrations: each K of --shots nearest of each
    /// label per request, from a pool of --per-class examples per label, by these
    /// similarities: tfidf, encoder (comma-separated). Default: none (on dev they did not
    /// win and cost 6-19x the tokens per request; docs/accuracy.md).
    #[arg(long, value_delimiter = ',')]
    pub demos: Option<Vec<String>>,
    #[command(flatten)]
    pub head: HeadArgs,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct LearnArgs {
    /// A task written by `edgeact tune` with a learned method (its [head] and [train]).
    #[arg(long, short)]
    pub task: String,
    /// Corrections to add: JSON lines of {"task", "text", "label", "id"?}. Without it the
    /// task is retrained from the corrections already kept.
    #[arg(long)]
    pub feedback: Option<PathBuf>,
    /// Folder of the feedback log (default: $EDGEACT_STATE_DIR, else ./state; serve's
    /// --outbox-dir).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Tokens per feature decode.
    #[arg(long, default_value_t = D::tune::FEATURE_BATCH)]
    pub feature_batch: u32,
    /// Do not read or write the feature cache ($EDGEACT_CACHE/features).
    #[arg(long)]
    pub no_feature_cache: bool,
    #[command(flatten)]
    pub board: BoardArgs,
}

/// The learned head (`tune --head`).
#[derive(Args)]
pub struct HeadArgs {
    /// Train a logistic-regression head on the model's hidden states instead of choosing
    /// a template.
    #[arg(long)]
    pub head: bool,
    /// Training examples per label for the learned methods: `all`, the whole train split, or
    /// a count K (the first K of each label in the train split; a label with fewer keeps what
    /// it has), e.g. 8 for a quick few-shot run.
    #[arg(long, default_value = D::tune::HEAD_PER_CLASS)]
    pub per_class: String,
    /// Feature prompt with one {text} (default: PromptEOL).
    #[arg(long, default_value = crate::classify::features::PROMPT_EOL)]
    pub feature_prompt: String,
    /// Layers whose outputs are the features: `final` (the final normed output) or
    /// comma-separated layer indices (0 = the first layer; several are concatenated).
    /// `tune` tries each of several `;`-separated choices on dev; `tune --head` the first.
    #[arg(long, default_value = D::tune::HEAD_LAYERS)]
    pub layers: String,
    /// Poolings to try: last, mean, last+mean (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = D::tune::HEAD_POOLINGS)]
    pub pooling: Vec<String>,
    /// L2 strengths to try (comma-separated; 1 = scikit-learn's C = 1).
    #[arg(long, value_delimiter = ',', default_value = D::tune::HEAD_ALPHAS)]
    pub alpha: Vec<f64>,
    /// Most text tokens kept in the feature prompt.
    #[arg(long, default_value_t = D::tune::MAX_TEXT_TOKENS)]
    pub max_text_tokens: usize,
    /// Tokens per feature decode (memory: about 2 MiB each for Gemma 3's logits).
    #[arg(long, default_value_t = D::tune::FEATURE_BATCH)]
    pub feature_batch: u32,
    /// Do not read or write the feature cache ($EDGEACT_CACHE/features).
    #[arg(long)]
    pub no_feature_cache: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Task to measure.
    #[arg(long, short, default_value = D::TASK)]
    pub task: String,
    /// JSON-lines requests (a `label` field, when present, gives accuracy too).
    #[arg(long, default_value = D::bench::DATA)]
    pub data: PathBuf,
    /// At most this many requests.
    #[arg(long, default_value_t = D::bench::LIMIT)]
    pub limit: usize,
    /// Queue depths of the batched path, comma-separated: that many requests waiting
    /// together are taken as one micro-batch, as `serve` takes what is queued (up to its
    /// --batch-size). One row each.
    #[arg(long, value_delimiter = ',', default_values_t = D::bench::DEPTHS)]
    pub batch_size: Vec<usize>,
    /// Run the (slow) naive reference path on only the first N requests; its speed-up
    /// column stays the baseline. Default: all of them.
    #[arg(long)]
    pub naive_limit: Option<usize>,
    /// Run the fast rows this many times, alternating (a loaded machine drifts); where
    /// the labels can be scored over the labels alone, each fast row runs both ways.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    #[command(flatten)]
    pub board: BoardArgs,
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub board: BoardArgs,
    /// A task the estimate is for (repeatable; names as `serve --task`): a cached prefix
    /// each, their LoRA adapter, a feature context per learned-head task.
    #[arg(long, short)]
    pub task: Vec<String>,
}

#[derive(Args)]
pub struct BoardArgs {
    /// Board profile: a name from board-configs/ (or $EDGEACT_BOARD_DIR,
    /// /etc/edgeact/board-configs) or a path to a .toml file.
    #[arg(long, env = "EDGEACT_BOARD", default_value = D::BOARD)]
    pub board: String,
    /// GGUF model file (overrides the board's model_path; its checksum is then not enforced
    /// unless --model-sha256 is given).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Expected sha256 of the model file.
    #[arg(long)]
    pub model_sha256: Option<String>,
    /// Threads for decoding and prompt processing.
    #[arg(long)]
    pub threads: Option<u32>,
    /// Memory budget in MiB for weights, KV cache and buffers.
    #[arg(long)]
    pub memory_budget_mib: Option<u64>,
    /// Context size in tokens.
    #[arg(long)]
    pub n_ctx: Option<u32>,
    /// Shrink n_ctx to fit the budget instead of refusing.
    #[arg(long)]
    pub allow_ctx_shrink: bool,
    /// KV cache element type.
    #[arg(long, value_parser = ["f16", "q8_0"])]
    pub kv_cache_type: Option<String>,
    /// Layers to offload to a GPU (builds with the vulkan or cuda feature).
    #[arg(long)]
    pub gpu_layers: Option<u32>,
    /// Do not load or save decoded task prefixes (default folder: the board's
    /// prefix_cache_dir, else $EDGEACT_CACHE/prefix or ~/.cache/edgeact/prefix).
    #[arg(long)]
    pub no_prefix_cache: bool,
}

/// The calibration switch, over the task file's.
#[derive(Args)]
pub struct CalibrateArgs {
    /// Apply contextual calibration (overrides the task file).
    #[arg(long, conflicts_with = "no_calibrate")]
    pub calibrate: bool,
    /// Do not apply contextual calibration (overrides the task file).
    #[arg(long)]
    pub no_calibrate: bool,
}

#[derive(Args)]
pub struct ClassifyArgs {
    /// Texts to classify; without any, reads --input or JSON lines from stdin.
    pub texts: Vec<String>,
    /// Task: a name from tasks/ (or $EDGEACT_TASK_DIR, /etc/edgeact/tasks) or a path.
    #[arg(long, short, default_value = D::TASK)]
    pub task: String,
    /// JSON-lines file of requests ({"id": .., "text": .., other fields}); `-` for stdin.
    #[arg(long, short)]
    pub input: Option<PathBuf>,
    #[command(flatten)]
    pub calibration: CalibrateArgs,
    /// Abstain when the top probability is below this (overrides the task file).
    #[arg(long)]
    pub min_confidence: Option<f64>,
    /// Abstain when top minus second probability is below this (overrides the task file).
    #[arg(long)]
    pub min_margin: Option<f64>,
    /// Score every label from scratch (no prefix reuse, no batching): a reference for checks.
    #[arg(long)]
    pub naive: bool,
    /// Requests scored together in one micro-batch (JSON-lines input).
    #[arg(long, default_value_t = D::BATCH_SIZE)]
    pub batch_size: usize,
    /// Pretty-print each result.
    #[arg(long)]
    pub pretty: bool,
    /// How to classify: prompt (label scores), head (the task's learned head), both
    /// (combined), stack or tfidf (the task's stack file). Default: the task file's
    /// `[head] method`, else prompt.
    #[arg(long, value_parser = ["prompt", "head", "both", "stack", "tfidf"])]
    pub method: Option<String>,
    /// What label log-probabilities are normalized over (overrides the task file's
    /// `logprob_over`): labels (where labels part, over the tokens that continue a label,
    /// scored from their output rows alone where the model allows; else vocab) or vocab
    /// (full logits: absolute log-likelihoods).
    #[arg(long, value_parser = ["labels", "vocab"])]
    pub logprob_over: Option<String>,
    #[command(flatten)]
    pub board: BoardArgs,
}
