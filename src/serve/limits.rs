//! Size and length limits on what crosses the network edge, as plain functions: ids and
//! field names of a request, context values, and the error record that replaces a message
//! over the MQTT packet limit.

use serde_json::Value;

use crate::serve::message::{error_record, MessageKind, OutMessage};
use crate::serve::mqtt::{self, Topics};
use crate::serve::worker::Job;

/// Largest context-topic value kept, in bytes: a sensor reading, not a document (it goes
/// into every prompt of the task).
pub const MAX_CONTEXT_VALUE_BYTES: usize = 1024;

/// Longest request id, rank item id or field name accepted, in bytes: they are copied into
/// results, traces, incidents and monitor state, so a long one multiplies.
pub const MAX_ID_BYTES: usize = 256;

/// The error record that replaces a message over the packet limit `limit`: the request id
/// (read from the payload when it has one), the topic and both sizes.
pub fn too_large_record(topics: &Topics, topic: &str, payload: &str, limit: usize) -> OutMessage {
    let id = serde_json::from_str::<Value>(payload)
        .ok()
        .and_then(|v| match v.get("id") {
            Some(Value::String(s)) if s.len() <= MAX_ID_BYTES => Some(s.clone()),
            _ => None,
        });
    let size = mqtt::publish_packet_bytes(topic, payload.len());
    let message = format!(
        "the message for {topic} is {size} bytes, over the MQTT packet limit of {limit} bytes \
         (max_packet_bytes, or the broker's max_packet_size); it is not published"
    );
    tracing::error!(id = ?id, "{message}");
    let rec = error_record(
        id.as_deref(),
        None,
        Some(topic),
        "result_too_large",
        &message,
    );
    OutMessage::new(MessageKind::Error, topics.errors(), rec.to_string())
}

/// Refuses a request whose id, rank item ids or field names are over [`MAX_ID_BYTES`].
pub fn check_id_lengths(job: &Job) -> Result<(), String> {
    let too_long = |what: &str, s: &str| {
        (s.len() > MAX_ID_BYTES).then(|| {
            format!(
                "{what} is {} bytes, over the limit of {MAX_ID_BYTES}",
                s.len()
            )
        })
    };
    let mut problems = vec![too_long("the request id", job.id())];
    match job {
        Job::Classify(r) => problems.extend(r.fields.keys().map(|k| too_long("a field name", k))),
        Job::Rank(r) => problems.extend(r.items.iter().map(|i| too_long("an item id", &i.id))),
        Job::React(_) => {}
    }
    match problems.into_iter().flatten().next() {
        Some(msg) => Err(msg),
        None => Ok(()),
    }
}

/// A context value as it goes into prompts: text with control characters (newlines
/// included, which could forge a line of the prompt) turned into spaces, trimmed.
pub fn context_value(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}
