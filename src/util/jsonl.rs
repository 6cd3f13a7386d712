//! The one JSON-lines reader: a file or stream read one line at a time (never the whole
//! file in memory), each line handed out without its newline and with its 1-based line
//! number, blank lines skipped. Parsing a line is the caller's (requests:
//! `classify::input::parse_line`), so each caller keeps its own error policy.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

pub struct JsonLines<R> {
    reader: R,
    buf: Vec<u8>,
    line: usize,
}

impl JsonLines<BufReader<File>> {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(JsonLines::new(BufReader::new(File::open(path)?)))
    }
}

impl<R: BufRead> JsonLines<R> {
    pub fn new(reader: R) -> Self {
        JsonLines {
            reader,
            buf: Vec::new(),
            line: 0,
        }
    }

    /// The next line that is not blank (ASCII white space only), with its 1-based number
    /// in the input; `None` at the end.
    pub fn next_line(&mut self) -> io::Result<Option<(usize, &[u8])>> {
        loop {
            self.buf.clear();
            if self.reader.read_until(b'\n', &mut self.buf)? == 0 {
                return Ok(None);
            }
            self.line += 1;
            if !self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                let end = self.buf.len() - usize::from(self.buf.ends_with(b"\n"));
                return Ok(Some((self.line, &self.buf[..end])));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_lines_skips_blanks_and_strips_newlines() {
        let src: &[u8] = b"{\"a\":1}\n\n  \r\n{\"b\":2}\r\nlast";
        let mut r = JsonLines::new(src);
        let mut got = Vec::new();
        while let Some((n, bytes)) = r.next_line().unwrap() {
            got.push((n, String::from_utf8(bytes.to_vec()).unwrap()));
        }
        assert_eq!(
            got,
            [
                (1, "{\"a\":1}".to_string()),
                (4, "{\"b\":2}\r".to_string()),
                (5, "last".to_string())
            ]
        );
    }
}
