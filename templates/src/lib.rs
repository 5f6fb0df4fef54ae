//! Stencil's page-table template engine.
//!
//! A *template* is a sealed set of mappings whose page tables are built once. An *address
//! space* attaches a template's subtrees **by reference** — one entry per 512 GiB (or per 1 GiB
//! slot) — so spawning costs the same whatever the template's size. When a space must change a
//! translation inside a shared subtree, it copies the tables on its path top-down, stopping at
//! the leaf's table (the PMD level decides which L1 is copied), and every sibling stays shared.
//!
//! ```text
//!  template T (sealed, never written)          space A (spawned, Mode::Share)
//!  ┌────────┐                                   ┌────────┐
//!  │ T.L4   │ (private root, never in CR3)      │ A.L4   │ owned, count 1
//!  └──┬─────┘                                   └──┬──┬──┘
//!     │ [0]                          attach: [0]   │  │ [256..511] kernel half, verbatim,
//!     ▼                  one borrowed entry        │  │            never followed
//!  ┌────────┐ <────────────────────────────────────┘  ▼
//!  │ T.L3   │ count 1 (T's; A borrows: LENT_BIT)    (kernel tables)
//!  └──┬──┬──┘
//!     ▼  ▼  one L2 per 1 GiB slot
//!  ┌──────┐ ┌──────┐
//!  │ L2   │ │ L2   │ ──► 512 × L1 ──► data frames (Private pages: read-only + COW bit)
//!  └──────┘ └──────┘
//!
//!  A writes to a Private page under L2 #1, L1 #7:  unshare top-down (invariants 4 and 11)
//!
//!  A.L4 ─► A.L3' (verbatim copy: its entries borrow T's L2s; no count moves)
//!           ├─[0]─► T.L2 #0            still shared (borrowed)
//!           └─[1]─► A.L2' (verbatim copy: borrows T's 512 L1s)
//!                     ├─[k≠7]─► T.L1 #k        still shared (511 siblings)
//!                     └─[7]──► A.L1' (verbatim copy: borrows T's data frames)
//!                                └─► new frame (copy of the page), writable, owned
//!
//!  A space holds its templates until its tree is gone, so what it borrows stays alive; it
//!  never counts or releases a borrowed entry. A write to a 2 MiB page splits it into an L1 of
//!  512 borrowed pieces (PIECE_BIT) and copies only the 4 KiB written.
//! ```
//!
//! * [`PhysMem`]: the only access to physical memory (frames, counts, pointers).
//! * [`TemplateBuilder`] → [`Template`]: regions ([`RegionSpec`]: [`Kind`], [`Perm`],
//!   [`PageSize`], [`Backing`]) sealed into prebuilt tables.
//! * [`AddressSpace`]: spawned in [`Mode::Share`] or [`Mode::Copy`]; `translate`,
//!   `resolve_fault`, `map`, `unmap`, `protect`, `snapshot` (incremental: it costs what the
//!   space changed since its spawn or last snapshot, and is that template again if nothing
//!   did), `stats`. Every change returns a [`Flush`] token.
//! * [`sim`]: simulated memory and a software MMU for host tests and benchmarks.
//! * Inside, the cursor module (`walk`) is the only code that writes a table or moves a
//!   reference count; a sealed template gives only its read-only walk (docs/engine.md,
//!   invariants 1–11, invariant 8 for this split).
//!
//! PTE bits: see [`entry`] — software bit 9 ([`COW_BIT`]) marks copy-on-write, bit 10
//! ([`LENT_BIT`]) a template's reference (borrowed in a space's table), bit 11 ([`PIECE_BIT`]) a
//! 4 KiB piece of a 2 MiB run; `ACCESSED` and `DIRTY` are preset so the CPU never writes a
//! shared table. Only the lower half (L4 entries
//! 0..256) is ever followed or changed.
#![no_std]

extern crate alloc;

pub mod entry;
mod error;
mod flush;
mod half;
mod mem;
pub mod sim;
mod space;
mod template;
mod walk;

pub use entry::{COW_BIT, LENT_BIT, PIECE_BIT};
pub use error::{Error, Fault, Name};
pub use flush::Flush;
pub use mem::PhysMem;
pub use space::{Access, AddressSpace, KernelHalf, KernelHalfId, Mode};
pub use template::Translation;
pub use template::{
    Backing, Kind, PageSize, Perm, Region, RegionSpec, Template, TemplateBuilder, TemplateStats,
    is_canonical,
};
pub use walk::SpaceStats;
