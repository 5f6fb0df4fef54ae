//! Hardware access: the ground floor. Everything that touches CPU registers, ports, MMIO or
//! descriptor tables lives here, and nothing here imports the layers above (traps hand over to
//! a handler the kernel core registers). The rest of libos calls only what this module
//! re-exports for hardware access; it still uses the `x86_64` crate's *types* (addresses, page
//! table entries) as data. Device registers behind MMIO are the drivers' (virtio, through the
//! `virtio-drivers` crate).

mod x86_64;

pub(crate) use self::x86_64::{
    apic, context, cpu, debug_exit, gdt, halt_forever, irq, mmu, pci, pic, pit, traps,
};
