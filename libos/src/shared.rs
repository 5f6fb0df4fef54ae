//! Shared heaps: memory that every task attached to a template can allocate from, read and
//! write — results, counters, a shared hash map.
//!
//! A [`SharedHeap`] is a `Shared` template region backed by physically contiguous frames.
//! Objects live at the region's lower-half addresses, the same in every task that attaches the
//! heap's [`template`](SharedHeap::template); a task that does not attach it faults on access
//! (and only that task ends). The allocator's bookkeeping is done through the kernel's direct map
//! of the same frames, so allocating and freeing work from any task.
//!
//! **Typed sharing.** Whatever goes into a shared heap is read by other tasks, in other address
//! spaces: it must be plain data with no pointer into one task's private memory. The heap holds
//! only [`ShareSafe`] values: every type with `zerocopy`'s [`IntoBytes`] (plain data without
//! pointers or padding: integers, arrays, atomics, `#[derive(IntoBytes)]` structs), and the
//! shared collections, which point only into their own shared heap: [`SharedVec`],
//! [`SharedBox`] and [`SharedMap`] (a `hashbrown` map with a fixed-seed hasher, so every task
//! hashes alike). A `Box`, `Vec`, `String` or reference does not compile:
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
//! **Ownership.** A [`SharedHeap`] is a handle ([`crate::handle::Owned`]) owned by the task that
//! made it: its drop there (or that task's end) releases the heap; a forked copy's drop does
//! nothing; [`Give`] hands it to a child. A [`SharedAlloc`] is plain data (which heap), freely
//! copied and usable from any task; once the heap is gone, allocating with it fails and freeing
//! does nothing. The memory stays mapped in tasks that attached the template until they end.
//!
//! ```no_run
//! use libos::shared::{SharedHeap, SharedVec};
//! let heap = SharedHeap::new("results", 0x2_0000_0000, 1 << 20).expect("memory");
//! let alloc = heap.allocator();
//! let t = heap.template();
//! let h = libos::task::spawn(&[&t], move || {
//!     let mut v = SharedVec::new_in(alloc);
//!     v.push(7u32);
//!     core::mem::forget(v); // left in the shared heap for others to read
//!     0
//! });
//! ```

use alloc::collections::BTreeMap;
use alloc::sync::{Arc, Weak};
use core::alloc::Layout;
use core::hash::{Hash, Hasher};
use core::ops::{Deref, DerefMut};
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
        for p in self.first_pfn..self.first_pfn + (self.len / PAGE_SIZE) as usize {
            frames().dec_ref(p);
        }
    }
}

/// Every live heap by [`SharedAlloc`] id (ids are never reused), and the next id.
static HEAPS: IrqMutex<BTreeMap<u64, Weak<Inner>>> = IrqMutex::new(BTreeMap::new());
static NEXT_HEAP: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

/// The heap `id`, if it still exists.
fn heap(id: u64) -> Option<Arc<Inner>> {
    let weak = HEAPS.lock().get(&id).cloned()?;
    // Upgraded (and the `Arc` possibly dropped, which takes `HEAPS` again) outside the lock.
    weak.upgrade()
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
        let id = NEXT_HEAP.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        let inner = Arc::new(Inner {
            id,
            va: start,
            len,
            dm,
            first_pfn: first,
            talc: IrqMutex::new(talc),
        });
        let backing: alloc::vec::Vec<_> = (0..pages as u64)
            .map(|i| x86_64::PhysAddr::new((first as u64 + i) * PAGE_SIZE))
            .collect();
        HEAPS.lock().insert(id, Arc::downgrade(&inner));
        let template = TemplateBuilder::new()
            .frames_region(name, start, Kind::Shared, backing)?
            .seal()?
            .engine();
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
/// without pointers or padding; derive it with `zerocopy`), and for the shared collections, whose
/// pointers lead only into their own shared heap.
///
/// # Safety
///
/// A type may implement it only if none of its values holds a pointer (or reference) to memory
/// other than a shared heap that every task using the value attaches.
pub unsafe trait ShareSafe {}

// SAFETY: `IntoBytes` types are plain bytes: zerocopy implements it for no pointer or reference
// type, and its derive refuses fields that are not `IntoBytes`.
unsafe impl<T: IntoBytes> ShareSafe for T {}
// SAFETY: the vector's buffer is in its shared heap, and its elements are `ShareSafe`.
unsafe impl<T: ShareSafe> ShareSafe for SharedVec<T> {}
// SAFETY: the box's value is in its shared heap and is `ShareSafe`.
unsafe impl<T: ShareSafe> ShareSafe for SharedBox<T> {}
// SAFETY: the table is in its shared heap, keys and values are `ShareSafe`, and the hasher is a
// fixed seed (plain data).
unsafe impl<K: ShareSafe, V: ShareSafe> ShareSafe for SharedMap<K, V> {}

/// A vector in a shared heap (an `allocator_api2` vector). Dereferences to a slice.
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
///     v.iter().sum::<u64>() as i32
/// });
/// ```
pub struct SharedVec<T: ShareSafe>(allocator_api2::vec::Vec<T, RawAlloc>);

impl<T: ShareSafe> SharedVec<T> {
    /// An empty vector (allocates nothing yet).
    pub fn new_in(alloc: SharedAlloc) -> Self {
        SharedVec(allocator_api2::vec::Vec::new_in(RawAlloc(alloc)))
    }

    /// An empty vector with room for `n` elements. Panics if the heap has no room (see
    /// [`try_reserve`](Self::try_reserve)).
    pub fn with_capacity_in(n: usize, alloc: SharedAlloc) -> Self {
        SharedVec(allocator_api2::vec::Vec::with_capacity_in(
            n,
            RawAlloc(alloc),
        ))
    }

    /// Makes room for `n` more elements, or says the heap has none.
    pub fn try_reserve(
        &mut self,
        n: usize,
    ) -> Result<(), allocator_api2::collections::TryReserveError> {
        self.0.try_reserve(n)
    }

    /// Makes room for exactly `n` more elements, or says the heap has none.
    pub fn try_reserve_exact(
        &mut self,
        n: usize,
    ) -> Result<(), allocator_api2::collections::TryReserveError> {
        self.0.try_reserve_exact(n)
    }

    /// Appends `v` (panics if the heap has no room: reserve first to get an error instead).
    pub fn push(&mut self, v: T) {
        self.0.push(v);
    }

    /// Removes the last element.
    pub fn pop(&mut self) -> Option<T> {
        self.0.pop()
    }

    /// Removes every element.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Appends copies of `s` (panics if the heap has no room).
    pub fn extend_from_slice(&mut self, s: &[T])
    where
        T: Clone,
    {
        self.0.extend_from_slice(s);
    }

    /// Elements the buffer has room for.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

impl<T: ShareSafe> Deref for SharedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: ShareSafe> DerefMut for SharedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

impl<T: ShareSafe> core::borrow::Borrow<[T]> for SharedVec<T> {
    fn borrow(&self) -> &[T] {
        &self.0
    }
}

impl<T: ShareSafe + core::fmt::Debug> core::fmt::Debug for SharedVec<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl<T: ShareSafe + PartialEq> PartialEq for SharedVec<T> {
    fn eq(&self, o: &Self) -> bool {
        self.0[..] == o.0[..]
    }
}

impl<T: ShareSafe + Eq> Eq for SharedVec<T> {}

impl<T: ShareSafe + Hash> Hash for SharedVec<T> {
    /// Hashes like the slice, so a map keyed by `SharedVec<T>` can be searched with a `&[T]`.
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0[..].hash(state);
    }
}

/// A value in a shared heap (an `allocator_api2` box).
///
/// ```no_run
/// use core::sync::atomic::{AtomicU64, Ordering};
/// use libos::shared::{SharedBox, SharedHeap};
/// let heap = SharedHeap::new("b", 0x2_0000_0000, 1 << 20).expect("memory");
/// let t = heap.template();
/// let alloc = heap.allocator();
/// let h = libos::task::spawn(&[&t], move || {
///     let hits = SharedBox::new_in(AtomicU64::new(0), alloc);
///     hits.fetch_add(1, Ordering::Relaxed) as i32
/// });
/// ```
pub struct SharedBox<T: ShareSafe>(allocator_api2::boxed::Box<T, RawAlloc>);

impl<T: ShareSafe> SharedBox<T> {
    /// Moves `v` into the heap (panics if the heap has no room: see
    /// [`try_new_in`](Self::try_new_in)).
    pub fn new_in(v: T, alloc: SharedAlloc) -> Self {
        SharedBox(allocator_api2::boxed::Box::new_in(v, RawAlloc(alloc)))
    }

    /// Moves `v` into the heap, or says it has no room.
    pub fn try_new_in(v: T, alloc: SharedAlloc) -> Result<Self, AllocError> {
        allocator_api2::boxed::Box::try_new_in(v, RawAlloc(alloc)).map(SharedBox)
    }
}

impl<T: ShareSafe> Deref for SharedBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: ShareSafe> DerefMut for SharedBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: ShareSafe + core::fmt::Debug> core::fmt::Debug for SharedBox<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        (**self).fmt(f)
    }
}

/// The hasher of every [`SharedMap`]: a fixed seed, so every task (whatever its own statics hold)
/// hashes a key alike.
type SharedHasher = foldhash::fast::FixedState;
const HASH_SEED: u64 = 0x5374_656e_6369_6c00;

/// A hash map in a shared heap (`hashbrown`, table and entries in the heap).
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
///     m.get(&1).copied().unwrap_or(0) as i32
/// });
/// ```
pub struct SharedMap<K: ShareSafe, V: ShareSafe>(hashbrown::HashMap<K, V, SharedHasher, RawAlloc>);

impl<K: ShareSafe + Hash + Eq, V: ShareSafe> SharedMap<K, V> {
    /// An empty map (allocates nothing yet).
    pub fn new_in(alloc: SharedAlloc) -> Self {
        SharedMap(hashbrown::HashMap::with_hasher_in(
            SharedHasher::with_seed(HASH_SEED),
            RawAlloc(alloc),
        ))
    }

    /// Makes room for `n` more entries, or says the heap has none.
    pub fn try_reserve(&mut self, n: usize) -> Result<(), hashbrown::TryReserveError> {
        self.0.try_reserve(n)
    }

    /// Inserts (panics if the heap has no room: reserve first to get an error instead); returns
    /// the value the key had.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.0.insert(k, v)
    }

    /// The value of `k` (any form of the key that hashes and compares like it).
    pub fn get<Q: Hash + hashbrown::Equivalent<K> + ?Sized>(&self, k: &Q) -> Option<&V> {
        self.0.get(k)
    }

    /// The value of `k`, to change.
    pub fn get_mut<Q: Hash + hashbrown::Equivalent<K> + ?Sized>(
        &mut self,
        k: &Q,
    ) -> Option<&mut V> {
        self.0.get_mut(k)
    }

    /// True when `k` has a value.
    pub fn contains_key<Q: Hash + hashbrown::Equivalent<K> + ?Sized>(&self, k: &Q) -> bool {
        self.0.contains_key(k)
    }

    /// Removes `k`; returns its value.
    pub fn remove<Q: Hash + hashbrown::Equivalent<K> + ?Sized>(&mut self, k: &Q) -> Option<V> {
        self.0.remove(k)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> hashbrown::hash_map::Iter<'_, K, V> {
        self.0.iter()
    }

    /// Removes every entry (keeps the table).
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

impl<K: ShareSafe + core::fmt::Debug, V: ShareSafe + core::fmt::Debug> core::fmt::Debug
    for SharedMap<K, V>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}
