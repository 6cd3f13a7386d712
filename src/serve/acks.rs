//! Which outbox entry a PUBACK acknowledges.
//!
//! rumqttc takes a publish into its request queue without a packet id; it picks the id
//! when it writes the packet and reports that as `Outgoing::Publish(pkid)`, one event per
//! publish, in the order the publishes were handed to it (QoS 0 ones report pkid 0). So
//! the daemon remembers, in hand-over order, which outbox entry (if any) each publish it
//! handed over was, pairs that with the packet id when the write is reported, and acks the
//! outbox entry when the broker's PUBACK for that id comes.

use std::collections::{HashMap, VecDeque};

/// Publishes handed to rumqttc and waiting for their packet id, then outbox entries
/// waiting for their PUBACK.
///
/// Invariant: `handed` has exactly one entry per publish rumqttc accepted in this
/// connection and has not yet reported written, oldest first (`None`: a publish that is
/// not from the outbox: availability, stats, discovery, or a fallback when the outbox
/// could not be written). [`PendingAcks::hand_over`] is the only way to add one, and it
/// adds one exactly when the client accepted the publish.
#[derive(Debug, Default)]
pub struct PendingAcks {
    handed: VecDeque<Option<u64>>,
    by_pkid: HashMap<u16, u64>,
}

impl PendingAcks {
    /// Hands one publish to the client through `send`; records it (as outbox entry `seq`)
    /// only when `send` succeeds.
    pub fn hand_over<E>(
        &mut self,
        seq: Option<u64>,
        send: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        send()?;
        self.handed.push_back(seq);
        Ok(())
    }

    /// rumqttc wrote the oldest publish handed over, with packet id `pkid`.
    pub fn written(&mut self, pkid: u16) {
        if let Some(Some(seq)) = self.handed.pop_front() {
            self.by_pkid.insert(pkid, seq);
        }
    }

    /// The broker acknowledged `pkid`: the outbox entry it carried, if it carried one.
    pub fn acked(&mut self, pkid: u16) -> Option<u64> {
        self.by_pkid.remove(&pkid)
    }

    /// Publishes handed over and not yet written (they sit in rumqttc's request queue).
    pub fn unwritten(&self) -> usize {
        self.handed.len()
    }

    /// A new connection (or none): rumqttc's in-flight state is dropped with the old one
    /// and the outbox replays what was not acknowledged, so nothing here holds any more.
    pub fn reset(&mut self) {
        self.handed.clear();
        self.by_pkid.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Result<(), ()> {
        Ok(())
    }

    #[test]
    fn packet_ids_pair_with_publishes_in_hand_over_order() {
        let mut a = PendingAcks::default();
        a.hand_over(Some(10), ok).unwrap();
        a.hand_over(None, ok).unwrap(); // stats, QoS 0
        a.hand_over(Some(11), ok).unwrap();
        assert_eq!(a.unwritten(), 3);
        a.written(1);
        a.written(0);
        a.written(2);
        assert_eq!(a.unwritten(), 0);
        assert_eq!(a.acked(2), Some(11));
        assert_eq!(a.acked(1), Some(10));
        assert_eq!(
            a.acked(0),
            None,
            "a publish not from the outbox acks nothing"
        );
        assert_eq!(a.acked(1), None, "each ack is taken once");
    }

    #[test]
    fn a_refused_hand_over_leaves_no_entry_to_shift_later_ids() {
        let mut a = PendingAcks::default();
        assert_eq!(a.hand_over(Some(1), || Err("full")), Err("full"));
        assert_eq!(a.unwritten(), 0);
        a.hand_over(Some(2), ok).unwrap();
        a.written(7);
        assert_eq!(a.acked(7), Some(2));
    }

    #[test]
    fn reset_forgets_everything_of_the_old_connection() {
        let mut a = PendingAcks::default();
        a.hand_over(Some(1), ok).unwrap();
        a.hand_over(Some(2), ok).unwrap();
        a.written(1);
        a.reset();
        assert_eq!(a.unwritten(), 0);
        assert_eq!(a.acked(1), None);
        // A write reported after the reset pairs with nothing.
        a.written(2);
        assert_eq!(a.acked(2), None);
    }

    #[test]
    fn a_packet_id_reused_after_its_ack_maps_to_the_new_entry() {
        let mut a = PendingAcks::default();
        a.hand_over(Some(1), ok).unwrap();
        a.written(5);
        assert_eq!(a.acked(5), Some(1));
        a.hand_over(Some(2), ok).unwrap();
        a.written(5);
        assert_eq!(a.acked(5), Some(2));
    }
}
