//! Sessions: the earlier turns of a conversation (question and answer), one JSON file per
//! session id under a folder, so a kiosk dialogue carries over between requests.
//!
//! The id is the session's secret: whoever knows it reads the session's history into their
//! prompt, so ids must be long enough not to be guessed (at least [`MIN_ID_CHARS`]
//! characters, e.g. a random UUID chosen by the client per dialogue). The store is bounded:
//! at most `max_sessions` files (the least recently used go first), `max_bytes` per file
//! (the oldest turns go first), and a session idle longer than `max_age` is forgotten.
//! Files are written owner-only (0600) in an owner-only folder.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::trace::Turn;
use crate::util::private;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "session id `{0}`: use {1} to 64 letters, digits, - and _ (over MQTT a random id such as a UUID: whoever knows the id reads the session)"
    )]
    BadId(String, usize),
    #[error("session file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// Turns kept on disk per session at most (the prompt keeps fewer, by token budget).
pub const MAX_STORED_TURNS: usize = 20;

/// Bounds on the session store (the product defaults are in `cli::defaults`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionLimits {
    /// Session files kept at most; beyond it the least recently used are removed.
    pub max_sessions: usize,
    /// Largest session file, in bytes; the oldest turns are dropped to fit.
    pub max_bytes: usize,
    /// A session not used for this long is forgotten.
    pub max_age: Duration,
    /// Shortest id accepted: 16 random letters and digits are about 95 bits, not guessed;
    /// `s1` would let any client of a shared device read another's dialogue.
    pub min_id_chars: usize,
}

/// Where sessions live, and their bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Sessions {
    pub dir: PathBuf,
    pub limits: SessionLimits,
}

fn path(dir: &Path, id: &str, min_chars: usize) -> Result<PathBuf, SessionError> {
    let ok = id.len() >= min_chars.max(1)
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(SessionError::BadId(id.into(), min_chars));
    }
    Ok(dir.join(format!("{id}.json")))
}

fn file_error(p: &Path, e: impl ToString) -> SessionError {
    SessionError::File {
        path: p.to_path_buf(),
        message: e.to_string(),
    }
}

/// How long ago a file was last written (zero for a clock that went back).
fn idle(meta: &std::fs::Metadata) -> Duration {
    meta.modified()
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}

impl Sessions {
    pub fn new(dir: PathBuf, limits: SessionLimits) -> Sessions {
        Sessions { dir, limits }
    }

    /// The session's turns, oldest first; none for a new session, one idle for longer than
    /// `max_age` or one over `max_bytes` (its file is removed).
    pub fn load(&self, id: &str) -> Result<Vec<Turn>, SessionError> {
        let p = path(&self.dir, id, self.limits.min_id_chars)?;
        let meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(file_error(&p, e)),
        };
        if idle(&meta) > self.limits.max_age {
            let _ = std::fs::remove_file(&p);
            return Ok(Vec::new());
        }
        if meta.len() > self.limits.max_bytes as u64 {
            // Written under a larger limit (we never write more than the limit): not read
            // whole into memory; the session starts afresh.
            tracing::warn!(path = %p.display(), bytes = meta.len(), "session file over session_max_kib: dropped");
            let _ = std::fs::remove_file(&p);
            return Ok(Vec::new());
        }
        let s = std::fs::read_to_string(&p).map_err(|e| file_error(&p, e))?;
        serde_json::from_str(&s).map_err(|e| file_error(&p, e))
    }

    /// Appends a turn and writes the session back (atomically: temporary file, rename),
    /// keeping at most [`MAX_STORED_TURNS`] turns and `max_bytes`; then removes expired and
    /// least recently used sessions beyond `max_sessions`.
    pub fn append(&self, id: &str, turn: Turn) -> Result<Vec<Turn>, SessionError> {
        let mut turns = self.load(id)?;
        turns.push(turn);
        let excess = turns.len().saturating_sub(MAX_STORED_TURNS);
        turns.drain(..excess);
        let p = path(&self.dir, id, self.limits.min_id_chars)?;
        // A Vec of two-string structs always serializes.
        let mut text = serde_json::to_string(&turns).unwrap_or_default();
        while text.len() > self.limits.max_bytes && !turns.is_empty() {
            turns.remove(0);
            text = serde_json::to_string(&turns).unwrap_or_default();
        }
        private::create_dir(&self.dir).map_err(|e| file_error(&self.dir, e))?;
        let tmp = p.with_extension(format!("json.tmp{}", std::process::id()));
        private::write(&tmp, text.as_bytes()).map_err(|e| file_error(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| file_error(&p, e))?;
        self.sweep();
        Ok(turns)
    }

    /// Removes sessions idle longer than `max_age`, then the least recently used beyond
    /// `max_sessions`. Best effort: a file that cannot be removed stays for the next sweep.
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(Duration, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| Some((idle(&e.metadata().ok()?), e.path())))
            .collect();
        // Most recently used first.
        files.sort();
        for (i, (age, p)) in files.iter().enumerate() {
            if i >= self.limits.max_sessions || *age > self.limits.max_age {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0b6f3c1e-9a4d-4e55-8f0a-2c7d1e9b3a61";

    fn limits() -> SessionLimits {
        SessionLimits {
            max_sessions: 100,
            max_bytes: 64 * 1024,
            max_age: Duration::from_secs(3600),
            min_id_chars: 16,
        }
    }

    fn turn(i: usize) -> Turn {
        Turn {
            question: format!("q{i}"),
            answer: format!("a{i}"),
        }
    }

    #[test]
    fn turns_persist_and_ids_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sessions::new(dir.path().to_path_buf(), limits());
        assert!(s.load(ID).unwrap().is_empty());
        for i in 0..(MAX_STORED_TURNS + 2) {
            s.append(ID, turn(i)).unwrap();
        }
        let turns = s.load(ID).unwrap();
        assert_eq!(turns.len(), MAX_STORED_TURNS);
        assert_eq!(turns[0].question, "q2");
        assert!(matches!(
            s.load("../etc/passwd-and-more-chars"),
            Err(SessionError::BadId(..))
        ));
        std::fs::write(dir.path().join("bad-session-0000000.json"), "{").unwrap();
        assert!(s.load("bad-session-0000000").is_err());
    }

    /// A short, guessable id (`s1`, `kiosk-3`) would let any client pull another client's
    /// dialogue into its prompt: refused, with a message that says why.
    #[test]
    fn guessable_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sessions::new(dir.path().to_path_buf(), limits());
        for id in ["s1", "kiosk-3", "123456789012345"] {
            let e = s.append(id, turn(0)).unwrap_err();
            assert!(matches!(e, SessionError::BadId(..)), "{id}");
            assert!(e.to_string().contains("random"), "{e}");
            assert!(s.load(id).is_err(), "{id}");
        }
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn a_session_file_stays_within_max_bytes_dropping_the_oldest_turns() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sessions::new(
            dir.path().to_path_buf(),
            SessionLimits {
                max_bytes: 2000,
                ..limits()
            },
        );
        for i in 0..MAX_STORED_TURNS {
            let t = Turn {
                question: format!("q{i} {}", "x".repeat(300)),
                answer: format!("a{i}"),
            };
            let kept = s.append(ID, t).unwrap();
            assert!(kept.last().unwrap().question.starts_with(&format!("q{i} ")));
            let bytes = std::fs::metadata(dir.path().join(format!("{ID}.json")))
                .unwrap()
                .len();
            assert!(bytes <= 2000, "{bytes}");
        }
        let turns = s.load(ID).unwrap();
        assert!(
            turns.len() < MAX_STORED_TURNS && turns.len() >= 4,
            "{}",
            turns.len()
        );
        // One turn larger than the limit on its own is not kept (nor is anything else).
        let huge = Turn {
            question: "y".repeat(5000),
            answer: String::new(),
        };
        assert!(s.append(ID, huge).unwrap().is_empty());
        // A file over the limit (written under a larger one) is dropped, not read whole.
        std::fs::write(dir.path().join(format!("{ID}.json")), "x".repeat(3000)).unwrap();
        assert!(s.load(ID).unwrap().is_empty());
        assert!(!dir.path().join(format!("{ID}.json")).exists());
    }

    #[test]
    fn sessions_are_bounded_in_number_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sessions::new(
            dir.path().to_path_buf(),
            SessionLimits {
                max_sessions: 5,
                ..limits()
            },
        );
        let id = |i: usize| format!("session-{i:012}");
        let set_idle = |i: usize, secs: u64| {
            let f = std::fs::File::options()
                .write(true)
                .open(dir.path().join(format!("{}.json", id(i))))
                .unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(secs))
                .unwrap();
        };
        for i in 0..12 {
            s.append(&id(i), turn(i)).unwrap();
            // Older files were used longer ago.
            for j in 0..=i {
                if dir.path().join(format!("{}.json", id(j))).exists() {
                    set_idle(j, 10 * (i - j + 1) as u64);
                }
            }
        }
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let want: Vec<String> = (7..12).map(|i| format!("{}.json", id(i))).collect();
        assert_eq!(left, want, "the 5 most recently used are kept");
        // A session idle longer than max_age is forgotten.
        set_idle(11, 7200);
        assert!(s.load(&id(11)).unwrap().is_empty());
        assert!(!dir.path().join(format!("{}.json", id(11))).exists());
        assert_eq!(s.load(&id(10)).unwrap(), vec![turn(10)]);
    }

    #[cfg(unix)]
    #[test]
    fn session_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sdir = dir.path().join("sessions");
        let s = Sessions::new(sdir.clone(), limits());
        // A file left with wide permissions is narrowed when it is written again.
        std::fs::create_dir_all(&sdir).unwrap();
        let p = sdir.join(format!("{ID}.json"));
        std::fs::write(&p, "[]").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        s.append(ID, turn(0)).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        let fresh = dir.path().join("fresh");
        Sessions::new(fresh.clone(), limits())
            .append(ID, turn(0))
            .unwrap();
        let dmode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700, "{dmode:o}");
        let fmode = std::fs::metadata(fresh.join(format!("{ID}.json")))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(fmode, 0o600, "{fmode:o}");
    }
}
