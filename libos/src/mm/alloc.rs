//! The global allocator: app code allocates from its task's own heap ([`super::pheap`]), libos
//! (kernel context, [`super::ctx`]) from the kernel heap ([`super::heap`]); a block is freed or
//! resized in the heap that holds it, whoever frees it.

use core::alloc::{GlobalAlloc, Layout};

use super::{heap, pheap};

/// Sends app code's allocations to its task's heap ([`pheap`]) and libos's
/// (kernel context, [`super::ctx`]) to the kernel heap; a block is freed or resized in the
/// heap that holds it, whoever frees it.
struct Dispatch;

// SAFETY: every block comes from one of two sound allocators and goes back to the one that
// holds it (decided by address: task heaps live in the process-memory range, the kernel heap in
// its own region), with the same layout.
unsafe impl GlobalAlloc for Dispatch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if super::ctx::in_app() {
            // SAFETY: app context (checked); `alloc`'s contract forwarded.
            unsafe { pheap::alloc(layout) }
        } else {
            // SAFETY: `alloc`'s contract forwarded.
            unsafe { heap::HEAP.alloc(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if pheap::owns(ptr) {
            // SAFETY: a block of the task heap region is the running task's (its own copy).
            unsafe { pheap::dealloc(ptr, layout) }
        } else {
            // SAFETY: every other block came from the kernel heap.
            unsafe { heap::HEAP.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if pheap::owns(ptr) {
            // SAFETY: as for `dealloc`; `realloc`'s contract forwarded.
            unsafe { pheap::realloc(ptr, layout, new_size) }
        } else {
            // SAFETY: as for `dealloc`; `realloc`'s contract forwarded.
            unsafe { heap::HEAP.realloc(ptr, layout, new_size) }
        }
    }
}

#[global_allocator]
static ALLOC: Dispatch = Dispatch;
