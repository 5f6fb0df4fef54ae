//! Fixed addresses of the kernel half. See the diagram in [`crate::mm`].

/// Size of a frame / small page.
pub const PAGE_SIZE: u64 = 4096;
/// Where all physical memory is mapped: physical `p` is at `DIRECT_MAP + p`.
pub const DIRECT_MAP: u64 = 0xffff_8000_0000_0000;
/// Base of the kernel heap's region (L4 entry 509).
pub const KHEAP: u64 = 0xffff_fe80_0000_0000;
/// Size of the kernel heap's region: one L4 entry.
pub const KHEAP_SIZE: u64 = 1 << 39;
/// Base of the kernel-stack area (L4 entry 510).
pub const KSTACKS: u64 = 0xffff_ff00_0000_0000;
/// Size of one kernel-stack slot, guard page included.
pub const KSTACK_SLOT: u64 = 4 << 20;
/// The image is linked at `KERNEL_BASE + physical address` (must match `stencil.ld`).
pub const KERNEL_BASE: u64 = 0xffff_ffff_8000_0000;
/// RAM below this is reachable through the boot mapping at `KERNEL_BASE` before the direct map exists.
pub const EARLY_LIMIT: u64 = 1 << 30;

/// Kernel virtual address of physical address `phys` in the direct map.
pub const fn phys_to_virt(phys: u64) -> u64 {
    DIRECT_MAP + phys
}
