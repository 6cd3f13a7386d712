//! The durable outbox: every message to publish is appended to an on-disk log first and
//! removed only after the broker's PUBACK, so results survive network cuts, broker restarts
//! and power loss, and are replayed oldest first.
//!
//! The log is a sequence of records `[len: u32 LE][crc32: u32 LE][JSON body]`. A body is
//! either a `put` (a message) or an `ack` (a sequence number that is done). On open the log
//! is read to its end ([`scan_log`]); a torn or corrupt tail (power loss mid-write) is cut
//! off and counted, and every record before it is kept; a damaged region in the middle is
//! skipped and counted, and the records after it are kept too. When most of the file is
//! acked, it is compacted by writing the live messages to a new file and renaming it over
//! the old one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::util::time::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("outbox {path}: a record of {bytes} bytes is over the limit of {max_bytes}")]
    TooLarge {
        path: PathBuf,
        bytes: usize,
        max_bytes: usize,
    },
}

/// Which messages are dropped last when the outbox is over its caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Traces and stats: dropped first.
    Low,
    /// Results and state.
    Normal,
    /// Errors and alerts: dropped last.
    High,
}

/// When appended records are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every append, before the caller acknowledges its input.
    Always,
    /// At most once per interval (a crash may lose the last interval).
    Interval(Duration),
    /// Never explicitly (the OS decides).
    Never,
}

/// A message waiting for its PUBACK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub seq: u64,
    pub topic: String,
    pub payload: String,
    pub retain: bool,
    pub priority: Priority,
    /// Unix time in ms when it was recorded.
    pub created_ms: u64,
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    Put(Message),
    Ack { seq: u64 },
}

/// Limits and policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxLimits {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub fsync: FsyncPolicy,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_bytes: 64 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            fsync: FsyncPolicy::Always,
        }
    }
}

/// Counters for `stats` and tests.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OutboxCounters {
    /// Messages dropped because of the byte cap, by priority.
    pub dropped_for_size: u64,
    /// Messages dropped because they were older than max_age.
    pub dropped_for_age: u64,
    /// Damaged regions (a torn or corrupt tail, or corrupt bytes in the middle) skipped
    /// when the log was opened; each held at least one record.
    pub torn_records: u64,
    /// Bytes skipped with them.
    pub torn_bytes: u64,
    pub compactions: u64,
}

pub struct Outbox {
    path: PathBuf,
    file: File,
    file_bytes: u64,
    live: BTreeMap<u64, Message>,
    live_bytes: u64,
    next_seq: u64,
    limits: OutboxLimits,
    last_sync: Instant,
    dirty: bool,
    /// Puts were written since the last sync (acks alone need no timely sync).
    puts_unsynced: bool,
    pub counters: OutboxCounters,
}

const HEADER: usize = 8;
/// Largest record body written or read: a bigger length field is a corrupt one.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;
/// How every body starts (serde writes the tag first): a cheap test before the CRC when
/// looking for the next record after a damaged region.
const BODY_START: &[u8] = b"{\"op\":\"";

/// The bytes of one record: `[len: u32 LE][crc32: u32 LE][JSON body]`.
pub fn encode_record(rec: &Record) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail.
    let body = serde_json::to_vec(rec).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend((body.len() as u32).to_le_bytes());
    out.extend(crc32fast::hash(&body).to_le_bytes());
    out.extend(body);
    out
}

/// What reading a log found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogScan {
    /// The good records, in file order.
    pub records: Vec<Record>,
    /// Damaged regions skipped (a torn tail is one).
    pub torn_records: u64,
    /// Bytes in them.
    pub torn_bytes: u64,
}

/// The record at `pos` and where the next one starts, if `pos` holds a whole, intact one.
fn record_at(bytes: &[u8], pos: usize) -> Option<(Record, usize)> {
    let header = bytes.get(pos..pos.checked_add(HEADER)?)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD_BYTES {
        return None;
    }
    let end = pos + HEADER + len;
    let body = bytes.get(pos + HEADER..end)?;
    if !body.starts_with(BODY_START) || crc32fast::hash(body) != crc {
        return None;
    }
    let rec = serde_json::from_slice::<Record>(body).ok()?;
    Some((rec, end))
}

/// Reads a log. Each stretch of bytes that is not a whole record with a good CRC (a torn
/// tail, a flipped bit, a zeroed block) is skipped and counted, up to the next good record;
/// every good record before and after it is kept.
///
/// After a damaged region, a put is kept only if its seq is above every seq before it (puts
/// are written in seq order): stale bytes of an older log generation that a filesystem
/// shows in a torn tail are not brought back. A JSON body cannot hold a record header (a
/// length below 16 MiB has a zero byte, which JSON escapes), so payloads never resync.
/// Looking for the next record costs at most a few passes over the file; past that budget
/// (only adversarial bytes reach it) the rest counts as damaged.
pub fn scan_log(bytes: &[u8]) -> LogScan {
    let mut scan = LogScan::default();
    let mut pos = 0;
    // The highest seq of a put or ack so far (compaction ends a log with an ack of the last
    // seq used).
    let mut max_seq: Option<u64> = None;
    let mut budget = bytes.len().saturating_mul(4).saturating_add(1 << 20);
    while pos < bytes.len() {
        if let Some((rec, next)) = record_at(bytes, pos) {
            let seq = match &rec {
                Record::Put(m) => m.seq,
                Record::Ack { seq } => *seq,
            };
            max_seq = max_seq.max(Some(seq));
            scan.records.push(rec);
            pos = next;
            continue;
        }
        // A damaged region starts here: find the next good record that continues the log.
        let start = pos;
        pos += 1;
        while pos < bytes.len() {
            let candidate = bytes
                .get(pos + HEADER..)
                .is_some_and(|b| b.starts_with(BODY_START));
            if candidate {
                let len = u32::from_le_bytes([
                    bytes[pos],
                    bytes[pos + 1],
                    bytes[pos + 2],
                    bytes[pos + 3],
                ]) as usize;
                budget = budget.saturating_sub(len.min(bytes.len() - pos));
                if budget == 0 {
                    pos = bytes.len();
                    break;
                }
                match record_at(bytes, pos) {
                    Some((Record::Put(m), _)) if max_seq.is_some_and(|mx| m.seq <= mx) => {}
                    Some(_) => break,
                    None => {}
                }
            }
            pos += 1;
        }
        scan.torn_records += 1;
        scan.torn_bytes += (pos - start) as u64;
    }
    scan
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, replaying its log.
    pub fn open(dir: &Path, limits: OutboxLimits) -> Result<Outbox, OutboxError> {
        let path = dir.join("outbox.log");
        let io = |source| OutboxError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut bytes = Vec::new();
        if path.exists() {
            BufReader::new(File::open(&path).map_err(io)?)
                .read_to_end(&mut bytes)
                .map_err(io)?;
        }
        let scan = scan_log(&bytes);
        let counters = OutboxCounters {
            torn_records: scan.torn_records,
            torn_bytes: scan.torn_bytes,
            ..Default::default()
        };
        if scan.torn_records > 0 {
            tracing::warn!(
                path = %path.display(),
                torn_regions = counters.torn_records,
                torn_bytes = counters.torn_bytes,
                "outbox log had torn or corrupt bytes (power loss?); they were skipped, every intact record is kept"
            );
        }
        let mut live = BTreeMap::new();
        let mut next_seq = 1;
        for r in scan.records {
            match r {
                Record::Put(m) => {
                    next_seq = next_seq.max(m.seq.saturating_add(1));
                    live.insert(m.seq, m);
                }
                Record::Ack { seq } => {
                    // Compaction leaves an ack of the last seq used, so seqs are not reused.
                    next_seq = next_seq.max(seq.saturating_add(1));
                    live.remove(&seq);
                }
            }
        }
        // Not truncated here: the compaction below replaces the file (atomically), so a
        // crash before it leaves the same log to read again.
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let mut ob = Outbox {
            live_bytes: live.values().map(Self::msg_bytes).sum(),
            path,
            file,
            file_bytes: bytes.len() as u64,
            live,
            next_seq,
            limits,
            last_sync: Instant::now(),
            dirty: false,
            puts_unsynced: false,
            counters,
        };
        ob.enforce_caps()?;
        ob.compact()?;
        Ok(ob)
    }

    fn msg_bytes(m: &Message) -> u64 {
        (m.topic.len() + m.payload.len() + 64) as u64
    }

    fn io(&self, source: io::Error) -> OutboxError {
        OutboxError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn append(&mut self, rec: &Record) -> Result<(), OutboxError> {
        use std::io::Seek;
        let bytes = encode_record(rec);
        if bytes.len() - HEADER > MAX_RECORD_BYTES {
            // The reader would take it for a corrupt length: refuse it instead.
            return Err(OutboxError::TooLarge {
                path: self.path.clone(),
                bytes: bytes.len() - HEADER,
                max_bytes: MAX_RECORD_BYTES,
            });
        }
        self.file
            .seek(io::SeekFrom::Start(self.file_bytes))
            .map_err(|e| self.io(e))?;
        self.file.write_all(&bytes).map_err(|e| self.io(e))?;
        self.file_bytes += bytes.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Forces appended records to disk according to the policy (`force` ignores it).
    pub fn sync(&mut self, force: bool) -> Result<(), OutboxError> {
        if !self.dirty {
            return Ok(());
        }
        let due = match self.limits.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(d) => force || self.last_sync.elapsed() >= d,
            FsyncPolicy::Never => force,
        };
        if due {
            // A failed sync also restarts the interval, so a timer on
            // [`Outbox::sync_deadline`] retries it one interval later instead of at once.
            self.last_sync = Instant::now();
            self.file.sync_data().map_err(|e| self.io(e))?;
            self.dirty = false;
            self.puts_unsynced = false;
        }
        Ok(())
    }

    /// With `outbox_fsync = N` ms: when puts written but not yet synced are due, so the
    /// caller can sync them then (`sync(true)`) even if nothing else happens; this is what
    /// bounds by N how long an acknowledged outcome may sit off disk. None otherwise.
    pub fn sync_deadline(&self) -> Option<Instant> {
        match self.limits.fsync {
            FsyncPolicy::Interval(d) if self.puts_unsynced => Some(self.last_sync + d),
            _ => None,
        }
    }

    /// Records messages (durably, per the fsync policy) and returns them with their
    /// sequence numbers. Callers acknowledge their input only after this returns.
    pub fn put_all(
        &mut self,
        msgs: Vec<(String, String, bool, Priority)>,
    ) -> Result<Vec<Message>, OutboxError> {
        let mut out = Vec::with_capacity(msgs.len());
        let created_ms = now_ms();
        for (topic, payload, retain, priority) in msgs {
            let m = Message {
                seq: self.next_seq,
                topic,
                payload,
                retain,
                priority,
                created_ms,
            };
            self.next_seq += 1;
            self.append(&Record::Put(m.clone()))?;
            self.puts_unsynced = true;
            self.live_bytes += Self::msg_bytes(&m);
            self.live.insert(m.seq, m.clone());
            out.push(m);
        }
        self.sync(false)?;
        self.enforce_caps()?;
        out.retain(|m| self.live.contains_key(&m.seq));
        Ok(out)
    }

    /// The broker has the message: forget it.
    pub fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        if let Some(m) = self.live.remove(&seq) {
            self.live_bytes -= Self::msg_bytes(&m);
            self.append(&Record::Ack { seq })?;
            // An ack lost in a crash only means one more publish: no fsync needed here.
            if self.file_bytes > 1024 * 1024 && self.file_bytes > 4 * self.live_bytes {
                self.compact()?;
            }
        }
        Ok(())
    }

    /// Puts are written but not yet synced to disk.
    pub fn has_unsynced_puts(&self) -> bool {
        self.puts_unsynced
    }

    /// Messages waiting for a PUBACK, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &Message> {
        self.live.values()
    }

    /// The message with sequence number `seq`, if it still waits for its PUBACK.
    pub fn get(&self, seq: u64) -> Option<&Message> {
        self.live.get(&seq)
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// The seq the next message put will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Drops messages over max_age, then the lowest-priority oldest ones while over
    /// max_bytes. Every drop is counted and logged.
    fn enforce_caps(&mut self) -> Result<(), OutboxError> {
        let cutoff = now_ms().saturating_sub(self.limits.max_age.as_millis() as u64);
        let old: Vec<u64> = self
            .live
            .values()
            .filter(|m| m.created_ms < cutoff)
            .map(|m| m.seq)
            .collect();
        for seq in old {
            self.drop_seq(seq)?;
            self.counters.dropped_for_age += 1;
        }
        while self.live_bytes > self.limits.max_bytes {
            // The oldest message of the lowest priority present.
            let Some(seq) = self
                .live
                .values()
                .min_by_key(|m| (m.priority, m.seq))
                .map(|m| m.seq)
            else {
                break;
            };
            self.drop_seq(seq)?;
            self.counters.dropped_for_size += 1;
        }
        Ok(())
    }

    fn drop_seq(&mut self, seq: u64) -> Result<(), OutboxError> {
        if let Some(m) = self.live.remove(&seq) {
            tracing::warn!(seq, topic = %m.topic, "outbox over its cap: message dropped");
            self.live_bytes -= Self::msg_bytes(&m);
            self.append(&Record::Ack { seq })?;
        }
        Ok(())
    }

    /// Rewrites the log with only the live messages (atomic rename).
    pub fn compact(&mut self) -> Result<(), OutboxError> {
        let tmp = self.path.with_extension("log.tmp");
        let io = |source| OutboxError::Io {
            path: tmp.clone(),
            source,
        };
        let mut f = File::create(&tmp).map_err(io)?;
        let mut bytes = 0u64;
        let mut recs: Vec<Record> = self.live.values().cloned().map(Record::Put).collect();
        let last = self.next_seq.saturating_sub(1);
        if last > 0 && !self.live.contains_key(&last) {
            // The high-water mark: reopening continues after `last`, never reusing a seq.
            recs.push(Record::Ack { seq: last });
        }
        for r in &recs {
            let rec = encode_record(r);
            f.write_all(&rec).map_err(io)?;
            bytes += rec.len() as u64;
        }
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        self.file_bytes = bytes;
        self.dirty = false;
        self.puts_unsynced = false;
        self.counters.compactions += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, p: Priority) -> (String, String, bool, Priority) {
        (
            topic.to_string(),
            format!("{{\"t\":\"{topic}\"}}"),
            false,
            p,
        )
    }

    #[test]
    fn survives_reopen_and_forgets_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        let put = ob
            .put_all(vec![
                msg("a", Priority::Normal),
                msg("b", Priority::Normal),
                msg("c", Priority::High),
            ])
            .unwrap();
        assert_eq!(put.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        ob.ack(2).unwrap();
        drop(ob);
        let mut ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        let topics: Vec<&str> = ob.pending().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, vec!["a", "c"]);
        // Sequence numbers keep growing after a restart.
        let m = ob.put_all(vec![msg("d", Priority::Low)]).unwrap();
        assert_eq!(m[0].seq, 4);
    }

    #[test]
    fn torn_tail_is_cut_and_counted_records_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        ob.put_all(vec![msg("a", Priority::Normal), msg("b", Priority::Normal)])
            .unwrap();
        drop(ob);
        let path = dir.path().join("outbox.log");
        let full = std::fs::read(&path).unwrap();
        // A half-written third record.
        let mut torn = full.clone();
        let third = encode_record(&Record::Put(Message {
            seq: 3,
            topic: "c".into(),
            payload: "x".into(),
            retain: false,
            priority: Priority::Normal,
            created_ms: now_ms(),
        }));
        torn.extend(&third[..third.len() / 2]);
        std::fs::write(&path, &torn).unwrap();
        let ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        assert_eq!(ob.len(), 2);
        assert_eq!(ob.counters.torn_records, 1);
        assert_eq!(ob.counters.torn_bytes, (third.len() / 2) as u64);
        drop(ob);
        // A flipped bit in the second record: the first is kept.
        let mut bad = full.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        assert_eq!(
            ob.pending().map(|m| m.topic.clone()).collect::<Vec<_>>(),
            vec!["a"]
        );
        assert_eq!(ob.counters.torn_records, 1);
        // Garbage lengths do not allocate or crash.
        std::fs::write(&path, [0xff; 64]).unwrap();
        let ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        assert!(ob.is_empty());
    }

    #[test]
    fn byte_cap_drops_low_priority_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let one = Outbox::msg_bytes(&Message {
            seq: 0,
            topic: "t1".into(),
            payload: "{\"t\":\"t1\"}".into(),
            retain: false,
            priority: Priority::Low,
            created_ms: 0,
        });
        let limits = OutboxLimits {
            max_bytes: one * 3,
            ..Default::default()
        };
        let mut ob = Outbox::open(dir.path(), limits).unwrap();
        ob.put_all(vec![
            msg("e1", Priority::High),
            msg("l1", Priority::Low),
            msg("n1", Priority::Normal),
            msg("l2", Priority::Low),
            msg("n2", Priority::Normal),
        ])
        .unwrap();
        let topics: Vec<String> = ob.pending().map(|m| m.topic.clone()).collect();
        assert_eq!(topics, vec!["e1", "n1", "n2"]);
        assert_eq!(ob.counters.dropped_for_size, 2);
        // The drops are durable.
        drop(ob);
        let ob = Outbox::open(dir.path(), limits).unwrap();
        assert_eq!(ob.len(), 3);
    }

    #[test]
    fn compaction_keeps_live_and_shrinks_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        for i in 0..200 {
            let m = ob
                .put_all(vec![msg(&format!("t{i}"), Priority::Normal)])
                .unwrap();
            if i % 10 != 0 {
                ob.ack(m[0].seq).unwrap();
            }
        }
        let before = ob.file_bytes();
        ob.compact().unwrap();
        assert!(ob.file_bytes() < before / 4);
        drop(ob);
        let ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        assert_eq!(ob.len(), 20);
        assert_eq!(ob.pending().next().unwrap().topic, "t0");
    }

    fn put_rec(seq: u64) -> Record {
        Record::Put(Message {
            seq,
            topic: format!("t/{seq}"),
            payload: format!("{{\"seq\":{seq}}}"),
            retain: false,
            priority: Priority::Normal,
            created_ms: 1,
        })
    }

    fn log_of(recs: &[Record]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for r in recs {
            bytes.extend(encode_record(r));
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    #[test]
    fn damage_in_the_middle_is_skipped_and_later_records_kept() {
        let recs: Vec<Record> = (1..=5).map(put_rec).collect();
        let (clean, ends) = log_of(&recs);
        assert_eq!(scan_log(&clean).records, recs);
        // A flipped bit in the body of record 3, a huge length field in record 3, and
        // record 3 zeroed (a block the disk never wrote): 1, 2, 4, 5 are kept each time,
        // and exactly record 3's bytes are counted as one damaged region.
        let r3 = ends[1]..ends[2];
        let mut flipped = clean.clone();
        flipped[r3.start + HEADER + 20] ^= 0x01;
        let mut huge = clean.clone();
        huge[r3.start..r3.start + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut zeroed = clean.clone();
        zeroed[r3.clone()].fill(0);
        for bad in [flipped, huge, zeroed] {
            let scan = scan_log(&bad);
            let seqs: Vec<u64> = scan
                .records
                .iter()
                .map(|r| match r {
                    Record::Put(m) => m.seq,
                    Record::Ack { seq } => *seq,
                })
                .collect();
            assert_eq!(seqs, vec![1, 2, 4, 5]);
            assert_eq!(scan.records[2], recs[3]);
            assert_eq!(scan.torn_records, 1);
            assert_eq!(scan.torn_bytes, r3.len() as u64);
        }
        // Through open: the same, and the log is rewritten clean. (The records are dated
        // 1970: no age cap here.)
        let limits = OutboxLimits {
            max_age: Duration::from_secs(100 * 365 * 24 * 3600),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut bad = clean.clone();
        bad[r3.start + HEADER + 20] ^= 0x01;
        std::fs::write(dir.path().join("outbox.log"), &bad).unwrap();
        let ob = Outbox::open(dir.path(), limits).unwrap();
        assert_eq!(
            ob.pending().map(|m| m.seq).collect::<Vec<_>>(),
            [1, 2, 4, 5]
        );
        assert_eq!(ob.counters.torn_records, 1);
        drop(ob);
        let ob = Outbox::open(dir.path(), limits).unwrap();
        assert_eq!(ob.len(), 4);
        assert_eq!(ob.counters.torn_records, 0);
    }

    #[test]
    fn stale_puts_after_a_damaged_region_are_not_brought_back() {
        // A torn tail that shows bytes of an older log (seqs 1, 2) after seq 7.
        let (mut bytes, _) = log_of(&[put_rec(6), put_rec(7)]);
        bytes.extend([0u8; 13]);
        let (old, _) = log_of(&[put_rec(1), put_rec(2)]);
        bytes.extend(&old);
        let scan = scan_log(&bytes);
        assert_eq!(scan.records, vec![put_rec(6), put_rec(7)]);
        assert_eq!(scan.torn_records, 1);
        assert_eq!(scan.torn_bytes, (13 + old.len()) as u64);
        // A later put and an ack after the damage are kept.
        let (newer, _) = log_of(&[put_rec(8), Record::Ack { seq: 6 }]);
        bytes.extend(&newer);
        let scan = scan_log(&bytes);
        assert_eq!(
            scan.records,
            vec![put_rec(6), put_rec(7), put_rec(8), Record::Ack { seq: 6 }]
        );
    }

    #[test]
    fn seqs_are_not_reused_after_everything_was_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        let m = ob
            .put_all(vec![msg("a", Priority::Normal), msg("b", Priority::Normal)])
            .unwrap();
        ob.ack(m[0].seq).unwrap();
        ob.ack(m[1].seq).unwrap();
        drop(ob);
        let mut ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        assert!(ob.is_empty());
        assert_eq!(ob.next_seq(), 3);
        assert_eq!(
            ob.put_all(vec![msg("c", Priority::Normal)]).unwrap()[0].seq,
            3
        );
    }

    #[test]
    fn a_record_too_large_to_read_back_is_refused_when_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        ob.put_all(vec![msg("a", Priority::Normal)]).unwrap();
        let huge = "x".repeat(MAX_RECORD_BYTES);
        let e = ob
            .put_all(vec![("t".into(), huge, false, Priority::High)])
            .unwrap_err();
        assert!(matches!(e, OutboxError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("over the limit"), "{e}");
        // Still usable, and the earlier message and a later one survive a reopen.
        ob.put_all(vec![msg("b", Priority::Normal)]).unwrap();
        drop(ob);
        let ob = Outbox::open(dir.path(), OutboxLimits::default()).unwrap();
        assert_eq!(
            ob.pending().map(|m| m.topic.clone()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(ob.counters.torn_records, 0);
    }
}
