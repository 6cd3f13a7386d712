//! What survives a restart: per rule its keys (LRU-bounded) and counters, and the
//! watermark; saved atomically and restored only for rules whose settings did not change.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::Rule;
use super::incident::end_incident;
use super::window::{measure, KeyState};
use super::{Monitor, MonitorConfig, MonitorError, MonitorEvent};
use crate::util::time::now_ms;

/// Per-rule state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct RuleState {
    /// Hash of the rule's settings: state for other settings is dropped on restore.
    pub(super) config_hash: String,
    pub(super) keys: BTreeMap<String, KeyState>,
    pub(super) clock: u64,
    #[serde(skip)]
    pub(super) lru: BTreeSet<(u64, String)>,
    /// Keys with an open incident.
    pub(super) open: BTreeSet<String>,
    pub(super) counters: RuleCounters,
}

impl RuleState {
    /// Makes `key` the most recently seen of the rule's keys. A new key is added with an
    /// empty window, first evicting the least recently seen keys beyond `max_keys` (an
    /// open incident of an evicted key ends, its `end` message into `out`).
    pub(super) fn touch(&mut self, rule: &Rule, key: &str, now: i64, out: &mut Vec<MonitorEvent>) {
        self.clock += 1;
        let clock = self.clock;
        if !self.keys.contains_key(key) {
            while self.keys.len() >= rule.cfg.max_keys {
                let Some((_, victim)) = self.lru.pop_first() else {
                    break;
                };
                self.evict(rule, &victim, now, out);
            }
            self.keys.insert(key.to_string(), KeyState::new());
        }
        if let Some(ks) = self.keys.get_mut(key) {
            self.lru.remove(&(ks.seen, key.to_string()));
            ks.seen = clock;
            self.lru.insert((clock, key.to_string()));
        }
    }

    /// Drops `victim` (already out of the LRU order), ending its open incident.
    fn evict(&mut self, rule: &Rule, victim: &str, now: i64, out: &mut Vec<MonitorEvent>) {
        if let Some(mut ks) = self.keys.remove(victim) {
            self.counters.evictions += 1;
            if ks.incident.is_some() {
                self.counters.evicted_open += 1;
                self.open.remove(victim);
                let m = measure(rule, &mut ks, now);
                out.push(end_incident(rule, victim, &mut ks, &m, now, "evicted"));
            }
        }
    }
}

/// Counters per rule (in `stats` and the state file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleCounters {
    pub observations: u64,
    pub hits: u64,
    /// Messages older than the window when they arrived (not counted).
    pub late: u64,
    /// Messages without the rule's key field.
    pub missing_key: u64,
    /// Keys evicted to stay within `max_keys`.
    pub evictions: u64,
    /// Incidents ended because their key was evicted.
    pub evicted_open: u64,
    pub incidents: u64,
}

/// Everything that survives a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct State {
    pub(super) format: u32,
    /// Highest event time seen.
    pub(super) watermark_ms: Option<i64>,
    pub(super) rules: BTreeMap<String, RuleState>,
}

pub(super) const STATE_FORMAT: u32 = 1;

/// How [`Monitor::restore`] found the state file.
#[derive(Debug, Clone, PartialEq)]
pub enum Restored {
    /// No file: a fresh start.
    Fresh,
    /// Loaded; rules whose settings changed since were reset (named).
    Loaded { reset_rules: Vec<String> },
    /// Unreadable (corrupt, other format): ignored and a fresh start, with the reason.
    Discarded(String),
}

impl Monitor {
    /// Writes the state to `path` atomically (temporary file, fsync, rename, fsync of the
    /// folder): after a crash the file is the old state or the new, never half of one.
    pub fn save(&self, path: &Path) -> Result<(), MonitorError> {
        let io = |source| MonitorError::Io {
            path: path.into(),
            source,
        };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(d) = dir {
            crate::util::private::create_dir(d).map_err(io)?;
        }
        let tmp = path.with_extension("tmp");
        // Plain structs, maps and JSON values: serializing cannot fail.
        let bytes = serde_json::to_vec(&self.state).unwrap_or_default();
        {
            // Owner-only: the state quotes request ids and fields.
            let mut f = crate::util::private::open(&tmp, true).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(d) = dir {
            // Makes the rename itself durable; a folder that cannot be opened is no error.
            if let Ok(f) = std::fs::File::open(d) {
                let _ = f.sync_all();
            }
        }
        Ok(())
    }

    /// A monitor for `cfg` with the state saved at `path`, when there is one. State of a
    /// rule whose settings changed, or of a rule no longer configured, is dropped.
    pub fn restore(cfg: &MonitorConfig, path: &Path) -> Result<(Monitor, Restored), MonitorError> {
        Monitor::restore_at(cfg, path, now_ms() as i64)
    }

    /// [`Monitor::restore`] with the wall clock given: a saved stream time more than
    /// `max_future_s` ahead of `clock_ms` (let in before such times were refused) discards
    /// the state, since every later message would count as late.
    pub fn restore_at(
        cfg: &MonitorConfig,
        path: &Path,
        clock_ms: i64,
    ) -> Result<(Monitor, Restored), MonitorError> {
        let mut m = Monitor::new(cfg);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((m, Restored::Fresh)),
            Err(source) => {
                return Err(MonitorError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        let saved: State = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => return Ok((m, Restored::Discarded(e.to_string()))),
        };
        if saved.format != STATE_FORMAT {
            return Ok((
                m,
                Restored::Discarded(format!(
                    "state format {} (this build writes {STATE_FORMAT})",
                    saved.format
                )),
            ));
        }
        if let Some(Err(e)) = saved.watermark_ms.map(|w| m.check_time(w, clock_ms)) {
            let why = format!(
                "saved stream time is {:.0} s ahead of the clock (max_future_s = {})",
                e.ahead_s, e.max_future_s
            );
            return Ok((m, Restored::Discarded(why)));
        }
        m.state.watermark_ms = saved.watermark_ms;
        let mut reset_rules = Vec::new();
        let mut saved_rules = saved.rules;
        for rule in &m.rules {
            let name = &rule.cfg.name;
            match saved_rules.remove(name) {
                Some(mut rs) if rs.config_hash == rule.hash => {
                    rs.lru = rs.keys.iter().map(|(k, v)| (v.seen, k.clone())).collect();
                    rs.open = rs
                        .keys
                        .iter()
                        .filter(|(_, v)| v.incident.is_some())
                        .map(|(k, _)| k.clone())
                        .collect();
                    m.state.rules.insert(name.clone(), rs);
                }
                Some(_) => reset_rules.push(name.clone()),
                None => {}
            }
        }
        Ok((m, Restored::Loaded { reset_rules }))
    }
}
