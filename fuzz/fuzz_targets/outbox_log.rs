//! Fuzz target: the outbox log reader after a power loss. A few valid records (written by
//! the real `Outbox`), then fuzz bytes appended after the first `k` of them, or written over
//! them from some offset. The reader never panics, keeps every record that lies wholly
//! before the damage, byte for byte, accounts for every byte (good records plus skipped
//! damaged regions), and `Outbox::open` replays exactly what the scan found, counts the
//! damage once, and leaves a clean log behind.
//!
//! Input: byte 0 = `k` and the mode (0x80: overwrite from the offset in bytes 1-2, else
//! append; 0x40: also go through `Outbox::open` on a real file), then the fuzz bytes.

#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use edgeact::serve::outbox::{
    encode_record, scan_log, FsyncPolicy, Message, Outbox, OutboxLimits, Priority, Record,
};
use libfuzzer_sys::fuzz_target;

struct Valid {
    log: Vec<u8>,
    records: Vec<Record>,
    /// Byte offset where each record ends.
    ends: Vec<usize>,
    dir: PathBuf,
}

fn limits() -> OutboxLimits {
    OutboxLimits {
        max_bytes: u64::MAX,
        max_age: Duration::from_secs(100 * 365 * 24 * 3600),
        fsync: FsyncPolicy::Never,
    }
}

fn valid() -> &'static Valid {
    static V: OnceLock<Valid> = OnceLock::new();
    V.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::tempdir_in(base).expect("temp dir").keep();
        let mut ob = Outbox::open(&dir, limits()).expect("open");
        let msgs = (0..6)
            .map(|i| {
                (
                    format!("dev/results/{i}"),
                    format!(
                        "{{\"id\":\"r{i}\",\"label\":\"ok\",\"text\":\"{}\"}}",
                        "é".repeat(i * 9)
                    ),
                    i % 2 == 0,
                    Priority::Normal,
                )
            })
            .collect();
        ob.put_all(msgs).expect("put");
        ob.ack(2).expect("ack");
        ob.ack(5).expect("ack");
        drop(ob);
        let log = std::fs::read(dir.join("outbox.log")).expect("read");
        let records = scan_log(&log).records;
        let mut ends = Vec::new();
        let mut again = Vec::new();
        for r in &records {
            again.extend(encode_record(r));
            ends.push(again.len());
        }
        assert_eq!(again, log, "the log is its records, encoded");
        assert_eq!(records.len(), 8);
        Valid {
            log,
            records,
            ends,
            dir,
        }
    })
}

fn live_of(records: &[Record]) -> BTreeMap<u64, Message> {
    let mut live = BTreeMap::new();
    for r in records {
        match r {
            Record::Put(m) => {
                live.insert(m.seq, m.clone());
            }
            Record::Ack { seq } => {
                live.remove(seq);
            }
        }
    }
    live
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let v = valid();
    let n = v.records.len();
    let (log, intact) = if mode & 0x80 != 0 {
        // Overwrite from an offset: records that end at or before it are intact.
        let (off, bytes) = match rest {
            [a, b, bytes @ ..] => (u16::from_le_bytes([*a, *b]) as usize % v.log.len(), bytes),
            _ => return,
        };
        let mut log = v.log.clone();
        let end = (off + bytes.len()).min(log.len());
        log[off..end].copy_from_slice(&bytes[..end - off]);
        log.extend(&bytes[end - off..]);
        let intact = v.ends.iter().take_while(|&&e| e <= off).count();
        (log, intact)
    } else {
        let k = (mode as usize & 0x3f) % (n + 1);
        let start = if k == 0 { 0 } else { v.ends[k - 1] };
        let mut log = v.log[..start].to_vec();
        log.extend(rest);
        (log, k)
    };
    let scan = scan_log(&log);
    assert!(scan.records.len() >= intact);
    assert_eq!(scan.records[..intact], v.records[..intact]);
    let good: usize = scan.records.iter().map(|r| encode_record(r).len()).sum();
    assert_eq!(
        good as u64 + scan.torn_bytes,
        log.len() as u64,
        "every byte accounted for"
    );
    assert_eq!(scan.torn_records == 0, scan.torn_bytes == 0);
    assert!(scan.torn_records <= scan.torn_bytes);

    if mode & 0x40 != 0 {
        let path = v.dir.join("outbox.log");
        std::fs::write(&path, &log).expect("write");
        let ob = Outbox::open(&v.dir, limits()).expect("open");
        assert_eq!(ob.counters.torn_records, scan.torn_records);
        assert_eq!(ob.counters.torn_bytes, scan.torn_bytes);
        let want = live_of(&scan.records);
        let got: Vec<&Message> = ob.pending().collect();
        assert_eq!(got, want.values().collect::<Vec<_>>());
        drop(ob);
        // The compacted log reads back clean, with the same messages.
        let clean = scan_log(&std::fs::read(&path).expect("read"));
        assert_eq!(clean.torn_records, 0);
        assert_eq!(live_of(&clean.records), want);
    }
});
