//! Shared heaps: memory that every task attached to a template can allocate from, read and
//! write — results, counters, a shared hash map — the way tasks share on purpose.
//!
//! A [`SharedHeap`] is a `Shared` template region backed by physically contiguous frames.
//! Objects live at the region's lower-half addresses, the same in every task that attaches the
//! heap's [`template`](SharedHeap::template). The allocator's bookkeeping is done through the
//! kernel's direct map of the same frames, so allocating and freeing work from any task.
//!
//! **Typed sharing.** Whatever goes into a shared heap is read by other tasks, in other address
//! spaces: it must be plain data with no pointer into one task's private memory. The heap holds
//! only [`ShareSafe`] values: every type with `zerocopy`'s [`IntoBytes`] (plain data without
//! pointers or padding: integers, arrays, atomics, `#[derive(IntoBytes)]` structs), the shared
//! collections, which point only into a shared heap — [`SharedVec`], [`SharedBox`] and
//! [`SharedMap`] (a `hashbrown` map with a fixed-seed hasher, so every task hashes alike) — and
//! tuples, arrays and `Option`s of those. A `Box`, `Vec`, `String` or reference does not compile:
//!
//! ```compile_fail,E0277
//! extern crate alloc;
//! use libos::shared::{SharedHeap, SharedVec};
//! let heap = SharedHeap::new("h", 0x2_0000_0000, 1 << 20).expect("memory");
//! let v: SharedVec<alloc::boxed::Box<u8>> = SharedVec::new_in(heap.allocator()); // refused
//! ```
//!
//! ```compile_fail,E0277
//! use libos::shared::{SharedBox, SharedHeap};
//! static X: u64 = 1;
//! let heap = SharedHeap::new("h", 0x2_0000_0000, 1 << 20).expect("memory");
//! let b = SharedBox::new_in(&X, heap.allocator()); // a `&'static`: refused
//! ```
//!
//! ```compile_fail,E0277
//! extern crate alloc;
//! use libos::shared::{SharedHeap, SharedMap};
//! let heap = SharedHeap::new("h", 0x2_0000_0000, 1 << 20).expect("memory");
//! let m: SharedMap<u64, alloc::vec::Vec<u8>> = SharedMap::new_in(heap.allocator()); // refused
//! ```
//!
//! **Reaching shared data: [`Shared`].** A shared collection *value* (the few words that hold
//! its pointer, length and allocator) is owned like any Rust value: by the task whose memory
//! holds it. Spawn is a fork, so a collection in a parent's memory would be copied bitwise into
//! the child — two owners of one block, a double free and a data race — so the collections are
//! neither `Send` nor `Sync`: a spawn closure cannot capture one, a static cannot hold one, a
//! [`Zygote`](crate::process::Zygote)'s state cannot contain one (it must be `Send`). Several
//! tasks reach one value only through a [`Shared<T>`]: the value moved into the heap, with a
//! lock. `Shared<T>` itself is plain data (which heap, which value), `Copy` and `Send`: capture
//! it, keep it in a zygote's state. [`Shared::with`] runs a closure on `&mut T`, one task at a
//! time:
//!
//! ```no_run
//! use libos::shared::{Shared, SharedHeap, SharedMap};
//! let heap = SharedHeap::new("kv", 0x2_0000_0000, 1 << 20).expect("memory");
//! let counts = Shared::new_in(SharedMap::<u64, u64>::new_in(heap.allocator()), heap.allocator())
//!     .map_err(|(e, _)| e)
//!     .expect("room");
//! let t = heap.template();
//! let h = libos::task::spawn(&[&t], move || {
//!     counts
//!         .with(|map| {
//!             map.try_reserve(1).expect("room");
//!             let n = map.get(&7).unwrap_or(0);
//!             map.insert(7, n + 1);
//!         })
//!         .expect("the heap is attached");
//!     0
//! });
//! ```
//!
//! ```compile_fail,E0277
//! use libos::shared::{SharedHeap, SharedVec};
//! let heap = SharedHeap::new("h", 0x2_0000_0000, 1 << 20).expect("memory");
//! let v: SharedVec<u64> = SharedVec::new_in(heap.allocator());
//! let t = heap.template();
//! let _ = libos::task::spawn(&[&t], move || v.len() as i32); // refused: not `Send`
//! ```
//!
//! ```compile_fail,E0277
//! use libos::shared::{SharedBox, SharedHeap};
//! let heap = SharedHeap::new("h", 0x2_0000_0000, 1 << 20).expect("memory");
//! let b = SharedBox::new_in(1u64, heap.allocator());
//! let _ = libos::process::Zygote::new(b); // refused: a zygote's state must be `Send`
//! ```
//!
//! ```compile_fail,E0277
//! use libos::shared::SharedVec;
//! // A static is every task's own copy after a fork: refused, the vector is not `Send`.
//! static KEEP: libos::sync::Mutex<Option<SharedVec<u64>>> = libos::sync::Mutex::new(None);
//! ```
//!
//! **No reference outlives the call.** A reference into a shared heap is valid only in tasks
//! that map that heap, and only while the lock is held; but a Rust reference to plain data is
//! `Send`, and a `'static` one could be carried into a child (a closure, a zygote's state, a
//! static) that maps another heap there — or the same heap, racing its holder. So the shared
//! types hand out references only to closures (`with`, `with_mut`, `get_with`, `update`,
//! `for_each`: `for<'a> FnOnce(&'a T) -> R`, so `R` cannot hold one) and otherwise copy values
//! out (`get`); none of them implements `Deref`:
//!
//! ```compile_fail,E0521
//! use libos::shared::{Shared, SharedHeap};
//! let heap = SharedHeap::new("h", 0x2_0000_0000, 1 << 20).expect("memory");
//! let a = heap.allocator();
//! let s = Shared::new_in([0u64; 4], a).map_err(|(e, _)| e).expect("room");
//! let mut kept: Option<&'static mut [u64; 4]> = None;
//! let _ = s.with(|v| kept = Some(v)); // refused: the reference cannot leave the closure
//! ```
//!
//! **Checked in every task.** A collection's pointers are valid only in a task that maps its
//! heap, so every use of a collection (and every [`Shared::with`]) checks that the running task
//! was spawned with that very heap's template (not merely that something is mapped at its
//! address): a task that was not gets [`SharedError::NotMapped`] from `with`, and a panic
//! (which ends only it) from a collection method, never another heap's bytes read as this
//! one's. A collection whose heap is gone is unusable (its drop frees nothing: the heap's memory
//! went with it). Heap memory holds Rust objects, so `task::write` refuses it (a forged header
//! would point anywhere); `task::read` may copy it out.
//!
//! **The lock and failures.** A task inside [`Shared::with`] cannot be killed half-way: a
//! kill waits until the closure returns (a task that blocks forever inside one cannot be
//! killed). A task that ends while holding one — a panic, a fault, a
//! `task::exit` — may have left the value half-changed, so the value is **poisoned**: every later
//! `lock` answers [`SharedError::Poisoned`], naming the task. Its memory stays in the heap until
//! the heap goes.
//!
//! **Ownership.** A [`SharedHeap`] is a handle ([`crate::handle::Owned`]) owned by the task that
//! made it: its drop there (or that task's end) releases the heap; a forked copy's drop does
//! nothing; [`Give`] hands it to a child. A [`SharedAlloc`] is plain data (which heap), freely
//! copied and usable from any task; once the heap is gone, allocating with it fails and freeing
//! does nothing. What a task leaves in a shared heap when it ends (a collection it never freed,
//! a `Shared` value nobody took) stays there until the heap goes, as a shared-memory object
//! outlives the process that made it.

use alloc::collections::BTreeMap;
use alloc::sync::{Arc, Weak};
use core::alloc::Layout;
use core::hash::{Hash, Hasher};
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};
use talc::base::Talc;
use talc::base::binning::DefaultBinning;
use talc::source::Manual;
pub use zerocopy::IntoBytes;

use crate::arch::irq::IrqMutex;
use crate::handle::{Give, Owned};
use crate::mm::kernel::frames;
use crate::mm::layout::{PAGE_SIZE, phys_to_virt};
use crate::space::{Error, Kind, Template, TemplateBuilder};

struct Inner {
    /// Its [`SharedAlloc`] id.
    id: u64,
    /// Lower-half address of the region (what tasks use).
    va: u64,
    len: u64,
    /// Direct-map address of the same bytes (what the allocator's bookkeeping uses).
    dm: u64,
    first_pfn: usize,
    talc: IrqMutex<Talc<Manual, DefaultBinning>>,
    /// Its [`Shared`] values by id, with their locks.
    roots: IrqMutex<BTreeMap<u64, Root>>,
    /// The heap's template, held as long as the heap lives, so that its root table (how a task
    /// is seen to attach it: [`mapped_here`]) is never another template's meanwhile.
    template: crate::space::EngineTemplate,
}

/// A [`Shared`] value's kernel-side record: where it is, and its lock.
#[derive(Debug)]
struct Root {
    /// Task-side address of the value.
    va: u64,
    layout: Layout,
    /// The task holding the lock.
    holder: Option<u64>,
    /// The task that ended while holding it: the value may be half-changed.
    poisoned_by: Option<u64>,
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
        HEAPS.lock().remove(&self.id);
        crate::space::unmark_typed(self.first_pfn);
        for p in self.first_pfn..self.first_pfn + (self.len / PAGE_SIZE) as usize {
            frames().dec_ref(p);
        }
    }
}

/// Every live heap by [`SharedAlloc`] id (ids are never reused), and the next id.
static HEAPS: IrqMutex<BTreeMap<u64, Weak<Inner>>> = IrqMutex::new(BTreeMap::new());
static NEXT_HEAP: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

/// The heap `id`, if it still exists. Call it in kernel context: dropping the `Arc` may drop
/// the heap, which frees kernel-heap memory.
fn heap(id: u64) -> Option<Arc<Inner>> {
    let weak = HEAPS.lock().get(&id).cloned()?;
    // Upgraded (and the `Arc` possibly dropped, which takes `HEAPS` again) outside the lock.
    weak.upgrade()
}

/// Recent answers of [`mapped_here`] that were yes, as (task, heap): a task's templates do not
/// change while it lives and ids are never reused, so a yes stays true. One CPU: one cache.
static MAPPED: IrqMutex<[(u64, u64); 4]> = IrqMutex::new([(u64::MAX, 0); 4]);

/// True when the running task was spawned with heap `id`'s template attached — so the whole
/// heap range maps the heap's own frames there (a task's templates are fixed for its life; no
/// private mapping may overlap one; `task::write` refuses heap memory) and pointers into the
/// heap are valid. Not "something is mapped at the heap's address": another heap, a snapshot of
/// this one or an arena may be there in another task. False once the heap is gone.
fn mapped_here(id: u64) -> bool {
    let me = crate::arch::cpu::running_task();
    if MAPPED.lock().contains(&(me, id)) {
        return true;
    }
    let _k = crate::mm::ctx::kernel();
    let Some(inner) = heap(id) else {
        return false;
    };
    let root = inner.template.root();
    let ok = crate::space::with_current(|s| s.templates().iter().any(|t| t.root() == root));
    drop(inner);
    if ok {
        MAPPED.lock()[(me ^ id) as usize % 4] = (me, id);
    }
    ok
}

/// Panics (ending only the running task) unless it maps heap `alloc`: see [`mapped_here`].
#[track_caller]
fn usable(alloc: SharedAlloc) {
    if !mapped_here(alloc.id) {
        panic!(
            "shared heap #{} used by task {}, which does not map it (attach the heap's \
             template) or after the heap was released",
            alloc.id,
            crate::arch::cpu::running_task()
        );
    }
}

/// The kernel side of a [`SharedHeap`] handle: keeps the heap and its template alive.
#[derive(Debug)]
struct HeapRef {
    inner: Arc<Inner>,
    template: crate::space::EngineTemplate,
}

/// A heap shared by every task that attaches its template. See the module docs.
///
/// A handle owned by the task that made it ([`crate::handle`]): its drop there releases the heap
/// (each clone is one more handle; the heap goes with the last), a forked copy's drop does
/// nothing, and when the owner ends the kernel releases it.
#[derive(Debug)]
pub struct SharedHeap {
    alloc: SharedAlloc,
    capacity: u64,
    obj: Owned<HeapRef>,
}

impl Clone for SharedHeap {
    /// Another handle to the same heap, owned by the running task. Panics in a task that does not
    /// own `self` (naming the heap and its owner).
    fn clone(&self) -> SharedHeap {
        let (inner, template) = self.obj.with(|h| (h.inner.clone(), h.template.clone()));
        SharedHeap {
            alloc: self.alloc,
            capacity: self.capacity,
            obj: Owned::new(HeapRef { inner, template }),
        }
    }
}

impl crate::handle::sealed::Sealed for SharedHeap {}

impl Give for SharedHeap {
    fn give_to(&self, task: u64) {
        self.obj.give_to(task);
    }
}

/// Which shared heap to allocate in: plain data, `Copy` and `Send`, usable from any task that
/// attaches the heap's template. Give it to [`SharedVec::new_in`], [`SharedBox::new_in`] or
/// [`SharedMap::new_in`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedAlloc {
    id: u64,
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
        let _k = crate::mm::ctx::kernel();
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
        let backing: alloc::vec::Vec<_> = (0..pages as u64)
            .map(|i| x86_64::PhysAddr::new((first as u64 + i) * PAGE_SIZE))
            .collect();
        let template = match TemplateBuilder::new()
            .frames_region(name, start, Kind::Shared, backing)
            .and_then(|b| b.seal())
        {
            Ok(t) => t.engine(),
            Err(e) => {
                for p in first..first + pages {
                    frames().dec_ref(p);
                }
                return Err(e);
            }
        };
        let id = NEXT_HEAP.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        crate::space::mark_typed(first, pages);
        let inner = Arc::new(Inner {
            id,
            va: start,
            len,
            dm,
            first_pfn: first,
            talc: IrqMutex::new(talc),
            roots: IrqMutex::new(BTreeMap::new()),
            template: template.clone(),
        });
        HEAPS.lock().insert(id, Arc::downgrade(&inner));
        Ok(SharedHeap {
            alloc: SharedAlloc { id },
            capacity: len,
            obj: Owned::new(HeapRef { inner, template }),
        })
    }

    /// The template to attach (with [`crate::task::spawn`]) in every task that uses the heap (a
    /// new reference to it; the heap's handle keeps its own). Panics in a task that does not own
    /// the heap, naming it and its owner.
    ///
    /// ```no_run
    /// let heap = libos::shared::SharedHeap::new("results", 0x2_0000_0000, 1 << 20).expect("memory");
    /// let h = libos::task::spawn(&[&heap.template()], || 0).expect("spawn");
    /// ```
    pub fn template(&self) -> Template {
        let _k = crate::mm::ctx::kernel();
        Template::from_engine(self.obj.with(|h| h.template.clone()))
    }

    /// Which heap to allocate in, for the shared collections. Only tasks that attach
    /// [`template`](SharedHeap::template) may touch (or drop) what they allocate in it.
    ///
    /// ```no_run
    /// use libos::shared::{SharedHeap, SharedVec};
    /// let heap = SharedHeap::new("kv", 0x2_0000_0000, 1 << 20).expect("memory");
    /// let v: SharedVec<u64> = SharedVec::new_in(heap.allocator()); // empty: no memory yet
    /// ```
    pub fn allocator(&self) -> SharedAlloc {
        self.alloc
    }

    /// Allocation statistics.
    ///
    /// ```no_run
    /// let heap = libos::shared::SharedHeap::new("results", 0x2_0000_0000, 1 << 20).expect("memory");
    /// assert_eq!(heap.stats().allocation_count, 0);
    /// ```
    pub fn stats(&self) -> SharedStats {
        let _k = crate::mm::ctx::kernel();
        let (allocated_bytes, allocation_count) = heap(self.alloc.id).map_or((0, 0), |h| {
            let t = h.talc.lock();
            let c = t.counters();
            (c.allocated_bytes, c.allocation_count)
        });
        SharedStats {
            allocated_bytes,
            allocation_count,
            capacity: self.capacity as usize,
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

/// What the shared collections allocate with (crate-private, so that only [`ShareSafe`] values
/// are ever stored in a shared heap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawAlloc(SharedAlloc);

// SAFETY: `allocate` hands out disjoint blocks from talc (which owns the region) at the task-side
// addresses of the same bytes; `deallocate` gives them back; blocks stay valid until deallocated
// or the heap is gone (then `allocate` fails and `deallocate` does nothing). Copies of the
// allocator name the same heap, so a block may be freed through any of them.
unsafe impl Allocator for RawAlloc {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            let p = NonNull::new(layout.align() as *mut u8).ok_or(AllocError)?;
            return Ok(NonNull::slice_from_raw_parts(p, 0));
        }
        let inner = heap(self.0.id).ok_or(AllocError)?;
        // SAFETY: layout has a non-zero size.
        let dm = unsafe { inner.talc.lock().allocate(layout) }.ok_or(AllocError)?;
        let p = NonNull::new(inner.to_task(dm.as_ptr())).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        let Some(inner) = heap(self.0.id) else {
            return; // the heap is gone, and its memory with it
        };
        // SAFETY: the caller passes a block this allocator returned, with its layout.
        unsafe {
            inner
                .talc
                .lock()
                .deallocate(inner.to_dm(ptr.as_ptr()), layout)
        }
    }
}

/// Values that may live in a shared heap: valid in every task that attaches it, so plain data
/// with no pointer into one task's memory. Implemented for every [`IntoBytes`] type (plain data
/// without pointers or padding; derive it with `zerocopy`), for the shared collections, whose
/// pointers lead only into a shared heap and are checked before every use, and for structs
/// declared with [`share_safe!`](crate::share_safe) (every field `ShareSafe`).
///
/// # Safety
///
/// A type may implement it only if none of its values holds a pointer (or reference) to memory
/// other than a shared heap, and every use of such a pointer is preceded by the check that the
/// running task maps that heap (as the shared collections do).
pub unsafe trait ShareSafe {}

// SAFETY: `IntoBytes` types are plain bytes: zerocopy implements it for no pointer or reference
// type, and its derive refuses fields that are not `IntoBytes`.
unsafe impl<T: IntoBytes> ShareSafe for T {}
// SAFETY: the vector's buffer is in its shared heap, its elements are `ShareSafe`, and every
// method checks that the running task maps the heap.
unsafe impl<T: ShareSafe> ShareSafe for SharedVec<T> {}
// SAFETY: as for `SharedVec`: the value is in the box's shared heap, checked before every use.
unsafe impl<T: ShareSafe> ShareSafe for SharedBox<T> {}
// SAFETY: the table is in its shared heap (checked before every use), keys and values are
// `ShareSafe`, and the hasher is a fixed seed (plain data).
unsafe impl<K: ShareSafe, V: ShareSafe> ShareSafe for SharedMap<K, V> {}
// SAFETY: plain data (which heap, which value), no pointer.
unsafe impl<T: ShareSafe> ShareSafe for Shared<T> {}
// SAFETY: plain data (which heap), no pointer.
unsafe impl ShareSafe for SharedAlloc {}

/// Declares a struct that may live in a shared heap: every field must be [`ShareSafe`] (checked
/// at compile time), and the struct is then `ShareSafe` itself, so it can be a [`Shared`] value
/// or an element of a shared collection — several collections and counters behind one lock.
/// Plain structs only (no generics, no tuple structs).
///
/// ```no_run
/// use libos::shared::{Shared, SharedHeap, SharedMap, SharedVec};
/// libos::share_safe! {
///     /// What the workers share.
///     pub struct Board {
///         pub words: SharedMap<SharedVec<u8>, u64>,
///         pub total: u64,
///     }
/// }
/// let heap = SharedHeap::new("board", 0x2_0000_0000, 1 << 20).expect("memory");
/// let a = heap.allocator();
/// let board = Shared::new_in(Board { words: SharedMap::new_in(a), total: 0 }, a);
/// ```
///
/// A field that is not `ShareSafe` does not compile:
///
/// ```compile_fail,E0277
/// libos::share_safe! {
///     struct Bad { name: alloc::string::String }
/// }
/// ```
#[macro_export]
macro_rules! share_safe {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field : $ty ),*
        }
        const _: fn() = || {
            fn share_safe<T: $crate::shared::ShareSafe>() {}
            $( share_safe::<$ty>(); )*
        };
        // SAFETY: every field is `ShareSafe` (checked just above), so the struct holds no
        // pointer but theirs.
        unsafe impl $crate::shared::ShareSafe for $name {}
    };
}

/// Makes a type neither `Send` nor `Sync`: a shared collection value is owned by the task whose
/// memory holds it (see the module docs).
type Local = core::marker::PhantomData<*const ()>;

/// A vector in a shared heap (an `allocator_api2` vector). Neither `Send` nor `Sync`: share one
/// through a [`Shared`]. Its elements are reached through closures ([`with`](Self::with),
/// [`with_mut`](Self::with_mut)) or copied out ([`get`](Self::get)): no reference into the heap
/// outlives the call (see the module docs). Every use panics in a task that does not map its
/// heap.
///
/// ```no_run
/// use libos::shared::{SharedHeap, SharedVec};
/// let heap = SharedHeap::new("v", 0x2_0000_0000, 1 << 20).expect("memory");
/// let t = heap.template();
/// let alloc = heap.allocator();
/// let h = libos::task::spawn(&[&t], move || {
///     let mut v = SharedVec::new_in(alloc);
///     v.try_reserve(2).expect("room");
///     v.extend_from_slice(&[1u64, 2]);
///     v.with(|s| s.iter().sum::<u64>()) as i32
/// });
/// ```
pub struct SharedVec<T: ShareSafe> {
    v: core::mem::ManuallyDrop<allocator_api2::vec::Vec<T, RawAlloc>>,
    _local: Local,
}

impl<T: ShareSafe> SharedVec<T> {
    /// An empty vector (allocates nothing yet).
    pub fn new_in(alloc: SharedAlloc) -> Self {
        SharedVec {
            v: core::mem::ManuallyDrop::new(allocator_api2::vec::Vec::new_in(RawAlloc(alloc))),
            _local: core::marker::PhantomData,
        }
    }

    /// An empty vector with room for `n` elements (allocated, not touched: any task may make
    /// one). Panics if the heap has no room (see [`try_reserve`](Self::try_reserve)).
    pub fn with_capacity_in(n: usize, alloc: SharedAlloc) -> Self {
        SharedVec {
            v: core::mem::ManuallyDrop::new(allocator_api2::vec::Vec::with_capacity_in(
                n,
                RawAlloc(alloc),
            )),
            _local: core::marker::PhantomData,
        }
    }

    /// The vector, after checking that the running task maps its heap.
    #[track_caller]
    fn get_ref(&self) -> &allocator_api2::vec::Vec<T, RawAlloc> {
        usable(self.v.allocator().0);
        &self.v
    }

    /// The vector, to change, after the same check.
    #[track_caller]
    fn get_mut_ref(&mut self) -> &mut allocator_api2::vec::Vec<T, RawAlloc> {
        usable(self.v.allocator().0);
        &mut self.v
    }

    /// Runs `f` on the elements. The slice lives only for the call.
    #[track_caller]
    pub fn with<R>(&self, f: impl FnOnce(&[T]) -> R) -> R {
        f(self.get_ref())
    }

    /// Runs `f` on the elements, to change them. The slice lives only for the call.
    #[track_caller]
    pub fn with_mut<R>(&mut self, f: impl FnOnce(&mut [T]) -> R) -> R {
        f(self.get_mut_ref())
    }

    /// A copy of element `i`.
    #[track_caller]
    pub fn get(&self, i: usize) -> Option<T>
    where
        T: Copy,
    {
        self.get_ref().get(i).copied()
    }

    /// Replaces element `i` with `v`, returning the old one (`Err(v)` if `i` is out of range).
    #[track_caller]
    pub fn replace(&mut self, i: usize, v: T) -> Result<T, T> {
        match self.get_mut_ref().get_mut(i) {
            Some(slot) => Ok(core::mem::replace(slot, v)),
            None => Err(v),
        }
    }

    /// Makes room for `n` more elements, or says the heap has none.
    #[track_caller]
    pub fn try_reserve(
        &mut self,
        n: usize,
    ) -> Result<(), allocator_api2::collections::TryReserveError> {
        self.get_mut_ref().try_reserve(n)
    }

    /// Makes room for exactly `n` more elements, or says the heap has none.
    #[track_caller]
    pub fn try_reserve_exact(
        &mut self,
        n: usize,
    ) -> Result<(), allocator_api2::collections::TryReserveError> {
        self.get_mut_ref().try_reserve_exact(n)
    }

    /// Appends `v` (panics if the heap has no room: reserve first to get an error instead).
    #[track_caller]
    pub fn push(&mut self, v: T) {
        self.get_mut_ref().push(v);
    }

    /// Removes the last element.
    #[track_caller]
    pub fn pop(&mut self) -> Option<T> {
        self.get_mut_ref().pop()
    }

    /// Removes every element.
    #[track_caller]
    pub fn clear(&mut self) {
        self.get_mut_ref().clear();
    }

    /// Shortens the vector to `n` elements (dropping the rest).
    #[track_caller]
    pub fn truncate(&mut self, n: usize) {
        self.get_mut_ref().truncate(n);
    }

    /// Appends copies of `s` (panics if the heap has no room).
    #[track_caller]
    pub fn extend_from_slice(&mut self, s: &[T])
    where
        T: Clone,
    {
        self.get_mut_ref().extend_from_slice(s);
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.v.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    /// Elements the buffer has room for.
    pub fn capacity(&self) -> usize {
        self.v.capacity()
    }
}

impl<T: ShareSafe> Drop for SharedVec<T> {
    fn drop(&mut self) {
        // In a task that does not map the heap (or once it is gone) the elements and the buffer
        // are out of reach: left as they are, they go with the heap.
        if mapped_here(self.v.allocator().0.id) {
            // SAFETY: dropped once, here; `self.v` is not used afterwards.
            unsafe { core::mem::ManuallyDrop::drop(&mut self.v) };
        }
    }
}

impl<T: ShareSafe + core::fmt::Debug> core::fmt::Debug for SharedVec<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.get_ref().iter()).finish()
    }
}

impl<T: ShareSafe + PartialEq> PartialEq for SharedVec<T> {
    fn eq(&self, o: &Self) -> bool {
        self.get_ref()[..] == o.get_ref()[..]
    }
}

impl<T: ShareSafe + Eq> Eq for SharedVec<T> {}

impl<T: ShareSafe + PartialEq> PartialEq<[T]> for SharedVec<T> {
    fn eq(&self, o: &[T]) -> bool {
        self.get_ref()[..] == *o
    }
}

impl<T: ShareSafe + Hash> Hash for SharedVec<T> {
    /// Hashes like the slice, so a map keyed by `SharedVec<T>` can be searched with a `&[T]`.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.get_ref()[..].hash(state);
    }
}

/// A map keyed by `SharedVec<T>` is searched with a `&[T]` (no copy into the heap first).
impl<T: ShareSafe + Eq> hashbrown::Equivalent<SharedVec<T>> for [T] {
    fn equivalent(&self, key: &SharedVec<T>) -> bool {
        key.get_ref()[..] == *self
    }
}

/// A value in a shared heap (an `allocator_api2` box). Neither `Send` nor `Sync`: share one
/// through a [`Shared`]. Its value is reached through closures ([`with`](Self::with),
/// [`with_mut`](Self::with_mut)) or copied out ([`get`](Self::get)). Every use panics in a
/// task that does not map its heap.
///
/// ```no_run
/// use libos::shared::{SharedBox, SharedHeap};
/// let heap = SharedHeap::new("b", 0x2_0000_0000, 1 << 20).expect("memory");
/// let t = heap.template();
/// let alloc = heap.allocator();
/// let h = libos::task::spawn(&[&t], move || {
///     let mut b = SharedBox::new_in([0u64; 4], alloc);
///     b.with_mut(|a| a[1] = 7);
///     b.with(|a| a.iter().sum::<u64>()) as i32
/// });
/// ```
pub struct SharedBox<T: ShareSafe> {
    b: core::mem::ManuallyDrop<allocator_api2::boxed::Box<T, RawAlloc>>,
    _local: Local,
}

impl<T: ShareSafe> SharedBox<T> {
    /// Moves `v` into the heap (panics if the heap has no room, see
    /// [`try_new_in`](Self::try_new_in), or if the running task does not map it).
    #[track_caller]
    pub fn new_in(v: T, alloc: SharedAlloc) -> Self {
        usable(alloc);
        SharedBox {
            b: core::mem::ManuallyDrop::new(allocator_api2::boxed::Box::new_in(v, RawAlloc(alloc))),
            _local: core::marker::PhantomData,
        }
    }

    /// Moves `v` into the heap, or says it has no room (also when the running task does not map
    /// the heap, or the heap is gone).
    pub fn try_new_in(v: T, alloc: SharedAlloc) -> Result<Self, AllocError> {
        if !mapped_here(alloc.id) {
            return Err(AllocError);
        }
        allocator_api2::boxed::Box::try_new_in(v, RawAlloc(alloc)).map(|b| SharedBox {
            b: core::mem::ManuallyDrop::new(b),
            _local: core::marker::PhantomData,
        })
    }

    fn alloc(&self) -> SharedAlloc {
        allocator_api2::boxed::Box::allocator(&self.b).0
    }

    /// Runs `f` on the value. The reference lives only for the call.
    #[track_caller]
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        usable(self.alloc());
        f(&self.b)
    }

    /// Runs `f` on the value, to change it. The reference lives only for the call.
    #[track_caller]
    pub fn with_mut<R>(&mut self, f: impl FnOnce(&mut T) -> R) -> R {
        usable(self.alloc());
        f(&mut self.b)
    }

    /// A copy of the value.
    #[track_caller]
    pub fn get(&self) -> T
    where
        T: Copy,
    {
        self.with(|v| *v)
    }
}

impl<T: ShareSafe> Drop for SharedBox<T> {
    fn drop(&mut self) {
        // As for `SharedVec`: out of reach here, the value goes with the heap.
        if mapped_here(self.alloc().id) {
            // SAFETY: dropped once, here; `self.b` is not used afterwards.
            unsafe { core::mem::ManuallyDrop::drop(&mut self.b) };
        }
    }
}

impl<T: ShareSafe + core::fmt::Debug> core::fmt::Debug for SharedBox<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.with(|v| v.fmt(f))
    }
}

/// The hasher of every [`SharedMap`]: a fixed seed, so every task (whatever its own statics hold)
/// hashes a key alike.
type SharedHasher = foldhash::fast::FixedState;
const HASH_SEED: u64 = 0x5374_656e_6369_6c00;

/// A hash map in a shared heap (`hashbrown`, table and entries in the heap). Neither `Send` nor
/// `Sync`: share one through a [`Shared`]. Values are copied out ([`get`](Self::get)) or reached
/// through closures ([`get_with`](Self::get_with), [`update`](Self::update),
/// [`for_each`](Self::for_each)): no reference into the heap outlives the call. Every use panics
/// in a task that does not map its heap.
///
/// ```no_run
/// use libos::shared::{SharedHeap, SharedMap};
/// let heap = SharedHeap::new("kv", 0x2_0000_0000, 1 << 20).expect("memory");
/// let t = heap.template();
/// let alloc = heap.allocator();
/// let h = libos::task::spawn(&[&t], move || {
///     let mut m = SharedMap::new_in(alloc);
///     m.try_reserve(1).expect("room");
///     m.insert(1u64, 10u64);
///     m.update(&1, |v| *v += 1);
///     m.get(&1).unwrap_or(0) as i32 // 11
/// });
/// ```
pub struct SharedMap<K: ShareSafe, V: ShareSafe> {
    m: core::mem::ManuallyDrop<hashbrown::HashMap<K, V, SharedHasher, RawAlloc>>,
    _local: Local,
}

impl<K: ShareSafe, V: ShareSafe> SharedMap<K, V> {
    #[track_caller]
    fn get_map(&self) -> &hashbrown::HashMap<K, V, SharedHasher, RawAlloc> {
        usable(self.m.allocator().0);
        &self.m
    }

    #[track_caller]
    fn get_map_mut(&mut self) -> &mut hashbrown::HashMap<K, V, SharedHasher, RawAlloc> {
        usable(self.m.allocator().0);
        &mut self.m
    }
}

impl<K: ShareSafe + Hash + Eq, V: ShareSafe> SharedMap<K, V> {
    /// An empty map (allocates nothing yet).
    pub fn new_in(alloc: SharedAlloc) -> Self {
        SharedMap {
            m: core::mem::ManuallyDrop::new(hashbrown::HashMap::with_hasher_in(
                SharedHasher::with_seed(HASH_SEED),
                RawAlloc(alloc),
            )),
            _local: core::marker::PhantomData,
        }
    }

    /// Makes room for `n` more entries, or says the heap has none.
    #[track_caller]
    pub fn try_reserve(&mut self, n: usize) -> Result<(), hashbrown::TryReserveError> {
        self.get_map_mut().try_reserve(n)
    }

    /// Inserts (panics if the heap has no room: reserve first to get an error instead); returns
    /// the value the key had.
    #[track_caller]
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.get_map_mut().insert(k, v)
    }

    /// A copy of the value of `k` (any form of the key that hashes and compares like it).
    #[track_caller]
    pub fn get<Q: Hash + hashbrown::Equivalent<K> + ?Sized>(&self, k: &Q) -> Option<V>
    where
        V: Copy,
    {
        self.get_map().get(k).copied()
    }

    /// Runs `f` on the value of `k`, if it has one.
    #[track_caller]
    pub fn get_with<Q: Hash + hashbrown::Equivalent<K> + ?Sized, R>(
        &self,
        k: &Q,
        f: impl FnOnce(&V) -> R,
    ) -> Option<R> {
        self.get_map().get(k).map(f)
    }

    /// Runs `f` on the value of `k`, to change it, if it has one.
    #[track_caller]
    pub fn update<Q: Hash + hashbrown::Equivalent<K> + ?Sized, R>(
        &mut self,
        k: &Q,
        f: impl FnOnce(&mut V) -> R,
    ) -> Option<R> {
        self.get_map_mut().get_mut(k).map(f)
    }

    /// True when `k` has a value.
    #[track_caller]
    pub fn contains_key<Q: Hash + hashbrown::Equivalent<K> + ?Sized>(&self, k: &Q) -> bool {
        self.get_map().contains_key(k)
    }

    /// Removes `k`; returns its value.
    #[track_caller]
    pub fn remove<Q: Hash + hashbrown::Equivalent<K> + ?Sized>(&mut self, k: &Q) -> Option<V> {
        self.get_map_mut().remove(k)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.m.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }

    /// Runs `f` on every entry, in no particular order.
    #[track_caller]
    pub fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        for (k, v) in self.get_map() {
            f(k, v);
        }
    }

    /// Runs `f` on every entry, to change the values, in no particular order.
    #[track_caller]
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&K, &mut V)) {
        for (k, v) in self.get_map_mut() {
            f(k, v);
        }
    }

    /// Removes every entry (keeps the table).
    #[track_caller]
    pub fn clear(&mut self) {
        self.get_map_mut().clear();
    }
}

impl<K: ShareSafe, V: ShareSafe> Drop for SharedMap<K, V> {
    fn drop(&mut self) {
        // As for `SharedVec`: out of reach here, the table goes with the heap.
        if mapped_here(self.m.allocator().0.id) {
            // SAFETY: dropped once, here; `self.m` is not used afterwards.
            unsafe { core::mem::ManuallyDrop::drop(&mut self.m) };
        }
    }
}

impl<K: ShareSafe + core::fmt::Debug, V: ShareSafe + core::fmt::Debug> core::fmt::Debug
    for SharedMap<K, V>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_map().entries(self.get_map().iter()).finish()
    }
}

/// Why a [`Shared`] value could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedError {
    /// The heap is gone, or the value was taken out of it ([`Shared::take`]).
    Gone,
    /// The running task does not map the value's heap (spawn it with the heap's template).
    NotMapped {
        /// The heap ([`SharedAlloc`] id).
        heap: u64,
        /// The running task.
        task: u64,
    },
    /// A task ended while holding the lock, so the value may be half-changed: it is no longer
    /// handed out.
    Poisoned {
        /// The task that ended holding it.
        task: u64,
    },
    /// Another task holds the lock ([`Shared::try_with`] only).
    Busy {
        /// The task holding it.
        holder: u64,
    },
    /// The running task holds the lock already (a second `lock` would wait forever).
    AlreadyHeld,
    /// The heap has no room for the value ([`Shared::new_in`]).
    OutOfMemory,
}

impl core::fmt::Display for SharedError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SharedError::Gone => write!(f, "the shared value (or its heap) is gone"),
            SharedError::NotMapped { heap, task } => write!(
                f,
                "task {task} does not map shared heap #{heap} (spawn it with the heap's template)"
            ),
            SharedError::Poisoned { task } => write!(
                f,
                "task {task} ended while holding the shared value's lock: it may be half-changed"
            ),
            SharedError::Busy { holder } => {
                write!(f, "task {holder} holds the shared value's lock")
            }
            SharedError::AlreadyHeld => {
                write!(f, "this task holds the shared value's lock already")
            }
            SharedError::OutOfMemory => write!(f, "the shared heap has no room for the value"),
        }
    }
}

/// Ids of [`Shared`] values, never reused.
static NEXT_ROOT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

/// A value in a shared heap that every task attaching the heap may use, one task at a time:
/// how tasks share on purpose (see the module docs).
///
/// `Shared<T>` is plain data — which heap, which value — so it is `Copy` and `Send` whatever `T`
/// is: capture it in a spawn closure, keep it in a zygote's state, send it through a channel.
/// The value itself stays in the heap until [`take`](Shared::take)n out or the heap goes (then it
/// is not dropped: its memory goes with the heap's).
///
/// ```no_run
/// use core::sync::atomic::AtomicU64;
/// use libos::shared::{Shared, SharedHeap};
/// let heap = SharedHeap::new("hits", 0x2_0000_0000, 1 << 20).expect("memory");
/// let hits = Shared::new_in(0u64, heap.allocator()).map_err(|(e, _)| e).expect("room");
/// let t = heap.template();
/// let h = libos::task::spawn(&[&t], move || {
///     hits.with(|n| *n += 1).expect("attached");
///     0
/// })
/// .expect("spawn");
/// assert_eq!(h.join(), Ok(0));
/// // The main task does not attach the heap: it takes the value out with a child.
/// let h = libos::task::spawn(&[&t], move || hits.take().map_or(-1, |n| n as i32)).expect("spawn");
/// assert_eq!(h.join(), Ok(1));
/// ```
pub struct Shared<T: ShareSafe> {
    heap: u64,
    root: u64,
    _t: core::marker::PhantomData<fn() -> T>,
}

impl<T: ShareSafe> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T: ShareSafe> Copy for Shared<T> {}

impl<T: ShareSafe> PartialEq for Shared<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.heap, self.root) == (o.heap, o.root)
    }
}

impl<T: ShareSafe> Eq for Shared<T> {}

impl<T: ShareSafe> core::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shared")
            .field("heap", &self.heap)
            .field("id", &self.root)
            .finish()
    }
}

impl<T: ShareSafe> Shared<T> {
    /// Moves `value` into the heap of `alloc` (any task may do it, mapping the heap or not). On
    /// an error the value comes back: [`SharedError::Gone`] (no such heap any more) or
    /// [`SharedError::OutOfMemory`].
    pub fn new_in(value: T, alloc: SharedAlloc) -> Result<Shared<T>, (SharedError, T)> {
        let _k = crate::mm::ctx::kernel();
        let Some(inner) = heap(alloc.id) else {
            return Err((SharedError::Gone, value));
        };
        let layout = Layout::new::<T>();
        let va = if layout.size() == 0 {
            layout.align() as u64
        } else {
            // SAFETY: the layout has a non-zero size.
            let Some(dm) = (unsafe { inner.talc.lock().allocate(layout) }) else {
                return Err((SharedError::OutOfMemory, value));
            };
            // SAFETY: a fresh block of `T`'s layout in the heap, reached through the direct map
            // (the same bytes as at `to_task(dm)` in every task that maps the heap).
            unsafe { dm.as_ptr().cast::<T>().write(value) };
            inner.to_task(dm.as_ptr()) as u64
        };
        let root = NEXT_ROOT.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        inner.roots.lock().insert(
            root,
            Root {
                va,
                layout,
                holder: None,
                poisoned_by: None,
            },
        );
        Ok(Shared {
            heap: alloc.id,
            root,
            _t: core::marker::PhantomData,
        })
    }

    /// Runs `f` on the value, with the value's lock held by the running task; waits (yielding to
    /// the others) while another task holds it. The reference lives only for the call (it cannot
    /// be kept: see the module docs). While `f` runs the task cannot be killed (a kill waits for
    /// `f` to return); if the task ends inside `f` (a panic, a fault, `task::exit`) the value is
    /// poisoned. Errors, before `f` runs: [`SharedError::Gone`], [`SharedError::NotMapped`],
    /// [`SharedError::Poisoned`], [`SharedError::AlreadyHeld`] (a `with` of the same value
    /// inside `f`).
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, SharedError> {
        let ptr = loop {
            match self.acquire()? {
                Ok(p) => break p,
                Err(_) => crate::task::yield_now(),
            }
        };
        Ok(self.run(ptr, f))
    }

    /// [`with`](Self::with) that does not wait: [`SharedError::Busy`] names the holder.
    pub fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, SharedError> {
        let ptr = self
            .acquire()?
            .map_err(|holder| SharedError::Busy { holder })?;
        Ok(self.run(ptr, f))
    }

    /// Runs `f` on the value at `ptr`, whose lock the running task holds, then lets it go (and
    /// carries out a kill that waited).
    fn run<R>(&self, ptr: *mut T, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: the value is initialised at `ptr`, in the heap, which this task maps (checked
        // by `acquire`: it attached the heap's template, and a task's templates do not change
        // while it lives), and the lock keeps every other task away from it until `release`;
        // `f` cannot keep the reference (it is only for the call: `for<'a> FnOnce(&'a mut T)`),
        // and a second `with` of the value inside `f` is refused (`AlreadyHeld`).
        let r = f(unsafe { &mut *ptr });
        self.release();
        r
    }

    /// One attempt: the value's address with the lock now held, or the task that holds it.
    fn acquire(&self) -> Result<Result<*mut T, u64>, SharedError> {
        let _k = crate::mm::ctx::kernel();
        let me = crate::arch::cpu::running_task();
        let inner = heap(self.heap).ok_or(SharedError::Gone)?;
        if !mapped_here(self.heap) {
            return Err(SharedError::NotMapped {
                heap: self.heap,
                task: me,
            });
        }
        crate::arch::irq::without(|tok| {
            let mut roots = inner.roots.lock();
            let r = roots.get_mut(&self.root).ok_or(SharedError::Gone)?;
            if let Some(task) = r.poisoned_by {
                return Err(SharedError::Poisoned { task });
            }
            match r.holder {
                None => {
                    // Taken and made unkillable at once (interrupts are off): a task that holds
                    // a lock is always in a no-kill section, which is how a waiter tells that a
                    // holder has ended.
                    r.holder = Some(me);
                    crate::task::enter_no_kill(tok);
                    Ok(Ok(r.va as *mut T))
                }
                Some(h) if h == me => Err(SharedError::AlreadyHeld),
                Some(h) if !crate::task::in_no_kill(h) => {
                    r.holder = None;
                    r.poisoned_by = Some(h);
                    Err(SharedError::Poisoned { task: h })
                }
                Some(h) => Ok(Err(h)),
            }
        })
    }

    /// Lets the lock go (the running task holds it), then leaves the no-kill section: a kill
    /// that came meanwhile ends the task here.
    fn release(&self) {
        {
            let _k = crate::mm::ctx::kernel();
            let me = crate::arch::cpu::running_task();
            if let Some(inner) = heap(self.heap)
                && let Some(r) = inner.roots.lock().get_mut(&self.root)
                && r.holder == Some(me)
            {
                r.holder = None;
            }
        }
        crate::task::leave_no_kill();
    }

    /// Takes the value out of the heap into the running task (waiting for the lock as
    /// [`with`](Self::with) does, with its errors); afterwards every copy of this `Shared`
    /// answers [`SharedError::Gone`].
    pub fn take(self) -> Result<T, SharedError> {
        let ptr = loop {
            match self.acquire()? {
                Ok(p) => break p,
                Err(_) => crate::task::yield_now(),
            }
        };
        // SAFETY: the lock gives this task exclusive access to the initialised value at `ptr`
        // (mapped here); it is read out once, and the record is removed below so that nothing
        // reaches the block again.
        let value = unsafe { ptr.read() };
        {
            let _k = crate::mm::ctx::kernel();
            if let Some(inner) = heap(self.heap) {
                let root = inner.roots.lock().remove(&self.root);
                if let Some(r) = root
                    && r.layout.size() != 0
                {
                    // SAFETY: the block `new_in` allocated with this layout, at the task-side
                    // address `r.va`, freed once (its record is gone).
                    unsafe {
                        inner
                            .talc
                            .lock()
                            .deallocate(inner.to_dm(r.va as *mut u8), r.layout)
                    };
                }
            }
        }
        // A kill that came while the lock was held ends the task here (the value, now in this
        // task's memory, goes with it).
        crate::task::leave_no_kill();
        Ok(value)
    }
}
