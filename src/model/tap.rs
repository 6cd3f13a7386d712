//! The layer tap: llama.cpp's eval callback (`cb_eval`, a `ggml_backend_sched_eval_callback`)
//! on a feature context, which copies the hidden states of chosen layers (`l_out-N`, each
//! layer's output for every token, or `result_norm`, the final normed output) as the graph
//! computes them, and stops the graph once the last one wanted is copied. Stopping there
//! skips the rest of the layers and the 262 144-wide output projection that an embeddings
//! context otherwise computes for every token: most of the cost of features.
//!
//! llama-cpp-2 0.1.160 does not wrap the callback; [`with_tap`] sets the two raw fields of
//! `llama_context_params` the way `load::with_n_outputs_max` sets another.

use std::ffi::{c_void, CStr};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_sys_2 as sys;

/// The graph name of the final normed output (the input of the output projection).
pub(super) const FINAL_NORM: &str = "result_norm";

/// What an embeddings context renames [`FINAL_NORM`] to: llama.cpp's pooling step names its
/// input `result_embd_pooled` even with no pooling (the same tensor).
const FINAL_POOLED: &str = "result_embd_pooled";

/// The graph name of layer `il`'s output (Gemma 3 and most llama.cpp graphs: `cb(cur,
/// "l_out", il)` names it `l_out-<il>`).
pub(super) fn layer_name(il: u32) -> String {
    format!("l_out-{il}")
}

/// What the callback copies during one decode, and what it copied.
#[derive(Debug, Default)]
pub(super) struct LayerTap {
    /// Tensor names wanted, in output order.
    names: Vec<String>,
    n_embd: usize,
    /// Rows (tokens) expected in each tensor.
    n_tokens: usize,
    /// One `n_tokens x n_embd` block per name (row-major: token, then feature).
    pub(super) out: Vec<Vec<f32>>,
    got: Vec<bool>,
    /// Why a wanted tensor could not be copied (shape or type not as expected).
    error: Option<String>,
}

impl LayerTap {
    /// Arms the tap for one decode of `n_tokens` tokens.
    pub(super) fn arm(&mut self, names: Vec<String>, n_embd: usize, n_tokens: usize) {
        self.out = vec![vec![0.0; n_tokens * n_embd]; names.len()];
        self.got = vec![false; names.len()];
        self.names = names;
        self.n_embd = n_embd;
        self.n_tokens = n_tokens;
        self.error = None;
    }

    /// After the decode: an error unless every wanted tensor was copied.
    pub(super) fn check(&self) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        match self.got.iter().position(|g| !g) {
            Some(i) => Err(format!(
                "the graph has no tensor `{}` (this model's graph names its layers otherwise)",
                self.names[i]
            )),
            None => Ok(()),
        }
    }

    fn wanted(&self, name: &str) -> Option<usize> {
        let name = if name == FINAL_POOLED {
            FINAL_NORM
        } else {
            name
        };
        self.names.iter().position(|n| n == name)
    }

    /// Copies tensor `t` if wanted; false stops the graph (everything wanted is copied).
    ///
    /// # Safety
    /// `t` is a computed tensor handed over by ggml's scheduler.
    unsafe fn take(&mut self, t: *mut sys::ggml_tensor) -> bool {
        let name = CStr::from_ptr(sys::ggml_get_name(t)).to_string_lossy();
        let Some(i) = self.wanted(&name) else {
            return true;
        };
        let tr = &*t;
        let contiguous = tr.nb[0] == 4 && tr.nb[1] == 4 * self.n_embd;
        if tr.type_ != sys::GGML_TYPE_F32
            || tr.ne[0] as usize != self.n_embd
            || tr.ne[1] as usize != self.n_tokens
            || tr.ne[2] != 1
            || !contiguous
        {
            self.error = Some(format!(
                "tensor `{name}` is type {} of shape {:?}, expected f32 [{}, {}]",
                tr.type_, tr.ne, self.n_embd, self.n_tokens
            ));
            return false;
        }
        let dst = &mut self.out[i];
        sys::ggml_backend_tensor_get(t, dst.as_mut_ptr().cast(), 0, dst.len() * 4);
        self.got[i] = true;
        !self.got.iter().all(|&g| g)
    }
}

/// The eval callback: asked (`ask`) whether a tensor is wanted, then handed it once
/// computed. Never unwinds into C.
unsafe extern "C" fn eval_callback(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    if t.is_null() || user.is_null() {
        return true;
    }
    let tap = &mut *user.cast::<LayerTap>();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if ask {
            let name = CStr::from_ptr(sys::ggml_get_name(t)).to_string_lossy();
            tap.wanted(&name).is_some()
        } else {
            tap.take(t)
        }
    }));
    // A panic (none expected) stops the graph; the decode's check reports the missing layer.
    r.unwrap_or(false)
}

/// Owns a [`LayerTap`] at a fixed address for the callback's user data. Declared after the
/// context in its owner, so the context (which holds the pointer) is dropped first.
pub(super) struct TapBox(*mut LayerTap);

// SAFETY: the tap is owned by one feature context; it is touched only by the thread that
// owns the context, from the callback inside that thread's decode or between decodes.
unsafe impl Send for TapBox {}

impl TapBox {
    pub(super) fn new() -> TapBox {
        TapBox(Box::into_raw(Box::default()))
    }

    /// The tap, outside a decode.
    pub(super) fn get(&mut self) -> &mut LayerTap {
        // SAFETY: the pointer came from Box::into_raw and lives until drop; the callback
        // only runs inside a decode, never while this borrow is held.
        unsafe { &mut *self.0 }
    }
}

impl Drop for TapBox {
    fn drop(&mut self) {
        // SAFETY: from Box::into_raw in `new`, dropped once.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

/// `params` with the eval callback set to the tap in `tap`.
pub(super) fn with_tap(params: LlamaContextParams, tap: &TapBox) -> LlamaContextParams {
    // SAFETY: LlamaContextParams is a struct with the single field `context_params:
    // llama_context_params` (llama-cpp-2 0.1.160, pinned with `=` in Cargo.toml); transmute
    // checks at compile time that the sizes are equal.
    let mut raw: sys::llama_context_params = unsafe { std::mem::transmute(params) };
    raw.cb_eval = Some(eval_callback);
    raw.cb_eval_user_data = tap.0.cast();
    // SAFETY: as above, the inverse conversion.
    unsafe { std::mem::transmute(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_reports_what_it_did_not_get() {
        let mut t = LayerTap::default();
        t.arm(vec![layer_name(3), FINAL_NORM.into()], 4, 2);
        assert_eq!(t.out.len(), 2);
        assert_eq!(t.out[0].len(), 8);
        assert_eq!(t.wanted("l_out-3"), Some(0));
        assert_eq!(t.wanted("result_norm"), Some(1));
        assert_eq!(t.wanted("result_embd_pooled"), Some(1));
        assert_eq!(t.wanted("l_out-30"), None);
        assert!(t.check().unwrap_err().contains("`l_out-3`"));
        t.got = vec![true, true];
        assert!(t.check().is_ok());
    }
}
