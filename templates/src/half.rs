//! The kernel half of every root table: raw entries the engine copies and never follows.

use x86_64::structures::paging::page_table::{PageTable, PageTableEntry};

/// Raw L4 entries 256..512 (the kernel half), copied verbatim into every root and never
/// followed, counted, changed or freed by the engine (invariant 6).
#[derive(Debug, Clone)]
pub struct KernelHalf {
    entries: [u64; 256],
}

/// Which [`KernelHalf`] a space was made with: its address, as an identity only (never
/// dereferenced). [`PhysMem::keep_root`](crate::PhysMem::keep_root) gets it with the root of a dropped space, so an
/// implementation that keeps roots for reuse ([`PhysMem::reuse_root`](crate::PhysMem::reuse_root)) can tell whose kernel
/// half is in them. A `KernelHalf` that lives as long as the program (a `static`'s) has an
/// identity no other one shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelHalfId(usize);

impl KernelHalf {
    /// This kernel half's identity (see [`KernelHalfId`]).
    pub fn id(&self) -> KernelHalfId {
        KernelHalfId(core::ptr::from_ref(self) as usize)
    }

    /// The 256 raw entries (L4 entries 256..512).
    pub fn entries(&self) -> &[u64; 256] {
        &self.entries
    }

    /// From the 256 upper entries of an L4.
    pub fn new(entries: &[PageTableEntry; 256]) -> Self {
        let mut raw = [0u64; 256];
        for (r, e) in raw.iter_mut().zip(entries) {
            // Every bit of an entry is either a flag (0–11, 52–63) or the address (12–51).
            *r = e.flags().bits() | e.addr().as_u64();
        }
        KernelHalf { entries: raw }
    }

    /// From a whole L4 (its entries 256..512).
    pub fn from_table(l4: &PageTable) -> Self {
        let mut raw = [0u64; 256];
        for (i, r) in raw.iter_mut().enumerate() {
            let e = &l4[256 + i];
            *r = e.flags().bits() | e.addr().as_u64();
        }
        KernelHalf { entries: raw }
    }
}
