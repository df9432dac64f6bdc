//! The `origami` command-line tool.

mod cli;

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::time::Instant;

/// The system allocator, timed for `origami bench --profile` while the profiler is on.
struct ProfiledAllocator;

// SAFETY: every call forwards to the system allocator with the same arguments; the profiler's
// bookkeeping neither allocates nor touches the memory.
unsafe impl GlobalAlloc for ProfiledAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        timed(layout.size(), || unsafe { System.alloc(layout) })
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        timed(layout.size(), || unsafe { System.alloc_zeroed(layout) })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        timed(0, || unsafe { System.dealloc(ptr, layout) })
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        timed(new_size, || unsafe {
            System.realloc(ptr, layout, new_size)
        })
    }
}

/// Runs one allocator call, recording its time (and the bytes asked for) when profiling.
#[inline]
fn timed<T>(bytes: usize, call: impl FnOnce() -> T) -> T {
    if !origami::profile::enabled() {
        return call();
    }
    let started = Instant::now();
    let value = call();
    origami::profile::record_allocation(started.elapsed(), bytes);
    value
}

#[global_allocator]
static ALLOCATOR: ProfiledAllocator = ProfiledAllocator;

/// Keeps freed memory in the process for the next step instead of handing it back to the
/// kernel: a training step allocates and frees the same large activation buffers every
/// micro-batch, and glibc's defaults give each one back (`munmap`, or trimming the heap) and
/// take fresh pages again, which the kernel zeroes on first touch. Every block comes from the
/// heap — none from its own mapping, whatever its size — and the heap is never trimmed. All
/// threads share the one heap: glibc gives other threads arenas of 64 MiB mappings and unmaps
/// one whenever it falls empty, whatever the trim threshold, so the ranks of a local run took
/// fresh pages every step.
/// Measured on the quick-start layout: page faults per step from 22,000–32,000 down to
/// 1,300–4,000, the step 15 % faster; on `small` bf16, where expert outputs and the SwiGLU
/// backward exceed glibc's largest mmap threshold (32 MiB), from ≈ 107,000 to none, the step
/// 10 % faster, peak RSS unchanged (`docs/kernels.md`, "Profiles").
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Runs the CLI. A failure prints its chain of causes (no backtrace) and exits with status 1,
/// or 2 for an invalid configuration ([`cli::ConfigError`]); a command may choose its status
/// itself (`origami check`: 1 on FAIL).
fn main() -> ExitCode {
    keep_freed_memory();
    match cli::run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<cli::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
