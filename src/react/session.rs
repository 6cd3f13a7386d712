//! Sessions: the earlier turns of a conversation (question and answer), one JSON file per
//! session id under a folder, so a kiosk dialogue carries over between requests.

use std::path::{Path, PathBuf};

use super::trace::Turn;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session id `{0}`: use 1 to 64 letters, digits, - and _")]
    BadId(String),
    #[error("session file {path}: {message}")]
    File { path: PathBuf, message: String },
}

/// Turns kept on disk per session at most (the prompt keeps fewer, by token budget).
pub const MAX_STORED_TURNS: usize = 20;

fn path(dir: &Path, id: &str) -> Result<PathBuf, SessionError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !ok {
        return Err(SessionError::BadId(id.into()));
    }
    Ok(dir.join(format!("{id}.json")))
}

/// The session's turns, oldest first; none for a new session.
pub fn load(dir: &Path, id: &str) -> Result<Vec<Turn>, SessionError> {
    let p = path(dir, id)?;
    match std::fs::read_to_string(&p) {
        Ok(s) => serde_json::from_str(&s).map_err(|e| SessionError::File {
            path: p,
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(SessionError::File {
            path: p,
            message: e.to_string(),
        }),
    }
}

/// Appends a turn and writes the session back (atomically: temporary file, rename).
pub fn append(dir: &Path, id: &str, turn: Turn) -> Result<Vec<Turn>, SessionError> {
    let mut turns = load(dir, id)?;
    turns.push(turn);
    let excess = turns.len().saturating_sub(MAX_STORED_TURNS);
    turns.drain(..excess);
    let p = path(dir, id)?;
    let fail = |e: std::io::Error| SessionError::File {
        path: p.clone(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let tmp = p.with_extension(format!("json.tmp{}", std::process::id()));
    // A Vec of two-string structs always serializes.
    let text = serde_json::to_string_pretty(&turns).unwrap_or_default();
    std::fs::write(&tmp, text).map_err(fail)?;
    std::fs::rename(&tmp, &p).map_err(fail)?;
    Ok(turns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_persist_and_ids_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), "s1").unwrap().is_empty());
        for i in 0..(MAX_STORED_TURNS + 2) {
            append(
                dir.path(),
                "s1",
                Turn {
                    question: format!("q{i}"),
                    answer: format!("a{i}"),
                },
            )
            .unwrap();
        }
        let turns = load(dir.path(), "s1").unwrap();
        assert_eq!(turns.len(), MAX_STORED_TURNS);
        assert_eq!(turns[0].question, "q2");
        assert!(matches!(
            load(dir.path(), "../etc/passwd"),
            Err(SessionError::BadId(_))
        ));
        std::fs::write(dir.path().join("bad.json"), "{").unwrap();
        assert!(load(dir.path(), "bad").is_err());
    }
}
