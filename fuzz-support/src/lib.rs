//! What the fuzz targets of the workspace (`*/tests/fuzz.rs`, proptest on the stable toolchain)
//! share: an allocator that counts what each thread allocates, so a target can hold a decoder to
//! "never allocates" or "allocates linearly in its input", and the `FUZZ_CASES` budget.
//!
//! A fuzz target installs the allocator itself (one per binary):
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: openspan_fuzz_support::CountingAllocator = openspan_fuzz_support::CountingAllocator;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::test_runner::Config;

/// The system allocator, counting the bytes each thread asks for. Per thread, because tests run
/// in parallel.
pub struct CountingAllocator;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    // `try_with`: allocations during thread teardown happen after the counter is gone.
    let _ = ALLOCATED.try_with(|c| c.set(c.get().saturating_add(bytes)));
}

// SAFETY (all four): each call forwards its arguments unchanged to the system allocator, which
// upholds GlobalAlloc's contract; counting touches only a thread-local integer and never
// allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its result with the bytes it allocated on this thread (0 unless the
/// binary installed [`CountingAllocator`]).
pub fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let result = f();
    (result, ALLOCATED.with(Cell::get) - before)
}

/// Cases per target: `FUZZ_CASES`, else `default` (the CI budget). Failures are printed with
/// their seed; no files are written into the tree.
pub fn cases(default: u32) -> Config {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}
