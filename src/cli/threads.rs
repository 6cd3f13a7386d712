//! How llama.cpp's CPU threads wait for each other, set before anything else runs.
//!
//! llama.cpp runs a decode on OpenMP threads that meet at a barrier after every operation
//! (hundreds per decode). libgomp's default is to spin at each barrier for a long while
//! (300,000 turns) before sleeping. On a quiet machine that is fast; on a board that also
//! runs a broker, a camera pipeline or a build, the thread that arrives first spins through its
//! whole time slice while the peer it waits for is descheduled. Measured with `edgeact bench`
//! at load average 13: 0.9-1.4 classifications/s spinning against 13.3 with a short wait
//! (docs/benchmarks.md, "Threads on a busy machine").
//!
//! libgomp reads its settings once, when it is loaded (before `main`), so the only way to
//! change them is the environment of a fresh start: when the user set neither
//! `OMP_WAIT_POLICY` nor `GOMP_SPINCOUNT`, edgeact sets `GOMP_SPINCOUNT` to [`SPIN_COUNT`]
//! and executes itself again (same pid, same arguments; systemd and signals see one process). A user's own
//! setting always wins.

use std::ffi::OsString;

/// A waiting thread spins 1,000 turns, then sleeps. Classifications/s one at a time, x86-dev
/// (docs/benchmarks.md): at load 13, 9.8 (passive 12-13.6, spin 10,000 2.4-2.9, libgomp's
/// default 0.9-1.4); on a quiet machine 31.4 (default 29.6, passive 19.6).
pub const SPIN_COUNT: &str = "1000";

/// Set on the second start so that it never loops.
const MARK: &str = "EDGEACT_THREAD_WAIT_SET";

/// The variables to set before starting again, or `None` when the environment already says
/// how threads wait (the user's choice, or this process is the second start).
pub fn wait_env(get: impl Fn(&str) -> Option<OsString>) -> Option<Vec<(&'static str, String)>> {
    if ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT", MARK]
        .iter()
        .any(|k| get(k).is_some())
    {
        return None;
    }
    Some(vec![
        ("GOMP_SPINCOUNT", SPIN_COUNT.to_string()),
        (MARK, "1".to_string()),
    ])
}

/// Starts this binary again with the wait settings when they are missing (Linux). Returns
/// only when nothing needed changing or the new start failed, in which case edgeact goes on
/// with libgomp's defaults.
pub fn set_thread_wait() {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let Some(vars) = wait_env(|k| std::env::var_os(k)) else {
            return;
        };
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| OsString::from("edgeact"));
        let err = std::process::Command::new("/proc/self/exe")
            .arg0(arg0)
            .args(args)
            .envs(vars)
            .exec();
        // Returns only on failure, e.g. under qemu-user without binfmt_misc, where the
        // host cannot exec the emulated binary (checked with qemu-aarch64 7.2); edgeact then
        // runs with libgomp's defaults. Logging is not set up yet: this is the only trace.
        if std::env::var_os("EDGEACT_DEBUG_THREADS").is_some() {
            eprintln!("edgeact: could not restart with GOMP_SPINCOUNT set: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(set: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            set.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn sets_a_short_spin_when_nothing_is_set() {
        let vars = wait_env(env(&[("PATH", "/bin")])).expect("should set");
        assert!(vars.contains(&("GOMP_SPINCOUNT", SPIN_COUNT.to_string())));
        assert!(vars.iter().any(|(k, _)| *k == MARK));
    }

    #[test]
    fn a_users_setting_or_a_second_start_is_left_alone() {
        assert!(wait_env(env(&[("OMP_WAIT_POLICY", "active")])).is_none());
        assert!(wait_env(env(&[("GOMP_SPINCOUNT", "0")])).is_none());
        assert!(wait_env(env(&[(MARK, "1")])).is_none());
    }
}
