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

/// Base of a task's process memory (L4 entry 255, the top 512 GiB of the lower half): its heap
/// and the engine's view of its statics. Every task has its own copy-on-write copy; spawn
/// gives the child one as of the spawn (`docs/ARCHITECTURE.md`, "Tasks as processes").
pub const PROC_BASE: u64 = 0x0000_7f80_0000_0000;
/// End of a task's process memory (the end of the lower half).
pub const PROC_END: u64 = 0x0000_8000_0000_0000;
/// A task's heap: the global allocator's home for everything app code allocates. Its first page
/// holds the allocator's own state, so the heap's bookkeeping is copied with its contents.
pub const PHEAP: u64 = PROC_BASE;
/// Size of a task's heap region (address space only: pages are demand-zero).
pub const PHEAP_SIZE: u64 = 256 << 30;
/// Where the engine maps a task's statics (the last 1 GiB slot of [`PROC_BASE`]'s range). The
/// CPU reaches the same page tables at [`PSTATICS`], where the image links them.
pub const PSTATICS_SHADOW: u64 = PROC_END - (1 << 30);
/// Where the image links every static that is not libos's own (`stencil.ld`, `.pdata`/`.pbss`):
/// the last 1 GiB of the address space, L4 entry 511, L3 entry 511 — the same L3 index as
/// [`PSTATICS_SHADOW`] under L4 entry 255, so one L2 table serves both.
pub const PSTATICS: u64 = 0xffff_ffff_c000_0000;
/// Size of the statics window at [`PSTATICS`] (one L3 entry).
pub const PSTATICS_SIZE: u64 = 1 << 30;
