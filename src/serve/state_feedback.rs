//! The daemon's handling of `<prefix>/feedback` (see [`crate::serve::learning`]): a
//! record is acknowledged only once it is on disk; an invalid one gets an error record
//! naming what is wrong; one that cannot be written is left to the broker to deliver again.

use std::time::Instant;

use rumqttc::Publish;
use serde_json::Value;

use super::{Daemon, Inference, Link};
use crate::serve::learning::{Accepted, Learning, RetrainReport};
use crate::serve::limits::MAX_ID_BYTES;

impl<L: Link, I: Inference> Daemon<L, I> {
    /// Takes feedback on `<prefix>/feedback` from now on (subscribed at the next connection).
    pub fn set_learning(&mut self, learning: Learning) {
        self.learning = Some(learning);
    }

    pub(super) fn on_feedback(&mut self, p: Publish) {
        if self.draining {
            // Not acknowledged: the broker keeps it for our next session.
            return;
        }
        let now = Instant::now();
        let Some(learning) = self.learning.as_mut() else {
            return;
        };
        match learning.accept(&p.payload, now) {
            Accepted::Kept(_) => {
                self.ack_now(&p);
                self.start_due_retrains();
            }
            Accepted::Duplicate => self.ack_now(&p),
            Accepted::Invalid(e) => {
                // The id and task as sent, when readable, so the sender can match the error.
                let v: Option<Value> = serde_json::from_slice(&p.payload).ok();
                let field = |k: &str| {
                    v.as_ref()
                        .and_then(|v| v.get(k))
                        .and_then(Value::as_str)
                        .filter(|s| s.len() <= MAX_ID_BYTES)
                        .map(str::to_string)
                };
                let (id, task) = (field("id"), field("task"));
                self.reject(&p, id.as_deref(), task.as_deref(), e.kind(), e.to_string());
            }
            Accepted::NotKept(e) => {
                tracing::error!("{e}; the feedback is left to the broker to deliver again");
            }
        }
    }

    /// Starts the retrains that are due (by count or by time).
    pub(super) fn start_due_retrains(&mut self) {
        if self.draining {
            return;
        }
        if let Some(l) = self.learning.as_mut() {
            l.start_due(Instant::now());
        }
    }

    pub(super) fn on_retrained(&mut self, r: RetrainReport) {
        if let Some(l) = self.learning.as_mut() {
            l.finished(r);
        }
        self.start_due_retrains();
    }
}
