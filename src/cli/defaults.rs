//! The product defaults: every value edgeact uses when neither a flag, a `serve --config`
//! file nor a board or task file gives one. One place, so the CLI, the daemon and a library
//! user building a config by hand agree. The `--help` texts quote some of them (`default
//! 64`): keep those in step (a test in `cli` checks the serve ones).

/// Board profile when neither `--board` nor `$EDGEACT_BOARD` names one.
pub const BOARD: &str = "x86-dev";
/// Classification task of `classify`, `eval`, `tune`, `bench` and `serve`.
pub const TASK: &str = "sentiment";
/// ReAct task of `react`, `qa` and `react-eval`.
pub const REACT_TASK: &str = "kiosk";
/// Ranking task of `rank` and `rank-eval`.
pub const RANK_TASK: &str = "rank-interest";
/// Monitor task of `monitor`.
pub const MONITOR_TASK: &str = "city-event";
/// Requests (or items) scored together in one micro-batch.
pub const BATCH_SIZE: usize = 8;
/// Folder of the daemon's state (outbox, monitor state) and of ReAct sessions when
/// `$EDGEACT_STATE_DIR` is not set.
pub const STATE_DIR: &str = "state";

/// `edgeact serve`.
pub mod serve {
    /// Requests waiting for the model at most; beyond, requests get `overloaded`.
    pub const QUEUE_CAPACITY: usize = 64;
    /// When the outbox forces writes to disk: `always`, `never` or milliseconds.
    pub const OUTBOX_FSYNC: &str = "always";
    /// Outbox cap in MiB.
    pub const OUTBOX_MAX_MIB: u64 = 64;
    /// Outbox cap on message age in hours (7 days).
    pub const OUTBOX_MAX_AGE_H: u64 = 24 * 7;
    /// Seconds between `<prefix>/stats` messages.
    pub const STATS_INTERVAL_S: u64 = 30;
    /// Largest request payload accepted, in bytes (256 KiB).
    pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
    /// MQTT keep-alive in seconds.
    pub const KEEP_ALIVE_S: u64 = 15;
    /// Seconds shutdown waits for PUBACKs.
    pub const DRAIN_TIMEOUT_S: u64 = 10;
    /// Fleet-wide topic prefix of `--share-group`.
    pub const FLEET_PREFIX: &str = "edgeact/fleet";
    /// Topic prefix before the device id: `edgeact/<device_id>`; also the client id's.
    pub const TOPIC_ROOT: &str = "edgeact";
    /// Device id when the host name is unreadable or empty.
    pub const DEVICE_ID: &str = "edgeact";
    /// Personal data redacted when `--redact` is not given.
    pub const REDACT: [&str; 3] = ["email", "phone", "card"];
    /// Largest MQTT packet, both ways (1 MiB): announced to the broker, which drops bigger
    /// messages for the daemon; results over it are replaced by an error record. Requests
    /// between `MAX_REQUEST_BYTES` and this get a `too_large` error record.
    pub const MAX_PACKET_BYTES: usize = 1024 * 1024;
    /// ReAct sessions kept at most; the least recently used go first.
    pub const SESSION_MAX_COUNT: usize = 1000;
    /// Largest session file in KiB; its oldest turns go first.
    pub const SESSION_MAX_KIB: usize = 64;
    /// Hours a session may stay unused before it is forgotten.
    pub const SESSION_MAX_AGE_H: u64 = 24;
    /// Shortest session id over MQTT: the id is the session's secret (16 random letters
    /// and digits are about 95 bits).
    pub const SESSION_MIN_ID_CHARS: usize = 16;
}

/// The session bounds: `serve`'s (ids are secrets, as clients share the device) and, for
/// `react` and `qa` on the command line (the local user's own dialogues), any id.
pub fn session_limits(serve: bool) -> crate::react::session::SessionLimits {
    crate::react::session::SessionLimits {
        max_sessions: serve::SESSION_MAX_COUNT,
        max_bytes: serve::SESSION_MAX_KIB * 1024,
        max_age: std::time::Duration::from_secs(serve::SESSION_MAX_AGE_H * 3600),
        min_id_chars: if serve {
            serve::SESSION_MIN_ID_CHARS
        } else {
            1
        },
    }
}

/// `edgeact eval`, `tune` and `tune --head`.
pub mod tune {
    /// Split the few-shot examples (and a head's training examples) come from.
    pub const TRAIN_SPLIT: &str = "train";
    /// Split candidates are scored on.
    pub const DEV_SPLIT: &str = "dev";
    /// K-shot sets tried besides each file's own examples.
    pub const SHOTS: &str = "0,4,8";
    /// Dev examples at most.
    pub const DEV_LIMIT: usize = 200;
    /// Training examples per label of the learned methods: `all`, the whole train split (a
    /// user's labels are what the learned methods are for; measured on disaster-events, 4 433
    /// train texts, every default method: 10 min on the 2-core development machine with no
    /// feature cache). A count such as 8 is the quick, few-shot run.
    pub const HEAD_PER_CLASS: &str = "all";
    /// Most pool examples per label of a retrieved-demonstration candidate (`--per-class
    /// all` would put the whole train split in the task file).
    pub const DEMO_POOL_MAX_PER_LABEL: usize = 32;
    /// Methods `tune` chooses among.
    pub const METHODS: &str = "prompt,tfidf,head,stack";
    /// Weights of the model-feature block against the TF-IDF blocks tried for the stack.
    pub const STACK_WEIGHTS: [f64; 2] = [1.0, 3.0];
    /// Most training texts for which the stack's prompt block is tried (each is one more
    /// prompt run at tune time; more labels cost more per run).
    pub const STACK_PROMPT_MAX_TRAIN: usize = 2000;
    /// L-BFGS iterations of the learned methods.
    pub const LEARN_MAX_ITERATIONS: usize = 150;
    /// Layer choices of the model features `tune` tries (see `tune --layers`): the final
    /// output and layer 12 (of Gemma 3 270M's 18), extracted in one pass up to the final
    /// output. Layer 12 beat the final output on 3 of 4 sets at 8 per label on dev
    /// (docs/accuracy.md, "Hidden states of several layers"); `tune --head` takes the first.
    pub const HEAD_LAYERS: &str = "final;12";
    /// Poolings tried for the head.
    pub const HEAD_POOLINGS: &str = "last,mean,last+mean";
    /// L2 strengths tried for the head.
    pub const HEAD_ALPHAS: &str = "0.1,1,10";
    /// Most text tokens kept in the feature prompt.
    pub const MAX_TEXT_TOKENS: usize = 96;
    /// Tokens per feature decode.
    pub const FEATURE_BATCH: u32 = 64;
}

/// Learning from feedback (`edgeact learn`, `serve`'s feedback topic).
pub mod learn {
    /// Largest corrected text (or ranking query) accepted, in bytes.
    pub const MAX_TEXT_BYTES: usize = 16 * 1024;
    /// `serve` retrains a task after this many new corrections...
    pub const RETRAIN_AFTER: usize = 20;
    /// ...or this many seconds after the first correction not yet learned, whichever
    /// comes first.
    pub const RETRAIN_INTERVAL_S: u64 = 15 * 60;
    /// Texts per feature job `serve` hands the inference thread while retraining: small, so
    /// a request waits behind at most this many texts.
    pub const FEATURE_CHUNK: usize = 4;
    /// Most memory a `serve` retrain may hold besides the model (features of the train and
    /// dev rows, the fit), in MiB; a larger one is refused with a log line.
    pub const MAX_MIB: u64 = 256;
}

/// `edgeact bench-accuracy`.
pub mod bench_accuracy {
    /// Split the figures are measured on.
    pub const TEST_SPLIT: &str = "test";
    /// Dev examples at most, for the K-shot template's calibration choice.
    pub const DEV_LIMIT: usize = 100;
    /// K per label of the template row and of the K-shot baseline.
    pub const SHOTS: usize = 8;
    /// K per label of the head rows.
    pub const HEAD_K: &str = "8,32";
    /// Rows run.
    pub const ROWS: &str = "zero-shot,tuned,head,tfidf";
    /// Pooling of the head rows.
    pub const POOLING: &str = "last";
    /// L2 strength of the head rows.
    pub const ALPHA: f64 = 1.0;
}

/// `edgeact bench`.
pub mod bench {
    /// Requests measured.
    pub const DATA: &str = "tests/data/sentiment-obvious.jsonl";
    /// At most this many requests.
    pub const LIMIT: usize = 40;
    /// Queue depths of the batched rows.
    pub const DEPTHS: [usize; 2] = [8, 32];
}

/// `edgeact react-eval`.
pub mod react_eval {
    /// The scenario file.
    pub const SCENARIOS: &str = "kb/kiosk-scenarios.jsonl";
    /// Retrieval hit rate at these k.
    pub const HIT_RATE_K: &str = "1,3";
}

/// `edgeact rank-eval`.
pub mod rank_eval {
    /// Labelled data (scripts/fetch-data).
    pub const DATA: &str = "data/banking77.jsonl";
    /// Families of intents with their profiles.
    pub const FAMILIES: &str = "datasets/banking77-families.toml";
    /// Split the candidates come from.
    pub const SPLIT: &str = "test";
    /// Relevant candidates per family.
    pub const RELEVANT: usize = 5;
    /// Candidates per family, relevant ones included.
    pub const CANDIDATES: usize = 30;
    /// NDCG cut-off.
    pub const K: usize = 5;
    pub const SEED: u64 = 1;
    /// Random orderings averaged for the random baseline.
    pub const RANDOM_RUNS: usize = 200;
    /// Candidate draws per family.
    pub const DRAWS: usize = 1;
}
