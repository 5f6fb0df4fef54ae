//! Kernel stacks: each in its own slot of the kernel-stack area, with unmapped guard space below.
//!
//! ```text
//!  slot n: KSTACKS + n * KSTACK_SLOT                                       (4 MiB per slot)
//!  ┌──────────────────────────── unmapped: guard (≥ 1 page) ───┬──── stack (size bytes) ────┐
//!  slot base                                            top - size                       top
//! ```
//!
//! A fault anywhere in a slot below its stack is a stack overflow and is reported as one (the
//! double fault that follows a kernel stack overflow runs on its own IST stack). Every task runs
//! on one of these stacks; freed stacks are kept mapped in a small cache so that spawning does not
//! map and unmap pages every time.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::arch::irq::IrqMutex;
use crate::mm::layout::{KSTACK_SLOT, KSTACKS, PAGE_SIZE};

/// How many stacks can exist at once: the slots fill one L4 entry (512 GiB).
pub const MAX_SLOTS: usize = ((1u64 << 39) / KSTACK_SLOT) as usize;

/// Freed stacks kept mapped for reuse.
const CACHE: usize = 64;

/// Stack size in pages per slot; 0 = free slot, u32::MAX = being set up.
static SLOT_PAGES: [AtomicU32; MAX_SLOTS] = [const { AtomicU32::new(0) }; MAX_SLOTS];

struct Slots {
    /// Never-used slots start here.
    next_unused: usize,
    /// Free slots with nothing mapped.
    free: Vec<u32>,
    /// Free slots whose stack is still mapped: (slot, pages).
    cached: Vec<(u32, u32)>,
}

static SLOTS: IrqMutex<Slots> = IrqMutex::new(Slots {
    next_unused: 0,
    free: Vec::new(),
    cached: Vec::new(),
});

/// A mapped kernel stack; dropping it frees the slot (and, beyond the cache, the frames).
#[derive(Debug)]
pub struct KernelStack {
    slot: usize,
    pages: u32,
}

impl KernelStack {
    /// Highest address (exclusive); the initial stack pointer.
    pub fn top(&self) -> u64 {
        slot_top(self.slot)
    }
}

fn slot_top(slot: usize) -> u64 {
    KSTACKS + (slot as u64 + 1) * KSTACK_SLOT
}

/// Why a stack could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackError {
    /// Every slot is in use.
    NoSlot,
    /// Not enough free frames.
    OutOfMemory,
    /// More than [`MAX_STACK`] bytes.
    TooLarge(crate::limits::StackTooLarge),
}

/// Largest stack: a slot less one guard page.
pub const MAX_STACK: u64 = KSTACK_SLOT - PAGE_SIZE;

/// Allocates and maps a stack of `size` bytes (rounded up to pages, at least one; more than
/// [`MAX_STACK`] is [`StackError::TooLarge`]).
pub fn alloc(size: u64) -> Result<KernelStack, StackError> {
    // At most KSTACK_SLOT / PAGE_SIZE - 1 pages (1023), which fits a u32.
    let pages = crate::limits::stack_pages(size, MAX_STACK / PAGE_SIZE)
        .map_err(StackError::TooLarge)? as u32;
    let slot = {
        let mut s = SLOTS.lock();
        if let Some(i) = s.cached.iter().rposition(|&(_, p)| p == pages) {
            let (slot, _) = s.cached.swap_remove(i);
            SLOT_PAGES[slot as usize].store(pages, Ordering::Release);
            return Ok(KernelStack {
                slot: slot as usize,
                pages,
            });
        }
        if let Some(slot) = s.free.pop() {
            slot as usize
        } else if s.next_unused < MAX_SLOTS {
            s.next_unused += 1;
            s.next_unused - 1
        } else {
            return Err(StackError::NoSlot);
        }
    };
    SLOT_PAGES[slot].store(u32::MAX, Ordering::Release);
    let top = slot_top(slot);
    for i in 0..u64::from(pages) {
        if crate::mm::kernel::map_new_kernel_page(top - (i + 1) * PAGE_SIZE).is_none() {
            for j in 0..i {
                crate::mm::kernel::unmap_kernel_page(top - (j + 1) * PAGE_SIZE);
            }
            SLOT_PAGES[slot].store(0, Ordering::Release);
            SLOTS.lock().free.push(slot as u32);
            return Err(StackError::OutOfMemory);
        }
    }
    SLOT_PAGES[slot].store(pages, Ordering::Release);
    Ok(KernelStack { slot, pages })
}

impl Drop for KernelStack {
    fn drop(&mut self) {
        SLOT_PAGES[self.slot].store(0, Ordering::Release);
        let mut s = SLOTS.lock();
        if s.cached.len() < CACHE {
            s.cached.push((self.slot as u32, self.pages));
            return;
        }
        drop(s);
        unmap_slot(self.slot, self.pages);
    }
}

/// Unmaps a slot's stack pages (their frames go back) and returns the slot to the free list.
fn unmap_slot(slot: usize, pages: u32) {
    let top = slot_top(slot);
    for j in 0..u64::from(pages) {
        crate::mm::kernel::unmap_kernel_page(top - (j + 1) * PAGE_SIZE);
    }
    SLOTS.lock().free.push(slot as u32);
}

/// Frees `stack` at once, past the cache: its frames and the page tables no stack uses any more
/// go back to the frame allocator (a spawn that gives up uses this, so it keeps no memory).
pub fn release(stack: KernelStack) {
    let stack = core::mem::ManuallyDrop::new(stack);
    SLOT_PAGES[stack.slot].store(0, Ordering::Release);
    unmap_slot(stack.slot, stack.pages);
    crate::mm::kernel::reclaim_stack_tables();
}

/// Unmaps every cached stack and returns its frames, and the page tables of slots no longer in
/// use (so a leak check sees a clean baseline).
pub fn trim_cache() {
    let cached: Vec<(u32, u32)> = core::mem::take(&mut SLOTS.lock().cached);
    for &(slot, pages) in &cached {
        let top = slot_top(slot as usize);
        for j in 0..u64::from(pages) {
            crate::mm::kernel::unmap_kernel_page(top - (j + 1) * PAGE_SIZE);
        }
    }
    SLOTS.lock().free.extend(cached.iter().map(|&(s, _)| s));
    crate::mm::kernel::reclaim_stack_tables();
}

fn slot_of(addr: u64) -> Option<(usize, u64, u64)> {
    let off = addr.checked_sub(KSTACKS)?;
    let slot = (off / KSTACK_SLOT) as usize;
    let pages = SLOT_PAGES.get(slot)?.load(Ordering::Acquire);
    if pages == 0 || pages == u32::MAX {
        return None;
    }
    let top = slot_top(slot);
    Some((slot, top - u64::from(pages) * PAGE_SIZE, top))
}

/// If `addr` lies in the guard space of a live stack, names that stack.
pub fn guard_hit(addr: u64) -> Option<StackName> {
    let (slot, bottom, _) = slot_of(addr)?;
    (addr < bottom).then_some(StackName(slot))
}

/// True if `[addr, addr + len)` lies inside one live stack (kernel-stack slots, the boot stack or
/// the double-fault stack).
pub fn contains(addr: u64, len: u64) -> bool {
    let end = addr + len;
    let in_range = |(b, t): (u64, u64)| addr >= b && end <= t;
    if let Some((_, bottom, top)) = slot_of(addr) {
        return in_range((bottom, top));
    }
    in_range(crate::arch::gdt::double_fault_stack()) || in_range(boot_stack())
}

fn boot_stack() -> (u64, u64) {
    unsafe extern "C" {
        static boot_stack_bottom: u8;
        static boot_stack_top: u8;
    }
    (
        (&raw const boot_stack_bottom) as u64,
        (&raw const boot_stack_top) as u64,
    )
}

/// Names a kernel stack in reports.
#[derive(Debug, Clone, Copy)]
pub struct StackName(usize);

impl core::fmt::Display for StackName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 == 0 {
            write!(f, "the main stack")
        } else {
            write!(f, "kernel stack #{}", self.0)
        }
    }
}
