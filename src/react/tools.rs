//! The tools a ReAct step may call (`kb_search`, `calculator`, `clock`, `sensor`,
//! `notify`), their argument schemas, and the toolbox that runs them for one task: only
//! allow-listed tools, each under a time limit and an output size limit, with every failure
//! returned as an error the loop turns into an observation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::kb::Kb;
use crate::spec::react::{NotifyConfig, ReactSpec};
use crate::spec::tool::{ArgSchema, ToolName};

/// Why a tool call produced no result. The loop shows it to the model as the observation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ToolError {
    #[error("tool `{0}` is not available in this task")]
    NotAllowed(String),
    #[error("{tool}: argument `{arg}` does not fit its schema")]
    BadArgument { tool: ToolName, arg: String },
    #[error("{tool}: no result within {timeout_ms} ms")]
    Timeout { tool: ToolName, timeout_ms: u64 },
    #[error("{tool}: {message}")]
    Failed { tool: ToolName, message: String },
    #[error("notify: rate limited, next notification possible in {wait_ms} ms")]
    RateLimited { wait_ms: u64 },
}

/// A tool's answer, already cut to the observation budget.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    pub text: String,
    /// Passage ids a `kb_search` returned, best first.
    pub passage_ids: Vec<String>,
    pub truncated: bool,
}

/// Where the clock tool reads the time (fixed in tests).
#[derive(Debug, Clone, Copy)]
pub enum ClockSource {
    System,
    /// Seconds since the Unix epoch, UTC.
    Fixed(i64),
}

/// The tools of one task: the allow-list, the knowledge base, limits and the notify state.
pub struct Toolbox {
    spec_tools: Vec<(ToolName, ArgSchema)>,
    kb: Option<Arc<Kb>>,
    kb_top_k: usize,
    max_passage_chars: usize,
    sensor_dir: Option<PathBuf>,
    notify: NotifyConfig,
    task: String,
    timeout: Duration,
    max_output_chars: usize,
    utc_offset_minutes: i32,
    pub clock: ClockSource,
    last_notify: Option<Instant>,
    /// Notifications sent (side effects done), for traces and tests.
    pub notifications: usize,
    /// Daemon mode: the latest value of each context topic, read by `sensor` instead of
    /// the `[sensor]` folder.
    sensor_values: Option<BTreeMap<String, String>>,
    /// Daemon mode: notifications are collected here for the daemon to publish (through
    /// its outbox) instead of being written to the sink.
    collected: Option<Vec<serde_json::Value>>,
}

impl Toolbox {
    /// The tools `spec` allows, with its knowledge base (loaded by the caller, once).
    pub fn new(spec: &ReactSpec, kb: Option<Arc<Kb>>) -> Toolbox {
        Toolbox {
            spec_tools: spec.tools.iter().map(|t| (t.name, t.arg.clone())).collect(),
            kb,
            kb_top_k: spec.kb.as_ref().map_or(2, |k| k.top_k),
            max_passage_chars: spec.kb.as_ref().map_or(220, |k| k.max_passage_chars),
            sensor_dir: spec.sensor.as_ref().map(|s| s.dir.clone()),
            notify: spec.notify.clone(),
            task: spec.name.clone(),
            timeout: Duration::from_millis(spec.tool_timeout_ms),
            max_output_chars: spec.max_observation_chars,
            utc_offset_minutes: spec.utc_offset_minutes,
            clock: ClockSource::System,
            last_notify: None,
            notifications: 0,
            sensor_values: None,
            collected: None,
        }
    }

    /// Daemon mode: `sensor[name]` reads `values` (context topics by name), not files.
    pub fn set_sensor_values(&mut self, values: BTreeMap<String, String>) {
        self.sensor_values = Some(values);
    }

    /// Sensors are files again (CLI mode).
    pub fn clear_sensor_values(&mut self) {
        self.sensor_values = None;
    }

    /// Daemon mode: notifications are kept for [`Toolbox::take_notifications`] instead of
    /// going to the sink.
    pub fn collect_notifications(&mut self) {
        self.collected.get_or_insert_with(Vec::new);
    }

    /// The notifications collected since the last call (daemon mode).
    pub fn take_notifications(&mut self) -> Vec<serde_json::Value> {
        self.collected
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Whether the task allows `name`.
    pub fn allows(&self, name: &str) -> bool {
        ToolName::parse(name).is_some_and(|t| self.spec_tools.iter().any(|(n, _)| *n == t))
    }

    /// Runs `name[arg]`: refused unless allow-listed and the argument fits the schema; run
    /// under the time limit; output cut to the observation budget.
    pub fn call(&mut self, name: &str, arg: &str) -> Result<ToolOutput, ToolError> {
        let tool = ToolName::parse(name)
            .filter(|t| self.spec_tools.iter().any(|(n, _)| n == t))
            .ok_or_else(|| ToolError::NotAllowed(name.to_string()))?;
        let schema = self
            .spec_tools
            .iter()
            .find(|(n, _)| *n == tool)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| ToolError::NotAllowed(name.to_string()))?;
        if !schema.accepts(arg) {
            return Err(ToolError::BadArgument {
                tool,
                arg: arg.to_string(),
            });
        }
        let mut out = match tool {
            ToolName::KbSearch => {
                let kb = self.kb.clone().ok_or_else(|| ToolError::Failed {
                    tool,
                    message: "no knowledge base loaded".into(),
                })?;
                let (k, chars, q) = (self.kb_top_k, self.max_passage_chars, arg.to_string());
                self.with_timeout(tool, move || Ok(kb_search(&kb, &q, k, chars)))?
            }
            ToolName::Calculator => {
                let expr = arg.to_string();
                self.with_timeout(tool, move || calculate(&expr).map(plain))?
            }
            ToolName::Clock => plain(self.clock_text()),
            ToolName::Sensor if self.sensor_values.is_some() => {
                let values = self.sensor_values.as_ref();
                match values.and_then(|v| v.get(arg)) {
                    Some(v) if !v.trim().is_empty() => plain(format!("{arg} = {}", v.trim())),
                    _ => {
                        return Err(ToolError::Failed {
                            tool,
                            message: format!("{arg}: no value yet"),
                        })
                    }
                }
            }
            ToolName::Sensor => {
                let dir = self.sensor_dir.clone().ok_or_else(|| ToolError::Failed {
                    tool,
                    message: "no sensor folder configured".into(),
                })?;
                let name = arg.to_string();
                self.with_timeout(tool, move || read_sensor(&dir, &name).map(plain))?
            }
            ToolName::Notify => plain(self.notify(arg)?),
        };
        if out.text.chars().count() > self.max_output_chars {
            out.text = cut_chars(&out.text, self.max_output_chars);
            out.truncated = true;
        }
        Ok(out)
    }

    /// Runs `f` on its own thread and waits at most the tool time limit; a late thread is
    /// left to finish on its own (its result is dropped).
    fn with_timeout(
        &self,
        tool: ToolName,
        f: impl FnOnce() -> Result<ToolOutput, String> + Send + 'static,
    ) -> Result<ToolOutput, ToolError> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(message)) => Err(ToolError::Failed { tool, message }),
            Err(_) => Err(ToolError::Timeout {
                tool,
                timeout_ms: self.timeout.as_millis() as u64,
            }),
        }
    }

    fn now_unix_s(&self) -> i64 {
        match self.clock {
            ClockSource::Fixed(s) => s,
            ClockSource::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        }
    }

    fn clock_text(&self) -> String {
        clock_text(
            self.now_unix_s() + i64::from(self.utc_offset_minutes) * 60,
            self.utc_offset_minutes,
        )
    }

    /// The side effect: one JSON line to the sink, at most once per `min_interval_ms`.
    fn notify(&mut self, arg: &str) -> Result<String, ToolError> {
        let now = Instant::now();
        if let Some(last) = self.last_notify {
            let min = Duration::from_millis(self.notify.min_interval_ms);
            let since = now.duration_since(last);
            if since < min {
                return Err(ToolError::RateLimited {
                    wait_ms: (min - since).as_millis() as u64,
                });
            }
        }
        let payload: serde_json::Value =
            serde_json::from_str(arg).map_err(|e| ToolError::Failed {
                tool: ToolName::Notify,
                message: format!("not JSON: {e}"),
            })?;
        let record = serde_json::json!({
            "task": self.task,
            "unix_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "payload": payload,
        });
        if let Some(c) = self.collected.as_mut() {
            c.push(record);
            self.last_notify = Some(now);
            self.notifications += 1;
            return Ok(format!(
                "notification {} sent: a member of staff has been told",
                self.notifications
            ));
        }
        let line = record.to_string();
        let failed = |e: std::io::Error| ToolError::Failed {
            tool: ToolName::Notify,
            message: format!("cannot write to {}: {e}", self.notify.sink),
        };
        if self.notify.sink == "stderr" {
            eprintln!("notify: {line}");
        } else {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.notify.sink)
                .map_err(failed)?;
            writeln!(f, "{line}").map_err(failed)?;
        }
        self.last_notify = Some(now);
        self.notifications += 1;
        Ok(format!(
            "notification {} sent: a member of staff has been told",
            self.notifications
        ))
    }
}

fn plain(text: String) -> ToolOutput {
    ToolOutput {
        text,
        passage_ids: Vec::new(),
        truncated: false,
    }
}

/// `[id] title: text` for each of the top passages, each cut to `max_chars`.
pub fn kb_search(kb: &Kb, query: &str, top_k: usize, max_chars: usize) -> ToolOutput {
    let hits = kb.search(query, top_k);
    if hits.is_empty() {
        return plain("no passage matches".into());
    }
    let mut text = String::new();
    let mut ids = Vec::new();
    for h in &hits {
        let p = &kb.passages[h.index];
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&format!(
            "[{}] {}",
            p.id,
            cut_chars(&p.one_line(), max_chars)
        ));
        ids.push(p.id.clone());
    }
    ToolOutput {
        text,
        passage_ids: ids,
        truncated: false,
    }
}

/// Evaluates an arithmetic expression (exmex); `,` is read as a decimal point. The result
/// is printed plainly (integers without a fraction, otherwise up to 6 decimals).
pub fn calculate(expr: &str) -> Result<String, String> {
    let e = expr.replace(',', ".");
    let v: f64 = exmex::eval_str::<f64>(&e).map_err(|err| format!("cannot evaluate: {err}"))?;
    if !v.is_finite() {
        return Err(format!("`{expr}` is not a finite number"));
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return Ok(format!("{}", v as i64));
    }
    let s = format!("{v:.6}");
    Ok(s.trim_end_matches('0').trim_end_matches('.').to_string())
}

/// A sensor's latest value: the first line of `<dir>/<name>`.
pub fn read_sensor(dir: &std::path::Path, name: &str) -> Result<String, String> {
    let p = dir.join(name);
    let s = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let v = s.lines().next().unwrap_or("").trim();
    if v.is_empty() {
        return Err(format!("{name}: no value yet"));
    }
    Ok(format!("{name} = {v}"))
}

/// `Sunday 2026-11-29 07:30 (UTC+01:00)` for local seconds since the epoch.
pub fn clock_text(local_s: i64, offset_min: i32) -> String {
    let days = local_s.div_euclid(86_400);
    let secs = local_s.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    const WEEKDAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let wd = WEEKDAYS[days.rem_euclid(7) as usize];
    let sign = if offset_min < 0 { '-' } else { '+' };
    let off = offset_min.unsigned_abs();
    format!(
        "{wd} {y:04}-{m:02}-{d:02} {:02}:{:02} (UTC{sign}{:02}:{:02})",
        secs / 3600,
        (secs % 3600) / 60,
        off / 60,
        off % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The first `max` characters of `s`, with `…` when cut.
pub fn cut_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calculator_evaluates_and_refuses() {
        assert_eq!(calculate("3 * 2.5").unwrap(), "7.5");
        assert_eq!(calculate("(4 + 6) / 4").unwrap(), "2.5");
        assert_eq!(calculate("12,50 * 2").unwrap(), "25");
        assert_eq!(calculate("2^10").unwrap(), "1024");
        assert!(calculate("1 / 0").is_err());
        assert!(calculate("3 +").is_err());
    }

    #[test]
    fn clock_formats_dates() {
        // 2026-11-29 07:30:00 UTC was a Sunday.
        let t = 1_795_937_400;
        assert_eq!(clock_text(t, 0), "Sunday 2026-11-29 07:30 (UTC+00:00)");
        assert_eq!(
            clock_text(t + 60 * 60, 60),
            "Sunday 2026-11-29 08:30 (UTC+01:00)"
        );
        assert_eq!(clock_text(0, 0), "Thursday 1970-01-01 00:00 (UTC+00:00)");
        // Leap day.
        assert!(clock_text(951_782_400, 0).starts_with("Tuesday 2000-02-29"));
    }

    #[test]
    fn schemas_accept_what_the_grammar_allows() {
        let text = ArgSchema::Text { max_chars: 5 };
        assert!(text.accepts("hours"));
        assert!(!text.accepts(""));
        assert!(!text.accepts("too long"));
        assert!(!text.accepts("a]b"));
        let expr = ArgSchema::Expr { max_chars: 20 };
        assert!(expr.accepts("3 * (2.5 + 1)"));
        assert!(!expr.accepts("rm -rf /"));
        let choice = ArgSchema::Choice {
            values: vec!["door".into(), "temperature".into()],
        };
        assert!(choice.accepts("door"));
        assert!(!choice.accepts("doors"));
        let json = ArgSchema::Json {
            keys: vec!["reason".into(), "contact".into()],
            max_value_chars: 10,
        };
        assert!(json.accepts(r#"{"reason": "lost card"}"#));
        assert!(json.accepts(r#"{"reason": "x", "contact": "desk"}"#));
        assert!(!json.accepts(r#"{"other": "x"}"#));
        assert!(!json.accepts(r#"{"reason": "much too long a value"}"#));
        assert!(!json.accepts(r#"{"reason": "x",}"#));
        assert!(!json.accepts("{}"));
        // A control character (a tab from the model) is not JSON: refused like the grammar
        // refuses it, and everything accepted parses as a JSON object (found while writing
        // the react_step fuzz target's invariant).
        assert!(!json.accepts("{\"reason\": \"a\tb\"}"));
        assert!(!json.accepts("{\"reason\": \"\u{0}\"}"));
        for ok in [r#"{"reason": "café ☕ 5€"}"#, r#"{"reason": ""}"#] {
            assert!(json.accepts(ok), "{ok}");
            assert!(serde_json::from_str::<serde_json::Value>(ok).is_ok_and(|v| v.is_object()));
        }
        assert!(ArgSchema::None.accepts(""));
        assert!(!ArgSchema::None.accepts("x"));
        assert!(ArgSchema::None.validate(ToolName::Clock).is_ok());
        assert!(ArgSchema::None.validate(ToolName::KbSearch).is_err());
    }

    fn toolbox(dir: &std::path::Path, extra: &str) -> Toolbox {
        let src = format!(
            r#"
type = "react"
instruction = "x"
max_observation_chars = 120
tool_timeout_ms = 200
tools = [
  {{ name = "kb_search", description = "search", arg = {{ kind = "text", max_chars = 60 }} }},
  {{ name = "sensor", description = "a reading", arg = {{ kind = "choice", values = ["door", "fifo", "empty"] }} }},
  {{ name = "notify", description = "call staff", arg = {{ kind = "json", keys = ["reason"], max_value_chars = 40 }} }},
  {{ name = "clock", description = "time" }},
]
[kb_search]
dir = "kb"
top_k = 2
max_passage_chars = 40
[sensor]
dir = "sensors"
[notify]
sink = "notify.jsonl"
{extra}
"#
        );
        let spec = ReactSpec::parse(&src, &dir.join("t.toml"), "t").unwrap();
        let kb = Kb::from_passages(
            &dir.join("kb"),
            vec![
                crate::react::kb::Passage {
                    id: "hours".into(),
                    title: "Hours".into(),
                    text: "We open at 08:00 and close at 20:00 every weekday, and the long text goes on and on.".into(),
                    source: "h.md".into(),
                },
                crate::react::kb::Passage {
                    id: "card".into(),
                    title: "Lost card".into(),
                    text: "Report a lost card at the desk.".into(),
                    source: "c.md".into(),
                },
            ],
        )
        .unwrap();
        Toolbox::new(&spec, Some(Arc::new(kb)))
    }

    #[test]
    fn daemon_mode_reads_context_sensors_and_collects_notifications() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sensors")).unwrap();
        std::fs::write(dir.path().join("sensors/door"), "from the file\n").unwrap();
        let mut tb = toolbox(dir.path(), "min_interval_ms = 60000");
        let mut values = BTreeMap::new();
        values.insert("door".to_string(), "closed".to_string());
        tb.set_sensor_values(values);
        assert_eq!(tb.call("sensor", "door").unwrap().text, "door = closed");
        // A context topic with no value yet is an observation, not the file's value.
        assert!(matches!(
            tb.call("sensor", "fifo"),
            Err(ToolError::Failed { .. })
        ));
        tb.clear_sensor_values();
        assert_eq!(
            tb.call("sensor", "door").unwrap().text,
            "door = from the file"
        );

        tb.collect_notifications();
        assert!(tb.call("notify", r#"{"reason": "lost child"}"#).is_ok());
        // Still rate limited, and nothing written to the sink.
        assert!(matches!(
            tb.call("notify", r#"{"reason": "again"}"#),
            Err(ToolError::RateLimited { .. })
        ));
        assert!(!dir.path().join("notify.jsonl").exists());
        let sent = tb.take_notifications();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["payload"]["reason"], "lost child");
        assert_eq!(sent[0]["task"], "t");
        assert!(tb.take_notifications().is_empty(), "taken once");
    }

    #[test]
    fn toolbox_runs_allowed_tools_within_limits() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sensors")).unwrap();
        std::fs::write(dir.path().join("sensors/door"), "open\n").unwrap();
        std::fs::write(dir.path().join("sensors/empty"), "\n").unwrap();
        let mut tb = toolbox(dir.path(), "min_interval_ms = 60000");
        tb.clock = ClockSource::Fixed(1_795_937_400);

        let out = tb.call("kb_search", "when do you close").unwrap();
        assert_eq!(out.passage_ids, vec!["hours"]);
        assert!(
            out.text.starts_with("[hours] Hours: We open at 08:00"),
            "{}",
            out.text
        );
        assert!(
            out.text.contains('…'),
            "passages are cut to max_passage_chars: {}",
            out.text
        );

        assert_eq!(tb.call("sensor", "door").unwrap().text, "door = open");
        assert!(matches!(
            tb.call("sensor", "empty"),
            Err(ToolError::Failed { .. })
        ));
        assert!(matches!(
            tb.call("sensor", "window"),
            Err(ToolError::BadArgument { .. })
        ));
        assert_eq!(
            tb.call("clock", "").unwrap().text,
            "Sunday 2026-11-29 07:30 (UTC+00:00)"
        );

        // Not on the list (calculator), not a tool at all (shell): refused, never run.
        assert_eq!(
            tb.call("calculator", "1 + 1"),
            Err(ToolError::NotAllowed("calculator".into()))
        );
        assert_eq!(
            tb.call("shell", "ls"),
            Err(ToolError::NotAllowed("shell".into()))
        );
        assert!(tb.allows("notify") && !tb.allows("calculator"));

        // notify: written to the sink once, then rate limited.
        assert!(tb.call("notify", r#"{"reason": "lost child"}"#).is_ok());
        assert!(matches!(
            tb.call("notify", r#"{"reason": "again"}"#),
            Err(ToolError::RateLimited { .. })
        ));
        assert_eq!(tb.notifications, 1);
        let sink = std::fs::read_to_string(dir.path().join("notify.jsonl")).unwrap();
        assert_eq!(sink.lines().count(), 1);
        assert!(sink.contains("lost child"));
        assert!(ToolName::Notify.side_effecting() && !ToolName::KbSearch.side_effecting());
    }

    #[test]
    fn a_tool_that_hangs_times_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sensors")).unwrap();
        let fifo = dir.path().join("sensors/fifo");
        // A FIFO with no writer: reading it blocks.
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("mkfifo unavailable: skipped");
            return;
        }
        let mut tb = toolbox(dir.path(), "");
        let t = Instant::now();
        assert_eq!(
            tb.call("sensor", "fifo"),
            Err(ToolError::Timeout {
                tool: ToolName::Sensor,
                timeout_ms: 200
            })
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        // Unblock the reader thread so it ends.
        let _ = std::fs::write(&fifo, "1\n");
    }

    #[test]
    fn cut_marks_truncation() {
        assert_eq!(cut_chars("abcdef", 4), "abc…");
        assert_eq!(cut_chars("abc", 4), "abc");
    }
}
