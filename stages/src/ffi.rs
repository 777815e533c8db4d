//! The C functions of `csrc/c10d_shim.cpp` and `csrc/autocast_shim.cpp`,
//! and the one place in the workspace with `unsafe`: pointers to tch's
//! tensors cross into libtorch.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use tch::Tensor;

/// Runs `f` with bfloat16 autocast on for CPU or CUDA (this thread).
pub fn with_bf16_autocast<T>(cuda: bool, f: impl FnOnce() -> T) -> T {
    let cuda = c_int::from(cuda);
    // SAFETY: plain calls on this thread's autocast state; no pointers.
    let was = unsafe { rlhf_autocast_enter(cuda) };
    struct Restore(c_int, c_int);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: as above.
            unsafe { rlhf_autocast_exit(self.0, self.1) }
        }
    }
    let _restore = Restore(cuda, was);
    f()
}

/// The kind matmuls compute in on `device`: bfloat16 under bf16 autocast,
/// else `weights`.
pub fn compute_kind(device: tch::Device, weights: tch::Kind) -> tch::Kind {
    // SAFETY: a plain query of this thread's autocast state.
    match unsafe { rlhf_autocast_enabled(c_int::from(device.is_cuda())) } {
        1 => tch::Kind::BFloat16,
        _ => weights,
    }
}

/// Runs `f` (sampling, under `no_grad`) with autocast's cache of bfloat16
/// weight copies on; the copies are dropped when it returns, before any
/// optimiser step changes the weights. No effect without autocast.
pub fn with_autocast_weight_cache<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: plain calls on this thread's autocast state; no pointers.
    unsafe { rlhf_autocast_weight_cache(1) };
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            // SAFETY: as above.
            unsafe { rlhf_autocast_weight_cache(0) }
        }
    }
    let _off = Off;
    f()
}

/// Opaque `torch::Tensor`, as tch's C layer passes it.
type CTensor = torch_sys::C_tensor;

extern "C" {
    fn rlhf_autocast_enter(cuda: c_int) -> c_int;
    fn rlhf_autocast_exit(cuda: c_int, was: c_int);
    fn rlhf_autocast_weight_cache(on: c_int);
    fn rlhf_autocast_enabled(cuda: c_int) -> c_int;
    fn rlhf_c10d_backends() -> c_int;
    fn rlhf_c10d_new(
        backend: *const c_char,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        store_is_external: c_int,
        timeout_ms: i64,
        gloo_threads: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn rlhf_c10d_free(g: *mut c_void);
    fn rlhf_c10d_allreduce_sum(
        g: *mut c_void,
        ts: *const *mut CTensor,
        n: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn rlhf_c10d_broadcast(
        g: *mut c_void,
        ts: *const *mut CTensor,
        n: c_int,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn rlhf_c10d_allgather(
        g: *mut c_void,
        input: *mut CTensor,
        outs: *const *mut CTensor,
        world: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn rlhf_c10d_barrier(g: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn rlhf_c10d_free_error(err: *mut c_char);
}

/// Whether this build has the Gloo and the NCCL backends.
pub fn backends() -> (bool, bool) {
    // SAFETY: reads two compile-time flags.
    let b = unsafe { rlhf_c10d_backends() };
    (b & 1 != 0, b & 2 != 0)
}

/// Takes the shim's error text, freeing it.
fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error in the c10d shim".into();
    }
    // SAFETY: the shim returns a NUL-terminated string it malloc'd.
    let text = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: freed once, by the allocator that made it.
    unsafe { rlhf_c10d_free_error(err) };
    without_backtraces(&text)
}

/// libtorch's message without its C++ backtraces ("Exception raised
/// from ... (most recent call first):" and the "frame #N" lines): a
/// rendezvous error nests one error's text, backtrace and all, in
/// another's, so the reason would come after two screens of frames.
fn without_backtraces(text: &str) -> String {
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.starts_with("Exception raised from") && !l.starts_with("frame #")
        })
        .collect();
    kept.join("\n").trim().to_owned()
}

/// A joined c10d group; dropped, it leaves.
pub struct Group(*mut c_void);

// SAFETY: c10d backends are used from one thread at a time here (the
// owner's), and may be moved between threads.
unsafe impl Send for Group {}

/// Settings for joining.
pub struct Join<'a> {
    pub backend: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub rank: usize,
    pub world: usize,
    pub store_is_external: bool,
    pub timeout_ms: i64,
    pub gloo_threads: usize,
}

impl Group {
    pub fn join(j: &Join) -> Result<Self, String> {
        let backend = CString::new(j.backend).map_err(|e| e.to_string())?;
        let host = CString::new(j.host).map_err(|e| e.to_string())?;
        let mut err = std::ptr::null_mut();
        // SAFETY: valid C strings; the shim catches every C++ exception.
        let g = unsafe {
            rlhf_c10d_new(
                backend.as_ptr(),
                host.as_ptr(),
                c_int::from(j.port),
                j.rank as c_int,
                j.world as c_int,
                c_int::from(j.store_is_external),
                j.timeout_ms,
                j.gloo_threads as c_int,
                &mut err,
            )
        };
        if g.is_null() {
            return Err(take_error(err));
        }
        Ok(Self(g))
    }

    fn call(&self, f: impl FnOnce(*mut c_void, *mut *mut c_char) -> c_int) -> Result<(), String> {
        let mut err = std::ptr::null_mut();
        match f(self.0, &mut err) {
            0 => Err(take_error(err)),
            _ => Ok(()),
        }
    }

    /// Sums each tensor in place across ranks.
    pub fn all_reduce_sum(&self, ts: &mut [Tensor]) -> Result<(), String> {
        let ptrs: Vec<*mut CTensor> = ts.iter_mut().map(|t| t.as_mut_ptr()).collect();
        // SAFETY: the pointers are live tch tensors for the call's length.
        self.call(|g, err| unsafe {
            rlhf_c10d_allreduce_sum(g, ptrs.as_ptr(), ptrs.len() as c_int, err)
        })
    }

    /// Copies rank `root`'s tensors into every rank's, in place.
    pub fn broadcast(&self, ts: &mut [Tensor], root: usize) -> Result<(), String> {
        let ptrs: Vec<*mut CTensor> = ts.iter_mut().map(|t| t.as_mut_ptr()).collect();
        // SAFETY: as above.
        self.call(|g, err| unsafe {
            rlhf_c10d_broadcast(g, ptrs.as_ptr(), ptrs.len() as c_int, root as c_int, err)
        })
    }

    /// Every rank's `input` (same shape on all), in rank order, into
    /// `outs` (preallocated, one per rank).
    pub fn all_gather(&self, input: &mut Tensor, outs: &mut [Tensor]) -> Result<(), String> {
        let ptrs: Vec<*mut CTensor> = outs.iter_mut().map(|t| t.as_mut_ptr()).collect();
        let input = input.as_mut_ptr();
        // SAFETY: as above.
        self.call(|g, err| unsafe {
            rlhf_c10d_allgather(g, input, ptrs.as_ptr(), ptrs.len() as c_int, err)
        })
    }

    pub fn barrier(&self) -> Result<(), String> {
        // SAFETY: a live group.
        self.call(|g, err| unsafe { rlhf_c10d_barrier(g, err) })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: made by rlhf_c10d_new, freed once.
        unsafe { rlhf_c10d_free(self.0) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn backtraces_are_dropped_and_the_reason_kept() {
        let text = "TCP client failed to connect/validate to host 127.0.0.1:29500 - timed out (try=1, timeout=1000ms): The client socket has timed out after 1000ms while trying to connect to (127.0.0.1, 29500).\n\
Exception raised from throwTimeoutError at /pytorch/torch/csrc/distributed/c10d/socket.cpp:1021 (most recent call first):\n\
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x98 (0x7f in libc10.so)\n\
frame #1: <unknown function> + 0x5 (0x7f in libtorch_cpu.so)\n\
Exception raised from doConnect at /pytorch/torch/csrc/distributed/c10d/TCPStore.cpp:1 (most recent call first):\n\
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x98 (0x7f in libc10.so)\n";
        let shown = super::without_backtraces(text);
        assert!(shown.ends_with("(127.0.0.1, 29500)."), "{shown}");
        assert!(!shown.contains("frame #") && !shown.contains("Exception raised"));
    }
}
