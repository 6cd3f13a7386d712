//! The durable outbox: every message to publish is appended to an on-disk log first and
//! removed only after the broker's PUBACK, so results survive network cuts, broker restarts
//! and power loss, and are replayed oldest first.
//!
//! The log is a sequence of records `[len: u32 LE][crc32: u32 LE][JSON body]`. A body is
//! either a `put` (a message) or an `ack` (a sequence number that is done). On open the log
//! is read to its end; a torn or corrupt tail (power loss mid-write) is cut off and counted,
//! and every record before it is kept. When most of the file is acked, it is compacted by
//! writing the live messages to a new file and renaming it over the old one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
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

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
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
    /// Records cut off a torn or corrupt tail when the log was opened.
    pub torn_records: u64,
    /// Bytes cut off with them.
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
    pub counters: OutboxCounters,
}

const HEADER: usize = 8;
/// Largest record accepted when reading: anything bigger is a corrupt length.
const MAX_RECORD: usize = 16 * 1024 * 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn encode(rec: &Record) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail.
    let body = serde_json::to_vec(rec).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend((body.len() as u32).to_le_bytes());
    out.extend(crc32fast::hash(&body).to_le_bytes());
    out.extend(body);
    out
}

/// Reads records until the end or the first bad one; returns them and the byte offset of
/// the end of the last good record.
fn read_records(bytes: &[u8]) -> (Vec<Record>, usize, u64) {
    let mut recs = Vec::new();
    let mut pos = 0;
    while pos + HEADER <= bytes.len() {
        let len = u32::from_le_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]])
            as usize;
        let crc = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]);
        if len > MAX_RECORD || pos + HEADER + len > bytes.len() {
            break;
        }
        let body = &bytes[pos + HEADER..pos + HEADER + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        match serde_json::from_slice::<Record>(body) {
            Ok(r) => recs.push(r),
            Err(_) => break,
        }
        pos += HEADER + len;
    }
    // Count what follows as torn records: at least one if any bytes remain.
    let torn = if pos < bytes.len() { 1 } else { 0 };
    (recs, pos, torn)
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
        let (records, good, torn) = read_records(&bytes);
        let mut counters = OutboxCounters::default();
        if good < bytes.len() {
            counters.torn_records = torn;
            counters.torn_bytes = (bytes.len() - good) as u64;
            tracing::warn!(
                path = %path.display(),
                torn_bytes = counters.torn_bytes,
                "outbox log had a torn or corrupt tail (power loss?); it was cut off, earlier records are kept"
            );
        }
        let mut live = BTreeMap::new();
        let mut next_seq = 1;
        for r in records {
            match r {
                Record::Put(m) => {
                    next_seq = next_seq.max(m.seq + 1);
                    live.insert(m.seq, m);
                }
                Record::Ack { seq } => {
                    live.remove(&seq);
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        file.set_len(good as u64).map_err(io)?;
        let mut ob = Outbox {
            live_bytes: live.values().map(Self::msg_bytes).sum(),
            path,
            file,
            file_bytes: good as u64,
            live,
            next_seq,
            limits,
            last_sync: Instant::now(),
            dirty: false,
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
        let bytes = encode(rec);
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
            self.file.sync_data().map_err(|e| self.io(e))?;
            self.last_sync = Instant::now();
            self.dirty = false;
        }
        Ok(())
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
        for m in self.live.values() {
            let rec = encode(&Record::Put(m.clone()));
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
        let third = encode(&Record::Put(Message {
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
}
