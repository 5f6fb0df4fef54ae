//! Argument checks of the public API, in one pure module so the host tests them (`cargo test -p
//! libos`): addresses and ranges an app passes in, durations turned into TSC cycles and back,
//! stack sizes and channel capacities. Every function answers with an error value or a
//! documented saturation — none panics, overflows or truncates. `docs/guide.md` ("Limits and
//! errors") lists what each public function accepts.

use core::time::Duration;

use templates::{Error, Fault, is_canonical};

/// One past the last lower-half address: app mappings live in `0..LOWER_HALF_END`.
pub const LOWER_HALF_END: u64 = 1 << 47;

/// Bytes per page.
pub const PAGE_SIZE: u64 = 4096;

/// `addr` as a lower-half address: [`Error::NonCanonical`] if no page table can map it,
/// [`Error::NotLowerHalf`] for the kernel half. Never moves the address.
///
/// ```
/// use libos::limits::lower_half;
/// use templates::Error;
/// assert_eq!(lower_half(0x4000_0000), Ok(0x4000_0000));
/// assert_eq!(lower_half(0x1_0000_4000_0000), Err(Error::NonCanonical { addr: 0x1_0000_4000_0000 }));
/// ```
pub fn lower_half(addr: u64) -> Result<u64, Error> {
    if !is_canonical(addr) {
        Err(Error::NonCanonical { addr })
    } else if addr >= LOWER_HALF_END {
        Err(Error::NotLowerHalf { addr })
    } else {
        Ok(addr)
    }
}

/// Checks a mapping request `start..start + len` before any memory is spent on it: a lower-half
/// start, a non-zero length, page alignment of `start`, and an end inside the lower half
/// (`start + len` neither wraps nor crosses `LOWER_HALF_END`). `len` is rounded up to whole pages
/// first when `round_len` is set (`TemplateBuilder::region` does that); else it must be a page
/// multiple. Returns the length in pages.
pub fn mapping(start: u64, len: u64, round_len: bool) -> Result<u64, Error> {
    lower_half(start)?;
    if len == 0 {
        return Err(Error::Empty);
    }
    if !start.is_multiple_of(PAGE_SIZE) || (!round_len && !len.is_multiple_of(PAGE_SIZE)) {
        return Err(Error::Misaligned { addr: start });
    }
    let pages = len.div_ceil(PAGE_SIZE);
    match pages
        .checked_mul(PAGE_SIZE)
        .and_then(|bytes| start.checked_add(bytes))
    {
        Some(end) if end <= LOWER_HALF_END => Ok(pages),
        _ => Err(Error::NotLowerHalf {
            addr: LOWER_HALF_END,
        }),
    }
}

/// The end of an access `va..va + len` by `task::read`/`write` or `Space::read`/`write`, after
/// checking that it starts in the lower half and ends inside it: a non-canonical or kernel-half
/// `va` is [`Fault::NotLowerHalf`] naming `va`; a range that wraps or reaches past the lower
/// half is [`Fault::NotLowerHalf`] naming the first address beyond it.
pub fn access(va: u64, len: usize) -> Result<u64, Fault> {
    if va >= LOWER_HALF_END {
        return Err(Fault::NotLowerHalf { addr: va });
    }
    match va.checked_add(len as u64) {
        Some(end) if end <= LOWER_HALF_END => Ok(end),
        _ => Err(Fault::NotLowerHalf {
            addr: LOWER_HALF_END,
        }),
    }
}

/// `d` in TSC cycles at `hz`, saturating at `u64::MAX` (about 227 years at 2.5 GHz): a deadline
/// that far out never comes, which is what `Duration::MAX` asks for.
///
/// ```
/// use core::time::Duration;
/// use libos::limits::duration_to_cycles;
/// assert_eq!(duration_to_cycles(Duration::from_millis(1), 2_000_000_000), 2_000_000);
/// assert_eq!(duration_to_cycles(Duration::MAX, 2_000_000_000), u64::MAX);
/// ```
pub fn duration_to_cycles(d: Duration, hz: u64) -> u64 {
    // as_nanos() < 2^94 and hz < 2^64, so the product fits a u128 only after the split:
    // whole seconds and the sub-second rest are converted separately.
    let hz = u128::from(hz);
    let whole = u128::from(d.as_secs()).saturating_mul(hz);
    let part = u128::from(d.subsec_nanos()) * hz / 1_000_000_000;
    u64::try_from(whole.saturating_add(part)).unwrap_or(u64::MAX)
}

/// `cycles` TSC cycles at `hz` (0 is taken as 1) as a [`Duration`], exactly to the nanosecond
/// below; any `u64` fits (a `Duration` holds `u64` seconds).
///
/// ```
/// use core::time::Duration;
/// use libos::limits::cycles_to_duration;
/// assert_eq!(cycles_to_duration(3_000, 1_000), Duration::from_secs(3));
/// assert_eq!(cycles_to_duration(u64::MAX, 1), Duration::from_secs(u64::MAX));
/// ```
pub fn cycles_to_duration(cycles: u64, hz: u64) -> Duration {
    let hz = hz.max(1);
    let secs = cycles / hz;
    let nanos = u128::from(cycles % hz) * 1_000_000_000 / u128::from(hz);
    // nanos < 1e9: `cycles % hz < hz`.
    Duration::new(secs, nanos as u32)
}

/// A TSC reading `d` after `tsc`, or `None` when it would pass `u64::MAX`.
pub fn deadline(tsc: u64, d: Duration, hz: u64) -> Option<u64> {
    tsc.checked_add(duration_to_cycles(d, hz))
}

/// Why a stack size is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackTooLarge {
    /// The size asked for, in bytes.
    pub requested: u64,
    /// The largest size there is room for, in bytes.
    pub max: u64,
}

/// Pages for a task stack of `bytes`: rounded up to whole pages, at least one page (a size of 0
/// gets one), at most `max_pages`; more is an error naming both sizes.
pub fn stack_pages(bytes: u64, max_pages: u64) -> Result<u64, StackTooLarge> {
    let pages = bytes.div_ceil(PAGE_SIZE).max(1);
    if pages > max_pages {
        return Err(StackTooLarge {
            requested: bytes,
            max: max_pages * PAGE_SIZE,
        });
    }
    Ok(pages)
}

/// Slots a bounded channel of capacity `cap` allocates up front: at most
/// [`CHANNEL_PREALLOC`]; the queue grows on demand beyond that, so any `cap` (even
/// `usize::MAX`, "unbounded") is accepted without reserving memory for it.
pub fn channel_prealloc(cap: usize) -> usize {
    cap.clamp(1, CHANNEL_PREALLOC)
}

/// Largest up-front allocation of a channel, in values.
pub const CHANNEL_PREALLOC: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HALF: u64 = LOWER_HALF_END;

    #[test]
    fn lower_half_edges() {
        assert_eq!(lower_half(0), Ok(0));
        assert_eq!(lower_half(1), Ok(1));
        assert_eq!(lower_half(HALF - 1), Ok(HALF - 1));
        assert_eq!(lower_half(HALF), Err(Error::NonCanonical { addr: HALF }));
        assert_eq!(
            lower_half(0x1_0000_4000_0000),
            Err(Error::NonCanonical {
                addr: 0x1_0000_4000_0000
            })
        );
        assert_eq!(
            lower_half(0xffff_8000_0000_0000),
            Err(Error::NotLowerHalf {
                addr: 0xffff_8000_0000_0000
            })
        );
        assert_eq!(
            lower_half(u64::MAX),
            Err(Error::NotLowerHalf { addr: u64::MAX })
        );
    }

    #[test]
    fn mapping_edges() {
        assert_eq!(mapping(0x1000, 0, true), Err(Error::Empty));
        assert_eq!(mapping(0x1000, 1, true), Ok(1));
        assert_eq!(
            mapping(0x1000, 1, false),
            Err(Error::Misaligned { addr: 0x1000 })
        );
        assert_eq!(
            mapping(0x1001, 4096, true),
            Err(Error::Misaligned { addr: 0x1001 })
        );
        let beyond = Err(Error::NotLowerHalf { addr: HALF });
        assert_eq!(mapping(0x1000, u64::MAX, true), beyond);
        assert_eq!(mapping(0x1000, !0xfff, false), beyond);
        assert_eq!(mapping(HALF - 4096, 8192, false), beyond);
        assert_eq!(mapping(HALF - 4096, 4096, false), Ok(1));
        assert_eq!(mapping(0, HALF, false), Ok(HALF / 4096));
        assert_eq!(
            mapping(0x1_0000_4000_0000, 4096, false),
            Err(Error::NonCanonical {
                addr: 0x1_0000_4000_0000
            })
        );
    }

    #[test]
    fn access_edges() {
        assert_eq!(access(0, 0), Ok(0));
        assert_eq!(access(HALF - 1, 1), Ok(HALF));
        assert_eq!(access(HALF - 1, 2), Err(Fault::NotLowerHalf { addr: HALF }));
        assert_eq!(
            access(u64::MAX - 1, 5),
            Err(Fault::NotLowerHalf { addr: u64::MAX - 1 })
        );
        assert_eq!(
            access(0x1_0000_4000_0000, 1),
            Err(Fault::NotLowerHalf {
                addr: 0x1_0000_4000_0000
            })
        );
        assert_eq!(
            access(HALF - 1, usize::MAX),
            Err(Fault::NotLowerHalf { addr: HALF })
        );
    }

    #[test]
    fn time_conversions_saturate_or_are_exact() {
        assert_eq!(duration_to_cycles(Duration::ZERO, u64::MAX), 0);
        assert_eq!(duration_to_cycles(Duration::MAX, 1), u64::MAX);
        assert_eq!(duration_to_cycles(Duration::MAX, u64::MAX), u64::MAX);
        assert_eq!(
            duration_to_cycles(Duration::from_nanos(1), 1_000_000_000),
            1
        );
        assert_eq!(
            duration_to_cycles(Duration::from_secs(u64::MAX / 2), 2),
            u64::MAX - 1
        );
        assert_eq!(
            cycles_to_duration(u64::MAX, 0),
            Duration::from_secs(u64::MAX)
        );
        assert_eq!(
            cycles_to_duration(u64::MAX, u64::MAX),
            Duration::from_secs(1)
        );
        // The old conversion (`(cycles * 1e9 / hz) as u64`) wrapped here.
        assert_eq!(
            cycles_to_duration(1 << 63, 1_000_000_000),
            Duration::new(9_223_372_036, 854_775_808)
        );
        assert_eq!(
            deadline(u64::MAX - 1, Duration::from_nanos(2), 1_000_000_000),
            None
        );
        assert_eq!(deadline(5, Duration::from_secs(1), 10), Some(15));
    }

    #[test]
    fn stack_and_channel_sizes() {
        assert_eq!(stack_pages(0, 1023), Ok(1));
        assert_eq!(stack_pages(1, 1023), Ok(1));
        assert_eq!(stack_pages(1023 * 4096, 1023), Ok(1023));
        assert_eq!(
            stack_pages(1023 * 4096 + 1, 1023),
            Err(StackTooLarge {
                requested: 1023 * 4096 + 1,
                max: 1023 * 4096
            })
        );
        assert_eq!(
            stack_pages(u64::MAX, 1023),
            Err(StackTooLarge {
                requested: u64::MAX,
                max: 1023 * 4096
            })
        );
        assert_eq!(channel_prealloc(0), 1);
        assert_eq!(channel_prealloc(4), 4);
        assert_eq!(channel_prealloc(usize::MAX), CHANNEL_PREALLOC);
    }

    fn reference_mapping(start: u64, len: u64, round: bool) -> Result<u64, Error> {
        // The same rules in u128 arithmetic, where nothing can overflow.
        if start >= HALF {
            return Err(if is_canonical(start) {
                Error::NotLowerHalf { addr: start }
            } else {
                Error::NonCanonical { addr: start }
            });
        }
        if len == 0 {
            return Err(Error::Empty);
        }
        if !start.is_multiple_of(4096) || (!round && !len.is_multiple_of(4096)) {
            return Err(Error::Misaligned { addr: start });
        }
        let pages = u128::from(len).div_ceil(4096);
        if u128::from(start) + pages * 4096 > u128::from(HALF) {
            return Err(Error::NotLowerHalf { addr: HALF });
        }
        Ok(pages as u64)
    }

    fn any_addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            (0..HALF / 4096).prop_map(|p| p * 4096),
            (0u64..8192).prop_map(|d| HALF.wrapping_sub(4096).wrapping_add(d)),
            (0u64..8192).prop_map(|d| u64::MAX - d),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// 2,048 cases: `mapping` agrees with a u128 reference and never panics.
        #[test]
        fn mapping_matches_reference(start in any_addr(), len in any_addr(), round: bool) {
            prop_assert_eq!(mapping(start, len, round), reference_mapping(start, len, round));
        }

        /// 2,048 cases: an accepted access lies wholly in the lower half.
        #[test]
        fn access_is_inside_lower_half(va in any_addr(), len in any::<usize>()) {
            match access(va, len) {
                Ok(end) => {
                    prop_assert!(va < HALF && end <= HALF);
                    prop_assert_eq!(u128::from(end), u128::from(va) + len as u128);
                }
                Err(Fault::NotLowerHalf { addr }) => {
                    prop_assert!(addr == va || addr == HALF);
                    prop_assert!(u128::from(va) + len as u128 > u128::from(HALF) || va >= HALF);
                }
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }

        /// 2,048 cases: cycles → duration → cycles loses less than a nanosecond's worth of
        /// cycles, and durations convert monotonically, saturating instead of wrapping.
        #[test]
        fn time_round_trip(cycles: u64, hz in 1u64..20_000_000_000) {
            let d = cycles_to_duration(cycles, hz);
            let back = duration_to_cycles(d, hz);
            prop_assert!(
                back <= cycles && cycles - back <= hz / 1_000_000_000 + 1,
                "{cycles} -> {d:?} -> {back}"
            );
            let longer = d.saturating_add(Duration::from_secs(1));
            prop_assert!(duration_to_cycles(longer, hz) >= back);
        }
    }
}
