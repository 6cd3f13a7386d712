//! `serve`'s settings into a [`ServeConfig`]: the `--config` file with the flags over it,
//! the served tasks (classification, ranking or ReAct) and their monitors, topics, the
//! broker, the outbox and the redactor, each checked with the file (or `command line`)
//! and key in the error. The checks run in a fixed order, so a config with several
//! mistakes always reports the same first one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::args::{PlanArgs, ServeArgs, ServeSettings};
use super::defaults::{self, serve as D};
use super::resolve::{find_task, invalid, state_dir};
use crate::cmd::AppError;
use crate::model::config::{self, ConfigError};
use crate::model::EngineError;
use crate::monitor::MonitorConfig;
use crate::rank::RankConfig;
use crate::react::ReactError;
use crate::serve::redact::{RedactError, Redactor};
use crate::serve::worker::ServedTask;
use crate::serve::{mqtt, outbox, ServeConfig};
use crate::spec::react::ReactSpec;

impl ServeSettings {
    /// `self` (from the file) with every setting `over` (the flags) gives replaced.
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
            max_packet_bytes,
            session_max_count,
            session_max_kib,
            session_max_age_h,
            ca_file,
            client_cert,
            client_key,
            username,
            password_file,
            client_id,
            keep_alive_s,
            drain_timeout_s,
            retrain_after,
            retrain_interval_s,
            learn_max_mib
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

/// The validated daemon config.
pub fn config(a: ServeArgs) -> Result<ServeConfig, AppError> {
    let (s, src) = settings(&a)?;
    let engine = a.board.engine_config()?;
    let (tasks, monitors) = tasks(&s, &src)?;
    check_budget(&engine, &tasks)?;
    let device_id = device_id(&s, &src)?;
    let topics = mqtt::Topics {
        prefix: s
            .prefix
            .clone()
            .unwrap_or_else(|| format!("{}/{device_id}", D::TOPIC_ROOT)),
        fleet_prefix: s
            .fleet_prefix
            .clone()
            .unwrap_or_else(|| D::FLEET_PREFIX.into()),
        share_group: s.share_group.clone(),
    };
    topic_prefix(&src, "prefix", &topics.prefix)?;
    topic_prefix(&src, "fleet_prefix", &topics.fleet_prefix)?;
    let context_topics = context_topics(&s, &src)?;
    let fsync = fsync(&s, &src)?;
    let broker = broker(&s, &src, &device_id)?;
    let redactor = redactor(&s, &src)?;
    let max_request_bytes = s.max_request_bytes.unwrap_or(D::MAX_REQUEST_BYTES);
    if let Some(b) = &broker {
        packet_limits(&src, max_request_bytes, b.max_packet_bytes)?;
    }
    let queue_capacity = s.queue_capacity.unwrap_or(D::QUEUE_CAPACITY);
    if queue_capacity == 0 {
        return Err(invalid(&src, "queue_capacity", "must be at least 1".into()));
    }
    Ok(ServeConfig {
        engine,
        tasks,
        monitors,
        device_id,
        topics,
        broker,
        context_topics,
        queue_capacity,
        batch_size: s.batch_size.map(|n| n.max(1)),
        outbox_dir: s.outbox_dir.clone().unwrap_or_else(state_dir),
        outbox: outbox::OutboxLimits {
            max_bytes: s.outbox_max_mib.unwrap_or(D::OUTBOX_MAX_MIB) * 1024 * 1024,
            max_age: Duration::from_secs(s.outbox_max_age_h.unwrap_or(D::OUTBOX_MAX_AGE_H) * 3600),
            fsync,
        },
        stats_interval: Duration::from_secs(
            s.stats_interval_s.unwrap_or(D::STATS_INTERVAL_S).max(1),
        ),
        ha_discovery: s.ha_discovery.unwrap_or(false),
        max_request_bytes,
        sessions: session_limits(&s),
        drain_timeout: Duration::from_secs(s.drain_timeout_s.unwrap_or(D::DRAIN_TIMEOUT_S)),
        redactor,
        learn: learn_settings(&s, &src)?,
    })
}

/// When `serve` retrains from feedback ([`defaults::learn`]).
fn learn_settings(
    s: &ServeSettings,
    src: &Path,
) -> Result<crate::serve::learning::LearnSettings, AppError> {
    use defaults::learn as L;
    let retrain_after = s.retrain_after.unwrap_or(L::RETRAIN_AFTER);
    if retrain_after == 0 {
        return Err(invalid(src, "retrain_after", "must be at least 1".into()));
    }
    Ok(crate::serve::learning::LearnSettings {
        retrain_after,
        retrain_interval: Duration::from_secs(
            s.retrain_interval_s.unwrap_or(L::RETRAIN_INTERVAL_S).max(1),
        ),
        max_bytes: s.learn_max_mib.unwrap_or(L::MAX_MIB) << 20,
        feature_chunk: L::FEATURE_CHUNK,
        max_text_bytes: L::MAX_TEXT_BYTES,
    })
}

/// Refuses, before connecting, a task set whose memory estimate (one model, a prefix slot
/// per task, the tasks' adapter) is over the board's budget, with the numbers and the tasks.
/// Other preflight failures (no model file, wrong checksum) are left to the daemon's start,
/// which reports them as it always has.
fn check_budget(engine: &config::EngineConfig, tasks: &[ServedTask]) -> Result<(), AppError> {
    use crate::model::budget::BudgetError;
    let cfg = crate::serve::worker::engine_config(engine, tasks)?;
    let Err(EngineError::Budget { path, source }) = crate::model::preflight(&cfg, tasks.len())
    else {
        return Ok(());
    };
    let names: Vec<&str> = tasks.iter().map(ServedTask::name).collect();
    let served = format!("serving {} tasks: {}", names.len(), names.join(", "));
    let source = match source {
        BudgetError::DoesNotFit {
            need_mib,
            budget_mib,
            detail,
        } => BudgetError::DoesNotFit {
            need_mib,
            budget_mib,
            detail: format!("{detail}; {served}"),
        },
        BudgetError::CannotShrink {
            min_ctx,
            need_mib,
            budget_mib,
            detail,
        } => BudgetError::CannotShrink {
            min_ctx,
            need_mib,
            budget_mib,
            detail: format!("{detail}; {served}"),
        },
        other => other,
    };
    Err(EngineError::Budget { path, source }.into())
}

/// The ReAct session bounds: the settings over the defaults.
fn session_limits(s: &ServeSettings) -> crate::react::session::SessionLimits {
    let d = defaults::session_limits(true);
    crate::react::session::SessionLimits {
        max_sessions: s.session_max_count.unwrap_or(d.max_sessions),
        max_bytes: s
            .session_max_kib
            .map_or(d.max_bytes, |k| k.saturating_mul(1024)),
        max_age: s
            .session_max_age_h
            .map_or(d.max_age, |h| Duration::from_secs(h.saturating_mul(3600))),
        min_id_chars: d.min_id_chars,
    }
}

/// The settings (the `--config` file's with the flags over them) and where they came from,
/// for errors.
fn settings(a: &ServeArgs) -> Result<(ServeSettings, PathBuf), AppError> {
    let Some(p) = &a.config else {
        return Ok((a.settings.clone(), PathBuf::from("command line")));
    };
    let text = std::fs::read_to_string(p).map_err(|source| AppError::Input {
        what: p.display().to_string(),
        source,
    })?;
    let file: ServeSettings = toml::from_str(&text).map_err(|e| {
        AppError::Config(ConfigError::Parse {
            path: p.clone(),
            message: e.to_string().trim().replace('\n', " "),
        })
    })?;
    Ok((file.overlay(a.settings.clone()), p.clone()))
}

/// The served tasks, each once, and the monitors of the classification tasks that have a
/// `[monitor]` section.
fn tasks(
    s: &ServeSettings,
    src: &Path,
) -> Result<(Vec<ServedTask>, BTreeMap<String, MonitorConfig>), AppError> {
    let names = if s.task.is_empty() {
        vec![defaults::TASK.to_string()]
    } else {
        s.task.clone()
    };
    let mut tasks: Vec<ServedTask> = Vec::new();
    let mut monitors = BTreeMap::new();
    for n in &names {
        let t = served_task(n)?;
        if tasks.iter().any(|o| o.name() == t.name()) {
            return Err(invalid(
                src,
                "task",
                format!("task `{}` is listed twice", t.name()),
            ));
        }
        if let ServedTask::Classify(task) = &t {
            if let Some(m) = MonitorConfig::from_task(task)? {
                monitors.insert(task.name.clone(), m);
            }
        }
        tasks.push(t);
    }
    Ok((tasks, monitors))
}

/// `plan`'s engine config for its `--task`s (label tasks' adapter and learned-head feature
/// contexts) and how many tasks there are.
pub fn plan_config(a: PlanArgs) -> Result<(config::EngineConfig, usize), AppError> {
    let engine = a.board.engine_config()?;
    let mut tasks = Vec::new();
    for n in &a.task {
        tasks.push(served_task(n)?);
    }
    // The same config `serve` plans and loads with these tasks.
    let cfg = crate::serve::worker::engine_config(&engine, &tasks)?;
    Ok((cfg, tasks.len()))
}

/// A task to serve, by name or path: a ReAct task file (`type = "react"`), a ranking task
/// (with `[rank]`) or a classification task.
fn served_task(name: &str) -> Result<ServedTask, AppError> {
    let dirs = config::task_dirs();
    let path = crate::spec::find_task_file(name, &dirs);
    let src = path.and_then(|p| std::fs::read_to_string(p).ok());
    if src
        .as_deref()
        .is_some_and(crate::spec::react::is_react_file)
    {
        let spec = ReactSpec::find(name, &dirs).map_err(ReactError::from)?;
        return Ok(ServedTask::React(spec));
    }
    let task = find_task(name)?;
    Ok(match RankConfig::from_task(&task)? {
        Some(r) => ServedTask::Rank(task, r),
        None => ServedTask::Classify(task),
    })
}

/// The host name, made topic-safe; the default device id.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| D::DEVICE_ID.into());
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
        D::DEVICE_ID.into()
    } else {
        clean
    }
}

fn device_id(s: &ServeSettings, src: &Path) -> Result<String, AppError> {
    let device_id = s.device_id.clone().unwrap_or_else(host_name);
    if device_id.is_empty() || device_id.contains(['/', '+', '#']) {
        return Err(invalid(
            src,
            "device_id",
            format!("`{device_id}` must be non-empty without / + #"),
        ));
    }
    Ok(device_id)
}

/// A topic prefix (`prefix`, `fleet_prefix`): every topic the daemon publishes or subscribes
/// to starts with it, and a broker refuses a publish to a topic with a wildcard, an empty
/// level or a NUL (the connection drops and the outbox entry blocks the ones behind it), so
/// it is refused here, at start-up, like a bad `device_id`.
fn topic_prefix(src: &Path, key: &str, prefix: &str) -> Result<(), AppError> {
    let reason = if prefix.contains(['+', '#']) {
        "contains an MQTT wildcard (+ or #)"
    } else if prefix.split('/').any(str::is_empty) {
        "has an empty level (it is empty, or has a leading, trailing or double /)"
    } else if prefix.contains('\0') {
        "contains a NUL character"
    } else if prefix.starts_with('$') {
        "starts with $, which brokers keep for themselves"
    } else {
        return Ok(());
    };
    Err(invalid(
        src,
        key,
        format!(
            "`{}` {reason}; use plain topic levels such as {}/kiosk1",
            prefix.escape_debug(),
            D::TOPIC_ROOT
        ),
    ))
}

/// `NAME=TOPIC` pairs.
fn context_topics(s: &ServeSettings, src: &Path) -> Result<BTreeMap<String, String>, AppError> {
    let mut context_topics = BTreeMap::new();
    for c in &s.context {
        let (name, topic) = c
            .split_once('=')
            .ok_or_else(|| invalid(src, "context", format!("`{c}` is not NAME=TOPIC")))?;
        context_topics.insert(name.trim().to_string(), topic.trim().to_string());
    }
    Ok(context_topics)
}

fn fsync(s: &ServeSettings, src: &Path) -> Result<outbox::FsyncPolicy, AppError> {
    Ok(match s.outbox_fsync.as_deref().unwrap_or(D::OUTBOX_FSYNC) {
        "always" => outbox::FsyncPolicy::Always,
        "never" => outbox::FsyncPolicy::Never,
        ms => outbox::FsyncPolicy::Interval(Duration::from_millis(ms.parse().map_err(|_| {
            invalid(
                src,
                "outbox_fsync",
                format!("`{ms}` is not always, never or a number of milliseconds"),
            )
        })?)),
    })
}

/// The broker connection, when a broker URL is given; the password from its file, else
/// from `$EDGEACT_MQTT_PASSWORD`.
fn broker(
    s: &ServeSettings,
    src: &Path,
    device_id: &str,
) -> Result<Option<mqtt::BrokerConfig>, AppError> {
    let Some(url) = &s.broker else {
        return Ok(None);
    };
    let (host, port, tls) = mqtt::parse_broker_url(url)?;
    let keep_alive_s = s.keep_alive_s.unwrap_or(D::KEEP_ALIVE_S);
    if keep_alive_s < 1 {
        return Err(invalid(
            src,
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
    Ok(Some(mqtt::BrokerConfig {
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
            .unwrap_or_else(|| format!("{}-{device_id}", D::TOPIC_ROOT)),
        keep_alive_s,
        max_packet_bytes: s.max_packet_bytes.unwrap_or(D::MAX_PACKET_BYTES),
    }))
}

/// Smallest `max_packet_bytes`: a result with its topic and a compact trace fit.
const MIN_PACKET_BYTES: usize = 16 * 1024;

/// The size limits must fit inside each other: a request the daemon accepts must fit in a
/// packet it can receive (with its topic), a packet in an outbox record, and a packet in
/// MQTT's own limit. An inconsistent pair is refused here, naming both settings, rather
/// than found later as messages that can never be delivered.
fn packet_limits(
    src: &Path,
    max_request_bytes: usize,
    max_packet_bytes: usize,
) -> Result<(), AppError> {
    // MQTT's Remaining Length tops out just under 256 MiB.
    const MQTT_MAX: usize = 268_435_455;
    let limit = outbox::MAX_RECORD_BYTES.min(MQTT_MAX);
    if !(MIN_PACKET_BYTES..=limit).contains(&max_packet_bytes) {
        return Err(invalid(
            src,
            "max_packet_bytes",
            format!(
                "{max_packet_bytes} must be from {MIN_PACKET_BYTES} to {limit} (the outbox's \
                 record limit)"
            ),
        ));
    }
    // Room for the topic and the packet's headers.
    let headroom = 1024;
    if max_request_bytes == 0 || max_request_bytes + headroom > max_packet_bytes {
        return Err(invalid(
            src,
            "max_request_bytes",
            format!(
                "{max_request_bytes} does not fit in max_packet_bytes = {max_packet_bytes} \
                 (a request needs {headroom} bytes of room for its topic and headers); raise \
                 max_packet_bytes or lower max_request_bytes"
            ),
        ));
    }
    Ok(())
}

fn redactor(s: &ServeSettings, src: &Path) -> Result<Redactor, AppError> {
    if s.redact.is_empty() && s.redact_pattern.is_empty() {
        return Ok(Redactor::all_kinds());
    }
    let kinds: Vec<String> = if s.redact.is_empty() {
        D::REDACT.iter().map(|k| k.to_string()).collect()
    } else {
        s.redact.clone()
    };
    Redactor::new(&kinds, &s.redact_pattern).map_err(|e| match e {
        RedactError::UnknownKind(k) => invalid(
            src,
            "redact",
            format!("unknown kind `{k}` (known: email, phone, card, none)"),
        ),
        RedactError::Pattern { pattern, reason } => invalid(
            src,
            "redact_patterns",
            format!("`{pattern}` is not a valid regex: {reason}"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::super::args::Cli;
    use super::D;

    #[test]
    fn inconsistent_size_limits_are_refused_naming_both_settings() {
        let src = std::path::Path::new("serve.toml");
        assert!(super::packet_limits(src, D::MAX_REQUEST_BYTES, D::MAX_PACKET_BYTES).is_ok());
        let e = super::packet_limits(src, 2 << 20, 1 << 20)
            .unwrap_err()
            .to_string();
        for needle in [
            "max_request_bytes",
            "max_packet_bytes",
            "serve.toml",
            "2097152",
        ] {
            assert!(e.contains(needle), "`{needle}` not in: {e}");
        }
        let e = super::packet_limits(src, 1024, 64 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_packet_bytes") && e.contains("67108864"),
            "{e}"
        );
        assert!(super::packet_limits(src, 0, 1 << 20).is_err());
    }

    /// The serve flags' help quotes some defaults in prose; they must match the constants.
    #[test]
    fn serve_help_quotes_the_defaults() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("serve")
            .expect("serve")
            .render_long_help()
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for needle in [
            format!("default {}/<device_id>", D::TOPIC_ROOT),
            format!("default {}", D::FLEET_PREFIX),
            format!("default {}-<device_id>", D::TOPIC_ROOT),
            format!("default: {}", super::defaults::TASK),
            "Default: all three".to_string(),
        ] {
            assert!(help.contains(&needle), "`{needle}` not in: {help}");
        }
        assert_eq!(D::REDACT.len(), 3);
    }
}
