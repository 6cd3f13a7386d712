//! The daemon's handling of what comes back: an outcome from the inference thread (its
//! messages, the alert rules' incidents, recorded before the request is acknowledged),
//! context readings, the stats tick. A child of `state`, so it sees the daemon's fields.

use std::collections::BTreeMap;
use std::time::Instant;

use rumqttc::{Publish, QoS};

use super::{Daemon, Inference, Link, MAX_CONTEXT_VALUE_BYTES};
use crate::serve::limits::context_value;
use crate::serve::message::{error_record, messages_for, MessageKind, OutMessage};
use crate::serve::worker::{Done, Output};
use crate::serve::ServeError;

impl<L: Link, I: Inference> Daemon<L, I> {
    /// A context topic's message: kept (control characters as spaces) as the latest value
    /// of `context.<name>`; an oversized one is refused with an error record and the last
    /// good value stays. Acknowledged either way.
    pub(super) fn on_context(&mut self, name: &str, p: &Publish) {
        if p.payload.len() > MAX_CONTEXT_VALUE_BYTES {
            let message = format!(
                "context `{name}`: value of {} bytes is over the limit of {MAX_CONTEXT_VALUE_BYTES}; the last value is kept",
                p.payload.len()
            );
            self.reject(p, None, None, "context_too_large", message);
            return;
        }
        self.context.insert(
            format!("context.{name}"),
            (context_value(&p.payload), Instant::now()),
        );
        self.ack_now(p);
    }

    /// The context readings into a request's fields, each with its age in seconds
    /// (`context.<name>.age_s`, for rules that must not use a stale one). A configured
    /// context is the sensor's alone: a request's own value or age for it is dropped.
    pub(super) fn add_context(&self, fields: &mut BTreeMap<String, String>) {
        for name in self.cfg.context_topics.keys() {
            fields.remove(&format!("context.{name}"));
            fields.remove(&format!("context.{name}.age_s"));
        }
        for (k, (v, at)) in &self.context {
            fields.insert(k.clone(), v.clone());
            let age_s = at.elapsed().as_secs_f64();
            fields.insert(format!("{k}.age_s"), format!("{age_s:.1}"));
        }
    }

    pub(super) fn on_done(&mut self, d: Done) -> Result<(), ServeError> {
        self.stats.record(&d);
        let ticket = self.tickets.remove(&d.ticket);
        let task = self.task_names.get(d.task).cloned().unwrap_or_default();
        if let Err(e) = &d.outcome {
            let e = e.to_string();
            tracing::warn!(id = %d.request_id, task = %task, "{}", self.cfg.redactor.redact(&e));
        }
        let route = ticket.as_ref().map_or(task, |t| t.route.clone());
        let mut msgs = messages_for(&self.cfg.topics, &route, &d.request_id, &d.outcome);
        if let (Ok(Output::Classified(r)), Some(fields)) =
            (&d.outcome, ticket.as_ref().and_then(|t| t.fields.as_ref()))
        {
            match self
                .monitors
                .observe(&self.cfg.topics.prefix, d.task, r, fields)
            {
                Ok(incidents) => msgs.extend(incidents),
                Err(refused) => {
                    // The result stands; only the alert rules refuse it, and say so.
                    let e = refused.to_string();
                    tracing::warn!(id = %d.request_id, route = %route, "{e}");
                    let topic = self.cfg.topics.request(&route);
                    let rec = error_record(
                        Some(&d.request_id),
                        Some(&route),
                        Some(&topic),
                        refused.kind(),
                        &e,
                    );
                    msgs.push(OutMessage::new(
                        MessageKind::Error,
                        self.cfg.topics.errors(),
                        rec.to_string(),
                    ));
                }
            }
        }
        let publish = ticket.and_then(|t| t.publish);
        let recorded = self.record(msgs, publish.as_ref());
        if let Some(p) = &publish {
            if recorded {
                self.redeliveries.finished(p);
            } else {
                // Its redelivery must be run again, not taken for one answered.
                self.redeliveries.abandoned(p);
            }
        }
        Ok(())
    }

    /// On the stats tick: moves idle monitors' time on (quiet incidents end) and saves
    /// window state that changed.
    pub(super) fn tick_monitors(&mut self) -> Result<(), ServeError> {
        let msgs = self.monitors.advance(&self.cfg.topics.prefix);
        if !msgs.is_empty() {
            self.record(msgs, None);
        }
        Ok(())
    }

    pub(super) fn publish_stats(&mut self) {
        let mut s = self.stats.snapshot(self.worker.depth(), &self.outbox);
        if let Some(l) = &self.learning {
            s["feedback"] = l.stats();
        }
        tracing::debug!(stats = %s, "stats");
        if self.is_connected() {
            let topic = self.cfg.topics.stats();
            let _ = self.publish(
                None,
                topic,
                QoS::AtMostOnce,
                false,
                s.to_string().into_bytes(),
            );
        }
        // Acks are written without fsync; settle them now and then.
        let _ = self.outbox.sync(false);
    }
}
