//! A reader of the safetensors format, enough for an f32 BERT: an 8-byte little-endian
//! header length, a JSON header (`name -> {dtype, shape, data_offsets}`), then the tensor
//! bytes. Only F32 tensors are read; the header is checked against the file size so a
//! truncated download is an error, not garbage weights.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::EncoderError;

/// Largest header accepted (the real one is a few KiB; a wrong length is not a 4 GiB read).
const MAX_HEADER_BYTES: u64 = 16 << 20;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range in the data section (after the header).
    pub start: u64,
    pub end: u64,
}

/// The parsed header, and where the data section starts in the file.
#[derive(Debug)]
pub struct Header {
    pub tensors: BTreeMap<String, Entry>,
    pub data_start: u64,
}

/// Parses the header of `bytes` read from the file start (`file_len`: the whole file's
/// size, to check the offsets).
pub fn parse_header(head: &[u8], json: &[u8], file_len: u64) -> Result<Header, String> {
    let n = u64::from_le_bytes(head.try_into().map_err(|_| "file shorter than 8 bytes")?);
    if n != json.len() as u64 {
        return Err(format!("header length {n}, read {}", json.len()));
    }
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("header is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("header is not a JSON object")?;
    let data_start = 8 + n;
    let data_len = file_len
        .checked_sub(data_start)
        .ok_or("file shorter than its header")?;
    let mut tensors = BTreeMap::new();
    for (name, e) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor {name}: {what}");
        let dtype = e["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of sizes"))?;
        let offs = e["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad("no data_offsets [start, end]"))?;
        if offs.0 > offs.1 || offs.1 > data_len {
            return Err(bad(&format!(
                "bytes {}..{} outside the {data_len}-byte data section (truncated file?)",
                offs.0, offs.1
            )));
        }
        tensors.insert(
            name.clone(),
            Entry {
                dtype: dtype.to_string(),
                shape,
                start: offs.0,
                end: offs.1,
            },
        );
    }
    Ok(Header {
        tensors,
        data_start,
    })
}

/// An open safetensors file.
pub struct SafeTensors {
    file: std::fs::File,
    pub header: Header,
    path: std::path::PathBuf,
}

impl SafeTensors {
    pub fn open(path: &Path) -> Result<SafeTensors, EncoderError> {
        let io = |source| EncoderError::Io {
            path: path.to_path_buf(),
            source,
        };
        let corrupt = |reason: String| EncoderError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut head = [0u8; 8];
        file.read_exact(&mut head)
            .map_err(|_| corrupt("file shorter than 8 bytes".into()))?;
        let n = u64::from_le_bytes(head);
        if n > MAX_HEADER_BYTES || n + 8 > file_len {
            return Err(corrupt(format!(
                "header length {n} does not fit the {file_len}-byte file"
            )));
        }
        let mut json = vec![0u8; n as usize];
        file.read_exact(&mut json).map_err(io)?;
        let header = parse_header(&head, &json, file_len).map_err(corrupt)?;
        Ok(SafeTensors {
            file,
            header,
            path: path.to_path_buf(),
        })
    }

    /// The F32 tensor `name`, checked to have `shape`.
    pub fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EncoderError> {
        let corrupt = |reason: String| EncoderError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let e = self
            .header
            .tensors
            .get(name)
            .ok_or_else(|| corrupt(format!("no tensor {name}")))?
            .clone();
        if e.dtype != "F32" || e.shape != shape {
            return Err(corrupt(format!(
                "tensor {name} is {} {:?}, expected F32 {shape:?}",
                e.dtype, e.shape
            )));
        }
        let count: usize = shape.iter().product();
        if e.end - e.start != 4 * count as u64 {
            return Err(corrupt(format!(
                "tensor {name} has {} bytes for {count} floats",
                e.end - e.start
            )));
        }
        let io = |source| EncoderError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .seek(SeekFrom::Start(self.header.data_start + e.start))
            .map_err(io)?;
        // Read in chunks: no second full-size copy of the largest tensor.
        let mut out = Vec::with_capacity(count);
        let mut buf = vec![0u8; (1 << 20).min(4 * count)];
        while out.len() < count {
            let take = buf.len().min(4 * (count - out.len()));
            self.file.read_exact(&mut buf[..take]).map_err(io)?;
            out.extend(
                buf[..take]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> (Vec<u8>, u64) {
        let head = (json.len() as u64).to_le_bytes().to_vec();
        (head, (8 + json.len() + data) as u64)
    }

    #[test]
    fn parses_entries_and_skips_metadata() {
        let json = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
        let (head, len) = file(json, 24);
        let h = parse_header(&head, json.as_bytes(), len).unwrap();
        assert_eq!(h.tensors.len(), 1);
        assert_eq!(h.tensors["a"].shape, vec![2, 3]);
        assert_eq!(h.data_start, 8 + json.len() as u64);
    }

    #[test]
    fn a_truncated_file_or_bad_header_is_an_error() {
        let json = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
        let (head, len) = file(json, 20);
        let e = parse_header(&head, json.as_bytes(), len).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let (head, len) = file("[1]", 0);
        assert!(parse_header(&head, b"[1]", len).is_err());
        let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8]}}"#;
        let (head, len) = file(json, 8);
        assert!(parse_header(&head, json.as_bytes(), len).is_err());
    }

    #[test]
    fn reads_f32_and_checks_shape() {
        let json = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend(json.as_bytes());
        for v in [1.5f32, -2.0, 0.25] {
            bytes.extend(v.to_le_bytes());
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let mut st = SafeTensors::open(&p).unwrap();
        assert_eq!(st.f32("w", &[3]).unwrap(), vec![1.5, -2.0, 0.25]);
        assert!(st.f32("w", &[4]).is_err());
        assert!(st.f32("missing", &[3]).is_err());
        std::fs::write(&p, &bytes[..bytes.len() - 30]).unwrap();
        assert!(SafeTensors::open(&p).is_err(), "truncated into the header");
    }
}
