//! Which outbox entry a PUBACK acknowledges.
//!
//! rumqttc takes a publish into its request queue without a packet id; it picks the id
//! when it writes the packet and reports that as `Outgoing::Publish(pkid)`, one event per
//! publish, in the order the publishes were handed to it (QoS 0 ones report pkid 0). So
//! the daemon remembers, in hand-over order, which outbox entry (if any) each publish it
//! handed over was, pairs that with the packet id when the write is reported, and acks the
//! outbox entry when the broker's PUBACK for that id comes.

use std::collections::{HashMap, VecDeque};

/// Why a publish was not handed over.
#[derive(Debug, PartialEq)]
pub enum HandOver<E> {
    /// No connection: nothing is handed to the client (it would send it on the next
    /// connection, where its packet id would pair with another publish).
    Disconnected,
    /// The client refused it.
    Refused(E),
}

/// Publishes handed to rumqttc and waiting for their packet id, then outbox entries
/// waiting for their PUBACK, for the current connection.
///
/// Invariant: while connected, `handed` has exactly one entry per publish rumqttc accepted
/// in this connection and has not yet reported written, oldest first (`None`: a publish
/// that is not from the outbox: availability, stats, discovery), and `by_pkid` maps packet
/// ids written in this connection to their outbox entries; while disconnected both are
/// empty and nothing is recorded. [`PendingAcks::hand_over`] is the only way to add to
/// `handed`, and it adds one exactly when connected and the client accepted the publish.
///
/// The event loop keeps its side: on every connection loss it empties rumqttc's request
/// queue, in-flight list and buffered events, so every write reported after
/// [`PendingAcks::connected`] is of a publish handed over after it.
#[derive(Debug, Default)]
pub struct PendingAcks {
    connected: bool,
    handed: VecDeque<Option<u64>>,
    by_pkid: HashMap<u16, u64>,
    /// Writes or acks reported that matched nothing of this connection (logged, counted).
    pub stale_events: u64,
}

impl PendingAcks {
    /// Hands one publish to the client through `send`, only while connected; records it
    /// (as outbox entry `seq`) only when `send` succeeds.
    pub fn hand_over<E>(
        &mut self,
        seq: Option<u64>,
        send: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), HandOver<E>> {
        if !self.connected {
            return Err(HandOver::Disconnected);
        }
        send().map_err(HandOver::Refused)?;
        self.handed.push_back(seq);
        Ok(())
    }

    /// rumqttc wrote the oldest publish handed over, with packet id `pkid`. A write with
    /// nothing handed over (or while disconnected) is stale: it pairs with nothing.
    pub fn written(&mut self, pkid: u16) {
        match self.handed.pop_front() {
            Some(Some(seq)) => {
                self.by_pkid.insert(pkid, seq);
            }
            Some(None) => {}
            None => self.stale_events += 1,
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

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// A new connection: nothing of an earlier one holds (the outbox replays what was not
    /// acknowledged); hand-overs are recorded from now on.
    pub fn connected(&mut self) {
        self.forget();
        self.connected = true;
    }

    /// The connection is lost: forget it all and record nothing until the next one.
    pub fn disconnected(&mut self) {
        self.forget();
        self.connected = false;
    }

    fn forget(&mut self) {
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

    fn connected() -> PendingAcks {
        let mut a = PendingAcks::default();
        a.connected();
        a
    }

    #[test]
    fn packet_ids_pair_with_publishes_in_hand_over_order() {
        let mut a = connected();
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
    fn acks_out_of_order_take_their_own_entries() {
        let mut a = connected();
        for seq in 1..=4 {
            a.hand_over(Some(seq), ok).unwrap();
        }
        for pkid in [7, 8, 9, 10] {
            a.written(pkid);
        }
        assert_eq!(a.acked(9), Some(3));
        assert_eq!(a.acked(7), Some(1));
        assert_eq!(a.acked(10), Some(4));
        assert_eq!(a.acked(8), Some(2));
    }

    #[test]
    fn a_refused_hand_over_leaves_no_entry_to_shift_later_ids() {
        let mut a = connected();
        assert_eq!(
            a.hand_over(Some(1), || Err("full")),
            Err(HandOver::Refused("full"))
        );
        assert_eq!(a.unwritten(), 0);
        a.hand_over(Some(2), ok).unwrap();
        a.written(7);
        assert_eq!(a.acked(7), Some(2));
    }

    #[test]
    fn nothing_is_handed_over_or_recorded_while_disconnected() {
        let mut a = PendingAcks::default();
        let mut sent = false;
        let r = a.hand_over(Some(1), || {
            sent = true;
            ok()
        });
        assert_eq!(r, Err(HandOver::Disconnected));
        assert!(!sent, "the client is not even asked");
        a.connected();
        a.hand_over(Some(2), ok).unwrap();
        a.disconnected();
        assert_eq!(a.hand_over(Some(3), ok), Err(HandOver::Disconnected));
        assert_eq!(a.unwritten(), 0);
        // The next connection starts clean: its first write is its first hand-over's.
        a.connected();
        a.hand_over(Some(4), ok).unwrap();
        a.written(1);
        assert_eq!(a.acked(1), Some(4));
    }

    #[test]
    fn a_stale_write_or_ack_from_an_old_connection_takes_nothing() {
        let mut a = connected();
        a.hand_over(Some(1), ok).unwrap();
        a.hand_over(Some(2), ok).unwrap();
        a.written(1);
        a.disconnected();
        // Reported after the loss (a failed flush left them buffered): they pair with
        // nothing, while disconnected and after the next connection alike.
        a.written(2);
        assert_eq!(a.acked(1), None);
        a.connected();
        a.written(3);
        assert_eq!(a.acked(3), None);
        assert_eq!(a.stale_events, 2);
        a.hand_over(Some(5), ok).unwrap();
        a.written(1);
        assert_eq!(a.acked(1), Some(5), "the new connection's own pairing");
    }

    #[test]
    fn a_packet_id_reused_after_its_ack_maps_to_the_new_entry() {
        let mut a = connected();
        a.hand_over(Some(1), ok).unwrap();
        a.written(5);
        assert_eq!(a.acked(5), Some(1));
        a.hand_over(Some(2), ok).unwrap();
        a.written(5);
        assert_eq!(a.acked(5), Some(2));
    }
}
