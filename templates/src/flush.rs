//! TLB flush tokens: every change that affects translations returns one.

use crate::entry::LOWER_HALF_END;
use x86_64::VirtAddr;

/// What the caller must invalidate in the TLB of every CPU running the changed space (only that
/// space: shared tables never change, invariant 5). Nothing is ever flushed silently.
///
/// Consume it with a `match` (the kernel: `invlpg` per page, or reload CR3 for [`Flush::All`]),
/// or with [`Flush::ignore`] when the space is not loaded anywhere.
#[must_use = "a translation changed: flush the TLB (or call .ignore() if the space is not loaded)"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Nothing to invalidate (only not-present entries became present, or nothing changed).
    None,
    /// One page (4 KiB, or the 2 MiB page containing it).
    Page(VirtAddr),
    /// Every page in `start..end`.
    Range { start: VirtAddr, end: VirtAddr },
    /// The whole (lower half of the) space.
    All,
}

impl Flush {
    /// The space is not loaded on any CPU: nothing to invalidate.
    pub fn ignore(self) {}

    /// Every page in `start..end` (the whole space if the range reaches the end of the lower
    /// half, whose end is not a canonical address).
    pub(crate) fn range(start: u64, end: u64) -> Flush {
        if end >= LOWER_HALF_END {
            Flush::All
        } else {
            Flush::Range {
                start: VirtAddr::new(start),
                end: VirtAddr::new(end),
            }
        }
    }

    /// A token covering both.
    pub fn merge(self, other: Flush) -> Flush {
        match (self, other) {
            (Flush::None, x) | (x, Flush::None) => x,
            (Flush::All, _) | (_, Flush::All) => Flush::All,
            (a, b) => {
                let (s1, e1) = a.bounds();
                let (s2, e2) = b.bounds();
                Flush::Range {
                    start: s1.min(s2),
                    end: e1.max(e2),
                }
            }
        }
    }

    fn bounds(self) -> (VirtAddr, VirtAddr) {
        match self {
            Flush::Page(p) => (p, p + 1u64),
            Flush::Range { start, end } => (start, end),
            Flush::None | Flush::All => unreachable!("handled by merge"),
        }
    }
}
