//! A memory bound on code a model folder brings: its chat template.
//!
//! minijinja's fuel bounds the steps a template takes, not the memory its
//! values hold: a template doubling a string thirty times fills gigabytes
//! in a few steps. [`BoundedAlloc`], the `rlhf` binary's allocator, counts
//! what a thread allocates while [`bounded`] runs on it; past
//! [`RENDER_MEMORY`] it writes an error naming the template and ends the
//! process, as an out-of-memory kill would but at once and with the cause.
//! Files rlhf writes are renamed into place whole, so none is left half
//! written. Elsewhere (and in programs without this allocator) it costs a
//! thread-local read per allocation.
//!
//! With `stages/src/ffi.rs`, the one module allowed `unsafe`: an allocator
//! is an unsafe trait, and the stop must neither allocate nor unwind.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Memory one rendering may hold.
pub const RENDER_MEMORY: usize = 512 << 20;

thread_local! {
    /// Bytes held by the rendering on this thread, when one runs.
    static HELD: Cell<Option<usize>> = const { Cell::new(None) };
    /// The message to print when the bound is passed (set by `bounded`).
    static MESSAGE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// Runs `f` with this thread's allocations bounded by [`RENDER_MEMORY`]
/// (under [`BoundedAlloc`]); `origin` names the template in the error.
pub fn bounded<T>(origin: &str, f: impl FnOnce() -> T) -> T {
    let message = format!(
        "error: {origin}: rendering one conversation held over {} MiB of memory, so rlhf stopped; a chat template builds one conversation's text\n",
        RENDER_MEMORY >> 20
    );
    let outer = HELD.with(|h| h.replace(Some(0)));
    MESSAGE.with(|m| m.set((message.as_ptr(), message.len())));
    let result = f();
    MESSAGE.with(|m| m.set((std::ptr::null(), 0)));
    HELD.with(|h| h.set(outer));
    drop(message);
    result
}

/// The system allocator, counting a bounded rendering's bytes.
pub struct BoundedAlloc;

impl BoundedAlloc {
    fn count(grow: usize, shrink: usize) {
        let _ = HELD.try_with(|h| {
            if let Some(held) = h.get() {
                let now = held.saturating_add(grow).saturating_sub(shrink);
                h.set(Some(now));
                if now > RENDER_MEMORY {
                    Self::stop();
                }
            }
        });
    }

    /// Prints the message without allocating, then exits.
    fn stop() -> ! {
        let (ptr, len) = MESSAGE.try_with(Cell::get).unwrap_or((std::ptr::null(), 0));
        // SAFETY: `ptr..ptr+len` is the message `bounded` keeps alive while
        // the count is on; write(2) and _exit(2) neither allocate nor unwind.
        unsafe {
            if !ptr.is_null() {
                libc::write(2, ptr.cast(), len);
            }
            libc::_exit(1);
        }
    }
}

// SAFETY: every call goes to the system allocator unchanged; the counting
// around it touches only a const-initialised thread-local without a
// destructor.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size(), 0);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size(), 0);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::count(0, layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count(new_size, layout.size());
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
