//! Task context switch: the assembly that saves one task's registers and resumes another's, and
//! the initial stack frame of a task that has not run yet.
//!
//! A saved context is a stack pointer: the callee-saved registers (rbp, rbx, r12–r15) and RFLAGS
//! sit on the task's own stack below the return address into whatever called [`switch`]. A
//! switch pushes them, stores RSP, loads CR3 only if it differs, loads the next RSP, pops, `ret`.

use core::arch::global_asm;

global_asm!(
    ".text",
    ".global stencil_switch",
    // stencil_switch(save: *mut u64, rsp: u64, cr3: u64)
    "stencil_switch:",
    "pushfq",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi], rsp",
    "mov rax, cr3",
    "cmp rax, rdx",
    "je 2f",
    "mov cr3, rdx",
    "2:",
    "mov rsp, rsi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "popfq",
    "ret",
);

unsafe extern "C" {
    fn stencil_switch(save: *mut u64, rsp: u64, cr3: u64);
}

/// Saves the running context (its stack pointer goes to `*save`), switches to the root table
/// `cr3` (only if it differs from the loaded one) and resumes the context whose stack pointer is
/// `rsp`. Returns when something switches back to the saved context.
///
/// # Safety
/// - Interrupts are off, and `save` is valid for a write of a `u64` that nothing reads or
///   writes until the saved context is resumed (it is the saved stack pointer of a task the
///   scheduler keeps until then);
/// - `rsp` was saved by `switch` (or made by [`initial_frame`]) for a context that is not
///   running, whose stack is mapped and not in use;
/// - `cr3` is a root table that maps the kernel half (code, stacks, heap), so execution goes on
///   after the load.
pub unsafe fn switch(save: *mut u64, rsp: u64, cr3: u64) {
    // SAFETY: the caller guarantees the three conditions `stencil_switch` needs (above); it
    // follows the C calling convention and preserves every callee-saved register across the
    // switch (they are restored from the resumed stack when this context runs again).
    unsafe { stencil_switch(save, rsp, cr3) }
}

/// Words [`initial_frame`] writes below a stack's top.
const FRAME_WORDS: usize = 9;

/// Bytes [`initial_frame`] needs at a stack's top.
pub const INITIAL_FRAME_BYTES: u64 = 8 * FRAME_WORDS as u64;

/// Writes, below `top`, the frame that the first [`switch`] to a new task pops: zeroed
/// callee-saved registers, RFLAGS with interrupts off, then the return address `entry` and a
/// zero "return address" for `entry` itself (which leaves the stack aligned as at a function
/// entry). Returns the stack pointer to give to [`switch`].
///
/// # Safety
/// `top` is the 16-byte aligned top of a mapped, writable stack that nothing uses, with at least
/// [`INITIAL_FRAME_BYTES`] below it.
pub unsafe fn initial_frame(top: u64, entry: extern "C" fn() -> !) -> u64 {
    let frame: [u64; FRAME_WORDS] = [0, 0, 0, 0, 0, 0, 0x2, entry as usize as u64, 0];
    let rsp = top - INITIAL_FRAME_BYTES;
    // SAFETY: the caller guarantees `rsp..top` is mapped, writable and unused; `rsp` is 8-byte
    // aligned because `top` is.
    unsafe { core::ptr::copy_nonoverlapping(frame.as_ptr(), rsp as *mut u64, FRAME_WORDS) };
    rsp
}
