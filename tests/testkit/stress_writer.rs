//! The outbox power-loss writer (powerloss tests): puts and acks as fast as fsync allows and
//! reports each step on a line, so that a process killed at any moment leaves a record of
//! what it knew to be durable. Only the public `Outbox` API.

use std::io::Write;
use std::path::Path;

use edgeact::serve::outbox::{Outbox, OutboxError, OutboxLimits, Priority};

/// The payload the writer records for `seq`: derived from the seq alone, with a length that
/// varies from 20 to about 1 000 bytes, so a reader can check every record it gets back.
pub fn stress_payload(seq: u64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let n = (seq.wrapping_mul(2_654_435_761) % 997) as usize;
    let fill: String = (0..n)
        .map(|i| ALPHABET[(seq as usize).wrapping_add(i * 7) % ALPHABET.len()] as char)
        .collect();
    format!("{{\"seq\":{seq},\"fill\":\"{fill}\"}}")
}

/// Whether the stress writer acks `seq` right after putting it (nine of every ten).
pub fn stress_writer_acks(seq: u64) -> bool {
    !seq.is_multiple_of(10)
}

/// The writer: opens the outbox in `dir` (fsync on every put), then puts `stress/<seq>` with
/// [`stress_payload`], and prints `P <seq> <file_bytes>` once `put_all` has returned (the
/// record is durable), then acks nine of every ten and prints `A <seq> <file_bytes>`. The
/// first line is `O <torn_records> <live messages> <file_bytes>`. It stops at `max_puts`
/// puts or when `out` fails.
pub fn stress_writer(dir: &Path, max_puts: u64, out: &mut impl Write) -> Result<(), OutboxError> {
    let mut ob = Outbox::open(dir, OutboxLimits::default())?;
    let opened = format!(
        "O {} {} {}\n",
        ob.counters.torn_records,
        ob.len(),
        ob.file_bytes()
    );
    if !emit(out, &opened) {
        return Ok(());
    }
    for _ in 0..max_puts {
        let seq = ob.next_seq();
        let put = ob.put_all(vec![(
            format!("stress/{seq}"),
            stress_payload(seq),
            false,
            Priority::Normal,
        )])?;
        debug_assert_eq!(put.first().map(|m| m.seq), Some(seq));
        if !emit(out, &format!("P {seq} {}\n", ob.file_bytes())) {
            return Ok(());
        }
        if stress_writer_acks(seq) {
            ob.ack(seq)?;
            if !emit(out, &format!("A {seq} {}\n", ob.file_bytes())) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One line, written and flushed at once: a reader sees whole lines only (pipe writes of
/// under 4 KiB are atomic). False when the reader is gone.
fn emit(out: &mut impl Write, text: &str) -> bool {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}
