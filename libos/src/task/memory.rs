//! The memory API of the running task: checked reads and writes in its address space, private
//! mappings, snapshots (the fork-server primitive), page-table accounting, and the stack cache.

use alloc::string::String;

use crate::space::Template;

/// Checks an access of `len` bytes at `va` for [`read`]/[`write`]. Process memory (the task's
/// heap and statics) holds Rust objects, which raw bytes must never overwrite (nor read, as
/// padding is uninitialised): it is refused as unmapped.
fn check(va: u64, len: usize, write: bool) -> Result<(), templates::Fault> {
    // Until an error is in the task's heap, a kill waits (it would leak the kernel's copy).
    let _h = crate::mm::ctx::hold();
    let r = {
        let _k = crate::mm::ctx::kernel();
        crate::space::with_current(|space| crate::space::check_access(space, va, len, write))
    };
    r.map_err(crate::space::rehome_fault)?;
    if len > 0 && crate::procmem::overlaps(va, len as u64) {
        return Err(templates::Fault::Unmapped {
            addr: va.max(crate::mm::layout::PROC_BASE),
        });
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `va` in the running task's address space. The range is checked
/// first: an address no region maps is `Err(Fault::Unmapped)`, one outside the lower half (a
/// non-canonical or kernel-half `va`, or `va + len` past it or wrapping) `Err(Fault::NotLowerHalf)`,
/// not a crash. An empty `buf` reads nothing and succeeds at any lower-half `va`.
///
/// ```no_run
/// let mut b = [0u8; 8];
/// match libos::task::read(0x4000_0000, &mut b) {
///     Ok(()) => libos::println!("read {b:?}"),
///     Err(e) => libos::println!("not mapped here: {e}"),
/// }
/// ```
pub fn read(va: u64, buf: &mut [u8]) -> Result<(), templates::Fault> {
    check(va, buf.len(), false)?;
    if buf.is_empty() {
        return Ok(());
    }
    // SAFETY: every byte lies in a region of the running task's space (checked), which is the
    // loaded one; demand-zero faults are resolved by the page-fault handler.
    unsafe { core::ptr::copy_nonoverlapping(va as *const u8, buf.as_mut_ptr(), buf.len()) };
    Ok(())
}

/// Writes `data` at `va` in the running task's address space (copy-on-write on the first write
/// to a `Private` template page). A read-only, unmapped or out-of-range range is an `Err` (as
/// for [`read`]), not a crash.
///
/// ```no_run
/// libos::task::map_private("scratch", 0x4000_0000, 4096).expect("map");
/// libos::task::write(0x4000_0000, b"hello").expect("writable");
/// ```
pub fn write(va: u64, data: &[u8]) -> Result<(), templates::Fault> {
    check(va, data.len(), true)?;
    if data.is_empty() {
        return Ok(());
    }
    // SAFETY: every byte lies in a writable region of the running task's space (checked), which
    // is the loaded one; copy-on-write and demand-zero faults are resolved by the page-fault
    // handler.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), va as *mut u8, data.len()) };
    Ok(())
}

/// Maps `len` bytes of demand-zero private memory named `name` at `va` in the running task's
/// space (page aligned; must not overlap anything mapped). A non-canonical `va` is
/// `Err(Error::NonCanonical)`, one in (or a range reaching into) the kernel half — `va + len`
/// wrapping included — `Err(Error::NotLowerHalf)`, `len == 0` `Err(Error::Empty)`, an unaligned
/// `va` or `len` `Err(Error::Misaligned)`, a range reaching into process memory (the task's heap
/// and statics, `0x7f80_0000_0000..0x8000_0000_0000`) `Err(Error::Overlap)`; nothing is mapped
/// then.
///
/// ```no_run
/// libos::task::map_private("state", 0x4000_0000, 1 << 20).expect("map");
/// let mut b = [1u8; 4];
/// libos::task::read(0x4000_0000, &mut b).expect("mapped");
/// assert_eq!(b, [0; 4]); // demand-zero
/// ```
pub fn map_private(name: &str, va: u64, len: u64) -> Result<(), templates::Error> {
    let _h = crate::mm::ctx::hold();
    let r = {
        let _k = crate::mm::ctx::kernel();
        map_private_k(name, va, len)
    };
    r.map_err(crate::space::rehome_error)
}

fn map_private_k(name: &str, va: u64, len: u64) -> Result<(), templates::Error> {
    // Copy the name first: it may live in this task's own memory, which must not fault while the
    // space is being changed.
    let name = String::from(name);
    let name = name.as_str();
    let va = crate::space::lower_va(va)?;
    // Process memory is libos's to lay out (the heap may grow anywhere in its range): no raw
    // mapping there, even where nothing is mapped yet. A request that is bad anyway gets the
    // error it always got (checked first, the engine's way).
    crate::limits::mapping(va.as_u64(), len, false)?;
    if crate::procmem::overlaps(va.as_u64(), len) {
        return Err(templates::Error::Overlap {
            addr: va.as_u64().max(crate::mm::layout::PROC_BASE),
        });
    }
    crate::space::with_current(|space| {
        let flush = space.map(
            va,
            len,
            templates::Perm {
                write: true,
                exec: false,
            },
            name,
            false,
        )?;
        crate::space::apply(flush);
        Ok(())
    })
}

/// Unmaps `va..va + len` of the running task's space (a private mapping this crate made, e.g. an
/// arena whose scope ended); its frames go back unless a template took references to them.
pub(crate) fn unmap_private(va: u64, len: u64) -> Result<(), templates::Error> {
    let _k = crate::mm::ctx::kernel();
    crate::space::with_current(|space| {
        let flush = space.unmap(x86_64::VirtAddr::new(va), len)?;
        crate::space::apply(flush);
        Ok(())
    })
}

/// Turns ranges of the running task's memory into a template: the fork-server primitive.
/// Afterwards this task and every task spawned from the template share that memory
/// copy-on-write. Each range `(start, len)` must be page aligned and mapped; a non-canonical
/// start is `Err(Error::NonCanonical)`, one outside the lower half `Err(Error::NotLowerHalf)`.
///
/// ```no_run
/// use libos::task;
/// task::map_private("state", 0x4000_0000, 4096).expect("map");
/// task::write(0x4000_0000, b"warm").expect("write");
/// let snap = task::snapshot(&[(0x4000_0000, 4096)]).expect("snapshot");
/// let h = task::spawn(&[&snap], || {
///     let mut b = [0u8; 4];
///     task::read(0x4000_0000, &mut b).expect("read");
///     task::write(0x4000_0000, b"mine").expect("private copy");
///     i32::from(&b == b"warm")
/// })
/// .expect("spawn");
/// assert_eq!(h.join(), Ok(1));
/// ```
pub fn snapshot(ranges: &[(u64, u64)]) -> Result<Template, templates::Error> {
    let _h = crate::mm::ctx::hold();
    let r = {
        let _k = crate::mm::ctx::kernel();
        snapshot_k(ranges)
    };
    r.map_err(crate::space::rehome_error)
}

fn snapshot_k(ranges: &[(u64, u64)]) -> Result<Template, templates::Error> {
    // Copy the ranges first: they may live in this task's own memory, which must not fault while
    // the space is being changed.
    let r = crate::space::lower_ranges(ranges)?;
    crate::space::with_current(|space| {
        let (t, flush) = space.snapshot(&r)?;
        crate::space::apply(flush);
        Ok(t)
    })
    .map(Template::from_engine)
}

/// Returns the frames of cached task stacks (freed but still mapped), top tables and root tables
/// to the frame allocator, so that a leak check compares like with like.
///
/// ```no_run
/// libos::task::trim_caches();
/// let before = libos::free_frames();
/// libos::task::spawn(&[], || 0).expect("spawn").join().expect("task");
/// libos::task::trim_caches();
/// libos::println!("frames not returned: {}", before as i64 - libos::free_frames() as i64);
/// ```
pub fn trim_caches() {
    let _k = crate::mm::ctx::kernel();
    crate::stack::trim_cache();
    crate::procmem::trim_top_cache();
}

/// Page-table accounting of the running task's space.
///
/// ```no_run
/// libos::println!("{:?}", libos::task::space_stats());
/// ```
pub fn space_stats() -> templates::SpaceStats {
    crate::space::with_current(|space| space.stats())
}
