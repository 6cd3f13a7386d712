use super::*;

use std::path::Path;

use crate::spec::Task;

pub(super) fn rule(name: &str, kind: ThresholdKind, threshold: f64) -> RuleConfig {
    RuleConfig {
        name: name.into(),
        label: "flood".into(),
        key: Some("district".into()),
        window_s: 60.0,
        window_slots: 12,
        kind,
        threshold,
        min_count: 1,
        baseline: BaselineKind::Ewma,
        baseline_alpha: 0.2,
        baseline_windows: 12,
        min_baseline_windows: 3,
        min_std: 1.0,
        update_interval_s: 30.0,
        quiet_s: Some(60.0),
        cooldown_s: 0.0,
        min_confidence: 0.0,
        max_keys: 100,
        max_examples: 2,
        max_trigger_ids: 5,
        context: None,
    }
}

pub(super) fn cfg(rules: Vec<RuleConfig>) -> MonitorConfig {
    MonitorConfig {
        ts_field: "ts".into(),
        max_future_s: 300.0,
        max_key_bytes: 128,
        max_id_bytes: 128,
        entities: None,
        rules,
    }
}

/// The device clock the tests' streams are fed at: after every event time they use.
const CLOCK_MS: i64 = 10_000_000_000;

fn obs(id: usize, ts_s: f64, label: &str, district: &str) -> Observation {
    let mut fields = BTreeMap::new();
    fields.insert("district".to_string(), district.to_string());
    fields.insert("text".to_string(), format!("message {id} about {label}"));
    Observation {
        id: format!("m{id}"),
        ts_ms: (ts_s * 1000.0) as i64,
        label: Some(label.into()),
        confidence: 0.5 + (id % 5) as f64 / 10.0,
        fields,
    }
}

/// Feeds (ts_s, label, district) triples; returns every event.
fn feed(m: &mut Monitor, stream: &[(f64, &str, &str)], first_id: usize) -> Vec<MonitorEvent> {
    stream
        .iter()
        .enumerate()
        .flat_map(|(i, (t, l, d))| m.observe(&obs(first_id + i, *t, l, d), CLOCK_MS).unwrap())
        .collect()
}

fn kinds(events: &[MonitorEvent]) -> Vec<EventType> {
    events.iter().map(|e| e.kind).collect()
}

/// A burst of `n` floods in district 4 from `from_s`, one every `every_s`, and a
/// non-flood message every 10 s in district 1 from 0 to `until_s` (time goes on).
fn burst_stream(
    from_s: f64,
    n: usize,
    every_s: f64,
    until_s: f64,
) -> Vec<(f64, &'static str, &'static str)> {
    let mut s: Vec<(f64, &str, &str)> = (0..n)
        .map(|i| (from_s + i as f64 * every_s, "flood", "4"))
        .collect();
    let mut t = 0.0;
    while t <= until_s {
        s.push((t, "storm", "1"));
        t += 10.0;
    }
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    s
}

#[test]
fn one_burst_is_one_incident_with_throttled_updates_and_an_end() {
    let mut m = Monitor::new(&cfg(vec![rule("floods", ThresholdKind::Count, 5.0)]));
    // 40 floods 2 s apart (80 s), then only other messages for 5 minutes.
    let events = feed(&mut m, &burst_stream(100.0, 40, 2.0, 500.0), 0);
    let k = kinds(&events);
    assert_eq!(
        k.iter().filter(|&&t| t == EventType::New).count(),
        1,
        "{k:?}"
    );
    assert_eq!(
        k.iter().filter(|&&t| t == EventType::End).count(),
        1,
        "{k:?}"
    );
    assert_eq!(k.first(), Some(&EventType::New));
    assert_eq!(k.last(), Some(&EventType::End));
    let id = events[0].incident_id().to_string();
    assert!(events.iter().all(|e| e.incident_id() == id));
    // Opens on the 5th flood: 100 + 4 * 2 s.
    assert_eq!(events[0].after["start_ts"].as_f64(), Some(108.0));
    assert_eq!(events[0].after["window"]["count"], 5);
    assert_eq!(events[0].after["key"], "4");
    assert_eq!(
        events[0].after["trigger_ids"].as_array().map(Vec::len),
        Some(5)
    );
    // Updates at most every 30 s of event time.
    let times: Vec<f64> = events
        .iter()
        .map(|e| e.after["ts"].as_f64().unwrap())
        .collect();
    for (w, e) in times.windows(2).zip(&events[1..]) {
        if e.kind == EventType::Update {
            assert!(w[1] - w[0] >= 30.0, "{times:?}");
        }
    }
    assert!(k.contains(&EventType::Update));
    // Update's `before` is what was published last.
    let upd = events
        .iter()
        .position(|e| e.kind == EventType::Update)
        .unwrap();
    assert_eq!(events[upd].before.as_ref(), Some(&events[upd - 1].after));
    // Ends once the window (60 s) has drained below 5 and stayed so for quiet_s (60 s).
    let end = events.last().unwrap();
    let last_flood = 100.0 + 39.0 * 2.0;
    let end_ts = end.after["end_ts"].as_f64().unwrap();
    assert!(
        end_ts >= last_flood + 60.0 && end_ts <= last_flood + 60.0 + 60.0 + 10.0,
        "{end_ts}"
    );
    assert_eq!(end.after["end_reason"], "quiet");
    assert_eq!(end.after["hits"], 40);
    let ex = end.after["top_examples"].as_array().unwrap();
    assert_eq!(ex.len(), 2);
    assert!(ex[0]["confidence"].as_f64() >= ex[1]["confidence"].as_f64());
    assert!(m.open_incidents().is_empty());
}

#[test]
fn cooldown_keeps_a_second_burst_out_until_it_passes() {
    let mut r = rule("floods", ThresholdKind::Count, 5.0);
    r.cooldown_s = 600.0;
    let mut m = Monitor::new(&cfg(vec![r.clone()]));
    // Two bursts 300 s apart: the second falls in the cooldown.
    let mut s = burst_stream(100.0, 10, 1.0, 1000.0);
    s.extend((0..10).map(|i| (400.0 + i as f64, "flood", "4")));
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    let k = kinds(&feed(&mut m, &s, 0));
    assert_eq!(
        k.iter().filter(|&&t| t == EventType::New).count(),
        1,
        "{k:?}"
    );

    // Without cooldown the same stream gives two incidents.
    r.cooldown_s = 0.0;
    let mut m = Monitor::new(&cfg(vec![r]));
    let k = kinds(&feed(&mut m, &s, 0));
    assert_eq!(
        k.iter().filter(|&&t| t == EventType::New).count(),
        2,
        "{k:?}"
    );
}

#[test]
fn flat_stream_raises_nothing_and_a_jump_does() {
    let mut r = rule("jump", ThresholdKind::Jump, 4.0);
    r.min_count = 4;
    let mut m = Monitor::new(&cfg(vec![r]));
    // One flood every 20 s (3 per window) for an hour, with other messages around it.
    let mut s: Vec<(f64, &str, &str)> = Vec::new();
    for i in 0..180 {
        let t = i as f64 * 20.0;
        s.push((t, "flood", "4"));
        s.push((t + 7.0, "storm", "4"));
    }
    let events = feed(&mut m, &s, 0);
    assert!(events.is_empty(), "{events:?}");
    // Then 20 floods in 30 s.
    let jump: Vec<(f64, &str, &str)> = (0..20)
        .map(|i| (3600.0 + i as f64 * 1.5, "flood", "4"))
        .collect();
    let events = feed(&mut m, &jump, 1000);
    assert_eq!(kinds(&events).first(), Some(&EventType::New), "{events:?}");
    let z = events[0].after["z"].as_f64().unwrap();
    assert!(z >= 4.0, "{z}");
    let mean = events[0].after["baseline"]["mean"].as_f64().unwrap();
    assert!((2.0..=4.0).contains(&mean), "baseline mean {mean}");
}

#[test]
fn share_and_rate_kinds() {
    let mut share = rule("share", ThresholdKind::Share, 0.5);
    share.min_count = 3;
    let mut rate = rule("rate", ThresholdKind::Rate, 6.0);
    rate.min_count = 1;
    let mut m = Monitor::new(&cfg(vec![share, rate]));
    // 2 floods among 10 messages: share 0.2, rate 2/min.
    let s: Vec<(f64, &str, &str)> = (0..10)
        .map(|i| {
            (
                i as f64 * 5.0,
                if i % 5 == 0 { "flood" } else { "storm" },
                "4",
            )
        })
        .collect();
    assert!(feed(&mut m, &s, 0).is_empty());
    // Then 6 floods in a row: share 8/16 = 0.5 at the last, rate 8/min.
    let s: Vec<(f64, &str, &str)> = (0..6).map(|i| (50.0 + i as f64, "flood", "4")).collect();
    let events = feed(&mut m, &s, 100);
    let rules: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == EventType::New)
        .map(|e| e.rule.as_str())
        .collect();
    assert!(
        rules.contains(&"share") && rules.contains(&"rate"),
        "{rules:?}"
    );
    let sh = events.iter().find(|e| e.rule == "share").unwrap();
    assert!(sh.after["window"]["share"].as_f64().unwrap() >= 0.5);
}

#[test]
fn keys_are_bounded_and_evictions_counted() {
    let mut r = rule("floods", ThresholdKind::Count, 3.0);
    r.max_keys = 3;
    let mut m = Monitor::new(&cfg(vec![r]));
    // An incident in district "hot", then 10 other districts one message each.
    let mut s: Vec<(f64, &str, &str)> = (0..3).map(|i| (i as f64, "flood", "hot")).collect();
    let others: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
    for (i, d) in others.iter().enumerate() {
        s.push((10.0 + i as f64, "storm", d.as_str()));
    }
    let events = feed(&mut m, &s, 0);
    assert_eq!(m.keys("floods"), 3);
    let c = m.counters("floods").unwrap();
    assert_eq!(c.evictions, 8);
    assert_eq!(c.evicted_open, 1);
    assert_eq!(kinds(&events), vec![EventType::New, EventType::End]);
    assert_eq!(events[1].after["end_reason"], "evicted");
    // The least recently seen go first: the last three districts are kept.
    let kept: Vec<&String> = m.state.rules["floods"].keys.keys().collect();
    assert_eq!(kept, vec!["d7", "d8", "d9"]);
}

#[test]
fn late_messages_are_counted_not_used() {
    let mut m = Monitor::new(&cfg(vec![rule("floods", ThresholdKind::Count, 2.0)]));
    feed(&mut m, &[(1000.0, "storm", "4")], 0);
    // 500 s before the watermark: outside the 60 s window.
    let events = feed(&mut m, &[(500.0, "flood", "4"), (501.0, "flood", "4")], 1);
    assert!(events.is_empty());
    assert_eq!(m.counters("floods").unwrap().late, 2);
    // Out of order but inside the window: counted.
    let events = feed(&mut m, &[(990.0, "flood", "4"), (980.0, "flood", "4")], 3);
    assert_eq!(kinds(&events), vec![EventType::New]);
}

#[test]
fn a_far_future_event_time_is_refused_and_moves_nothing() {
    let mut m = Monitor::new(&cfg(vec![rule("floods", ThresholdKind::Count, 2.0)]));
    let clock_ms = 2_000_000;
    m.observe(&obs(0, 1000.0, "storm", "4"), clock_ms).unwrap();
    // Milliseconds sent as seconds, the far end of i64, and just past the skew.
    let far = [1000.0 * 1000.0, i64::MAX as f64 / 1000.0, 2300.01];
    for (i, ts_s) in far.into_iter().enumerate() {
        let e = m
            .observe(&obs(1 + i, ts_s, "flood", "4"), clock_ms)
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("`ts`") && msg.contains("max_future_s = 300"),
            "{msg}"
        );
        assert_eq!(m.watermark_ms(), Some(1_000_000), "{msg}");
    }
    assert_eq!(m.counters("floods").unwrap().observations, 1);
    // At the skew exactly is still accepted; later normal reports count, none is late.
    m.observe(&obs(5, 2300.0, "storm", "1"), clock_ms).unwrap();
    let events: Vec<MonitorEvent> = [(2290.0, "flood"), (2295.0, "flood")]
        .iter()
        .enumerate()
        .flat_map(|(i, (t, l))| m.observe(&obs(6 + i, *t, l, "4"), clock_ms).unwrap())
        .collect();
    assert_eq!(kinds(&events), vec![EventType::New]);
    assert_eq!(m.counters("floods").unwrap().late, 0);
    // The skew is validated.
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        let c = MonitorConfig {
            max_future_s: bad,
            ..cfg(vec![rule("floods", ThresholdKind::Count, 2.0)])
        };
        let e = c
            .validate(Path::new("t.toml"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`monitor.max_future_s`"), "{e}");
    }
}

#[test]
fn state_round_trips_through_a_file_and_replays_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join("monitor.json");
    let mut j = rule("jump", ThresholdKind::Jump, 3.0);
    j.min_count = 4;
    let c = cfg(vec![rule("floods", ThresholdKind::Count, 5.0), j]);
    let mut s = burst_stream(1200.0, 30, 2.0, 2000.0);
    s.extend((0..60).map(|i| (i as f64 * 20.0, "flood", "4")));
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Cut in the middle of the burst, with an incident open.
    let cut = s.iter().position(|x| x.0 >= 1230.0).unwrap();
    let mut a = Monitor::new(&c);
    let first = feed(&mut a, &s[..cut], 0);
    assert!(!a.open_incidents().is_empty(), "{first:?}");
    a.save(&path).unwrap();
    assert!(!path.with_extension("tmp").exists());
    let (mut b, restored) = Monitor::restore(&c, &path).unwrap();
    assert_eq!(
        restored,
        Restored::Loaded {
            reset_rules: vec![]
        }
    );
    assert_eq!(b.open_incidents(), a.open_incidents());
    let rest_a = feed(&mut a, &s[cut..], cut);
    let rest_b = feed(&mut b, &s[cut..], cut);
    assert!(!rest_a.is_empty());
    assert_eq!(
        rest_a.iter().map(MonitorEvent::payload).collect::<Vec<_>>(),
        rest_b.iter().map(MonitorEvent::payload).collect::<Vec<_>>()
    );
    // The incident open at the cut goes on: no second `new`, and it ends.
    assert!(rest_b
        .iter()
        .all(|e| !(e.rule == "floods" && e.kind == EventType::New)));
    assert!(rest_b
        .iter()
        .any(|e| e.rule == "floods" && e.kind == EventType::End));
    assert_eq!(b.counters("floods"), a.counters("floods"));

    // A rule whose settings changed starts over; the other keeps its state.
    let mut changed = c.clone();
    changed.rules[0].threshold = 6.0;
    let (m, restored) = Monitor::restore(&changed, &path).unwrap();
    assert_eq!(
        restored,
        Restored::Loaded {
            reset_rules: vec!["floods".into()]
        }
    );
    assert_eq!(m.keys("floods"), 0);
    assert!(m.keys("jump") > 0);

    // A corrupt file is reported and ignored; a missing one is a fresh start.
    std::fs::write(&path, b"{not json").unwrap();
    assert!(matches!(
        Monitor::restore(&c, &path).unwrap().1,
        Restored::Discarded(_)
    ));
    let (_, r) = Monitor::restore(&c, &dir.path().join("none.json")).unwrap();
    assert_eq!(r, Restored::Fresh);
}

#[test]
fn rules_from_a_task_file_and_errors_naming_the_key() {
    let base = r#"
instruction = "Name the event."
query = "Message: {text}\nEvent:"
labels = [{ name = "flood", text = " flood" }, { name = "fire", text = " fire" }]
"#;
    let parse = |extra: &str| {
        let t = Task::parse(&format!("{base}{extra}"), Path::new("t.toml"), "t").unwrap();
        MonitorConfig::from_task(&t)
    };
    assert!(parse("").unwrap().is_none());
    let ok = parse(
        r#"
[monitor]
[[monitor.rules]]
name = "flood-jump"
label = "flood"
key = "district"
window_s = 600
kind = "jump"
threshold = 3
"#,
    )
    .unwrap()
    .unwrap();
    assert_eq!(ok.rules[0].quiet_s, None);
    assert_eq!(ok.ts_field, "ts");
    let r = &Monitor::new(&ok).rules[0];
    assert_eq!(
        (r.window_ms, r.slot_ms, r.quiet_ms),
        (600_000, 30_000, 600_000)
    );

    let rule = |body: &str| {
        format!(
            "[[monitor.rules]]\nname = \"r\"\nlabel = \"flood\"\nwindow_s = 60\nkind = \"count\"\nthreshold = 3\n{body}"
        )
    };
    for (body, key) in [
        ("label2 = 1", "monitor"),
        ("cooldown_s = -1", "monitor.rules[0].cooldown_s"),
        ("baseline_alpha = 0", "monitor.rules[0].baseline_alpha"),
        ("max_keys = 0", "monitor.rules[0].max_keys"),
    ] {
        let e = parse(&rule(body)).unwrap_err().to_string();
        assert!(e.contains(key), "{body}: {e}");
    }
    let e = parse(&rule("").replace("\"flood\"", "\"storm\""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("monitor.rules[0].label") && e.contains("storm"),
        "{e}"
    );
    let e = parse(&rule("").replace("name = \"r\"", "name = \"a/b\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("monitor.rules[0].name"), "{e}");
    let e = parse(&rule("").replace(
        "kind = \"count\"\nthreshold = 3",
        "kind = \"share\"\nthreshold = 3",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("share"), "{e}");
    let two = format!("{}\n{}", rule(""), rule(""));
    let e = parse(&two).unwrap_err().to_string();
    assert!(
        e.contains("monitor.rules[1].name") && e.contains("twice"),
        "{e}"
    );
}

#[test]
fn a_saved_stream_time_far_ahead_of_the_clock_is_discarded_on_restore() {
    // A state saved by a build that let a far-future time in (milliseconds sent as seconds).
    let c = cfg(vec![rule("floods", ThresholdKind::Count, 2.0)]);
    let mut a = Monitor::new(&c);
    let poisoned_s = 1_800_000_000.0 * 1000.0;
    a.observe(&obs(0, poisoned_s, "flood", "4"), i64::MAX)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    a.save(&path).unwrap();
    let clock_ms = 1_800_000_000_000;
    let (m, restored) = Monitor::restore_at(&c, &path, clock_ms).unwrap();
    let Restored::Discarded(why) = restored else {
        panic!("kept a poisoned state: {restored:?}")
    };
    assert!(why.contains("ahead of the clock"), "{why}");
    assert_eq!(m.watermark_ms(), None);
    // A sane saved time is kept.
    let mut b = Monitor::new(&c);
    b.observe(&obs(0, 1_799_999_000.0, "flood", "4"), clock_ms)
        .unwrap();
    b.save(&path).unwrap();
    let (m, restored) = Monitor::restore_at(&c, &path, clock_ms).unwrap();
    assert!(matches!(restored, Restored::Loaded { .. }), "{restored:?}");
    assert_eq!(m.watermark_ms(), Some(1_799_999_000_000));
}

/// The saved state quotes request ids and fields: owner-only (0600, in a 0700 folder), and
/// a file left with wider permissions is narrowed when saved again.
#[cfg(unix)]
#[test]
fn the_state_file_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join("monitor.json");
    let a = Monitor::new(&cfg(vec![rule("floods", ThresholdKind::Count, 5.0)]));
    a.save(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(path.with_extension("tmp"), "old").unwrap();
    std::fs::set_permissions(
        path.with_extension("tmp"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    a.save(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
}

/// An observation with the given fields (and a text) at `ts_s`.
fn obs_with(id: &str, ts_s: f64, label: &str, fields: &[(&str, &str)]) -> Observation {
    Observation {
        id: id.into(),
        ts_ms: (ts_s * 1000.0) as i64,
        label: Some(label.into()),
        confidence: 0.9,
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn entity_cfg() -> MonitorConfig {
    let mut r = rule("neg", ThresholdKind::Count, 2.0);
    r.label = "negative".into();
    r.key = Some("entity".into());
    let mut c = cfg(vec![r]);
    let mut names = BTreeMap::new();
    names.insert("NOKIA".to_string(), vec!["Nokia".to_string()]);
    c.entities = Some(EntityConfig {
        key: "entity".into(),
        from: "text".into(),
        cashtags: true,
        names,
        max_per_message: 4,
    });
    c
}

#[test]
fn entity_rules_count_each_company_a_text_names() {
    let mut m = Monitor::new(&entity_cfg());
    let t = |id, ts, text| obs_with(id, ts, "negative", &[("text", text)]);
    assert!(m
        .observe(&t("a", 1.0, "$TSLA and Nokia fall"), CLOCK_MS)
        .unwrap()
        .is_empty());
    let ev = m
        .observe(&t("b", 2.0, "Nokia warns again"), CLOCK_MS)
        .unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].after["key"], "NOKIA");
    assert_eq!(ev[0].after["trigger_ids"], serde_json::json!(["a", "b"]));
    assert_eq!(m.keys("neg"), 2, "TSLA and NOKIA");
    // A message's own `entity` field wins over the text; a text naming nobody is missing.
    let own = obs_with(
        "c",
        3.0,
        "negative",
        &[("text", "$TSLA"), ("entity", "ACME")],
    );
    m.observe(&own, CLOCK_MS).unwrap();
    m.observe(&t("d", 4.0, "markets were calm"), CLOCK_MS)
        .unwrap();
    assert_eq!(m.keys("neg"), 3, "ACME, not a second TSLA");
    assert_eq!(m.counters("neg").unwrap().missing_key, 1);
}

#[test]
fn ids_and_keys_over_their_limits_are_refused_and_change_nothing() {
    let mut c = cfg(vec![rule("count", ThresholdKind::Count, 1.0)]);
    c.max_key_bytes = 8;
    c.max_id_bytes = 8;
    let mut m = Monitor::new(&c);
    let long_id = obs_with("123456789", 1.0, "flood", &[("district", "4")]);
    let e = m.observe(&long_id, CLOCK_MS).unwrap_err();
    assert_eq!(e.kind(), "monitor_id_too_long");
    assert!(e.to_string().contains("max_id_bytes = 8"), "{e}");
    let long_key = obs_with("x", 1.0, "flood", &[("district", "district-4")]);
    let e = m.observe(&long_key, CLOCK_MS).unwrap_err();
    assert_eq!(e.kind(), "monitor_key_too_long");
    assert!(e.to_string().contains("`district` of 10 bytes"), "{e}");
    assert_eq!(m.keys("count"), 0);
    assert_eq!(m.watermark_ms(), None);
    assert_eq!(m.counters("count").unwrap().observations, 0);
    // At the limit: counted.
    let ok = obs_with("12345678", 1.0, "flood", &[("district", "12345678")]);
    assert_eq!(m.observe(&ok, CLOCK_MS).unwrap().len(), 1);
}

#[test]
fn memory_settings_are_capped_by_validation() {
    let path = Path::new("t.toml");
    let mut c = cfg(vec![rule("r", ThresholdKind::Count, 1.0)]);
    c.max_id_bytes = 1 << 20;
    assert!(c.validate(path, None).is_err());
    let mut c = cfg(vec![rule("r", ThresholdKind::Count, 1.0)]);
    c.rules[0].max_trigger_ids = 100_000;
    let e = c.validate(path, None).unwrap_err().to_string();
    assert!(e.contains("max_trigger_ids"), "{e}");
    let mut c = entity_cfg();
    c.entities
        .as_mut()
        .unwrap()
        .names
        .insert("X".repeat(200), vec!["x".into()]);
    assert!(c.validate(path, None).is_err());
}

/// Fire reports in a district AND a smoke reading above 300, fresh within 60 s.
fn fusion_cfg() -> MonitorConfig {
    let mut r = rule("fire-smoke", ThresholdKind::Count, 3.0);
    r.label = "fire".into();
    r.context = Some(ContextCondition {
        field: "context.smoke".into(),
        above: Some(300.0),
        below: None,
        max_age_s: 60.0,
    });
    cfg(vec![r])
}

/// Three fire reports in district 4 carrying a smoke reading `smoke` of age `age_s`.
fn fires_with_smoke(smoke: &str, age_s: &str) -> Vec<MonitorEvent> {
    let mut m = Monitor::new(&fusion_cfg());
    (0..3)
        .flat_map(|i| {
            let o = obs_with(
                &format!("f{i}"),
                100.0 + i as f64,
                "fire",
                &[
                    ("district", "4"),
                    ("context.smoke", smoke),
                    ("context.smoke.age_s", age_s),
                ],
            );
            m.observe(&o, CLOCK_MS).unwrap()
        })
        .collect()
}

#[test]
fn the_sensor_reading_decides_whether_reports_become_an_incident() {
    let high = fires_with_smoke("412", "5");
    assert_eq!(high.len(), 1, "{high:?}");
    let ctx = &high[0].after["context"];
    assert_eq!(ctx["value"], 412.0);
    assert_eq!(ctx["holds"], true);
    assert_eq!(ctx["stale"], false);
    // The same reports with a low reading: no incident.
    assert!(fires_with_smoke("120", "5").is_empty());
    // No reading at all: no incident either.
    let mut m = Monitor::new(&fusion_cfg());
    for i in 0..3 {
        let o = obs_with(
            &format!("n{i}"),
            100.0 + i as f64,
            "fire",
            &[("district", "4")],
        );
        assert!(m.observe(&o, CLOCK_MS).unwrap().is_empty());
    }
}

#[test]
fn a_stale_reading_is_not_used_and_an_incident_shows_it_went_stale() {
    // Over the threshold but 90 s old: not used.
    assert!(fires_with_smoke("900", "90").is_empty());
    // Fresh at first: an incident; the reading then goes stale as the stream moves on
    // without a new one, and the incident ends showing why.
    let mut m = Monitor::new(&fusion_cfg());
    let mut events = Vec::new();
    for i in 0..3 {
        let o = obs_with(
            &format!("f{i}"),
            100.0 + i as f64,
            "fire",
            &[
                ("district", "4"),
                ("context.smoke", "900"),
                ("context.smoke.age_s", "0"),
            ],
        );
        events.extend(m.observe(&o, CLOCK_MS).unwrap());
    }
    assert_eq!(events.len(), 1);
    events.extend(m.advance_to(102_000 + 61_000 + 60_000));
    let end = events.last().unwrap();
    assert_eq!(end.kind, EventType::End, "{events:?}");
    assert_eq!(end.after["context"]["stale"], true);
    assert_eq!(end.after["context"]["holds"], false);
}
