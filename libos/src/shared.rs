//! Shared heaps: memory that every task attached to a template can allocate from, read and
//! write — results, counters, a shared hash map.
//!
//! A [`SharedHeap`] is a `Shared` template region backed by physically contiguous frames.
//! Objects live at the region's lower-half addresses, the same in every task that attaches the
//! heap's [`template`](SharedHeap::template); a task that does not attach it faults on access
//! (and only that task ends). The allocator's bookkeeping is done through the kernel's direct map
//! of the same frames, so allocating and freeing work from any task. [`SharedAlloc`] implements
//! `allocator_api2`'s `Allocator`, which `hashbrown` and `allocator_api2`'s `Vec`/`Box` accept
//! on stable Rust; guard shared data with a [`crate::sync::Mutex`].
//!
//! ```no_run
//! use libos::shared::SharedHeap;
//! let heap = SharedHeap::new("results", 0x2_0000_0000, 1 << 20).expect("memory");
//! let alloc = heap.allocator();
//! let t = heap.template().clone();
//! let h = libos::task::spawn(&[&t], move || {
//!     let mut v = allocator_api2::vec::Vec::new_in(alloc);
//!     v.push(7u32);
//!     core::mem::forget(v); // left in the shared heap for others to read
//!     0
//! });
//! ```

use alloc::sync::Arc;
use core::alloc::Layout;
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};
use talc::base::Talc;
use talc::base::binning::DefaultBinning;
use talc::source::Manual;

use crate::arch::irq::IrqMutex;
use crate::mm::kernel::frames;
use crate::mm::layout::{PAGE_SIZE, phys_to_virt};
use crate::space::{Error, Kind, Template, TemplateBuilder};

struct Inner {
    /// Lower-half address of the region (what tasks use).
    va: u64,
    len: u64,
    /// Direct-map address of the same bytes (what the allocator's bookkeeping uses).
    dm: u64,
    first_pfn: usize,
    talc: IrqMutex<Talc<Manual, DefaultBinning>>,
}

impl core::fmt::Debug for Inner {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedHeap")
            .field("va", &self.va)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for p in self.first_pfn..self.first_pfn + (self.len / PAGE_SIZE) as usize {
            frames().dec_ref(p);
        }
    }
}

/// A heap shared by every task that attaches its template. See the module docs.
#[derive(Debug, Clone)]
pub struct SharedHeap {
    template: Template,
    inner: Arc<Inner>,
}

/// Allocates in a [`SharedHeap`]; cheap to clone and `Send`, so tasks can carry it.
#[derive(Debug, Clone)]
pub struct SharedAlloc {
    inner: Arc<Inner>,
}

/// Statistics of a shared heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedStats {
    /// Bytes currently allocated.
    pub allocated_bytes: usize,
    /// Live allocations.
    pub allocation_count: usize,
    /// Size of the heap.
    pub capacity: usize,
}

impl SharedHeap {
    /// A heap of `len` bytes (rounded up to pages) at lower-half address `start` (page aligned,
    /// in a 1 GiB slot no other template of the same tasks uses), named `name` in fault reports.
    ///
    /// Checked before any memory is spent, so every pointer the heap hands out is one the CPU
    /// accepts: a non-canonical `start` is [`Error::NonCanonical`], one in (or a heap reaching
    /// into) the kernel half [`Error::NotLowerHalf`], an unaligned one [`Error::Misaligned`],
    /// `len == 0` [`Error::Empty`], more than the free RAM (physically contiguous)
    /// [`Error::OutOfFrames`].
    ///
    /// ```no_run
    /// let heap = libos::shared::SharedHeap::new("results", 0x2_0000_0000, 4 << 20).expect("memory");
    /// ```
    pub fn new(name: &str, start: u64, len: u64) -> Result<SharedHeap, Error> {
        let pages = crate::limits::mapping(start, len, true)?;
        if pages > frames().free_frames() as u64 {
            return Err(Error::OutOfFrames);
        }
        let pages = pages as usize;
        let first = frames()
            .alloc_contiguous(pages, 1)
            .ok_or(Error::OutOfFrames)?;
        let dm = phys_to_virt(first as u64 * PAGE_SIZE);
        let len = pages as u64 * PAGE_SIZE;
        // SAFETY: freshly allocated frames, reached through the direct map.
        unsafe { core::ptr::write_bytes(dm as *mut u8, 0, len as usize) };
        let mut talc = Talc::new(Manual);
        // SAFETY: the range is ours alone (just allocated) and lives as long as `Inner`.
        if unsafe { talc.claim(dm as *mut u8, len as usize) }.is_none() {
            for p in first..first + pages {
                frames().dec_ref(p);
            }
            return Err(Error::Empty);
        }
        let inner = Arc::new(Inner {
            va: start,
            len,
            dm,
            first_pfn: first,
            talc: IrqMutex::new(talc),
        });
        let backing: alloc::vec::Vec<_> = (0..pages as u64)
            .map(|i| x86_64::PhysAddr::new((first as u64 + i) * PAGE_SIZE))
            .collect();
        let template = TemplateBuilder::new()
            .frames_region(name, start, Kind::Shared, backing)?
            .seal()?;
        Ok(SharedHeap { template, inner })
    }

    /// The template to attach (with [`crate::task::spawn`]) in every task that uses the heap.
    ///
    /// ```no_run
    /// let heap = libos::shared::SharedHeap::new("results", 0x2_0000_0000, 1 << 20).expect("memory");
    /// let h = libos::task::spawn(&[heap.template()], || 0).expect("spawn");
    /// ```
    pub fn template(&self) -> &Template {
        &self.template
    }

    /// An allocator handle for `allocator_api2` / `hashbrown` collections. Only tasks that attach
    /// [`template`](SharedHeap::template) may touch (or drop) what they allocate with it. (A
    /// `hashbrown` map takes it with hashbrown's `allocator-api2` feature, through
    /// `HashMap::with_hasher_in`.)
    ///
    /// ```no_run
    /// use allocator_api2::vec::Vec;
    /// use libos::shared::{SharedAlloc, SharedHeap};
    /// let heap = SharedHeap::new("kv", 0x2_0000_0000, 1 << 20).expect("memory");
    /// let v: Vec<u64, SharedAlloc> = Vec::new_in(heap.allocator()); // empty: no memory yet
    /// ```
    pub fn allocator(&self) -> SharedAlloc {
        SharedAlloc {
            inner: self.inner.clone(),
        }
    }

    /// Allocation statistics.
    ///
    /// ```no_run
    /// let heap = libos::shared::SharedHeap::new("results", 0x2_0000_0000, 1 << 20).expect("memory");
    /// assert_eq!(heap.stats().allocation_count, 0);
    /// ```
    pub fn stats(&self) -> SharedStats {
        let t = self.inner.talc.lock();
        let c = t.counters();
        SharedStats {
            allocated_bytes: c.allocated_bytes,
            allocation_count: c.allocation_count,
            capacity: self.inner.len as usize,
        }
    }
}

impl Inner {
    fn to_task(&self, dm_ptr: *mut u8) -> *mut u8 {
        (dm_ptr as u64 - self.dm + self.va) as *mut u8
    }

    fn to_dm(&self, task_ptr: *mut u8) -> *mut u8 {
        (task_ptr as u64 - self.va + self.dm) as *mut u8
    }
}

// SAFETY: `allocate` hands out disjoint blocks from talc (which owns the region) at the task-side
// addresses of the same bytes; `deallocate` gives them back; blocks stay valid until deallocated
// and while any clone of the allocator (and so `Inner`) lives.
unsafe impl Allocator for SharedAlloc {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            let p = NonNull::new(layout.align() as *mut u8).ok_or(AllocError)?;
            return Ok(NonNull::slice_from_raw_parts(p, 0));
        }
        // SAFETY: layout has a non-zero size.
        let dm = unsafe { self.inner.talc.lock().allocate(layout) }.ok_or(AllocError)?;
        let p = NonNull::new(self.inner.to_task(dm.as_ptr())).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // SAFETY: the caller passes a block this allocator returned, with its layout.
        unsafe {
            self.inner
                .talc
                .lock()
                .deallocate(self.inner.to_dm(ptr.as_ptr()), layout)
        }
    }
}
