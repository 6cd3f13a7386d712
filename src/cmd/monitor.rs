//! `edgeact monitor`: replays JSON lines (event time in a field) through a task's monitor
//! rules and prints the incident messages as JSON lines, then a summary on stderr. Labels
//! come from the model (the task's classifier) or from a field of the data itself.

use std::io::Write;
use std::path::PathBuf;

use super::AppError;
use crate::classify::input;
use crate::classify::runner::{load_model, ModelSource, TaskRunner};
use crate::classify::{Request, ScorePath};
use crate::model::config::EngineConfig;
use crate::model::FeatureParams;
use crate::monitor::replay::{event_line, event_time_ms, observation};
use crate::monitor::{EventType, Monitor, MonitorConfig, MonitorEvent, Restored};
use crate::spec::Task;
use crate::util::jsonl::JsonLines;
use crate::util::time::now_ms;

/// Where each message's label comes from.
#[derive(Debug, Clone)]
pub enum Labels {
    /// This field of the data (confidence 1); no model is loaded.
    Field(String),
    /// The task's classifier on this engine.
    Model(EngineConfig),
}

/// Everything `edgeact monitor` runs with.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub task: Task,
    pub monitor: MonitorConfig,
    pub data: PathBuf,
    pub labels: Labels,
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

/// The replay, then its summary on stderr.
pub fn run(cfg: ReplayConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let s = replay(cfg, out)?;
    eprintln!(
        "edgeact monitor: {} messages ({} rejected), {} incident messages, {} incidents, {} open at the end",
        s.messages, s.rejected, s.events, s.incidents, s.open_at_end
    );
    Ok(())
}

/// Runs the replay, writing each incident message as `{"topic_suffix", "rule", ...event}`.
pub fn replay(cfg: ReplayConfig, out: &mut dyn Write) -> Result<ReplaySummary, AppError> {
    let (mut monitor, restored) = match &cfg.state {
        Some(p) => Monitor::restore(&cfg.monitor, p)?,
        None => (Monitor::new(&cfg.monitor), Restored::Fresh),
    };
    if let Restored::Discarded(why) = &restored {
        tracing::warn!("monitor state ignored: {why}");
    }
    let mut model = match &cfg.labels {
        Labels::Field(_) => None,
        Labels::Model(e) => {
            // The task's own method, as `classify` and `serve` run it (a task that reads
            // no model runs without its weights).
            let ecfg = crate::spec::config_for_tasks(e, [&cfg.task])?;
            let mut engine = load_model(&ecfg, 1)?;
            let c = TaskRunner::new(
                &mut *engine,
                cfg.task.clone(),
                0,
                None,
                None,
                None,
                FeatureParams::default(),
            )?;
            Some((engine, c))
        }
    };
    let input_err = |source| AppError::Input {
        what: cfg.data.display().to_string(),
        source,
    };
    let mut lines = JsonLines::open(&cfg.data).map_err(input_err)?;
    let mut summary = ReplaySummary::default();
    let mut pending: Vec<(Request, i64)> = Vec::new();
    let ts_field = cfg.monitor.ts_field.clone();
    let mut flush = |pending: &mut Vec<(Request, i64)>,
                     monitor: &mut Monitor,
                     out: &mut dyn Write,
                     summary: &mut ReplaySummary|
     -> Result<(), AppError> {
        let labels = label(&mut model, &cfg.labels, pending);
        for ((req, ts), (label, conf)) in pending.drain(..).zip(labels) {
            // Checked when read, against a clock that has only moved on since.
            match monitor.observe(&observation(&req, label, conf, ts), now_ms() as i64) {
                Ok(events) => write_events(events, out, summary)?,
                Err(e) => {
                    summary.messages -= 1;
                    summary.rejected += 1;
                    tracing::warn!("{}: {e}", req.id);
                }
            }
        }
        Ok(())
    };
    while let Some((line, raw)) = lines.next_line().map_err(input_err)? {
        let req = match input::parse_line(raw, line) {
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
        // Old data replays fine; only times ahead of the wall clock are refused.
        if let Err(e) = monitor.check_time(ts, now_ms() as i64) {
            summary.rejected += 1;
            tracing::warn!("line {line}: {e}");
            continue;
        }
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
        monitor.save(p)?;
    }
    Ok(summary)
}

/// The label and confidence of each pending message: from its field, or classified (a
/// message the model fails on gets no label).
fn label(
    model: &mut Option<(Box<dyn ModelSource>, TaskRunner)>,
    labels: &Labels,
    pending: &[(Request, i64)],
) -> Vec<(Option<String>, f64)> {
    match (model, labels) {
        (_, Labels::Field(f)) => pending
            .iter()
            .map(|(r, _)| (r.fields.get(f).cloned(), 1.0))
            .collect(),
        (Some((engine, c)), Labels::Model(_)) => {
            let reqs: Vec<Request> = pending.iter().map(|(r, _)| r.clone()).collect();
            c.classify_many(&mut **engine, &reqs, ScorePath::Fast)
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
        (None, Labels::Model(_)) => vec![(None, 0.0); pending.len()],
    }
}

fn write_events(
    events: Vec<MonitorEvent>,
    out: &mut dyn Write,
    summary: &mut ReplaySummary,
) -> Result<(), AppError> {
    for e in events {
        summary.events += 1;
        if e.kind == EventType::New {
            summary.incidents += 1;
        }
        writeln!(out, "{}", event_line(&e)).map_err(AppError::Output)?;
    }
    Ok(())
}
