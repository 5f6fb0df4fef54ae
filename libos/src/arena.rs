//! Per-task heaps: memory in the running task's own address space (its private tables).
//!
//! An [`Arena`] maps a demand-zero private region at an address the task chooses and runs an
//! allocator over it whose bookkeeping lives inside the region too. Everything allocated there
//! disappears with the task's address space — also when the task faults, panics or is killed and
//! no destructor runs (kernel-heap objects would leak then). An `Arena` is neither `Send` nor
//! `Sync`: its addresses mean something only in the task that made it.
//!
//! Running out is an error for that task only: a full arena answers `try_reserve` with `Err` and
//! an infallible allocation (`push`) with a panic that ends the task; an arena larger than the
//! RAM left faults when a demand-zero page cannot be backed, which also ends just that task.
//!
//! **Scoped.** An arena exists only inside [`Arena::scope`]: the closure gets `&Arena`, and when
//! it returns the region is unmapped. The closure cannot keep a reference into the arena (it is
//! `for<'a> FnOnce(&'a Arena) -> R`): a `'static` one would be `Send` for plain data and could
//! be carried into a child — a spawn closure, a zygote's state, a static — where the arena is
//! not mapped and something else (a shared heap, say) may be, at the same address.
//!
//! ```no_run
//! let h = libos::task::spawn(&[], || {
//!     libos::arena::Arena::scope(0x10_0000_0000, 16 << 20, |arena| {
//!         let mut v = allocator_api2::vec::Vec::new_in(arena);
//!         v.extend_from_slice(b"scratch that lives in this task only");
//!         v.len() as i32
//!     })
//!     .expect("map")
//! })
//! .expect("spawn");
//! assert_eq!(h.join(), Ok(36));
//! ```
//!
//! ```compile_fail,E0521
//! let mut kept: Option<&'static mut [u64]> = None;
//! let _ = libos::arena::Arena::scope(0x10_0000_0000, 1 << 20, |arena| {
//!     let v = alloc::boxed::Box::leak(alloc::boxed::Box::new(allocator_api2::vec::Vec::new_in(arena)));
//!     v.push(1u64);
//!     kept = Some(&mut v[..]); // refused: the arena's memory cannot outlive the scope
//! });
//! ```

use core::alloc::Layout;
use core::marker::PhantomData;
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};
use talc::base::Talc;
use talc::base::binning::DefaultBinning;
use talc::source::Manual;

use crate::sync::Mutex;

/// The arena's allocator behind a task lock, not an interrupt-disabling kernel lock: the arena is
/// task-private memory that no interrupt handler and no other task touches, and its demand-zero
/// pages fault in (and may run out of RAM) while the allocator works. A task that fails there
/// takes the lock down with its own address space; the rest of the system never waits for it.
type Heap = Mutex<Talc<Manual, DefaultBinning>>;

/// A heap in the running task's private memory. See the module docs.
#[derive(Debug)]
pub struct Arena {
    heap: NonNull<Heap>,
    /// The task whose memory the arena is (a copy in a fork child's memory points at memory the
    /// child does not have).
    owner: u64,
    /// Addresses are only meaningful in the task that made the arena.
    _task_local: PhantomData<*const ()>,
}

impl Arena {
    /// Maps `len` bytes of private, demand-zero memory named "arena" at `va` (page aligned, not
    /// overlapping anything the task has mapped), starts an allocator over it and runs `f` on
    /// it. `len` must be a page multiple above one page plus the allocator's header
    /// ([`templates::Error::TooSmall`] otherwise); `va` and `va + len` must lie in the lower half
    /// (see [`crate::task::map_private`] for the errors).
    ///
    /// When `f` returns, the region is unmapped and its memory freed (unless a snapshot took
    /// it: `task::snapshot` of the arena's range inside `f`).
    ///
    /// ```no_run
    /// use libos::arena::Arena;
    /// let sum = Arena::scope(0x10_0000_0000, 1 << 20, |a| {
    ///     let mut v = allocator_api2::vec::Vec::new_in(a);
    ///     v.extend_from_slice(&[1u64, 2, 3]);
    ///     v.iter().sum::<u64>()
    /// });
    /// assert_eq!(sum, Ok(6));
    /// ```
    pub fn scope<R>(va: u64, len: u64, f: impl FnOnce(&Arena) -> R) -> Result<R, templates::Error> {
        let arena = Arena::open(va, len)?;
        let r = f(&arena);
        // Nothing refers to the region any more (`f` could keep no reference): it goes. An unmap
        // that failed would leave it mapped, unreachable, until the task ends: harmless.
        let _ = crate::task::unmap_private(va, len);
        Ok(r)
    }

    fn open(va: u64, len: u64) -> Result<Arena, templates::Error> {
        let header = core::mem::size_of::<Heap>().next_multiple_of(64) as u64;
        if len <= header + 4096 {
            return Err(templates::Error::TooSmall {
                len,
                min: (header + 4097).next_multiple_of(4096),
            });
        }
        crate::task::map_private("arena", va, len)?;
        let heap = va as *mut Heap;
        // SAFETY: `va..va + len` was just mapped writable (demand-zero) in the running task's
        // space, page aligned, and nothing else uses it; the header fits (checked above).
        unsafe { heap.write(Mutex::new(Talc::new(Manual))) };
        // SAFETY: as above: the heap header was just written; the rest of the region is ours.
        let claimed = unsafe {
            (*heap)
                .lock()
                .claim((va + header) as *mut u8, (len - header) as usize)
        };
        if claimed.is_none() {
            return Err(templates::Error::Empty);
        }
        Ok(Arena {
            heap: NonNull::new(heap).ok_or(templates::Error::Empty)?,
            owner: crate::task::current(),
            _task_local: PhantomData,
        })
    }

    fn heap(&self) -> &Heap {
        // A bitwise copy in another task's memory (a spawn forks the task's heap, not its other
        // mappings) must not reach memory that task does not map: end that task, clearly.
        let me = crate::task::current();
        assert!(
            me == self.owner,
            "the arena at {:#x} belongs to task {}; task {me} does not map its memory",
            self.heap.as_ptr() as u64,
            self.owner
        );
        // SAFETY: the header was initialised in `new` and the region stays mapped for the life
        // of the task that made it (the owner, checked above), which outlives this non-Send
        // handle.
        unsafe { self.heap.as_ref() }
    }

    /// Bytes currently allocated in the arena.
    pub fn allocated_bytes(&self) -> usize {
        self.heap().lock().counters().allocated_bytes
    }
}

// SAFETY: blocks come from talc over memory the arena owns exclusively; they stay valid until
// deallocated, and the region lives as long as the task that holds the (non-Send) arena.
unsafe impl Allocator for &Arena {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            let p = NonNull::new(layout.align() as *mut u8).ok_or(AllocError)?;
            return Ok(NonNull::slice_from_raw_parts(p, 0));
        }
        // SAFETY: non-zero size.
        let p = unsafe { self.heap().lock().allocate(layout) }.ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: the caller passes a block from this arena with its layout.
            unsafe { self.heap().lock().deallocate(ptr.as_ptr(), layout) }
        }
    }
}
