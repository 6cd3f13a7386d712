//! `edgeact monitor`: replays JSON lines (event time in a field) through a task's monitor
//! rules and prints the incident messages as JSON lines. Labels come from the model (the
//! task's classifier) or, with `label_field`, from the data itself.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use serde_json::{json, Value};

use super::{Monitor, MonitorConfig, MonitorError, MonitorEvent, Observation, Restored};
use crate::classify::input;
use crate::classify::{Classifier, Request, ScorePath};
use crate::cmd::AppError;
use crate::model::config::EngineConfig;
use crate::model::Engine;
use crate::spec::Task;

/// Event time of a message in ms: the `ts_field` in seconds (a number or a numeric string).
pub fn event_time_ms(fields: &BTreeMap<String, String>, ts_field: &str) -> Option<i64> {
    let s: f64 = fields.get(ts_field)?.trim().parse().ok()?;
    s.is_finite().then(|| (s * 1000.0).round() as i64)
}

/// An observation from a request and its classification.
pub fn observation(
    req: &Request,
    label: Option<String>,
    confidence: f64,
    ts_ms: i64,
) -> Observation {
    Observation {
        id: req.id.clone(),
        ts_ms,
        label,
        confidence,
        fields: req.fields.clone(),
    }
}

/// Everything `edgeact monitor` runs with.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub task: Task,
    pub monitor: MonitorConfig,
    pub data: PathBuf,
    /// Take labels from this field of the data instead of classifying (confidence 1).
    pub label_field: Option<String>,
    /// Needed when labels come from the model.
    pub engine: Option<EngineConfig>,
    /// Load the state from here first and save it at the end.
    pub state: Option<PathBuf>,
    pub batch_size: usize,
}

/// What a replay saw, for the summary on stderr.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplaySummary {
    pub messages: usize,
    pub rejected: usize,
    pub events: usize,
    pub incidents: usize,
    pub open_at_end: usize,
}

/// Runs the replay, writing each incident message as `{"topic_suffix", "rule", ...event}`.
pub fn replay(cfg: ReplayConfig, out: &mut dyn Write) -> Result<ReplaySummary, AppError> {
    let (mut monitor, restored) = match &cfg.state {
        Some(p) => Monitor::restore(&cfg.monitor, p).map_err(monitor_err)?,
        None => (Monitor::new(&cfg.monitor), Restored::Fresh),
    };
    if let Restored::Discarded(why) = &restored {
        tracing::warn!("monitor state ignored: {why}");
    }
    let mut model = match (&cfg.label_field, &cfg.engine) {
        (Some(_), _) => None,
        (None, Some(e)) => {
            let mut engine = Engine::load(e, 1)?;
            let c = Classifier::new(&mut engine, cfg.task.clone(), 0, None, None)?;
            Some((engine, c))
        }
        (None, None) => {
            return Err(AppError::Input {
                what: "labels".into(),
                source: std::io::Error::other("give --label-field or a model"),
            })
        }
    };
    let reader = std::io::BufReader::new(std::fs::File::open(&cfg.data).map_err(|source| {
        AppError::Input {
            what: cfg.data.display().to_string(),
            source,
        }
    })?);
    let mut summary = ReplaySummary::default();
    let mut pending: Vec<(Request, i64)> = Vec::new();
    let ts_field = cfg.monitor.ts_field.clone();
    let mut flush = |pending: &mut Vec<(Request, i64)>,
                     monitor: &mut Monitor,
                     out: &mut dyn Write,
                     summary: &mut ReplaySummary|
     -> Result<(), AppError> {
        let labels: Vec<(Option<String>, f64)> = match (&mut model, &cfg.label_field) {
            (_, Some(f)) => pending
                .iter()
                .map(|(r, _)| (r.fields.get(f).cloned(), 1.0))
                .collect(),
            (Some((engine, c)), None) => {
                let reqs: Vec<Request> = pending.iter().map(|(r, _)| r.clone()).collect();
                c.classify_many(engine, &reqs, ScorePath::Fast)
                    .into_iter()
                    .zip(&reqs)
                    .map(|(res, req)| match res {
                        Ok(r) => (r.label, r.confidence),
                        Err(e) => {
                            tracing::warn!(id = %req.id, "{e}");
                            (None, 0.0)
                        }
                    })
                    .collect()
            }
            (None, None) => vec![(None, 0.0); pending.len()],
        };
        for ((req, ts), (label, conf)) in pending.drain(..).zip(labels) {
            let events = monitor.observe(&observation(&req, label, conf, ts));
            write_events(events, out, summary)?;
        }
        Ok(())
    };
    let mut line = 0usize;
    for raw in reader.split(b'\n') {
        line += 1;
        let raw = raw.map_err(|source| AppError::Input {
            what: cfg.data.display().to_string(),
            source,
        })?;
        let req = match input::parse_line(&raw, line) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                summary.rejected += 1;
                tracing::warn!("{e}");
                continue;
            }
        };
        let Some(ts) = event_time_ms(&req.fields, &ts_field) else {
            summary.rejected += 1;
            tracing::warn!("line {line}: no event time in field `{ts_field}` (seconds)");
            continue;
        };
        summary.messages += 1;
        pending.push((req, ts));
        if pending.len() >= cfg.batch_size.max(1) {
            flush(&mut pending, &mut monitor, out, &mut summary)?;
        }
    }
    flush(&mut pending, &mut monitor, out, &mut summary)?;
    out.flush().map_err(AppError::Output)?;
    summary.open_at_end = monitor.open_incidents().len();
    if let Some(p) = &cfg.state {
        monitor.save(p).map_err(monitor_err)?;
    }
    Ok(summary)
}

fn write_events(
    events: Vec<MonitorEvent>,
    out: &mut dyn Write,
    summary: &mut ReplaySummary,
) -> Result<(), AppError> {
    for e in events {
        summary.events += 1;
        if e.kind == super::EventType::New {
            summary.incidents += 1;
        }
        writeln!(out, "{}", event_line(&e)).map_err(AppError::Output)?;
    }
    Ok(())
}

/// An incident message as one JSON line of `edgeact monitor`: the payload plus `rule`.
pub fn event_line(e: &MonitorEvent) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    v["rule"] = json!(e.rule);
    v
}

fn monitor_err(e: MonitorError) -> AppError {
    match e {
        MonitorError::Io { path, source } => AppError::Input {
            what: path.display().to_string(),
            source,
        },
        MonitorError::Invalid { path, key, reason } => {
            AppError::Config(crate::model::config::ConfigError::Invalid { path, key, reason })
        }
    }
}
