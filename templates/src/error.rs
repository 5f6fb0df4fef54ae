//! Typed errors. No operation of the engine panics on bad input or exhausted memory.

use alloc::sync::Arc;
use core::fmt;

/// A region's name, e.g. `"libdata"`, carried into fault reports.
pub type Name = Arc<str>;

/// Why building, spawning, mapping, unmapping, protecting or snapshotting failed.
///
/// Every operation that returns one leaves its object consistent and leaks nothing: the
/// translations are those before the call (for `unmap`/`protect`/`snapshot`/`map`), though some
/// tables may have been unshared on the way (invisible, and accounted for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The physical-memory allocator returned `None`.
    OutOfFrames,
    /// An address or length is not aligned to the page size it is used with.
    Misaligned { addr: u64 },
    /// A zero-length region or range.
    Empty,
    /// An address outside the lower half (`0..2^47`), or a range reaching past it (`addr` is then
    /// the first address beyond it): the kernel half is never touched.
    NotLowerHalf { addr: u64 },
    /// An address whose bits 48..64 do not copy bit 47: no page table can map it (the CPU raises
    /// #GP on any access). Never truncated into a canonical one.
    NonCanonical { addr: u64 },
    /// A region overlaps an existing region (builder: another region; `map`: any mapping).
    Overlap { addr: u64 },
    /// Two templates of one spawn claim the same 1 GiB slot (`slot` is its start address).
    SlotConflict { slot: u64 },
    /// The range would split a 2 MiB page.
    SplitsHugePage { addr: u64 },
    /// Part of the range is not mapped (`protect`).
    NotMapped { addr: u64 },
    /// `protect` on a region that is not `Private`.
    NotPrivate { addr: u64, region: Name },
    /// A length below what the call needs (e.g. an arena smaller than its header and one page).
    TooSmall { len: u64, min: u64 },
    /// `Backing::Frames` with the wrong number of frames, or a frame not aligned to the page size.
    BadBacking,
}

/// Why a page fault could not be resolved: the task did something the layout forbids (or the
/// machine is out of memory). `Display` gives a one-line report naming the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// No region covers the address.
    Unmapped { addr: u64 },
    /// A write to a region that is not writable (a `ReadOnly` region, or a protected one).
    WriteToReadOnly { addr: u64, region: Name },
    /// An instruction fetch from a non-executable region.
    ExecuteNoExec { addr: u64, region: Name },
    /// An address in the kernel half (the engine never resolves those).
    NotLowerHalf { addr: u64 },
    /// Resolving needed a frame and none was left; the space is unchanged (retry may succeed).
    OutOfFrames { addr: u64 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OutOfFrames => write!(f, "out of physical frames"),
            Error::Misaligned { addr } => write!(f, "misaligned address or length at {addr:#x}"),
            Error::Empty => write!(f, "empty range"),
            Error::NotLowerHalf { addr } => write!(
                f,
                "{addr:#x} is not in the lower half (0..0x800000000000), where app mappings go"
            ),
            Error::NonCanonical { addr } => write!(
                f,
                "{addr:#x} is not a canonical address (bits 48..63 must copy bit 47)"
            ),
            Error::Overlap { addr } => write!(f, "overlapping mapping at {addr:#x}"),
            Error::SlotConflict { slot } => {
                write!(f, "two templates claim the 1 GiB slot at {slot:#x}")
            }
            Error::SplitsHugePage { addr } => write!(f, "range splits a 2 MiB page at {addr:#x}"),
            Error::NotMapped { addr } => write!(f, "{addr:#x} is not mapped"),
            Error::NotPrivate { addr, region } => {
                write!(f, "region '{region}' at {addr:#x} is not private")
            }
            Error::TooSmall { len, min } => {
                write!(f, "length {len:#x} is too small (at least {min:#x} bytes)")
            }
            Error::BadBacking => write!(f, "backing frames do not match the region"),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Unmapped { addr } => write!(f, "access to unmapped address {addr:#x}"),
            Fault::WriteToReadOnly { addr, region } => {
                write!(f, "write to read-only region '{region}' at {addr:#x}")
            }
            Fault::ExecuteNoExec { addr, region } => {
                write!(
                    f,
                    "execute in non-executable region '{region}' at {addr:#x}"
                )
            }
            Fault::NotLowerHalf { addr } => write!(f, "fault at kernel-half address {addr:#x}"),
            Fault::OutOfFrames { addr } => {
                write!(f, "out of frames resolving a fault at {addr:#x}")
            }
        }
    }
}

impl core::error::Error for Error {}
impl core::error::Error for Fault {}
