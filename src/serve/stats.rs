//! Rolling figures for `<prefix>/stats`.

use std::time::Instant;

use heapless::HistoryBuffer;
use serde_json::{json, Value};

use crate::serve::outbox::Outbox;
use crate::serve::worker::{Done, Output};
use crate::util::proc::rss_mib;
use crate::util::stats::percentile;

/// Latencies kept for the percentiles: the most recent outcomes (a fixed ring, so the
/// window costs the same memory at any uptime).
const LATENCY_WINDOW: usize = 1024;

/// Counters since the start, and the latency window.
pub struct Stats {
    started: Instant,
    results: u64,
    errors: u64,
    /// Requests refused because the queue was full.
    pub overloaded: u64,
    /// Outcomes published without the outbox because it could not be written.
    pub outbox_write_errors: u64,
    /// Outbox messages the MQTT client refused for good (dropped, each logged).
    pub publish_refused: u64,
    /// Messages over the MQTT packet limit, replaced by an error record.
    pub too_large_results: u64,
    decoded_tokens: u64,
    latencies_ms: HistoryBuffer<f64, LATENCY_WINDOW>,
    /// When the last snapshot was taken, with the result and token counts then.
    last: (Instant, u64, u64),
}

impl Default for Stats {
    fn default() -> Stats {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            started: Instant::now(),
            results: 0,
            errors: 0,
            overloaded: 0,
            outbox_write_errors: 0,
            publish_refused: 0,
            too_large_results: 0,
            decoded_tokens: 0,
            latencies_ms: HistoryBuffer::new(),
            last: (Instant::now(), 0, 0),
        }
    }

    pub fn record(&mut self, d: &Done) {
        match &d.outcome {
            Ok(o) => {
                self.results += 1;
                self.decoded_tokens += match o {
                    Output::Classified(r) => r.tokens.decoded as u64,
                    Output::Ranked(r) => r.ranked.iter().map(|x| x.tokens_decoded as u64).sum(),
                    Output::Reacted(r) => r.generated_tokens as u64,
                };
            }
            Err(_) => self.errors += 1,
        }
        // The oldest latency is overwritten once the window is full.
        self.latencies_ms.write(d.latency_ms);
    }

    /// The figures now; rates are over the time since the last snapshot.
    pub fn snapshot(&mut self, queue_depth: usize, outbox: &Outbox) -> Value {
        let mut l: Vec<f64> = self.latencies_ms.as_slice().to_vec();
        l.sort_by(f64::total_cmp);
        let pct = |p: usize| percentile(&l, p);
        let secs = self.last.0.elapsed().as_secs_f64().max(1e-3);
        let rate = (self.results - self.last.1) as f64 / secs;
        let tok_rate = (self.decoded_tokens - self.last.2) as f64 / secs;
        self.last = (Instant::now(), self.results, self.decoded_tokens);
        let (peak, rss) = rss_mib();
        json!({
            "queue_depth": queue_depth,
            "outbox_depth": outbox.len(),
            "outbox_bytes": outbox.live_bytes(),
            "outbox_dropped": outbox.counters.dropped_for_size + outbox.counters.dropped_for_age,
            "outbox_torn_records": outbox.counters.torn_records,
            "outbox_write_errors": self.outbox_write_errors,
            "publish_refused": self.publish_refused,
            "too_large_results": self.too_large_results,
            "results_total": self.results,
            "errors_total": self.errors,
            "overloaded_total": self.overloaded,
            "results_per_s": (rate * 100.0).round() / 100.0,
            "latency_p50_ms": (pct(50) * 10.0).round() / 10.0,
            "latency_p99_ms": (pct(99) * 10.0).round() / 10.0,
            "decoded_tokens_per_s": tok_rate.round(),
            "rss_mib": rss.round(),
            "peak_rss_mib": peak.round(),
            "uptime_s": self.started.elapsed().as_secs(),
        })
    }
}
