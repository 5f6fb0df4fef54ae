//! Kernel stacks: each in its own slot of the kernel-stack area, with unmapped guard space below.
//!
//! ```text
//!  slot n: KSTACKS + n * KSTACK_SLOT
//!  ┌──────────────────────────── unmapped: guard (≥ 1 page) ───┬──── stack (size bytes) ────┐
//!  slot base                                            top - size                       top
//! ```
//!
//! A fault anywhere in a slot below its stack is a stack overflow and is reported as one (the
//! double fault that follows a kernel stack overflow runs on its own IST stack).

use core::sync::atomic::{AtomicU32, Ordering};

use crate::mm::layout::{KSTACK_SLOT, KSTACKS, PAGE_SIZE};

/// How many stacks can exist at once.
const MAX_SLOTS: usize = 1024;

/// Stack size in pages per slot; 0 = free slot.
static SLOT_PAGES: [AtomicU32; MAX_SLOTS] = [const { AtomicU32::new(0) }; MAX_SLOTS];

/// A mapped kernel stack.
#[derive(Debug)]
pub struct KernelStack {
    #[allow(dead_code, reason = "freeing stacks arrives with tasks")]
    slot: usize,
    top: u64,
}

impl KernelStack {
    /// Highest address (exclusive); the initial stack pointer.
    pub fn top(&self) -> u64 {
        self.top
    }
}

/// Why a stack could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackError {
    /// Every slot is in use.
    NoSlot,
    /// Not enough free frames.
    OutOfMemory,
}

/// Allocates and maps a stack of `size` bytes (rounded up to pages, at most a slot minus one
/// guard page).
pub fn alloc(size: u64) -> Result<KernelStack, StackError> {
    let pages = size
        .div_ceil(PAGE_SIZE)
        .clamp(1, KSTACK_SLOT / PAGE_SIZE - 1) as u32;
    let slot = (0..MAX_SLOTS)
        .find(|&i| {
            SLOT_PAGES[i]
                .compare_exchange(0, u32::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
        .ok_or(StackError::NoSlot)?;
    let top = KSTACKS + (slot as u64 + 1) * KSTACK_SLOT;
    for i in 0..u64::from(pages) {
        if crate::mm::kernel::map_new_kernel_page(top - (i + 1) * PAGE_SIZE).is_none() {
            // Partial stacks are not unmapped yet (only the boot stack exists so far): report.
            SLOT_PAGES[slot].store(0, Ordering::Release);
            return Err(StackError::OutOfMemory);
        }
    }
    SLOT_PAGES[slot].store(pages, Ordering::Release);
    Ok(KernelStack { slot, top })
}

fn slot_of(addr: u64) -> Option<(usize, u64, u64)> {
    let off = addr.checked_sub(KSTACKS)?;
    let slot = (off / KSTACK_SLOT) as usize;
    let pages = SLOT_PAGES.get(slot)?.load(Ordering::Acquire);
    if pages == 0 || pages == u32::MAX {
        return None;
    }
    let top = KSTACKS + (slot as u64 + 1) * KSTACK_SLOT;
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
    in_range(crate::arch::x86_64::gdt::double_fault_stack()) || in_range(boot_stack())
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
