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
/// fit in `out` are dropped (the caller sizes `out` generously).
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
        let re = r.addr.saturating_add(r.size).div_ceil(PAGE) * PAGE;
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
        let r = Range {
            start: out[i].start.div_ceil(PAGE) * PAGE,
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
}
