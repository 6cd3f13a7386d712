//! `llama_model_quantize`: another weight type of a GGUF model, written to a new file.
//!
//! llama.cpp requantizes an already quantized model only when asked (`allow_requantize`),
//! and that loses more quality than quantizing from f16/bf16; the caller says which it is
//! doing, and the result is measured (docs/benchmarks.md), not assumed.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

/// Weight types `edgeact quantize` writes: the ones with fast CPU kernels on the boards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// 4.5 bits/weight; repacked at load for Arm dot-product and AVX2 kernels.
    Q4_0,
    /// 4.5 bits/weight, non-linear levels; also repacked on Arm.
    Iq4Nl,
    Q4KS,
    Q4KM,
    Q5KM,
    /// 8.5 bits/weight: near the source's quality, twice the size of the 4-bit types.
    Q8_0,
}

impl QuantType {
    pub const ALL: [QuantType; 6] = [
        QuantType::Q4_0,
        QuantType::Iq4Nl,
        QuantType::Q4KS,
        QuantType::Q4KM,
        QuantType::Q5KM,
        QuantType::Q8_0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "q4_0",
            QuantType::Iq4Nl => "iq4_nl",
            QuantType::Q4KS => "q4_k_s",
            QuantType::Q4KM => "q4_k_m",
            QuantType::Q5KM => "q5_k_m",
            QuantType::Q8_0 => "q8_0",
        }
    }

    fn ftype(self) -> llama_cpp_sys_2::llama_ftype {
        match self {
            QuantType::Q4_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_0,
            QuantType::Iq4Nl => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_IQ4_NL,
            QuantType::Q4KS => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_K_S,
            QuantType::Q4KM => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q4_K_M,
            QuantType::Q5KM => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q5_K_M,
            QuantType::Q8_0 => llama_cpp_sys_2::LLAMA_FTYPE_MOSTLY_Q8_0,
        }
    }
}

impl FromStr for QuantType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let want = s.to_ascii_lowercase();
        QuantType::ALL
            .into_iter()
            .find(|t| t.name() == want)
            .ok_or_else(|| {
                let names: Vec<&str> = QuantType::ALL.iter().map(|t| t.name()).collect();
                format!("unknown type `{s}` (one of {})", names.join(", "))
            })
    }
}

#[derive(Debug, Error)]
pub enum QuantizeError {
    #[error("model file {0} does not exist")]
    Missing(PathBuf),
    #[error("{0} already exists; remove it or choose another --out")]
    Exists(PathBuf),
    #[error("the output {0} is the input")]
    SameFile(PathBuf),
    #[error("path {0} cannot be passed to llama.cpp (it contains a NUL byte)")]
    Path(PathBuf),
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "llama.cpp could not quantize {input} to {ty} (code {code}; run with -vvv for its log)"
    )]
    Failed {
        input: PathBuf,
        ty: &'static str,
        code: u32,
    },
}

/// Writes `input` with weights of type `ty` to `output` (a new file; written under a
/// temporary name and renamed, so a failed run leaves no partial model behind).
pub fn quantize(
    input: &Path,
    output: &Path,
    ty: QuantType,
    threads: u32,
) -> Result<(), QuantizeError> {
    if !input.is_file() {
        return Err(QuantizeError::Missing(input.to_path_buf()));
    }
    if output.exists() {
        return Err(QuantizeError::Exists(output.to_path_buf()));
    }
    if output == input {
        return Err(QuantizeError::SameFile(output.to_path_buf()));
    }
    super::load::backend().map_err(|e| QuantizeError::Backend(e.to_string()))?;
    let tmp = PathBuf::from(format!("{}.part", output.display()));
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| QuantizeError::Path(p.to_path_buf()))
    };
    let (c_in, c_out) = (c(input)?, c(&tmp)?);
    // SAFETY: plain C calls; the params struct comes from llama.cpp's own defaults and the
    // strings outlive the call.
    let code = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.nthread = threads.max(1) as i32;
        params.ftype = ty.ftype();
        params.allow_requantize = true;
        llama_cpp_sys_2::llama_model_quantize(c_in.as_ptr(), c_out.as_ptr(), &params)
    };
    if code != 0 {
        let _ = std::fs::remove_file(&tmp);
        return Err(QuantizeError::Failed {
            input: input.to_path_buf(),
            ty: ty.name(),
            code,
        });
    }
    std::fs::rename(&tmp, output).map_err(|source| QuantizeError::Io {
        path: output.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_round_trip_and_unknown_names_are_listed() {
        for t in QuantType::ALL {
            assert_eq!(t.name().parse::<QuantType>(), Ok(t));
        }
        assert_eq!("Q4_0".parse::<QuantType>(), Ok(QuantType::Q4_0));
        let e = "q3".parse::<QuantType>().unwrap_err();
        assert!(e.contains("q3") && e.contains("q4_0, iq4_nl"), "{e}");
    }

    #[test]
    fn refuses_missing_input_and_existing_output() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.gguf");
        let out = dir.path().join("out.gguf");
        assert!(matches!(
            quantize(&missing, &out, QuantType::Q4_0, 1),
            Err(QuantizeError::Missing(_))
        ));
        std::fs::write(&missing, b"x").unwrap();
        std::fs::write(&out, b"x").unwrap();
        assert!(matches!(
            quantize(&missing, &out, QuantType::Q4_0, 1),
            Err(QuantizeError::Exists(_))
        ));
    }
}
