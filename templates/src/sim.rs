//! Host-side simulation: a [`PhysMem`] over ordinary heap memory with a frame budget and
//! allocation-failure injection, and a software MMU that translates through the tables as an
//! x86_64 CPU in ring 0 with `CR0.WP = 1` and `EFER.NXE = 1` does.
//!
//! Used by the tests and the benchmark; compiled everywhere (it needs only `alloc`), never used
//! by the kernel.

use crate::entry;
use crate::half::{KernelHalf, KernelHalfId};
use crate::mem::PhysMem;
use crate::space::Access;
use crate::walk::raw;
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use x86_64::PhysAddr;
use x86_64::structures::paging::{PageTableFlags, PhysFrame, Size2MiB};

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// Frame numbers start here (2 MiB), so physical address 0 is never handed out.
const BASE: u64 = 512;
const POISON: u8 = 0xA5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Free,
    Single,
    HugeHead,
    HugeTail,
}

struct Inner {
    capacity: usize,
    pages: Vec<Cell<*mut Page>>,
    counts: Vec<Cell<u32>>,
    state: Vec<Cell<State>>,
    poison: bool,
    book: RefCell<Book>,
    /// `frame_ptr` calls: the engine's reads and writes of tables (one per entry, or one per
    /// table for a loop over its entries) and of data frames.
    accesses: Cell<u64>,
    /// `inc_ref` calls.
    inc_refs: Cell<u64>,
}

struct Book {
    budget: usize,
    in_use: usize,
    bump: usize,
    free: Vec<usize>,
    free_huge: Vec<usize>,
    allocs: u64,
    fail_at: Option<u64>,
    /// Roots of dropped spaces kept for reuse (`keep_root`), with their kernel half's identity.
    roots: Vec<(PhysFrame, KernelHalfId)>,
    /// How many roots `keep_root` keeps at most (0: none, the default).
    roots_max: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for p in &self.pages {
            let p = p.get();
            if !p.is_null() {
                // SAFETY: every non-null pointer came from `Box::into_raw` in `page_ptr` and is
                // freed exactly once, here.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

/// Simulated physical memory: a cheap `Clone` handle (an `Rc`), single-threaded.
///
/// Frames are allocated lazily on the heap; freed frames are reused. Fresh frames are filled
/// with `0xA5` (unless poisoning is off) so a missing zeroing shows up in tests, and
/// `frame_ptr` panics on a frame that is not allocated (a use-after-free in the engine).
#[derive(Clone)]
pub struct SimMem {
    inner: Rc<Inner>,
}

impl core::fmt::Debug for SimMem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let b = self.inner.book.borrow();
        write!(f, "SimMem {{ in_use: {}, budget: {} }}", b.in_use, b.budget)
    }
}

impl SimMem {
    /// At most `budget` frames in use at once; fresh frames poisoned.
    pub fn new(budget: usize) -> Self {
        Self::with_poison(budget, true)
    }

    /// As [`new`](Self::new), choosing whether fresh frames are poisoned (benchmarks: off).
    pub fn with_poison(budget: usize, poison: bool) -> Self {
        // Room for alignment waste of 2 MiB runs.
        let capacity = budget + budget / 2 + 4096;
        let inner = Inner {
            capacity,
            pages: (0..capacity)
                .map(|_| Cell::new(core::ptr::null_mut()))
                .collect(),
            counts: (0..capacity).map(|_| Cell::new(0)).collect(),
            state: (0..capacity).map(|_| Cell::new(State::Free)).collect(),
            poison,
            book: RefCell::new(Book {
                budget,
                in_use: 0,
                bump: 0,
                free: Vec::new(),
                free_huge: Vec::new(),
                allocs: 0,
                fail_at: None,
                roots: Vec::new(),
                roots_max: 0,
            }),
            accesses: Cell::new(0),
            inc_refs: Cell::new(0),
        };
        SimMem {
            inner: Rc::new(inner),
        }
    }

    /// Frames in use (a 2 MiB run counts 512).
    pub fn frames_in_use(&self) -> usize {
        self.inner.book.borrow().in_use
    }

    /// Change the budget (frames in use may exceed it; allocation then fails).
    pub fn set_budget(&self, budget: usize) {
        self.inner.book.borrow_mut().budget = budget;
    }

    /// Keep up to `max` roots of dropped spaces for reuse (`PhysMem::keep_root` /
    /// `reuse_root`, as libos does); 0 (the default) keeps none. Kept roots stay allocated
    /// (count 1): see [`kept_roots`](Self::kept_roots) and [`trim_roots`](Self::trim_roots).
    pub fn keep_roots(&self, max: usize) {
        self.inner.book.borrow_mut().roots_max = max;
    }

    /// The roots kept for reuse now.
    pub fn kept_roots(&self) -> Vec<PhysFrame> {
        self.inner.book.borrow().roots.iter().map(|r| r.0).collect()
    }

    /// Frees every kept root.
    pub fn trim_roots(&self) {
        let roots = core::mem::take(&mut self.inner.book.borrow_mut().roots);
        for (r, _) in roots {
            self.dec_ref(r);
        }
    }

    /// Make the `n`-th allocation from now (1-based) fail, once. `None` cancels.
    pub fn fail_nth_alloc(&self, n: Option<u64>) {
        let mut b = self.inner.book.borrow_mut();
        b.fail_at = n.map(|n| b.allocs + n);
    }

    /// Allocation attempts so far (4 KiB and 2 MiB alike).
    pub fn alloc_count(&self) -> u64 {
        self.inner.book.borrow().allocs
    }

    /// `frame_ptr` calls so far: a measure of the engine's work on tables. Each entry read or
    /// written on its own counts one; a loop over a table's entries (`raw::entries`, a fill, a
    /// 4 KiB copy) counts one per table or frame; the simulation's own reads (`words`,
    /// `checksum`, `read`, `write`, the software MMU) count too.
    pub fn frame_accesses(&self) -> u64 {
        self.inner.accesses.get()
    }

    /// `inc_ref` calls so far (references taken to frames that already had one).
    pub fn inc_ref_count(&self) -> u64 {
        self.inner.inc_refs.get()
    }

    /// Every allocated frame (heads only for 2 MiB runs) with its count.
    pub fn allocated(&self) -> Vec<(PhysFrame, u32)> {
        let mut v = Vec::new();
        let bump = self.inner.book.borrow().bump;
        for (i, s) in self.inner.state[..bump].iter().enumerate() {
            if matches!(s.get(), State::Single | State::HugeHead) {
                v.push((frame(i), self.inner.counts[i].get()));
            }
        }
        v
    }

    /// Is `frame` the head of a 2 MiB run?
    pub fn is_huge(&self, f: PhysFrame) -> bool {
        self.inner.state.get(idx(f)).map(|s| s.get()) == Some(State::HugeHead)
    }

    /// Read bytes of a frame.
    pub fn read(&self, f: PhysFrame, offset: usize, buf: &mut [u8]) {
        raw::read_bytes(self, f, offset, buf)
    }

    /// Write bytes of a frame (tests: fill "image" frames).
    pub fn write(&self, f: PhysFrame, offset: usize, data: &[u8]) {
        raw::write_bytes(self, f, offset, data)
    }

    /// A frame's contents as 512 little-endian words (a table's entries).
    pub fn words(&self, f: PhysFrame) -> [u64; 512] {
        let mut w = [0u64; 512];
        let p = self.frame_ptr(f).cast::<[u64; 512]>();
        // SAFETY: `frame_ptr` checked the frame is allocated; pages are 4096-aligned and 4096
        // bytes long, and nothing else accesses them during this copy (single-threaded).
        w.copy_from_slice(unsafe { &*p });
        w
    }

    /// A checksum of a frame's contents.
    pub fn checksum(&self, f: PhysFrame) -> u64 {
        let p = self.frame_ptr(f).cast::<[u64; 512]>();
        // SAFETY: as in `words`: an allocated, aligned 4096-byte page, not accessed concurrently.
        let words = unsafe { &*p };
        // Position-dependent and independent per word, so it vectorises.
        words.iter().enumerate().fold(0u64, |h, (i, &w)| {
            h.wrapping_add((w ^ i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15 | (i as u64) << 1 | 1))
        })
    }

    fn take(&self, book: &mut Book, frames: usize) -> bool {
        book.allocs += 1;
        if book.fail_at == Some(book.allocs) {
            book.fail_at = None;
            return false;
        }
        book.in_use + frames <= book.budget
    }

    fn page_ptr(&self, i: usize) -> *mut Page {
        let cell = &self.inner.pages[i];
        if cell.get().is_null() {
            cell.set(Box::into_raw(Box::new(Page([0; 4096]))));
        }
        cell.get()
    }

    fn fresh(&self, i: usize, state: State) {
        self.inner.state[i].set(state);
        let p = self.page_ptr(i);
        if self.inner.poison {
            // SAFETY: `p` is a live heap page of 4096 bytes owned by this memory.
            unsafe { (*p).0.fill(POISON) }
        }
    }
}

fn idx(f: PhysFrame) -> usize {
    (f.start_address().as_u64() / 4096 - BASE) as usize
}

fn frame(i: usize) -> PhysFrame {
    PhysFrame::containing_address(PhysAddr::new((i as u64 + BASE) * 4096))
}

// SAFETY: `frame_ptr` returns a 4096-aligned heap page that stays allocated for the life of the
// memory (pages are only freed in `Inner::drop`), distinct frames are distinct pages, and a
// frame is handed out by `alloc_*` only while its state is `Free`.
unsafe impl PhysMem for SimMem {
    fn alloc_frame(&self) -> Option<PhysFrame> {
        let mut b = self.inner.book.borrow_mut();
        if !self.take(&mut b, 1) {
            return None;
        }
        let i = match b.free.pop() {
            Some(i) => i,
            None if b.bump < self.inner.capacity => {
                b.bump += 1;
                b.bump - 1
            }
            None => return None,
        };
        b.in_use += 1;
        self.fresh(i, State::Single);
        self.inner.counts[i].set(1);
        Some(frame(i))
    }

    fn alloc_huge_frame(&self) -> Option<PhysFrame<Size2MiB>> {
        let mut b = self.inner.book.borrow_mut();
        if !self.take(&mut b, 512) {
            return None;
        }
        let head = match b.free_huge.pop() {
            Some(h) => h,
            None => {
                let h = b.bump.next_multiple_of(512);
                if h + 512 > self.inner.capacity {
                    return None;
                }
                for w in b.bump..h {
                    b.free.push(w);
                }
                b.bump = h + 512;
                h
            }
        };
        b.in_use += 512;
        self.fresh(head, State::HugeHead);
        for i in head + 1..head + 512 {
            self.fresh(i, State::HugeTail);
        }
        self.inner.counts[head].set(1);
        Some(PhysFrame::containing_address(frame(head).start_address()))
    }

    fn inc_ref(&self, f: PhysFrame) {
        let i = idx(f);
        assert!(
            matches!(self.inner.state[i].get(), State::Single | State::HugeHead),
            "inc_ref on free frame {f:?}"
        );
        let c = &self.inner.counts[i];
        c.set(c.get().checked_add(1).expect("reference count overflow"));
        self.inner.inc_refs.set(self.inner.inc_refs.get() + 1);
    }

    fn reuse_root(&self, kernel: &KernelHalf) -> Option<PhysFrame> {
        let id = kernel.id();
        let root = {
            let mut b = self.inner.book.borrow_mut();
            let at = b.roots.iter().rposition(|r| r.1 == id)?;
            b.roots.swap_remove(at).0
        };
        // What the contract promises the engine, checked: the engine cleared the lower half
        // when it gave the root back, and never wrote the kernel half.
        let w = self.words(root);
        assert!(
            w[..256].iter().all(|&e| e == 0),
            "a kept root's lower half is not empty"
        );
        assert_eq!(
            &w[256..],
            &kernel.entries()[..],
            "a kept root's kernel half changed"
        );
        assert_eq!(self.ref_count(root), 1, "a kept root has one reference");
        Some(root)
    }

    fn keep_root(&self, root: PhysFrame, kernel: KernelHalfId) -> bool {
        let mut b = self.inner.book.borrow_mut();
        if b.roots.len() >= b.roots_max {
            return false;
        }
        b.roots.push((root, kernel));
        true
    }

    fn dec_ref(&self, f: PhysFrame) -> u32 {
        let i = idx(f);
        assert_eq!(
            self.inner.state[i].get(),
            State::Single,
            "dec_ref on a free frame or a 2 MiB run {f:?}"
        );
        let c = &self.inner.counts[i];
        let n = c.get() - 1;
        c.set(n);
        if n == 0 {
            self.inner.state[i].set(State::Free);
            if self.inner.poison {
                // SAFETY: the page pointer is live for the life of the memory.
                unsafe { (*self.page_ptr(i)).0.fill(POISON) }
            }
            let mut b = self.inner.book.borrow_mut();
            b.in_use -= 1;
            b.free.push(i);
        }
        n
    }

    fn dec_ref_huge(&self, run: PhysFrame<Size2MiB>) -> u32 {
        let i = idx(PhysFrame::containing_address(run.start_address()));
        assert_eq!(
            self.inner.state[i].get(),
            State::HugeHead,
            "dec_ref_huge on {run:?}"
        );
        let c = &self.inner.counts[i];
        let n = c.get() - 1;
        c.set(n);
        if n == 0 {
            for k in i..i + 512 {
                self.inner.state[k].set(State::Free);
            }
            let mut b = self.inner.book.borrow_mut();
            b.in_use -= 512;
            b.free_huge.push(i);
        }
        n
    }

    fn ref_count(&self, f: PhysFrame) -> u32 {
        self.inner.counts[idx(f)].get()
    }

    fn frame_ptr(&self, f: PhysFrame) -> *mut u8 {
        self.inner.accesses.set(self.inner.accesses.get() + 1);
        let i = idx(f);
        assert_ne!(
            self.inner.state[i].get(),
            State::Free,
            "access to free frame {f:?}"
        );
        self.page_ptr(i).cast()
    }
}

/// The fault a CPU would raise (the interesting bits of the #PF error code, and CR2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFault {
    /// CR2: the faulting address.
    pub addr: u64,
    /// Error code bit 0: the page was present (a protection fault).
    pub present: bool,
    /// Error code bit 1: the access was a write.
    pub write: bool,
    /// Error code bit 4: the access was an instruction fetch.
    pub fetch: bool,
}

/// A software MMU: walks the four levels from `root` as the CPU does (present bits, `WRITABLE`
/// ANDed and `NO_EXECUTE` ORed over the walk, 2 MiB and 1 GiB leaves, supervisor mode with
/// `CR0.WP = 1`), and sets `ACCESSED`/`DIRTY` where they are clear, as the CPU would: a shared
/// table with such a bit clear would thus be written, which the tests detect.
#[derive(Debug, Clone)]
pub struct SoftMmu<M: PhysMem> {
    mem: M,
}

impl<M: PhysMem> SoftMmu<M> {
    /// An MMU over `mem`.
    pub fn new(mem: &M) -> Self {
        SoftMmu { mem: mem.clone() }
    }

    /// Translate `va` for `access`: the physical address, or the fault the CPU would raise.
    pub fn translate(
        &self,
        root: PhysFrame,
        va: u64,
        access: Access,
    ) -> Result<PhysAddr, CpuFault> {
        let write = access == Access::Write;
        let fetch = access == Access::Execute;
        let fault = |present| CpuFault {
            addr: va,
            present,
            write,
            fetch,
        };
        if va >= entry::LOWER_HALF_END {
            return Err(fault(false));
        }
        let a = PageTableFlags::ACCESSED.bits();
        let d = PageTableFlags::DIRTY.bits();
        let mut table = root;
        let mut level = 4u8;
        let mut w = true;
        let mut x = true;
        loop {
            let i = entry::index(va, level);
            let e = raw::read(&self.mem, table, i);
            if !entry::present(e) {
                return Err(fault(false));
            }
            w &= entry::writable(e);
            x &= entry::executable(e);
            let leaf = level == 1 || (level <= 3 && entry::huge(e));
            if e & a == 0 {
                raw::set_hardware_bits(&self.mem, table, i, a);
            }
            if leaf {
                if (write && !w) || (fetch && !x) {
                    return Err(fault(true));
                }
                let e = raw::read(&self.mem, table, i);
                if write && e & d == 0 {
                    raw::set_hardware_bits(&self.mem, table, i, d);
                }
                let offset = va & (entry::span(level) - 1);
                return Ok(PhysAddr::new(
                    (entry::addr(e) & !(entry::span(level) - 1)) + offset,
                ));
            }
            table = PhysFrame::containing_address(PhysAddr::new(entry::addr(e)));
            level -= 1;
        }
    }

    /// Read `buf.len()` bytes at `va` (must not cross a 4 KiB boundary).
    pub fn read(&self, root: PhysFrame, va: u64, buf: &mut [u8]) -> Result<(), CpuFault> {
        let pa = self.translate(root, va, Access::Read)?;
        let f = PhysFrame::containing_address(pa);
        raw::read_bytes(&self.mem, f, (pa.as_u64() & 4095) as usize, buf);
        Ok(())
    }

    /// Write `data` at `va` (must not cross a 4 KiB boundary).
    pub fn write(&self, root: PhysFrame, va: u64, data: &[u8]) -> Result<(), CpuFault> {
        let pa = self.translate(root, va, Access::Write)?;
        let f = PhysFrame::containing_address(pa);
        raw::write_bytes(&self.mem, f, (pa.as_u64() & 4095) as usize, data);
        Ok(())
    }

    /// Read a little-endian `u64` at `va` (8-aligned).
    pub fn read_u64(&self, root: PhysFrame, va: u64) -> Result<u64, CpuFault> {
        let mut b = [0u8; 8];
        self.read(root, va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write a little-endian `u64` at `va` (8-aligned).
    pub fn write_u64(&self, root: PhysFrame, va: u64, v: u64) -> Result<(), CpuFault> {
        self.write(root, va, &v.to_le_bytes())
    }
}
