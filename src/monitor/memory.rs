//! The monitor's memory bound in bytes. Every piece a key holds is bounded by a setting:
//! keys (`max_key_bytes`) and ids (`max_id_bytes`) are refused beyond their limit, example
//! texts are cut to 160 bytes, and the counts of keys, ids, examples, slots and baseline
//! windows are capped by validation. The bound below adds up the worst case of each piece
//! (every key at its longest, with an open incident full of evidence), with room for the
//! growth slack of vectors and the nodes of the ordered maps; a unit test fills a monitor to
//! its bounds and checks the heap it really holds against it.

use std::mem::size_of;

use super::config::{MonitorConfig, RuleConfig};
use super::incident::{Example, EXAMPLE_BYTES};
use super::window::{KeyState, Slot};

/// The incident snapshot kept as `before` of the next message: a JSON object of about 35
/// fields with small nested objects (window, baseline, context), apart from the strings,
/// ids and examples counted separately. Measured at about 5 KiB; kept with room.
const SNAPSHOT_FIXED_BYTES: usize = 10 * 1024;
/// One example in the snapshot: a JSON object of 4 fields, apart from its id and text.
const SNAPSHOT_EXAMPLE_BYTES: usize = 1024;
/// A JSON value.
const VALUE_BYTES: usize = 32;
/// A String's own size.
const STRING_BYTES: usize = 24;
/// B-tree nodes are at least about half full: an entry costs at most this many times its
/// size.
const MAP_FACTOR: usize = 3;

impl MonitorConfig {
    /// An upper bound of the heap a monitor for these rules holds, in bytes, whatever the
    /// stream: every rule at `max_keys`, each key at `max_key_bytes` with an open incident
    /// whose ids are all `max_id_bytes` long.
    pub fn worst_case_bytes(&self) -> usize {
        let rules: usize = self
            .rules
            .iter()
            .map(|r| r.max_keys.saturating_mul(self.worst_case_key_bytes(r)))
            .fold(0, usize::saturating_add);
        // Per rule: its name, settings and the state's map entry.
        rules.saturating_add(self.rules.len() * 4096)
    }

    /// The worst case of one key of rule `r`, in bytes.
    pub fn worst_case_key_bytes(&self, r: &RuleConfig) -> usize {
        let k = self.max_key_bytes;
        let id = self.max_id_bytes;
        let t = r.max_trigger_ids;
        let e = r.max_examples;
        let name = r.name.len() + r.label.len() + r.key.as_ref().map_or(0, String::len);
        let example = size_of::<Example>();
        // The key in the key map, the LRU order and the open set; in the incident id, and in
        // the snapshot's `id` and `key`; the rule's strings in the id and the snapshot.
        let keys = MAP_FACTOR * (size_of::<KeyState>() + STRING_BYTES)
            + MAP_FACTOR * (8 + STRING_BYTES)
            + MAP_FACTOR * STRING_BYTES
            + 6 * k
            + 3 * name
            + 64;
        // Slot and baseline rings, with growth slack.
        let windows =
            2 * r.window_slots as usize * size_of::<Slot>() + 2 * r.baseline_windows as usize * 8;
        // Recent hits and the incident's examples (ids and texts), the incident's trigger
        // ids, with growth slack on each vector.
        let evidence = 2 * (t + 1) * example
            + 2 * (e + 1) * example
            + 2 * t * STRING_BYTES
            + (t + e) * (id + EXAMPLE_BYTES)
            + t * id;
        // The snapshot: its fixed part, the trigger ids and examples again.
        let snapshot = SNAPSHOT_FIXED_BYTES
            + 2 * t * VALUE_BYTES
            + t * id
            + e * (SNAPSHOT_EXAMPLE_BYTES + id + EXAMPLE_BYTES);
        keys + windows + evidence + snapshot
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use super::super::tests::{cfg, rule};
    use super::super::{Monitor, Observation, ThresholdKind};

    /// Counts the bytes this thread holds on the heap, so a test can measure what a structure
    /// really keeps (other tests' threads are not counted).
    struct Counting;

    thread_local! {
        static HELD: Cell<i64> = const { Cell::new(0) };
    }

    fn add(n: i64) {
        let _ = HELD.try_with(|h| h.set(h.get() + n));
    }

    fn held() -> i64 {
        HELD.with(|h| h.get())
    }

    // SAFETY: forwards to the system allocator unchanged; only counts.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            add(l.size() as i64);
            System.alloc(l)
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            add(-(l.size() as i64));
            System.dealloc(p, l)
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            add(new as i64 - l.size() as i64);
            System.realloc(p, l, new)
        }
    }

    #[global_allocator]
    static ALLOC: Counting = Counting;

    /// Every key at its longest, every id at its longest, texts of 4-byte characters, and
    /// every key with an open incident full of evidence: the heap held stays under
    /// `worst_case_bytes`, and the worst case with the defaults is what docs/monitor.md
    /// states.
    #[test]
    fn a_monitor_filled_to_its_bounds_holds_less_than_its_stated_worst_case() {
        let mut r = rule("burst", ThresholdKind::Count, 1.0);
        r.max_keys = 200;
        r.max_trigger_ids = 10;
        r.max_examples = 3;
        r.window_s = 3600.0;
        r.update_interval_s = 0.0;
        let mut c = cfg(vec![r.clone()]);
        c.max_key_bytes = 128;
        c.max_id_bytes = 128;
        let before = held();
        let mut m = Monitor::new(&c);
        let text: String = "\u{1F525}".repeat(100);
        let mut n = 0usize;
        // Two rounds over more keys than fit, so evictions happen and the survivors are the
        // last ones, each with more hits than max_trigger_ids.
        for round in 0..2 {
            for key in 0..(r.max_keys + 50) {
                for _ in 0..(r.max_trigger_ids + 2) {
                    n += 1;
                    let mut fields = BTreeMap::new();
                    let k = format!("{key:0>128}");
                    fields.insert("district".to_string(), k);
                    fields.insert("text".to_string(), text.clone());
                    let o = Observation {
                        id: format!("{n:0>128}"),
                        ts_ms: 1_000_000 + (round * 1000 + n) as i64,
                        label: Some("flood".into()),
                        confidence: (n % 7) as f64 / 7.0,
                        fields,
                    };
                    drop(m.observe(&o, i64::MAX).unwrap());
                }
            }
        }
        let used = (held() - before) as usize;
        assert_eq!(m.keys("burst"), r.max_keys);
        assert_eq!(m.open_incidents().len(), r.max_keys);
        let bound = c.worst_case_bytes();
        eprintln!(
            "held {used} bytes for {} keys ({} a key); bound {bound} ({} a key)",
            r.max_keys,
            used / r.max_keys,
            c.worst_case_key_bytes(&r)
        );
        assert!(used <= bound, "held {used} > bound {bound}");
        // Not a bound so loose that it says nothing.
        assert!(bound < 4 * used, "bound {bound} is over 4x the {used} held");
        drop(m);

        // The defaults (docs/monitor.md): per key, and a rule of 4096 keys.
        let d: super::super::MonitorConfig = toml::from_str(
            "[[rules]]\nname = \"fire-jump\"\nlabel = \"fire\"\nkey = \"district\"\n\
             window_s = 600\nkind = \"jump\"\nthreshold = 4.0\n",
        )
        .unwrap();
        let per_key = d.worst_case_key_bytes(&d.rules[0]);
        let rule_mib = d.worst_case_bytes() as f64 / (1u64 << 20) as f64;
        eprintln!("defaults: {per_key} bytes a key, {rule_mib:.1} MiB for a rule of 4096 keys");
        assert_eq!(d.rules[0].max_keys, 4096);
        assert!(per_key <= 28 * 1024, "{per_key}");
    }
}
