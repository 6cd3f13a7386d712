//! Tests of the outbox: replay, damage, caps, compaction, and bounded disk and memory at
//! the cap.

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
    // Results quote requests: the log is owner-only, after a compaction too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        ob.compact().unwrap();
        let meta = std::fs::metadata(dir.path().join("outbox.log")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
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

// ---- Bounded disk and memory at the cap (a long outage) ----

/// Runs the named test of this module alone in a child process (a fresh address space,
/// so its peak RSS is its own, not that of tests running beside it) and returns whether
/// this process is that child.
fn in_child(name: &str) -> bool {
    const CHILD: &str = "EDGEACT_OUTBOX_RSS_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([&format!("{module}::{name}"), "--exact", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "child {name} failed");
    assert!(text.contains("1 passed"), "child {name} did not run");
    false
}

/// A result-sized message (~1 KiB), as a long outage fills the outbox with.
fn result_msg(i: usize) -> (String, String, bool, Priority) {
    let text = "The room was clean and the staff friendly. ".repeat(22);
    let payload =
        format!("{{\"id\":\"r{i}\",\"label\":\"positive\",\"p\":0.93,\"text\":\"{text}\"}}");
    (
        "edgeact/d1/sentiment/result".into(),
        payload,
        false,
        Priority::Normal,
    )
}

const CAP_BYTES: u64 = 2 * 1024 * 1024;
/// What a process holds besides the outbox (allocator slack, the test harness), in bytes.
const RSS_SLACK_BYTES: f64 = 16.0 * 1024.0 * 1024.0;

fn at_cap() -> OutboxLimits {
    OutboxLimits {
        max_bytes: CAP_BYTES,
        fsync: FsyncPolicy::Never,
        ..Default::default()
    }
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// Broker down for a long time: 40 times the cap in results are recorded and none is
/// acknowledged. The file stays within 4 x the cap + 1 MiB (compaction when the drops'
/// ack records pile up), and the process's peak memory within a few caps, also when
/// the log is opened again.
#[test]
fn a_long_outage_at_the_cap_keeps_file_and_memory_bounded() {
    if !in_child("a_long_outage_at_the_cap_keeps_file_and_memory_bounded") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, base_mib) = crate::util::proc::rss_mib();
    let mut ob = Outbox::open(dir.path(), at_cap()).unwrap();
    let one = Outbox::msg_bytes(&Message {
        seq: 0,
        topic: result_msg(0).0,
        payload: result_msg(0).1,
        retain: false,
        priority: Priority::Normal,
        created_ms: 0,
    });
    let n = (40 * CAP_BYTES / one) as usize;
    let file_bound = 4 * CAP_BYTES + 1024 * 1024 + 2 * one;
    let mut max_file = 0;
    for i in 0..n {
        ob.put_all(vec![result_msg(i)]).unwrap();
        max_file = max_file.max(ob.file_bytes());
    }
    let on_disk = std::fs::metadata(dir.path().join("outbox.log"))
        .unwrap()
        .len();
    assert_eq!(on_disk, ob.file_bytes());
    assert!(ob.live_bytes() <= CAP_BYTES);
    assert!(
        ob.counters.dropped_for_size as usize >= n / 2,
        "{:?}",
        ob.counters
    );
    assert!(
        max_file <= file_bound,
        "{n} puts at a cap of {CAP_BYTES} bytes: the file reached {max_file} bytes (bound {file_bound})"
    );
    let newest = ob.pending().last().unwrap().payload.clone();
    drop(ob);
    let ob = Outbox::open(dir.path(), at_cap()).unwrap();
    assert_eq!(
        ob.pending().last().unwrap().payload,
        newest,
        "the newest are kept"
    );
    let (peak_mib, _) = crate::util::proc::rss_mib();
    let bound_mib = base_mib + mib(4.0 * CAP_BYTES as f64 + RSS_SLACK_BYTES);
    eprintln!(
        "{n} puts, {} B each, cap {CAP_BYTES} B: file at most {max_file} B; peak RSS {peak_mib:.1} MiB (start {base_mib:.1}, bound {bound_mib:.1})",
        one
    );
    assert!(
        peak_mib <= bound_mib,
        "peak RSS {peak_mib:.1} MiB > {bound_mib:.1}"
    );
}

/// A log far over the cap (64 MiB, as a build without compaction at the cap left after an
/// outage) is opened as a stream: peak memory stays within a few caps, not the file's size,
/// and what it holds is the newest messages up to the cap.
#[test]
fn opening_a_huge_log_reads_it_as_a_stream() {
    if !in_child("opening_a_huge_log_reads_it_as_a_stream") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.log");
    let file_bytes = 64 * 1024 * 1024;
    {
        let mut w = std::io::BufWriter::new(File::create(&path).unwrap());
        let (mut written, mut seq) = (0u64, 1u64);
        while written < file_bytes {
            let (topic, payload, retain, priority) = result_msg(seq as usize);
            let put = Record::Put(Message {
                seq,
                topic,
                payload,
                retain,
                priority,
                created_ms: now_ms(),
            });
            for rec in [
                put,
                Record::Ack {
                    seq: seq.saturating_sub(1000),
                },
            ] {
                let bytes = encode_record(&rec);
                w.write_all(&bytes).unwrap();
                written += bytes.len() as u64;
            }
            seq += 1;
        }
        w.flush().unwrap();
    }
    let (_, base_mib) = crate::util::proc::rss_mib();
    let ob = Outbox::open(dir.path(), at_cap()).unwrap();
    let (peak_mib, _) = crate::util::proc::rss_mib();
    assert!(
        ob.live_bytes() <= CAP_BYTES && ob.len() > 100,
        "{}",
        ob.len()
    );
    assert!(ob.file_bytes() <= 2 * CAP_BYTES, "compacted on open");
    let bound_mib = base_mib + mib(4.0 * CAP_BYTES as f64 + RSS_SLACK_BYTES);
    eprintln!(
        "opened a {file_bytes} B log at a cap of {CAP_BYTES} B: peak RSS {peak_mib:.1} MiB (start {base_mib:.1}, bound {bound_mib:.1})"
    );
    assert!(
        peak_mib <= bound_mib,
        "peak RSS {peak_mib:.1} MiB > {bound_mib:.1}"
    );
}
