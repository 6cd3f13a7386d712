//! What the daemon publishes: typed outgoing messages, and the JSON records in them
//! (results, compact traces, retained state, `notify` side effects, error records,
//! incidents).

use serde_json::{json, Value};

use crate::classify::ClassifyResult;
use crate::monitor::MonitorEvent;
use crate::rank::RankResult;
use crate::react::request::{compact_trace, ReactResult};
use crate::serve::mqtt::Topics;
use crate::serve::outbox::Priority;
use crate::serve::redact::Redactor;
use crate::serve::worker::{JobError, Output};
use crate::util::time::now_ms;

/// What an outgoing message is; it decides its priority in the outbox, whether the broker
/// retains it, and whether its payload is redacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// `<prefix>/<task>/result`: the outcome itself.
    Result,
    /// `<prefix>/<task>/trace`: the compact trace of an outcome.
    Trace,
    /// `<prefix>/<task>/state`: the latest classification, retained.
    State,
    /// `<prefix>/<task>/notify`: a ReAct `notify` side effect.
    Notify,
    /// `<prefix>/errors`: an error record.
    Error,
    /// `<prefix>/<rule>/events`: a monitor incident.
    Incident,
}

impl MessageKind {
    /// Whether personal data in this kind's payload is masked before it leaves the device.
    /// Every kind can carry it: traces and error records quote request text, incidents
    /// their example texts, ReAct answers and `notify` payloads what the model read or
    /// was told, results and state the fields echoed back. One match with no wildcard, so
    /// a new kind has to decide.
    pub fn redacted(self) -> bool {
        match self {
            MessageKind::Result
            | MessageKind::Trace
            | MessageKind::State
            | MessageKind::Notify
            | MessageKind::Error
            | MessageKind::Incident => true,
        }
    }

    pub const ALL: [MessageKind; 6] = [
        MessageKind::Result,
        MessageKind::Trace,
        MessageKind::State,
        MessageKind::Notify,
        MessageKind::Error,
        MessageKind::Incident,
    ];

    /// Side effects, errors and incidents go first; traces are dropped first when the
    /// outbox is over its caps.
    pub fn priority(self) -> Priority {
        match self {
            MessageKind::Notify | MessageKind::Error | MessageKind::Incident => Priority::High,
            MessageKind::Result | MessageKind::State => Priority::Normal,
            MessageKind::Trace => Priority::Low,
        }
    }

    /// Only the state is retained: a dashboard that subscribes late sees the latest one.
    pub fn retained(self) -> bool {
        self == MessageKind::State
    }
}

/// One message to record in the outbox and publish (QoS 1).
#[derive(Debug, Clone, PartialEq)]
pub struct OutMessage {
    pub kind: MessageKind,
    pub topic: String,
    pub payload: String,
    pub retain: bool,
    pub priority: Priority,
}

impl OutMessage {
    /// A message of `kind`, with that kind's priority and retain flag.
    pub fn new(kind: MessageKind, topic: String, payload: String) -> OutMessage {
        OutMessage {
            kind,
            topic,
            payload,
            retain: kind.retained(),
            priority: kind.priority(),
        }
    }

    /// Masks personal data in the payload when the kind calls for it.
    pub fn redact_with(&mut self, redactor: &Redactor) {
        if self.kind.redacted() {
            self.payload = redactor.redact_payload(&self.payload);
        }
    }

    /// The outbox's record of it (the kind is not stored: it is only needed before).
    pub fn into_outbox(self) -> (String, String, bool, Priority) {
        (self.topic, self.payload, self.retain, self.priority)
    }
}

/// An MQTT event for the trace log: what it is, never a payload (a request's text would
/// reach the log unredacted).
pub fn log_summary(e: &rumqttc::v5::Event) -> String {
    use rumqttc::v5::{mqttbytes::v5::Packet, Event};
    match e {
        Event::Incoming(Packet::Publish(p)) => format!(
            "Incoming(Publish topic={} pkid={} qos={:?} dup={} bytes={})",
            String::from_utf8_lossy(&p.topic),
            p.pkid,
            p.qos,
            p.dup,
            p.payload.len()
        ),
        other => format!("{other:?}"),
    }
}

/// An incident for `<prefix>/<rule>/events`.
pub fn incident_message(prefix: &str, event: &MonitorEvent) -> OutMessage {
    OutMessage::new(MessageKind::Incident, event.topic(prefix), event.payload())
}

/// An error record for `<prefix>/errors` (and stdout in pipeline mode).
pub fn error_record(
    id: Option<&str>,
    task: Option<&str>,
    topic: Option<&str>,
    kind: &str,
    message: &str,
) -> Value {
    json!({
        "id": id,
        "task": task,
        "topic": topic,
        "error": {"kind": kind, "message": message},
        "ts_ms": now_ms(),
    })
}

/// The compact trace of a result: bounded in size (top labels only), full detail stays in
/// the local log.
pub fn trace_of(r: &ClassifyResult) -> Value {
    let mut scores: Vec<(&String, &f64)> = r.scores.iter().collect();
    scores.sort_by(|a, b| b.1.total_cmp(a.1));
    let top: serde_json::Map<String, Value> = scores
        .iter()
        .take(8)
        .map(|(k, v)| ((*k).clone(), json!((**v * 1e4).round() / 1e4)))
        .collect();
    let mut trace = json!({
        "id": r.id,
        "task": r.task,
        "label": r.label,
        "abstained": r.abstained,
        "template_sha256": r.provenance.template_sha256,
        "model_sha256": &r.provenance.model_sha256[..16.min(r.provenance.model_sha256.len())],
        "tokens": r.tokens,
        "timings_ms": r.timings_ms,
        "top_scores": top,
        "n_labels": r.scores.len(),
        "truncated": r.truncated,
        "calibration": r.calibration.applied,
        "logprob_over": r.logprob_over,
        "ts_ms": now_ms(),
    });
    // Retrieved demonstrations: which pool examples this request was shown.
    if !r.demos.is_empty() {
        trace["demos"] = json!(r.demos);
    }
    trace
}

/// The compact trace of a ranking: the top items' ids and scores, counts and time.
fn rank_trace(r: &RankResult) -> Value {
    let top: Vec<Value> = r
        .ranked
        .iter()
        .take(8)
        .map(|x| json!({"id": x.id, "score": (x.score * 1e4).round() / 1e4}))
        .collect();
    json!({
        "id": r.id,
        "task": r.task,
        "top": top,
        "n_items": r.n_items,
        "n_ranked": r.ranked.len(),
        "n_failed": r.failed.len(),
        "prefix_tokens_decoded": r.prefix_tokens_decoded,
        "ms": r.ms,
        "ts_ms": now_ms(),
    })
}

/// What one outcome publishes under `route` (the task name the request came in on):
/// result, trace and retained state for a classification; result and trace for a ranking;
/// `notify` side effects, answer and trace for a ReAct run; or an error record.
pub fn messages_for(
    topics: &Topics,
    route: &str,
    request_id: &str,
    outcome: &Result<Output, JobError>,
) -> Vec<OutMessage> {
    use MessageKind as K;
    match outcome {
        Ok(Output::Classified(r)) => {
            let state = json!({
                "id": r.id, "label": r.label, "top_label": r.top_label,
                "confidence": r.confidence, "abstained": r.abstained, "ts_ms": now_ms(),
            });
            vec![
                OutMessage::new(K::Result, topics.result(route), to_json(r.as_ref())),
                OutMessage::new(K::Trace, topics.trace(route), trace_of(r).to_string()),
                OutMessage::new(K::State, topics.state(route), state.to_string()),
            ]
        }
        Ok(Output::Ranked(r)) => vec![
            OutMessage::new(K::Result, topics.result(route), to_json(r)),
            OutMessage::new(K::Trace, topics.trace(route), rank_trace(r).to_string()),
        ],
        Ok(Output::Reacted(r)) => {
            let mut msgs: Vec<OutMessage> = r
                .notify
                .iter()
                .map(|n| {
                    let mut n = n.clone();
                    n["id"] = json!(r.id);
                    OutMessage::new(K::Notify, topics.notify(route), n.to_string())
                })
                .collect();
            msgs.push(OutMessage::new(
                K::Result,
                topics.result(route),
                to_json(r.as_ref() as &ReactResult),
            ));
            msgs.push(OutMessage::new(
                K::Trace,
                topics.trace(route),
                compact_trace(r).to_string(),
            ));
            msgs
        }
        Err(e) => {
            let record = error_record(
                Some(request_id),
                Some(route),
                Some(&topics.request(route)),
                e.kind(),
                &e.to_string(),
            );
            vec![OutMessage::new(
                K::Error,
                topics.errors(),
                record.to_string(),
            )]
        }
    }
}

/// Plain data structs: serializing cannot fail (empty, as before, if it ever did).
fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::react::trace::{StepRecord, StopReason, Trace};

    fn topics() -> Topics {
        Topics {
            prefix: "edgeact/d".into(),
            fleet_prefix: "edgeact/fleet".into(),
            share_group: None,
        }
    }

    #[test]
    fn a_react_outcome_publishes_notifications_first_then_answer_and_trace() {
        let trace = Trace {
            task: "kiosk".into(),
            question: "My child is lost".into(),
            answer: "A member of staff is on the way.".into(),
            finished: true,
            stop_reason: StopReason::Final,
            seed: 42,
            grammar: true,
            steps: vec![
                StepRecord {
                    thought: Some("Staff must help.".into()),
                    tool: Some("notify".into()),
                    arg: Some(r#"{"reason":"lost child"}"#.into()),
                    observation: Some("x".repeat(5000)),
                    passage_ids: vec!["lost-child".into()],
                    ..StepRecord::default()
                },
                StepRecord {
                    final_answer: Some("A member of staff is on the way.".into()),
                    ..StepRecord::default()
                },
            ],
            generated_tokens: 40,
            unparsable_steps: 0,
            refused_calls: 0,
            tool_errors: 0,
            dropped_observations: 0,
            history_turns: 0,
            dropped_turns: 0,
            total_ms: 1234.56,
        };
        let notify = vec![json!({"task": "kiosk", "payload": {"reason": "lost child"}})];
        let r = ReactResult::new("k7", None, trace, notify);
        let msgs = messages_for(&topics(), "kiosk", "k7", &Ok(Output::Reacted(Box::new(r))));
        let names: Vec<&str> = msgs.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(
            names,
            [
                "edgeact/d/kiosk/notify",
                "edgeact/d/kiosk/result",
                "edgeact/d/kiosk/trace"
            ]
        );
        assert_eq!(msgs[0].priority, Priority::High, "side effects go first");
        let n: Value = serde_json::from_str(&msgs[0].payload).unwrap();
        assert_eq!(
            (n["id"].as_str(), n["payload"]["reason"].as_str()),
            (Some("k7"), Some("lost child"))
        );
        let result: Value = serde_json::from_str(&msgs[1].payload).unwrap();
        assert_eq!(result["stop_reason"], "final");
        assert_eq!(result["citations"], json!(["lost-child"]));
        assert_eq!(result["notifications"], 1);
        assert!(result.get("trace").is_none(), "the full trace stays local");
        assert!(
            msgs[2].payload.len() < 2000,
            "observations are cut in the compact trace"
        );
    }

    #[test]
    fn kinds_keep_the_priorities_retain_flags_and_redaction_of_their_topics() {
        use MessageKind as K;
        let table = [
            (K::Result, Priority::Normal, false, true),
            (K::Trace, Priority::Low, false, true),
            (K::State, Priority::Normal, true, true),
            (K::Notify, Priority::High, false, true),
            (K::Error, Priority::High, false, true),
            (K::Incident, Priority::High, false, true),
        ];
        for (kind, priority, retain, redacted) in table {
            let m = OutMessage::new(kind, "t".into(), "p".into());
            assert_eq!(
                (m.priority, m.retain, kind.redacted()),
                (priority, retain, redacted),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn an_error_outcome_is_one_error_record_naming_the_request_topic() {
        let e = JobError::WrongKind {
            task: "greet".into(),
            reason: "no such task".into(),
        };
        let msgs = messages_for(&topics(), "greet", "r1", &Err(e));
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            (msgs[0].kind, msgs[0].topic.as_str()),
            (MessageKind::Error, "edgeact/d/errors")
        );
        let v: Value = serde_json::from_str(&msgs[0].payload).unwrap();
        assert_eq!(v["id"], "r1");
        assert_eq!(v["task"], "greet");
        assert_eq!(v["topic"], "edgeact/d/greet/request");
        assert_eq!(v["error"]["kind"], "invalid_request");
    }

    /// Whatever leaves the device is redacted by its kind, whatever its topic: a ReAct
    /// answer, a `notify` payload, an incident's examples as much as a trace; the id stays.
    #[test]
    fn every_kind_of_message_is_redacted_ids_kept() {
        let r = Redactor::all_kinds();
        let text = r#"{"id":"r-4111111111111111","answer":"call ０７７００９００１２３ or mail jane.doe@example.com"}"#;
        for kind in MessageKind::ALL {
            let mut m = OutMessage::new(kind, "any/topic".into(), text.into());
            m.redact_with(&r);
            let v: Value = serde_json::from_str(&m.payload).unwrap();
            assert_eq!(v["id"], "r-4111111111111111", "{kind:?}");
            assert_eq!(v["answer"], "call [phone] or mail [email]", "{kind:?}");
        }
        // Not JSON (a notify payload can be plain text): redacted as text.
        let mut m = OutMessage::new(
            MessageKind::Notify,
            "n".into(),
            "to jane@example.com".into(),
        );
        m.redact_with(&r);
        assert_eq!(m.payload, "to [email]");
    }

    /// The trace log names a packet, never its payload (request text is not redacted there).
    #[test]
    fn the_trace_log_summary_of_a_publish_has_no_payload() {
        use rumqttc::v5::mqttbytes::{v5::Packet, v5::Publish, QoS};
        let p = Publish::new(
            "edgeact/d/greet/request",
            QoS::AtLeastOnce,
            br#"{"text":"call me on 0770 0900123, jane@example.com"}"#.to_vec(),
            None,
        );
        let s = log_summary(&rumqttc::v5::Event::Incoming(Packet::Publish(p)));
        assert!(
            s.contains("edgeact/d/greet/request") && s.contains("bytes=52"),
            "{s}"
        );
        assert!(!s.contains("jane") && !s.contains("0770"), "{s}");
    }
}
