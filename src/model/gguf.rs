//! Reads a GGUF file's header (metadata and tensor table) without loading weights, so
//! edgeact can refuse a bad file with a real reason and size the memory budget first.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Why a file could not be read as GGUF.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("model file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read model file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a GGUF file (first bytes are {magic:?}, expected \"GGUF\")")]
    NotGguf { path: PathBuf, magic: String },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: GGUF header is corrupt or truncated: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// One metadata value. Arrays keep only their length: the tokenizer's 262k strings are
/// not needed to plan memory.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array { len: u64 },
}

/// The parts of a GGUF header that edgeact uses.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub n_tensors: u64,
    /// The tensor table: names, shapes and types (no data).
    pub tensors: Vec<TensorInfo>,
    /// Offset of the tensor data section.
    pub data_offset_bytes: u64,
    pub file_size_bytes: u64,
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` is the fastest-varying (ggml's `ne[0]`).
    pub dims: Vec<u64>,
    /// ggml type id (0 = F32, 1 = F16, 12 = Q4_K, ...).
    pub ggml_type: u32,
    /// Offset of the tensor's data from the start of the data section.
    pub offset_bytes: u64,
}

impl Header {
    /// Bytes of tensor data: what the weights occupy once mapped.
    pub fn tensor_bytes(&self) -> u64 {
        self.file_size_bytes.saturating_sub(self.data_offset_bytes)
    }

    /// Bytes one tensor takes in the data section: up to the next tensor's data (alignment
    /// padding included) or the end of the file. None if there is no such tensor.
    pub fn tensor_data_bytes(&self, name: &str) -> Option<u64> {
        let t = self.tensors.iter().find(|t| t.name == name)?;
        let next = self
            .tensors
            .iter()
            .map(|o| o.offset_bytes)
            .filter(|&o| o > t.offset_bytes)
            .min()
            .unwrap_or_else(|| self.tensor_bytes());
        Some(next.saturating_sub(t.offset_bytes))
    }

    pub fn architecture(&self) -> Option<&str> {
        self.str("general.architecture")
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn uint(&self, key: &str) -> Option<u64> {
        match self.metadata.get(key) {
            Some(Value::Uint(v)) => Some(*v),
            Some(Value::Int(v)) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }

    /// An architecture-scoped key such as `gemma3.block_count`.
    pub fn arch_uint(&self, suffix: &str) -> Option<u64> {
        let arch = self.architecture()?;
        self.uint(&format!("{arch}.{suffix}"))
    }
}

/// Reads the header of the GGUF file at `path`.
pub fn read_header(path: &Path) -> Result<Header, GgufError> {
    let io_err = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(GgufError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(e)),
    };
    let file_size_bytes = file.metadata().map_err(io_err)?.len();
    let mut r = Reader {
        inner: BufReader::with_capacity(1 << 16, file),
        pos: 0,
        size: file_size_bytes,
    };
    parse(&mut r, file_size_bytes).map_err(|e| match e {
        ParseError::Io(source) => io_err(source),
        ParseError::NotGguf(magic) => GgufError::NotGguf {
            path: path.to_path_buf(),
            magic,
        },
        ParseError::Version(version) => GgufError::Version {
            path: path.to_path_buf(),
            version,
        },
        ParseError::Corrupt(reason) => GgufError::Corrupt {
            path: path.to_path_buf(),
            reason,
        },
    })
}

enum ParseError {
    Io(io::Error),
    NotGguf(String),
    Version(u32),
    Corrupt(String),
}

impl From<io::Error> for ParseError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ParseError::Corrupt("unexpected end of file".into())
        } else {
            ParseError::Io(e)
        }
    }
}

/// Skips up to this size are read through the buffer rather than sought past.
const SHORT_SKIP_BYTES: u64 = 4096;

struct Reader<R> {
    inner: R,
    pos: u64,
    size: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    /// Guards lengths read from the file against the bytes that are left, so a corrupt
    /// length is an error rather than a huge allocation.
    fn check_len(&self, len: u64, what: &str) -> Result<(), ParseError> {
        if len > self.size.saturating_sub(self.pos) {
            return Err(ParseError::Corrupt(format!(
                "{what} length {len} runs past the end of the file"
            )));
        }
        Ok(())
    }
    fn string(&mut self) -> Result<String, ParseError> {
        let len = self.u64()?;
        self.check_len(len, "string")?;
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += len;
        String::from_utf8(buf).map_err(|_| ParseError::Corrupt("string is not UTF-8".into()))
    }
    /// Skips `n` bytes. Short skips (the 262k vocabulary strings of a tokenizer) are read
    /// through the buffer: a seek would throw the `BufReader`'s buffer away and refill it
    /// for every string, which made `plan` read 17 GB to skip a 4 MB array.
    fn skip(&mut self, n: u64) -> Result<(), ParseError> {
        self.check_len(n, "value")?;
        if n <= SHORT_SKIP_BYTES {
            let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
            if copied < n {
                return Err(ParseError::Corrupt("unexpected end of file".into()));
            }
        } else {
            self.inner.seek(SeekFrom::Current(n as i64))?;
        }
        self.pos += n;
        Ok(())
    }
    fn value(&mut self, ty: u32) -> Result<Value, ParseError> {
        Ok(match ty {
            0 => Value::Uint(u8::from_le_bytes(self.bytes()?) as u64),
            1 => Value::Int(i8::from_le_bytes(self.bytes()?) as i64),
            2 => Value::Uint(u16::from_le_bytes(self.bytes()?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => Value::Uint(self.u32()? as u64),
            5 => Value::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let elem = self.u32()?;
                let len = self.u64()?;
                match fixed_size(elem) {
                    Some(size) => self
                        .skip(len.checked_mul(size).ok_or_else(|| {
                            ParseError::Corrupt("array length overflows".into())
                        })?)?,
                    None if elem == 8 => {
                        self.check_len(len.saturating_mul(8), "array")?;
                        for _ in 0..len {
                            let n = self.u64()?;
                            self.skip(n)?;
                        }
                    }
                    None => {
                        return Err(ParseError::Corrupt(format!(
                            "array of unsupported element type {elem}"
                        )))
                    }
                }
                Value::Array { len }
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.bytes()?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(ParseError::Corrupt(format!("unknown value type {other}"))),
        })
    }
}

fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn parse<R: Read + Seek>(r: &mut Reader<R>, file_size_bytes: u64) -> Result<Header, ParseError> {
    let magic = match r.bytes::<4>() {
        Ok(m) => m,
        Err(ParseError::Corrupt(_)) => {
            return Err(ParseError::NotGguf("file shorter than 4 bytes".into()))
        }
        Err(e) => return Err(e),
    };
    if &magic != b"GGUF" {
        return Err(ParseError::NotGguf(
            String::from_utf8_lossy(&magic).escape_debug().to_string(),
        ));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(ParseError::Version(version));
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    r.check_len(n_kv.saturating_mul(12), "metadata table")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty)?;
        metadata.insert(key, value);
    }
    r.check_len(n_tensors.saturating_mul(24), "tensor table")?;
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > 8 {
            return Err(ParseError::Corrupt(format!(
                "tensor with {n_dims} dimensions"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64()?);
        }
        let ggml_type = r.u32()?;
        let offset_bytes = r.u64()?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset_bytes,
        });
    }
    let alignment = match metadata.get("general.alignment") {
        Some(Value::Uint(a)) if *a > 0 => *a,
        _ => 32,
    };
    let data_offset_bytes = r.pos.div_ceil(alignment) * alignment;
    if data_offset_bytes > file_size_bytes {
        return Err(ParseError::Corrupt(
            "no tensor data after the header".into(),
        ));
    }
    // A download cut short can keep a whole header: a tensor starting past the end says so.
    if let Some(t) = tensors
        .iter()
        .find(|t| data_offset_bytes.saturating_add(t.offset_bytes) > file_size_bytes)
    {
        return Err(ParseError::Corrupt(format!(
            "tensor `{}` starts at byte {}, past the end of the file ({file_size_bytes} bytes): the file was cut short",
            t.name,
            data_offset_bytes.saturating_add(t.offset_bytes)
        )));
    }
    Ok(Header {
        version,
        metadata,
        n_tensors,
        tensors,
        data_offset_bytes,
        file_size_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A tiny but valid GGUF v3 file: three metadata keys, one tensor of 64 bytes.
    fn tiny_gguf() -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(3u64.to_le_bytes()); // kv
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "toy");
        string(&mut b, "toy.block_count");
        b.extend(4u32.to_le_bytes());
        b.extend(7u32.to_le_bytes());
        string(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        string(&mut b, "a");
        string(&mut b, "bc");
        string(&mut b, "w");
        b.extend(1u32.to_le_bytes());
        b.extend(16u64.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // f32
        b.extend(0u64.to_le_bytes());
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend([0u8; 64]);
        b
    }

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn reads_metadata_and_tensor_bytes() {
        let f = write(&tiny_gguf());
        let h = read_header(f.path()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.architecture(), Some("toy"));
        assert_eq!(h.arch_uint("block_count"), Some(7));
        assert_eq!(
            h.metadata.get("tokenizer.ggml.tokens"),
            Some(&Value::Array { len: 2 })
        );
        assert_eq!(h.tensor_bytes(), 64);
        assert_eq!(
            h.tensors,
            vec![TensorInfo {
                name: "w".into(),
                dims: vec![16],
                ggml_type: 0,
                offset_bytes: 0
            }]
        );
    }

    #[test]
    fn rejects_non_gguf_and_truncated_files() {
        let f = write(b"PK\x03\x04 this is a zip");
        assert!(matches!(
            read_header(f.path()),
            Err(GgufError::NotGguf { .. })
        ));
        let f = write(b"GG");
        assert!(matches!(
            read_header(f.path()),
            Err(GgufError::NotGguf { .. })
        ));
        let full = tiny_gguf();
        let f = write(&full[..60]);
        assert!(matches!(
            read_header(f.path()),
            Err(GgufError::Corrupt { .. })
        ));
        let mut huge = full.clone();
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes()); // first key's length
        let f = write(&huge);
        assert!(matches!(
            read_header(f.path()),
            Err(GgufError::Corrupt { .. })
        ));
    }

    #[test]
    fn missing_file_is_named() {
        let err = read_header(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/model.gguf"));
        assert!(matches!(err, GgufError::Missing { .. }));
    }
}
