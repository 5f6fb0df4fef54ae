//! The firmware memory map: normalising what the PVH loader hands over.
//!
//! QEMU's PVH start info carries an E820-style table. qboot's (microvm) is unsorted and ends with
//! an all-zero entry; SeaBIOS's (q35) is sorted. [`normalize`] turns either into sorted,
//! non-overlapping, page-aligned usable ranges, which is all the frame allocator needs.

/// E820 type of ordinary RAM.
pub const TYPE_RAM: u32 = 1;

/// One entry of the firmware's memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type (1 = RAM).
    pub kind: u32,
}

/// A half-open range of physical memory `[start, end)`, page aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Range {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True when the range holds no byte.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

const PAGE: u64 = 4096;

/// Normalises a raw memory map into usable RAM ranges.
///
/// Drops zero-sized and non-RAM entries, sorts and merges the RAM (touching entries join before
/// rounding, so a page split across two entries is kept), removes every page that a non-RAM
/// entry overlaps (firmware maps are not always disjoint), and rounds what is left inward to whole
/// pages. Writes the result into `out` and returns how many ranges it holds; ranges that do not
/// fit in `out` are dropped (the caller sizes `out` generously: one more than twice the entries
/// always fits). Any input is taken — unsorted, overlapping, zero-length, `addr + size` past
/// `u64::MAX` (clipped there) — without panicking.
pub fn normalize(raw: &[MapEntry], out: &mut [Range]) -> usize {
    let mut n = 0;
    for e in raw.iter().filter(|e| e.size != 0 && e.kind == TYPE_RAM) {
        if n < out.len() {
            out[n] = Range {
                start: e.addr,
                end: e.addr.saturating_add(e.size),
            };
            n += 1;
        }
    }
    out[..n].sort_unstable_by_key(|r| r.start);
    let mut w = 0;
    for i in 0..n {
        if w > 0 && out[i].start <= out[w - 1].end {
            out[w - 1].end = out[w - 1].end.max(out[i].end);
        } else {
            out[w] = out[i];
            w += 1;
        }
    }
    n = w;
    // Carve out anything a reserved entry claims, rounded outward to pages.
    for r in raw.iter().filter(|e| e.size != 0 && e.kind != TYPE_RAM) {
        let rs = r.addr / PAGE * PAGE;
        // Past the last page boundary: everything up to u64::MAX is reserved.
        let re = r
            .addr
            .saturating_add(r.size)
            .checked_next_multiple_of(PAGE)
            .unwrap_or(u64::MAX);
        let mut i = 0;
        while i < n {
            let cur = out[i];
            if re <= cur.start || rs >= cur.end {
                i += 1;
                continue;
            }
            let left = Range {
                start: cur.start,
                end: rs.max(cur.start),
            };
            let right = Range {
                start: re.min(cur.end),
                end: cur.end,
            };
            match (left.is_empty(), right.is_empty()) {
                (true, true) => {
                    out.copy_within(i + 1..n, i);
                    n -= 1;
                    continue;
                }
                (false, true) => out[i] = left,
                (true, false) => out[i] = right,
                (false, false) => {
                    out[i] = left;
                    if n < out.len() {
                        out.copy_within(i + 1..n, i + 2);
                        out[i + 1] = right;
                        n += 1;
                    }
                }
            }
            i += 1;
        }
    }
    // Round inward to whole pages and drop what becomes empty.
    let mut w = 0;
    for i in 0..n {
        // A start within the last partial page has no whole page after it.
        let Some(start) = out[i].start.checked_next_multiple_of(PAGE) else {
            continue;
        };
        let r = Range {
            start,
            end: out[i].end / PAGE * PAGE,
        };
        if !r.is_empty() {
            out[w] = r;
            w += 1;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(addr: u64, size: u64, kind: u32) -> MapEntry {
        MapEntry { addr, size, kind }
    }

    #[test]
    fn qboot_style_unsorted_with_trailing_zero_entry() {
        // What qboot hands over on microvm with -m 256M: unsorted, trailing all-zero entry.
        let raw = [
            e(0x10_0000, 0x0ff0_0000, 1),
            e(0, 0x9fc00, 1),
            e(0x9fc00, 0x400, 2),
            e(0xf0000, 0x10000, 2),
            e(0, 0, 0),
        ];
        let mut out = [Range { start: 0, end: 0 }; 8];
        let n = normalize(&raw, &mut out);
        assert_eq!(
            &out[..n],
            &[
                Range {
                    start: 0,
                    end: 0x9f000
                },
                Range {
                    start: 0x10_0000,
                    end: 0x1000_0000
                }
            ]
        );
    }

    #[test]
    fn merges_touching_and_rounds_inward() {
        let raw = [
            e(0x1800, 0x1000, 1),
            e(0x2800, 0x3000, 1),
            e(0x10_0001, 0x2000, 1),
        ];
        let mut out = [Range { start: 0, end: 0 }; 8];
        let n = normalize(&raw, &mut out);
        assert_eq!(
            &out[..n],
            &[
                Range {
                    start: 0x2000,
                    end: 0x5000
                },
                Range {
                    start: 0x10_1000,
                    end: 0x10_2000
                }
            ]
        );
    }

    #[test]
    fn reserved_overlap_splits_ram() {
        let raw = [e(0, 0x10_0000, 1), e(0x4000, 0x1000, 2)];
        let mut out = [Range { start: 0, end: 0 }; 8];
        let n = normalize(&raw, &mut out);
        assert_eq!(
            &out[..n],
            &[
                Range {
                    start: 0,
                    end: 0x4000
                },
                Range {
                    start: 0x5000,
                    end: 0x10_0000
                }
            ]
        );
    }

    #[test]
    fn empty_and_non_ram_maps_yield_nothing() {
        let mut out = [Range { start: 0, end: 0 }; 4];
        assert_eq!(normalize(&[], &mut out), 0);
        assert_eq!(normalize(&[e(0, 0, 0), e(0x1000, 0x1000, 2)], &mut out), 0);
        // Smaller than a page after rounding.
        assert_eq!(normalize(&[e(0x10, 0x1000, 1)], &mut out), 0);
    }

    /// The top of the address space: the old page rounding overflowed here.
    #[test]
    fn entries_at_the_top_of_the_address_space() {
        let mut out = [Range { start: 0, end: 0 }; 8];
        let raw = [
            e(u64::MAX - 0x2fff, u64::MAX, 1),
            e(u64::MAX - 10, 100, 2),
            e(0, 0x3000, 1),
            e(0x3fff, 1, 2),
        ];
        let n = normalize(&raw, &mut out);
        assert_eq!(
            &out[..n],
            &[
                Range {
                    start: 0,
                    end: 0x3000
                },
                Range {
                    start: u64::MAX - 0x2fff,
                    end: u64::MAX - 0xfff
                }
            ]
        );
        assert_eq!(normalize(&[e(u64::MAX - 5, 3, 1)], &mut out), 0);
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        const PAGES: u64 = 64;

        fn entry() -> impl Strategy<Value = MapEntry> {
            let addr = prop_oneof![
                8 => 0..PAGES * PAGE,
                1 => (0..PAGES).prop_map(|p| p * PAGE),
                1 => (0u64..3 * PAGE).prop_map(|d| u64::MAX - d),
                1 => any::<u64>(),
            ];
            let size = prop_oneof![
                8 => 0..16 * PAGE,
                2 => (0..16u64).prop_map(|p| p * PAGE),
                1 => Just(0u64),
                1 => Just(u64::MAX),
                1 => any::<u64>(),
            ];
            let kind = prop_oneof![4 => Just(TYPE_RAM), 1 => Just(2u32), 1 => any::<u32>()];
            (addr, size, kind).prop_map(|(addr, size, kind)| MapEntry { addr, size, kind })
        }

        fn map() -> impl Strategy<Value = Vec<MapEntry>> {
            (proptest::collection::vec(entry(), 0..12), any::<bool>()).prop_map(|(mut v, z)| {
                if z {
                    // qboot's all-zero terminator.
                    v.push(MapEntry {
                        addr: 0,
                        size: 0,
                        kind: 0,
                    });
                }
                v
            })
        }

        fn end(e: &MapEntry) -> u128 {
            (u128::from(e.addr) + u128::from(e.size)).min(u128::from(u64::MAX))
        }

        /// The page `[p, p + PAGE)` lies wholly in the union of the RAM entries.
        fn in_ram(raw: &[MapEntry], p: u128) -> bool {
            let mut ram: Vec<(u128, u128)> = raw
                .iter()
                .filter(|e| e.kind == TYPE_RAM && e.size != 0)
                .map(|e| (u128::from(e.addr), end(e)))
                .collect();
            ram.sort();
            let mut covered = p;
            for (s, e) in ram {
                if s <= covered && e > covered {
                    covered = e;
                }
            }
            covered >= p + u128::from(PAGE)
        }

        /// Some non-RAM entry overlaps the page.
        fn reserved(raw: &[MapEntry], p: u128) -> bool {
            raw.iter().any(|e| {
                e.kind != TYPE_RAM
                    && e.size != 0
                    && u128::from(e.addr) < p + u128::from(PAGE)
                    && end(e) > p
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4096))]

            /// 4,096 cases: any map (overlapping, unsorted, zero-length, wrapping `addr + size`,
            /// all-zero terminator) normalises without panicking into sorted, disjoint,
            /// page-aligned ranges holding exactly the usable pages: wholly inside the RAM and
            /// touched by no reserved entry. With a small `out`, a subset of them.
            #[test]
            fn normalize_is_exact(raw in map(), small in 1usize..4) {
                let mut out = vec![Range { start: 0, end: 0 }; 2 * raw.len() + 1];
                let n = normalize(&raw, &mut out);
                let got = &out[..n];
                for r in got {
                    prop_assert!(r.start % PAGE == 0 && r.end % PAGE == 0 && r.start < r.end);
                }
                for w in got.windows(2) {
                    prop_assert!(w[0].end < w[1].start, "not sorted and disjoint: {:?}", got);
                }
                let mut pages = 0u64;
                for r in got {
                    let mut p = r.start;
                    while p < r.end {
                        prop_assert!(in_ram(&raw, p.into()), "{p:#x} is not RAM");
                        prop_assert!(!reserved(&raw, p.into()), "{p:#x} is reserved");
                        pages += 1;
                        if pages > 1 << 12 {
                            break; // huge ranges near the top: sampled, not walked
                        }
                        p += PAGE;
                    }
                }
                // Every usable page of the low region is there.
                for p in (0..PAGES + 16).map(|p| p * PAGE) {
                    let want = in_ram(&raw, p.into()) && !reserved(&raw, p.into());
                    let have = got.iter().any(|r| r.start <= p && p < r.end);
                    prop_assert_eq!(have, want, "page {:#x} in {:?}", p, got);
                }
                // A too-small `out` gives a subset, and still no panic.
                let mut tiny = vec![Range { start: 0, end: 0 }; small];
                let m = normalize(&raw, &mut tiny);
                for r in &tiny[..m] {
                    prop_assert!(r.start < r.end);
                    let mut p = r.start;
                    while p < r.end && p - r.start < 64 * PAGE {
                        prop_assert!(in_ram(&raw, p.into()) && !reserved(&raw, p.into()));
                        p += PAGE;
                    }
                }
            }
        }
    }
}
