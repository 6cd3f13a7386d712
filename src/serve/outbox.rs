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

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::util::private;
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
    /// The log's length right after the last compaction: the next one waits until the
    /// log has at least doubled, so compaction costs O(1) a record however large the
    /// live set.
    compacted_bytes: u64,
    live: BTreeMap<u64, Message>,
    /// (priority, seq) of every live message: the next one to drop at the cap is the first.
    drop_order: BTreeSet<(Priority, u64)>,
    live_bytes: u64,
    next_seq: u64,
    limits: OutboxLimits,
    last_sync: Instant,
    dirty: bool,
    /// Puts were written since the last sync (acks alone need no timely sync).
    puts_unsynced: bool,
    /// Tests: every write fails as on a full disk.
    fail_writes: bool,
    pub counters: OutboxCounters,
}

/// Below this the log is never compacted (a small log costs nothing to read).
const COMPACT_MIN_BYTES: u64 = 1024 * 1024;

const HEADER: usize = 8;
/// Largest record body written or read: a bigger length field is a corrupt one.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;
/// How every body starts (serde writes the tag first): a cheap test before the CRC when
/// looking for the next record after a damaged region.
const BODY_START: &[u8] = b"{\"op\":\"";

/// A [`Record`] by reference: encodes the same bytes without copying the message.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum RecordRef<'a> {
    Put(&'a Message),
    Ack { seq: u64 },
}

/// The bytes of one record: `[len: u32 LE][crc32: u32 LE][JSON body]`.
pub fn encode_record(rec: &Record) -> Vec<u8> {
    encode(rec)
}

fn encode(rec: &impl Serialize) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail.
    let body = serde_json::to_vec(rec).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend((body.len() as u32).to_le_bytes());
    out.extend(crc32fast::hash(&body).to_le_bytes());
    out.extend(body);
    out
}

/// Bytes read from the log at a time when opening it.
const READ_CHUNK: usize = 64 * 1024;

/// A forward-only window on a log being read: at most one record (plus a chunk) is held,
/// whatever the log's length, so opening a long log needs no memory in proportion to it.
struct Window<R: Read> {
    r: R,
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    start: usize,
    eof: bool,
}

impl<R: Read> Window<R> {
    /// The next `n` bytes (fewer at the end of the log), without consuming them.
    fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        while self.buf.len() - self.start < n && !self.eof {
            // Drop what was consumed once it is at least what is left (amortised O(1) a
            // byte), so the buffer holds about the longest record asked for.
            if self.start > 0 && self.start >= self.buf.len() - self.start {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let have = self.buf.len();
            let want = (n - (have - self.start)).max(READ_CHUNK);
            self.buf.resize(have + want, 0);
            let got = loop {
                match self.r.read(&mut self.buf[have..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            self.buf.truncate(have + *got.as_ref().unwrap_or(&0));
            if got? == 0 {
                self.eof = true;
            }
        }
        let end = (self.start + n).min(self.buf.len());
        Ok(&self.buf[self.start..end])
    }

    /// Consumes `n` bytes that [`Window::peek`] showed.
    fn advance(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
    }
}

/// The record at the start of the window and its length, if it holds a whole, intact one.
fn record_at<R: Read>(w: &mut Window<R>) -> io::Result<Option<(Record, usize)>> {
    let header = w.peek(HEADER)?;
    if header.len() < HEADER {
        return Ok(None);
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD_BYTES {
        return Ok(None);
    }
    let bytes = w.peek(HEADER + len)?;
    let Some(body) = bytes.get(HEADER..HEADER + len) else {
        return Ok(None);
    };
    if !body.starts_with(BODY_START) || crc32fast::hash(body) != crc {
        return Ok(None);
    }
    Ok(serde_json::from_slice::<Record>(body)
        .ok()
        .map(|rec| (rec, HEADER + len)))
}

/// Damaged regions a read of a log skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Damage {
    /// Damaged regions skipped (a torn tail is one).
    pub regions: u64,
    /// Bytes in them.
    pub bytes: u64,
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

/// Reads a whole log held in memory ([`scan_stream`] on a slice).
pub fn scan_log(bytes: &[u8]) -> LogScan {
    let mut records = Vec::new();
    // Reading a slice cannot fail.
    let damage = scan_stream(bytes, bytes.len() as u64, |r| records.push(r)).unwrap_or_default();
    LogScan {
        records,
        torn_records: damage.regions,
        torn_bytes: damage.bytes,
    }
}

/// Reads a log of `total_bytes` from `r` as a stream, handing each good record to
/// `on_record` in file order; memory is one record and a read buffer. Each stretch of bytes
/// that is not a whole record with a good CRC (a torn tail, a flipped bit, a zeroed block)
/// is skipped and counted, up to the next good record; every good record before and after
/// it is kept.
///
/// After a damaged region, a put is kept only if its seq is above every seq before it (puts
/// are written in seq order): stale bytes of an older log generation that a filesystem
/// shows in a torn tail are not brought back. A JSON body cannot hold a record header (a
/// length below 16 MiB has a zero byte, which JSON escapes), so payloads never resync.
/// Looking for the next record costs at most a few passes over the log; past that budget
/// (only adversarial bytes reach it) the rest counts as damaged.
pub fn scan_stream<R: Read>(
    r: R,
    total_bytes: u64,
    mut on_record: impl FnMut(Record),
) -> io::Result<Damage> {
    let mut w = Window {
        r,
        buf: Vec::new(),
        start: 0,
        eof: false,
    };
    let mut damage = Damage::default();
    // The highest seq of a put or ack so far (compaction ends a log with an ack of the last
    // seq used).
    let mut max_seq: Option<u64> = None;
    let total = usize::try_from(total_bytes).unwrap_or(usize::MAX);
    let mut budget = total.saturating_mul(4).saturating_add(1 << 20);
    let mut pos = 0usize;
    while !w.peek(1)?.is_empty() {
        if let Some((rec, len)) = record_at(&mut w)? {
            let seq = match &rec {
                Record::Put(m) => m.seq,
                Record::Ack { seq } => *seq,
            };
            max_seq = max_seq.max(Some(seq));
            on_record(rec);
            w.advance(len);
            pos += len;
            continue;
        }
        // A damaged region starts here: find the next good record that continues the log.
        let mut skipped = 1usize;
        w.advance(1);
        loop {
            let head = w.peek(HEADER + BODY_START.len())?;
            if head.is_empty() {
                break;
            }
            if head.get(HEADER..).is_some_and(|b| b == BODY_START) {
                let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
                let left = total.saturating_sub(pos + skipped).max(1);
                budget = budget.saturating_sub(len.min(left));
                if budget == 0 {
                    // The rest counts as damaged.
                    loop {
                        let n = w.peek(READ_CHUNK)?.len();
                        if n == 0 {
                            break;
                        }
                        w.advance(n);
                        skipped += n;
                    }
                    break;
                }
                match record_at(&mut w)? {
                    Some((Record::Put(m), _)) if max_seq.is_some_and(|mx| m.seq <= mx) => {}
                    Some(_) => break,
                    None => {}
                }
            }
            w.advance(1);
            skipped += 1;
        }
        pos += skipped;
        damage.regions += 1;
        damage.bytes += skipped as u64;
    }
    Ok(damage)
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, replaying its log as a stream: memory is
    /// the live messages (at most the byte cap, applied while replaying) and one record,
    /// whatever the log's length.
    pub fn open(dir: &Path, limits: OutboxLimits) -> Result<Outbox, OutboxError> {
        let path = dir.join("outbox.log");
        let io = |source| OutboxError::Io {
            path: path.clone(),
            source,
        };
        // Owner-only: results quote requests.
        private::create_dir(dir).map_err(io)?;
        // Not truncated here: the compaction below replaces the file (atomically), so a
        // crash before it leaves the same log to read again.
        let file = private::open(&path, false).map_err(io)?;
        let mut ob = Outbox {
            path: path.clone(),
            file,
            file_bytes: 0,
            compacted_bytes: 0,
            live: BTreeMap::new(),
            drop_order: BTreeSet::new(),
            live_bytes: 0,
            next_seq: 1,
            limits,
            last_sync: Instant::now(),
            dirty: false,
            puts_unsynced: false,
            fail_writes: false,
            counters: OutboxCounters::default(),
        };
        let reader = File::open(&path).map_err(io)?;
        let total = reader.metadata().map_err(io)?.len();
        let damage = scan_stream(reader, total, |r| ob.replay(r)).map_err(io)?;
        ob.file_bytes = total;
        ob.counters.torn_records = damage.regions;
        ob.counters.torn_bytes = damage.bytes;
        if damage.regions > 0 {
            tracing::warn!(
                path = %path.display(),
                torn_regions = damage.regions,
                torn_bytes = damage.bytes,
                "outbox log had torn or corrupt bytes (power loss?); they were skipped, every intact record is kept"
            );
        }
        if ob.counters.dropped_for_size > 0 {
            tracing::warn!(
                dropped = ob.counters.dropped_for_size,
                "outbox log over its cap: the oldest lowest-priority messages were dropped"
            );
        }
        ob.enforce_caps()?;
        ob.compact()?;
        Ok(ob)
    }

    /// One record of the log being opened; the byte cap holds while replaying, so a log
    /// far over it (an old build's) never fills memory.
    fn replay(&mut self, rec: Record) {
        match rec {
            Record::Put(m) => {
                self.next_seq = self.next_seq.max(m.seq.saturating_add(1));
                self.remove_live(m.seq);
                self.insert_live(m);
                while self.live_bytes > self.limits.max_bytes {
                    let Some(&(_, seq)) = self.drop_order.first() else {
                        break;
                    };
                    self.remove_live(seq);
                    self.counters.dropped_for_size += 1;
                }
            }
            Record::Ack { seq } => {
                // Compaction leaves an ack of the last seq used, so seqs are not reused.
                self.next_seq = self.next_seq.max(seq.saturating_add(1));
                self.remove_live(seq);
            }
        }
    }

    fn msg_bytes(m: &Message) -> u64 {
        (m.topic.len() + m.payload.len() + 64) as u64
    }

    fn insert_live(&mut self, m: Message) {
        self.live_bytes += Self::msg_bytes(&m);
        self.drop_order.insert((m.priority, m.seq));
        self.live.insert(m.seq, m);
    }

    fn remove_live(&mut self, seq: u64) -> Option<Message> {
        let m = self.live.remove(&seq)?;
        self.live_bytes -= Self::msg_bytes(&m);
        self.drop_order.remove(&(m.priority, m.seq));
        Some(m)
    }

    fn io(&self, source: io::Error) -> OutboxError {
        OutboxError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Tests: makes every write fail (or succeed again), as a full disk does.
    #[cfg(test)]
    pub(crate) fn fail_writes(&mut self, fail: bool) {
        self.fail_writes = fail;
    }

    fn append(&mut self, rec: &RecordRef) -> Result<(), OutboxError> {
        use std::io::Seek;
        let bytes = encode(rec);
        if bytes.len() - HEADER > MAX_RECORD_BYTES {
            // The reader would take it for a corrupt length: refuse it instead.
            return Err(OutboxError::TooLarge {
                path: self.path.clone(),
                bytes: bytes.len() - HEADER,
                max_bytes: MAX_RECORD_BYTES,
            });
        }
        if self.fail_writes {
            return Err(self.io(io::Error::from(io::ErrorKind::StorageFull)));
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
            if self.fail_writes {
                return Err(self.io(io::Error::from(io::ErrorKind::StorageFull)));
            }
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
    /// sequence numbers. Callers acknowledge their input only after this returns. All or
    /// nothing: on an error (a full disk) none of them is recorded, and the log is as
    /// before.
    pub fn put_all(
        &mut self,
        msgs: Vec<(String, String, bool, Priority)>,
    ) -> Result<Vec<Message>, OutboxError> {
        let mut seqs = Vec::with_capacity(msgs.len());
        let created_ms = now_ms();
        let batch_start = self.file_bytes;
        let mut written = Ok(());
        for (topic, payload, retain, priority) in msgs {
            let m = Message {
                seq: self.next_seq,
                topic,
                payload,
                retain,
                priority,
                created_ms,
            };
            // Seqs are never reused, even those of a batch that failed.
            self.next_seq += 1;
            written = self.append(&RecordRef::Put(&m));
            if written.is_err() {
                break;
            }
            self.puts_unsynced = true;
            seqs.push(m.seq);
            self.insert_live(m);
        }
        if let Err(e) = written.and_then(|()| self.sync(false)) {
            for seq in seqs {
                self.remove_live(seq);
            }
            // The next append writes over what this batch left; a crash before it leaves
            // puts whose requests were not acknowledged: delivered again, answered twice
            // at worst, never lost.
            self.file_bytes = batch_start;
            let _ = self.file.set_len(batch_start);
            return Err(e);
        }
        // The puts are recorded: a failure to drop or compact now only delays that.
        if let Err(e) = self.enforce_caps().and_then(|()| self.maybe_compact()) {
            tracing::error!("{e}");
        }
        Ok(seqs
            .into_iter()
            .filter_map(|s| self.live.get(&s).cloned())
            .collect())
    }

    /// The broker has the message: forget it.
    pub fn ack(&mut self, seq: u64) -> Result<(), OutboxError> {
        if self.remove_live(seq).is_some() {
            self.append(&RecordRef::Ack { seq })?;
            // An ack lost in a crash only means one more publish: no fsync needed here.
            self.maybe_compact()?;
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
        // Seq order is put order, so the old ones come first (a clock set back only delays
        // a drop to a later put); stopping at the first young one keeps a put O(log n).
        let old: Vec<u64> = self
            .live
            .values()
            .take_while(|m| m.created_ms < cutoff)
            .map(|m| m.seq)
            .collect();
        for seq in old {
            self.drop_seq(seq)?;
            self.counters.dropped_for_age += 1;
        }
        while self.live_bytes > self.limits.max_bytes {
            // The oldest message of the lowest priority present.
            let Some(&(_, seq)) = self.drop_order.first() else {
                break;
            };
            self.drop_seq(seq)?;
            self.counters.dropped_for_size += 1;
        }
        Ok(())
    }

    fn drop_seq(&mut self, seq: u64) -> Result<(), OutboxError> {
        if let Some(m) = self.remove_live(seq) {
            tracing::warn!(seq, topic = %m.topic, "outbox over its cap: message dropped");
            self.append(&RecordRef::Ack { seq })?;
        }
        Ok(())
    }

    /// Compacts when the log is mostly acked (and drop) records: over 1 MiB, over 4 times
    /// the live bytes, and at least twice its length after the last compaction. So at the
    /// cap, with the broker gone, the log stays within about 4 x max_bytes, and each
    /// compaction is paid for by as many appended bytes.
    fn maybe_compact(&mut self) -> Result<(), OutboxError> {
        let bound = COMPACT_MIN_BYTES
            .max(self.live_bytes.saturating_mul(4))
            .max(self.compacted_bytes.saturating_mul(2));
        if self.file_bytes > bound {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the log with only the live messages (atomic rename).
    pub fn compact(&mut self) -> Result<(), OutboxError> {
        let tmp = self.path.with_extension("log.tmp");
        let written = self.write_live(&tmp);
        let bytes = match written {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(OutboxError::Io {
                    path: tmp,
                    source: e,
                });
            }
        };
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
        self.compacted_bytes = bytes;
        self.dirty = false;
        self.puts_unsynced = false;
        self.counters.compactions += 1;
        Ok(())
    }

    /// Writes the live messages (and the high-water mark) to `tmp`, synced; its length.
    fn write_live(&self, tmp: &Path) -> io::Result<u64> {
        if self.fail_writes {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        let mut f = BufWriter::new(private::open(tmp, true)?);
        let mut bytes = 0u64;
        let mut write = |rec: &RecordRef| -> io::Result<()> {
            let b = encode(rec);
            bytes += b.len() as u64;
            f.write_all(&b)
        };
        for m in self.live.values() {
            write(&RecordRef::Put(m))?;
        }
        let last = self.next_seq.saturating_sub(1);
        if last > 0 && !self.live.contains_key(&last) {
            // The high-water mark: reopening continues after `last`, never reusing a seq.
            write(&RecordRef::Ack { seq: last })?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(bytes)
    }
}

#[cfg(test)]
#[path = "outbox_tests.rs"]
mod tests;
