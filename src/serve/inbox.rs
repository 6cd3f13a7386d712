//! Incoming requests the broker may deliver more than once (QoS 1): a redelivery of one
//! being worked on, or of one already answered whose PUBACK a connection loss ate, is not
//! run again.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use rumqttc::{Publish, QoS};

/// Answered requests remembered for redeliveries.
const ANSWERED_MEMORY: usize = 4096;

/// Incoming packet ids in work, and the requests answered most recently.
#[derive(Debug, Default)]
pub struct Redeliveries {
    /// Packet id -> ticket of the request being worked on.
    working: HashMap<u16, u64>,
    /// (packet id, payload hash) of answered requests, most recent last.
    answered: VecDeque<(u16, u64)>,
}

fn payload_hash(p: &Publish) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.topic.hash(&mut h);
    p.payload.hash(&mut h);
    h.finish()
}

impl Redeliveries {
    /// A redelivery (DUP) of a request already answered: its result is in the outbox, it
    /// only needs acknowledging.
    pub fn answered_before(&self, p: &Publish) -> bool {
        p.dup && self.answered.contains(&(p.pkid, payload_hash(p)))
    }

    /// The ticket of the request with `p`'s packet id being worked on, if any.
    pub fn working_on(&self, p: &Publish) -> Option<u64> {
        if p.qos == QoS::AtMostOnce {
            return None;
        }
        self.working.get(&p.pkid).copied()
    }

    /// `p` was queued as `ticket`.
    pub fn started(&mut self, p: &Publish, ticket: u64) {
        if p.qos != QoS::AtMostOnce {
            self.working.insert(p.pkid, ticket);
        }
    }

    /// `p`'s outcome could not be recorded: no longer in work, and not answered, so its
    /// redelivery is run again.
    pub fn abandoned(&mut self, p: &Publish) {
        self.working.remove(&p.pkid);
    }

    /// `p` was answered (its outcome recorded).
    pub fn finished(&mut self, p: &Publish) {
        self.working.remove(&p.pkid);
        if p.qos != QoS::AtMostOnce {
            if self.answered.len() == ANSWERED_MEMORY {
                self.answered.pop_front();
            }
            self.answered.push_back((p.pkid, payload_hash(p)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16, payload: &str, dup: bool) -> Publish {
        let mut p = Publish::new(
            "d/greet/request",
            QoS::AtLeastOnce,
            payload.as_bytes().to_vec(),
        );
        p.pkid = pkid;
        p.dup = dup;
        p
    }

    #[test]
    fn a_duplicate_of_an_answered_request_is_recognised_by_id_and_payload() {
        let mut r = Redeliveries::default();
        let p = publish(3, "{\"text\":\"hi\"}", false);
        r.started(&p, 1);
        assert_eq!(r.working_on(&publish(3, "other", true)), Some(1));
        r.finished(&p);
        assert_eq!(r.working_on(&p), None);
        assert!(r.answered_before(&publish(3, "{\"text\":\"hi\"}", true)));
        assert!(
            !r.answered_before(&publish(3, "{\"text\":\"hi\"}", false)),
            "not DUP: new"
        );
        assert!(
            !r.answered_before(&publish(3, "{\"text\":\"yo\"}", true)),
            "other payload"
        );
    }

    #[test]
    fn qos0_requests_are_not_tracked() {
        let mut r = Redeliveries::default();
        let mut p = publish(0, "x", false);
        p.qos = QoS::AtMostOnce;
        r.started(&p, 1);
        assert_eq!(r.working_on(&p), None);
        r.finished(&p);
        p.dup = true;
        assert!(!r.answered_before(&p));
    }
}
