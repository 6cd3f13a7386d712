//! Turns between requests and background work (a retrain's feature chunks) on the
//! inference thread.

use std::time::{Duration, Instant};

/// Longest a waiting background job (a retrain's feature chunk) yields to requests: under
/// continuous traffic one job runs between two batches after this long, so a retrain still
/// finishes while requests wait at most one chunk more.
pub const BACKGROUND_MAX_WAIT: Duration = Duration::from_secs(5);

/// When background work gets a turn: whenever no request waits, and between two batches
/// once it has waited [`BACKGROUND_MAX_WAIT`] behind continuous traffic. Pure, so it is
/// tested without a model.
#[derive(Debug, Clone, Copy)]
pub struct BackgroundTurns {
    /// Since when background work has had no turn.
    since: Instant,
}

impl BackgroundTurns {
    pub fn new(now: Instant) -> BackgroundTurns {
        BackgroundTurns { since: now }
    }

    /// Whether background work may run now (and if so, its wait starts again).
    pub fn take(&mut self, now: Instant, request_waiting: bool) -> bool {
        let due = !request_waiting || now.duration_since(self.since) >= BACKGROUND_MAX_WAIT;
        if due {
            self.since = now;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_work_runs_when_idle_and_after_the_wait_behind_traffic() {
        let t0 = Instant::now();
        let mut turns = BackgroundTurns::new(t0);
        // Idle: always.
        assert!(turns.take(t0, false));
        // Continuous traffic: not before the wait, then once, then waits again.
        let half = t0 + BACKGROUND_MAX_WAIT / 2;
        assert!(!turns.take(half, true));
        let after = t0 + BACKGROUND_MAX_WAIT;
        assert!(turns.take(after, true));
        assert!(!turns.take(after + Duration::from_millis(1), true));
        assert!(turns.take(after + BACKGROUND_MAX_WAIT, true));
        // An idle moment starts the wait again.
        let idle = after + BACKGROUND_MAX_WAIT + Duration::from_secs(1);
        assert!(turns.take(idle, false));
        assert!(!turns.take(idle + BACKGROUND_MAX_WAIT / 2, true));
    }
}
