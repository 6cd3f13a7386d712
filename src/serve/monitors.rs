//! The served tasks' alert rules: classifications feed their task's monitor, incidents come
//! back as messages, and window state is saved beside the outbox across restarts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::classify::ClassifyResult;
use crate::monitor::{replay, Monitor, MonitorConfig, Observation, Refused, Restored};
use crate::serve::message::{incident_message, OutMessage};
use crate::serve::ServeError;
use crate::util::time::now_ms;

/// A task's alert rules, their state file and whether it changed since it was saved.
struct TaskMonitor {
    monitor: Monitor,
    ts_field: String,
    path: PathBuf,
    dirty: bool,
    /// When the last message came, and the stream's time then: an idle stream's time moves
    /// on with the wall clock from there, whatever epoch its event times use.
    last_seen: Option<(Instant, i64)>,
}

/// The monitors of the served tasks, by task index.
#[derive(Default)]
pub struct Monitors {
    by_task: HashMap<usize, TaskMonitor>,
}

impl Monitors {
    /// Each monitored task's rules (`task_index` finds a task by name; rules for a task not
    /// served are skipped), with the window state saved in `dir` before the last stop.
    pub fn open(
        configs: &BTreeMap<String, MonitorConfig>,
        dir: &Path,
        task_index: impl Fn(&str) -> Option<usize>,
    ) -> Result<Monitors, ServeError> {
        let mut by_task = HashMap::new();
        for (name, mcfg) in configs {
            let Some(i) = task_index(name) else {
                continue;
            };
            let path = dir.join(format!("monitor-{name}.json"));
            let (monitor, restored) =
                Monitor::restore(mcfg, &path).map_err(|source| ServeError::MonitorState {
                    path: path.clone(),
                    source,
                })?;
            match restored {
                Restored::Fresh => {}
                Restored::Loaded { reset_rules } => tracing::info!(
                    task = %name,
                    open_incidents = monitor.open_incidents().len(),
                    ?reset_rules,
                    "monitor state restored"
                ),
                Restored::Discarded(reason) => tracing::warn!(
                    task = %name,
                    path = %path.display(),
                    "monitor state discarded ({reason}); starting with empty windows"
                ),
            }
            by_task.insert(
                i,
                TaskMonitor {
                    monitor,
                    ts_field: mcfg.ts_field.clone(),
                    path,
                    dirty: false,
                    last_seen: None,
                },
            );
        }
        Ok(Monitors { by_task })
    }

    /// Whether task `task` has alert rules (its requests' fields are kept for them).
    pub fn watches(&self, task: usize) -> bool {
        self.by_task.contains_key(&task)
    }

    /// Feeds a classification to its task's monitor; the incident messages it caused. An
    /// event time too far ahead of the clock, or an id or key over its length limit, is
    /// refused (the caller answers with an error record) and changes nothing.
    pub fn observe(
        &mut self,
        prefix: &str,
        task: usize,
        r: &ClassifyResult,
        fields: &BTreeMap<String, String>,
    ) -> Result<Vec<OutMessage>, Refused> {
        let Some(m) = self.by_task.get_mut(&task) else {
            return Ok(Vec::new());
        };
        let clock_ms = now_ms() as i64;
        let ts_ms = replay::event_time_ms(fields, &m.ts_field).unwrap_or(clock_ms);
        let obs = Observation {
            id: r.id.clone(),
            ts_ms,
            label: r.label.clone(),
            confidence: r.confidence,
            fields: fields.clone(),
        };
        let events = m.monitor.observe(&obs, clock_ms)?;
        m.dirty = true;
        m.last_seen = m.monitor.watermark_ms().map(|w| (Instant::now(), w));
        if !events.is_empty() {
            // Incidents opened or ended: keep the windows that explain them.
            if let Err(e) = m.monitor.save(&m.path) {
                tracing::error!("{e}");
            } else {
                m.dirty = false;
            }
        }
        Ok(events.iter().map(|e| incident_message(prefix, e)).collect())
    }

    /// Moves idle monitors' time on with the wall clock (quiet incidents end) and saves
    /// window state that changed; the incident messages that caused.
    pub fn advance(&mut self, prefix: &str) -> Vec<OutMessage> {
        let mut msgs = Vec::new();
        for m in self.by_task.values_mut() {
            let Some((at, watermark)) = m.last_seen else {
                continue;
            };
            let elapsed = i64::try_from(at.elapsed().as_millis()).unwrap_or(i64::MAX);
            let now = watermark.saturating_add(elapsed);
            let events = m.monitor.advance_to(now);
            if !events.is_empty() {
                m.dirty = true;
            }
            msgs.extend(events.iter().map(|e| incident_message(prefix, e)));
        }
        self.save();
        msgs
    }

    /// Saves window state that changed since it was last saved.
    pub fn save(&mut self) {
        for m in self.by_task.values_mut().filter(|m| m.dirty) {
            match m.monitor.save(&m.path) {
                Ok(()) => m.dirty = false,
                Err(e) => tracing::error!("{e}"),
            }
        }
    }
}
