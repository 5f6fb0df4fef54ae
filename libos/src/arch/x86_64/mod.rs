//! x86_64 support: PVH entry, descriptor tables, traps, interrupts and their locks, the MMU, PIC,
//! PIT, the local APIC, the debug-exit device, CPU features.

pub mod apic;
pub mod boot;
pub mod context;
pub mod cpu;
pub mod gdt;
pub mod irq;
pub mod mmu;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod traps;

use ::x86_64::instructions::port::Port;

/// The `isa-debug-exit` device xtask attaches (`iobase=0xf4`).
const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Writes `value` to QEMU's isa-debug-exit device, which ends the VM with status
/// `(value << 1) | 1`. Without the device this does nothing, so the caller halts afterwards.
pub fn debug_exit(value: u32) {
    let mut port = Port::<u32>::new(DEBUG_EXIT_PORT);
    // SAFETY: port 0xf4 is the debug-exit device (or nothing); writing it has no other effect.
    unsafe { port.write(value) };
}

/// Stops this CPU for good: interrupts off, `hlt` forever.
pub fn halt_forever() -> ! {
    loop {
        ::x86_64::instructions::interrupts::disable();
        ::x86_64::instructions::hlt();
    }
}
