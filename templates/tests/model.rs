//! Model-based property test: random programs of build / seal / spawn (both modes) / read /
//! write / exec / map / unmap / protect / snapshot / drop over several spaces and templates,
//! checked after every step against a plain reference model (per space: page → words, kind,
//! rights), plus invariants: template tables and read-only data never written, reference counts
//! equal to the real references, nothing left once everything is dropped.
//!
//! `PROPTEST_CASES` sets the number of cases (default below); failures are persisted in
//! `proptest-regressions/` and replayed first; `PROPTEST_RNG_SEED` fixes the seed.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use templates::sim::SimMem;
use templates::*;
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

const DEFAULT_CASES: u32 = 4000;
/// Word offsets checked in every page (first, second, middle, last).
const OFFS: [u64; 4] = [0, 8, 2048, 4088];
const GIB: u64 = 1 << 30;
/// 1 GiB slots templates are built in; 513 lies in the second 512 GiB range.
const SLOTS: [u64; 4] = [1, 2, 3, 513];
/// Page offsets (4 KiB) inside a slot where regions and accesses start.
const PAGE_OFFS: [u64; 12] = [0, 1, 2, 5, 7, 510, 511, 512, 513, 1024, 1030, 1535];
const CAND_SLOTS: [u64; 6] = [1, 2, 3, 4, 513, 514];

fn cand(i: usize) -> u64 {
    let s = CAND_SLOTS[i / PAGE_OFFS.len() % CAND_SLOTS.len()];
    s * GIB + PAGE_OFFS[i % PAGE_OFFS.len()] * 4096
}
fn n_cand() -> usize {
    CAND_SLOTS.len() * PAGE_OFFS.len()
}

#[derive(Clone, Debug)]
enum Data {
    Priv([u64; 4]),
    Shared(Rc<RefCell<[u64; 4]>>),
}

#[derive(Clone, Debug)]
struct MPage {
    /// `None`: demand-zero, never touched (reads as zero, may be absent).
    data: Option<Data>,
    kind: Kind,
    perm: Perm,
    /// First address of the 2 MiB page (of a 2 MiB-page region) this page lies in: ranges
    /// must not split it, even after a write split its leaf.
    huge_base: Option<u64>,
    /// A write split this 2 MiB page's leaf in this space: it translates as 4 KiB pages now.
    split: bool,
}

impl MPage {
    fn words(&self) -> [u64; 4] {
        match &self.data {
            None => [0; 4],
            Some(Data::Priv(w)) => *w,
            Some(Data::Shared(c)) => *c.borrow(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum BackingGen {
    Zeroed,
    Frames,
    Alias,
}

#[derive(Clone, Debug)]
struct RegionGen {
    slot_delta: u64,
    off: usize,
    pages: u64,
    kind: Kind,
    exec: bool,
    huge: bool,
    backing: BackingGen,
}

#[derive(Clone, Debug)]
enum Op {
    Build {
        slot: usize,
        regions: Vec<RegionGen>,
    },
    Spawn {
        tpls: Vec<usize>,
        mode: Mode,
    },
    Read {
        sp: usize,
        page: usize,
        word: usize,
    },
    Write {
        sp: usize,
        page: usize,
        word: usize,
        value: u64,
    },
    Exec {
        sp: usize,
        page: usize,
    },
    Map {
        sp: usize,
        page: usize,
        pages: u64,
        perm: Perm,
        populate: bool,
    },
    Unmap {
        sp: usize,
        page: usize,
        pages: u64,
    },
    Protect {
        sp: usize,
        page: usize,
        pages: u64,
        perm: Perm,
    },
    /// `ranges`: (candidate page, pages); a page index `n_cand() + k` means all of L4 entry
    /// `k` (512 GiB, `pages` ignored).
    Snapshot {
        sp: usize,
        ranges: Vec<(usize, u64)>,
    },
    /// A zygote's re-seal: snapshot `sp`, then drop the template at once, so that only the
    /// space holds it (if it took the space's tables) and the space's next snapshot of ranges
    /// covering these replaces it, taking its references over.
    Reseal {
        sp: usize,
        ranges: Vec<(usize, u64)>,
    },
    /// One step of a fork chain: snapshot `sp` (again at once if `twice`: in a `Share` space
    /// that holds the first snapshot, the second must be that template, `Flush::None`), then
    /// spawn a space from the snapshot alone.
    Fork {
        sp: usize,
        ranges: Vec<(usize, u64)>,
        twice: bool,
        mode: Mode,
    },
    DropSpace {
        sp: usize,
    },
    DropTemplate {
        t: usize,
    },
}

/// Accesses pick a candidate page (`< n_cand()`) or, more often, a page the space maps
/// (`n_cand() + k`: the k-th of its mapped pages, counting only the first two 4 KiB pages of a
/// 2 MiB page), so that reads and writes hit the same pages again and again.
fn access_page() -> impl Strategy<Value = usize> {
    prop_oneof![1 => 0..n_cand(), 2 => n_cand()..n_cand() + 64]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Private),
        Just(Kind::Shared),
        Just(Kind::ReadOnly)
    ]
}
fn perm() -> impl Strategy<Value = Perm> {
    prop_oneof![
        Just(Perm::RW),
        Just(Perm::R),
        Just(Perm::RX),
        Just(Perm::RWX)
    ]
}
fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Share), Just(Mode::Copy)]
}
fn len_pages() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 1..=8u64, 1 => Just(512u64), 1 => Just(1024u64)]
}
fn region() -> impl Strategy<Value = RegionGen> {
    let backing = prop_oneof![
        Just(BackingGen::Zeroed),
        Just(BackingGen::Frames),
        Just(BackingGen::Alias)
    ];
    (
        0..2u64,
        0..PAGE_OFFS.len(),
        1..=6u64,
        kind(),
        any::<bool>(),
        prop::bool::weighted(0.15),
        backing,
    )
        .prop_map(
            |(slot_delta, off, pages, kind, exec, huge, backing)| RegionGen {
                slot_delta,
                off,
                pages,
                kind,
                exec,
                huge,
                backing,
            },
        )
}
/// Snapshot ranges: candidate pages with a length, whole 1 GiB slots (candidates `12 k`), or
/// whole L4 entries (0: slots 1..4; 1: slots 513, 514).
fn snapshot_ranges() -> impl Strategy<Value = Vec<(usize, u64)>> {
    let one = prop_oneof![
        3 => (0..n_cand(), prop_oneof![len_pages(), Just(GIB / 4096)]),
        1 => (0..CAND_SLOTS.len()).prop_map(|k| (k * PAGE_OFFS.len(), GIB / 4096)),
        1 => (0..2usize).prop_map(|k| (n_cand() + k, 0)),
    ];
    prop::collection::vec(one, 1..=2)
}

/// A snapshot range in addresses (see `Op::Snapshot`).
fn snapshot_range(&(p, n): &(usize, u64)) -> (u64, u64) {
    if p >= n_cand() {
        let k = (p - n_cand()) as u64;
        (k * 512 * GIB, (k + 1) * 512 * GIB)
    } else {
        (cand(p), cand(p) + n * 4096)
    }
}

fn build() -> impl Strategy<Value = Op> {
    (0..SLOTS.len(), prop::collection::vec(region(), 1..=3))
        .prop_map(|(slot, regions)| Op::Build { slot, regions })
}
fn op() -> impl Strategy<Value = Op> {
    let sp = 0..4usize;
    let page = 0..n_cand();
    prop_oneof![
        2 => build(),
        3 => (prop::collection::vec(0..4usize, 1..=2), mode()).prop_map(|(tpls, mode)| Op::Spawn { tpls, mode }),
        4 => (sp.clone(), access_page(), 0..4usize).prop_map(|(sp, page, word)| Op::Read { sp, page, word }),
        6 => (sp.clone(), access_page(), 0..4usize, 1..1000u64).prop_map(|(sp, page, word, value)| Op::Write { sp, page, word, value }),
        1 => (sp.clone(), access_page()).prop_map(|(sp, page)| Op::Exec { sp, page }),
        2 => (sp.clone(), page.clone(), len_pages(), perm(), any::<bool>())
            .prop_map(|(sp, page, pages, perm, populate)| Op::Map { sp, page, pages, perm, populate }),
        2 => (sp.clone(), access_page(), len_pages()).prop_map(|(sp, page, pages)| Op::Unmap { sp, page, pages }),
        3 => (sp.clone(), access_page(), len_pages(), perm()).prop_map(|(sp, page, pages, perm)| Op::Protect { sp, page, pages, perm }),
        3 => (sp.clone(), snapshot_ranges()).prop_map(|(sp, ranges)| Op::Snapshot { sp, ranges }),
        2 => (sp.clone(), snapshot_ranges()).prop_map(|(sp, ranges)| Op::Reseal { sp, ranges }),
        3 => (sp.clone(), snapshot_ranges(), any::<bool>(), mode())
            .prop_map(|(sp, ranges, twice, mode)| Op::Fork { sp, ranges, twice, mode }),
        1 => sp.prop_map(|sp| Op::DropSpace { sp }),
        1 => (0..4usize).prop_map(|t| Op::DropTemplate { t }),
    ]
}

struct MT {
    t: Template<SimMem>,
    pages: BTreeMap<u64, MPage>,
    slots: BTreeSet<u64>,
    fp: u64,
}

struct MS {
    s: AddressSpace<SimMem>,
    pages: BTreeMap<u64, MPage>,
}

struct World {
    m: SimMem,
    templates: Vec<MT>,
    spaces: Vec<MS>,
    /// Frames the test itself holds a reference to (given / aliased backing).
    external: Vec<(PhysFrame, bool)>,
    /// Out-of-frames errors are legitimate only while a failure is injected.
    inject: bool,
    ooms: usize,
    /// What every access returned, to compare runs.
    trace: Vec<String>,
    /// Content key of each test frame (by physical address).
    keys: HashMap<u64, u64>,
    /// The kernel half every space gets (boxed: its identity is its address), as in libos, whose
    /// memory reuses the roots of dropped spaces (`SimMem::keep_roots`).
    kernel: Box<KernelHalf>,
}

/// A kernel half as the model's spaces get it: two entries that point at frames the simulated
/// memory does not have (following one would panic), the rest empty.
fn model_kernel_half() -> Box<KernelHalf> {
    use x86_64::structures::paging::PageTableFlags as F;
    use x86_64::structures::paging::page_table::PageTableEntry;
    let mut entries: [PageTableEntry; 256] = core::array::from_fn(|_| PageTableEntry::new());
    entries[0].set_addr(PhysAddr::new(0x7777_0000_0000), F::PRESENT | F::WRITABLE);
    entries[255].set_addr(PhysAddr::new(0x1000), F::PRESENT | F::GLOBAL);
    Box::new(KernelHalf::new(&entries))
}

/// The words of a test frame with content key `key` (independent of physical addresses, so
/// runs that allocate differently see the same data).
fn words_of(key: u64) -> [u64; 4] {
    OFFS.map(|o| pattern(key, o))
}

fn fill(m: &SimMem, f: PhysFrame, key: u64) {
    for o in OFFS {
        m.write(f, o as usize, &pattern(key, o).to_le_bytes());
    }
}

impl World {
    fn oom_ok(&mut self) {
        assert!(self.inject, "out of frames without an injected failure");
        self.ooms += 1;
    }

    fn test_frame(&mut self, huge: bool) -> Option<u64> {
        let key = 1000 + self.keys.len() as u64 * 512;
        let (base, pages) = if huge {
            let run = self.m.alloc_huge_frame()?;
            (run.start_address().as_u64(), 512)
        } else {
            (self.m.alloc_frame()?.start_address().as_u64(), 1)
        };
        for k in 0..pages {
            fill(&self.m, frame(base + k * 4096), key + k);
            self.keys.insert(base + k * 4096, key + k);
        }
        self.external.push((frame(base), huge));
        Some(base)
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Build { slot, regions } => self.build(SLOTS[*slot], regions),
            Op::Spawn { tpls, mode } => {
                if self.templates.is_empty() {
                    return;
                }
                let idx: Vec<usize> = tpls.iter().map(|i| i % self.templates.len()).collect();
                let mut conflict = false;
                let mut seen = BTreeSet::new();
                for &i in &idx {
                    for s in &self.templates[i].slots {
                        conflict |= !seen.insert(*s);
                    }
                }
                let ts: Vec<&Template<SimMem>> =
                    idx.iter().map(|&i| &self.templates[i].t).collect();
                match AddressSpace::new(&self.m, &ts, *mode, Some(&self.kernel)) {
                    Ok(s) => {
                        assert!(!conflict, "spawn should have failed with a slot conflict");
                        let mut pages = BTreeMap::new();
                        for &i in &idx {
                            pages.extend(
                                self.templates[i].pages.iter().map(|(k, v)| (*k, v.clone())),
                            );
                        }
                        self.spaces.push(MS { s, pages });
                    }
                    Err(Error::SlotConflict { .. }) => assert!(conflict),
                    Err(Error::OutOfFrames) => self.oom_ok(),
                    Err(e) => panic!("spawn: {e:?}"),
                }
            }
            Op::Read { sp, page, word } => {
                let Some(i) = self.sp(*sp) else { return };
                let pg = self.page_of(i, *page);
                let va = pg + OFFS[*word];
                let m = self.m.clone();
                let ms = &mut self.spaces[i];
                let expected = ms.pages.get(&pg).map(|p| p.words()[*word]);
                let r = read_u64(&mut ms.s, &m, va);
                self.trace.push(format!("read {va:#x} {r:?}"));
                match (r, expected) {
                    (Ok(v), Some(e)) => assert_eq!(v, e, "read {va:#x}"),
                    (Err(Fault::Unmapped { .. }), None) => {}
                    (Err(Fault::OutOfFrames { .. }), Some(_)) => self.oom_ok(),
                    (r, e) => panic!("read {va:#x}: {r:?}, model {e:?}"),
                }
            }
            Op::Write {
                sp,
                page,
                word,
                value,
            } => {
                let Some(i) = self.sp(*sp) else { return };
                let pg = self.page_of(i, *page);
                let va = pg + OFFS[*word];
                let m = self.m.clone();
                let ms = &mut self.spaces[i];
                let r = write_u64(&mut ms.s, &m, va, *value);
                self.trace.push(format!("write {va:#x} {r:?}"));
                // A write to a copy-on-write 2 MiB page splits it (in this space only).
                let split = match (&r, ms.pages.get(&pg)) {
                    (Ok(()), Some(p)) if p.kind == Kind::Private && !p.split => p.huge_base,
                    _ => None,
                };
                if let Some(b) = split {
                    for (_, p) in ms.pages.range_mut(b..b + (2 << 20)) {
                        p.split = true;
                    }
                }
                match (r, ms.pages.get_mut(&pg)) {
                    (Ok(()), Some(p)) => {
                        assert!(p.perm.write, "write to {va:#x} should have failed");
                        match &mut p.data {
                            Some(Data::Shared(c)) => c.borrow_mut()[*word] = *value,
                            Some(Data::Priv(w)) => w[*word] = *value,
                            d @ None => {
                                let mut w = [0; 4];
                                w[*word] = *value;
                                *d = Some(Data::Priv(w));
                            }
                        }
                    }
                    (Err(Fault::WriteToReadOnly { .. }), Some(p)) => assert!(!p.perm.write),
                    (Err(Fault::Unmapped { .. }), None) => {}
                    (Err(Fault::OutOfFrames { .. }), Some(_)) => self.oom_ok(),
                    (r, p) => panic!("write {va:#x}: {r:?}, model {p:?}"),
                }
            }
            Op::Exec { sp, page } => {
                let Some(i) = self.sp(*sp) else { return };
                let va = self.page_of(i, *page);
                let m = self.m.clone();
                let ms = &mut self.spaces[i];
                let exec = ms.pages.get(&va).map(|p| p.perm.exec);
                let r = access(&mut ms.s, &m, va, Access::Execute).map(|_| ());
                self.trace.push(format!("exec {va:#x} {r:?}"));
                match (r, exec) {
                    (Ok(_), Some(true))
                    | (Err(Fault::ExecuteNoExec { .. }), Some(false))
                    | (Err(Fault::Unmapped { .. }), None) => {}
                    (Err(Fault::OutOfFrames { .. }), Some(true)) => self.oom_ok(),
                    (r, e) => panic!("exec {va:#x}: {r:?}, model {e:?}"),
                }
            }
            Op::Map {
                sp,
                page,
                pages,
                perm,
                populate,
            } => {
                let Some(i) = self.sp(*sp) else { return };
                let (start, end) = (cand(*page), cand(*page) + pages * 4096);
                let ms = &mut self.spaces[i];
                let overlap = ms.pages.range(start..end).next().is_some();
                match ms
                    .s
                    .map(VirtAddr::new(start), pages * 4096, *perm, "map", *populate)
                {
                    Ok(f) => {
                        f.ignore();
                        assert!(!overlap, "map over existing pages");
                        for p in (start..end).step_by(4096) {
                            ms.pages.insert(
                                p,
                                MPage {
                                    data: None,
                                    kind: Kind::Private,
                                    perm: *perm,
                                    huge_base: None,
                                    split: false,
                                },
                            );
                        }
                    }
                    Err(Error::Overlap { .. }) => assert!(overlap),
                    Err(Error::OutOfFrames) => self.oom_ok(),
                    Err(e) => panic!("map: {e:?}"),
                }
            }
            Op::Unmap { sp, page, pages } => {
                let Some(i) = self.sp(*sp) else { return };
                let start = self.page_of(i, *page);
                let end = start + pages * 4096;
                let ms = &mut self.spaces[i];
                let split = splits(&ms.pages, start) || splits(&ms.pages, end);
                match ms.s.unmap(VirtAddr::new(start), pages * 4096) {
                    Ok(f) => {
                        f.ignore();
                        assert!(!split);
                        let gone: Vec<u64> = ms.pages.range(start..end).map(|(k, _)| *k).collect();
                        for k in gone {
                            ms.pages.remove(&k);
                        }
                    }
                    Err(Error::SplitsHugePage { .. }) => assert!(split),
                    Err(Error::OutOfFrames) => self.oom_ok(),
                    Err(e) => panic!("unmap: {e:?}"),
                }
            }
            Op::Protect {
                sp,
                page,
                pages,
                perm,
            } => {
                let Some(i) = self.sp(*sp) else { return };
                let start = self.page_of(i, *page);
                let end = start + pages * 4096;
                let ms = &mut self.spaces[i];
                let mut expect = None;
                for p in (start..end).step_by(4096) {
                    match ms.pages.get(&p) {
                        None => expect = Some("NotMapped"),
                        Some(mp) if mp.kind != Kind::Private => expect = Some("NotPrivate"),
                        _ => continue,
                    }
                    break;
                }
                if expect.is_none() && (splits(&ms.pages, start) || splits(&ms.pages, end)) {
                    expect = Some("SplitsHugePage");
                }
                match (
                    ms.s.protect(VirtAddr::new(start), pages * 4096, *perm),
                    expect,
                ) {
                    (Ok(f), None) => {
                        f.ignore();
                        for (_, p) in ms.pages.range_mut(start..end) {
                            p.perm = *perm;
                        }
                    }
                    (Err(Error::NotMapped { .. }), Some("NotMapped"))
                    | (Err(Error::NotPrivate { .. }), Some("NotPrivate"))
                    | (Err(Error::SplitsHugePage { .. }), Some("SplitsHugePage")) => {}
                    (Err(Error::OutOfFrames), None) => self.oom_ok(),
                    (r, e) => panic!("protect {start:#x}..{end:#x}: {r:?}, model {e:?}"),
                }
            }
            Op::Fork {
                sp,
                ranges,
                twice,
                mode,
            } => {
                let n = self.templates.len();
                self.run(&Op::Snapshot {
                    sp: *sp,
                    ranges: ranges.clone(),
                });
                if self.templates.len() == n {
                    return; // no space, or the snapshot failed as the model said
                }
                if *twice {
                    let mut rs: Vec<(u64, u64)> = ranges.iter().map(snapshot_range).collect();
                    rs.sort();
                    self.snapshot_again(sp % self.spaces.len(), &rs);
                }
                self.run(&Op::Spawn {
                    tpls: vec![self.templates.len() - 1],
                    mode: *mode,
                });
            }
            Op::Snapshot { sp, ranges } => {
                let Some(i) = self.sp(*sp) else { return };
                let mut rs: Vec<(u64, u64)> = ranges.iter().map(snapshot_range).collect();
                rs.sort();
                let ms = &mut self.spaces[i];
                let overlap = rs.windows(2).any(|w| w[1].0 < w[0].1);
                let split = !overlap
                    && rs
                        .iter()
                        .any(|&(s, e)| splits(&ms.pages, s) || splits(&ms.pages, e));
                let args: Vec<(VirtAddr, u64)> =
                    rs.iter().map(|&(s, e)| (VirtAddr::new(s), e - s)).collect();
                match ms.s.snapshot(&args) {
                    Ok((t, f)) => {
                        f.ignore();
                        assert!(!overlap && !split);
                        let mut pages = BTreeMap::new();
                        for &(s, e) in &rs {
                            pages.extend(ms.pages.range(s..e).map(|(k, v)| (*k, v.clone())));
                        }
                        let slots = pages.keys().map(|p| p >> 30).collect();
                        let fp = template_fingerprint(&self.m, &t);
                        self.templates.push(MT {
                            t,
                            pages,
                            slots,
                            fp,
                        });
                    }
                    Err(Error::Overlap { .. }) => assert!(overlap),
                    Err(Error::SplitsHugePage { .. }) => assert!(split),
                    Err(Error::OutOfFrames) => self.oom_ok(),
                    Err(e) => panic!("snapshot: {e:?}"),
                }
            }
            Op::Reseal { sp, ranges } => {
                let n = self.templates.len();
                self.run(&Op::Snapshot {
                    sp: *sp,
                    ranges: ranges.clone(),
                });
                if self.templates.len() > n {
                    self.templates.pop();
                }
            }
            Op::DropSpace { sp } => {
                if let Some(i) = self.sp(*sp) {
                    self.spaces.remove(i);
                }
            }
            Op::DropTemplate { t } => {
                if !self.templates.is_empty() {
                    let i = t % self.templates.len();
                    self.templates.remove(i);
                }
            }
        }
    }

    /// Snapshot space `i` again, right after its snapshot (the last template) with the same
    /// ranges: the space changed nothing, so if it is a `Share` space that holds that snapshot
    /// the result is that template, with nothing to flush (the incremental snapshot's clean
    /// fast path, docs/engine.md invariant 12). Otherwise (a `Copy` space, or a snapshot that
    /// took none of the space's tables) a new template with the same contents.
    fn snapshot_again(&mut self, i: usize, rs: &[(u64, u64)]) {
        let last = self.templates.len() - 1;
        let prev = self.templates[last].t.clone();
        let ranges: Vec<(VirtAddr, u64)> =
            rs.iter().map(|&(s, e)| (VirtAddr::new(s), e - s)).collect();
        let ms = &mut self.spaces[i];
        let held = ms.s.held_templates().any(|t| t.root() == prev.root());
        let held = held && ms.s.mode() == Mode::Share;
        match ms.s.snapshot(&ranges) {
            Ok((t, f)) => {
                if held {
                    assert_eq!(t.root(), prev.root(), "unchanged: the held snapshot again");
                    assert_eq!(f, Flush::None);
                }
                // Either way it maps what the previous one maps, the space's pages there.
                let pages = self.templates[last].pages.clone();
                let slots = self.templates[last].slots.clone();
                let fp = template_fingerprint(&self.m, &t);
                self.templates.push(MT {
                    t,
                    pages,
                    slots,
                    fp,
                });
            }
            Err(Error::OutOfFrames) => self.oom_ok(),
            Err(e) => panic!("snapshot again: {e:?}"),
        }
    }

    /// The page an access op means (see `access_page`).
    fn page_of(&self, sp: usize, page: usize) -> u64 {
        if page < n_cand() {
            return cand(page);
        }
        let hot: Vec<u64> = self.spaces[sp]
            .pages
            .iter()
            .filter(|(va, p)| p.huge_base.is_none_or(|b| **va - b < 2 * 4096))
            .map(|(va, _)| *va)
            .collect();
        if hot.is_empty() {
            cand(page % n_cand())
        } else {
            hot[(page - n_cand()) % hot.len()]
        }
    }

    fn sp(&self, sp: usize) -> Option<usize> {
        (!self.spaces.is_empty()).then(|| sp % self.spaces.len())
    }

    fn build(&mut self, slot: u64, regions: &[RegionGen]) {
        let mut b = TemplateBuilder::new(&self.m);
        let mut pages = BTreeMap::new();
        let mut accepted: Vec<(u64, u64)> = Vec::new();
        // Shared pages are one cell per physical frame (an aliased frame is one cell).
        let mut cells: HashMap<u64, Rc<RefCell<[u64; 4]>>> = HashMap::new();
        for g in regions {
            let base = (slot + g.slot_delta) * GIB;
            let (start, size, n) = if g.huge {
                (base + (1 + g.off as u64 % 2) * (2 << 20), 2u64 << 20, 1)
            } else {
                (base + PAGE_OFFS[g.off] * 4096, 4096, g.pages)
            };
            let end = start + n * size;
            let overlap = accepted.iter().any(|&(s, e)| s < end && start < e);
            // Frames for this page (`k`) of the region.
            let frames: Vec<u64> = match g.backing {
                BackingGen::Zeroed => vec![],
                BackingGen::Frames => {
                    let mut v = vec![];
                    for _ in 0..n {
                        match self.test_frame(g.huge) {
                            Some(f) => v.push(f),
                            None => return self.oom_ok(),
                        }
                    }
                    v
                }
                BackingGen::Alias => match self.test_frame(g.huge) {
                    Some(f) => vec![f],
                    None => return self.oom_ok(),
                },
            };
            let backing = match g.backing {
                BackingGen::Zeroed => Backing::Zeroed,
                BackingGen::Frames => {
                    Backing::Frames(frames.iter().map(|&f| PhysAddr::new(f)).collect())
                }
                BackingGen::Alias => Backing::Alias(PhysAddr::new(frames[0])),
            };
            let mut spec = RegionSpec::new("r", start, n * size, g.kind).backing(backing);
            spec.exec = g.exec;
            if g.huge {
                spec = spec.huge();
            }
            match b.add(spec) {
                Ok(_) => assert!(!overlap),
                Err(Error::Overlap { .. }) => {
                    assert!(overlap);
                    continue;
                }
                Err(e) => panic!("add: {e:?}"),
            }
            accepted.push((start, end));
            let perm = Perm {
                write: g.kind != Kind::ReadOnly,
                exec: g.exec,
            };
            for k in 0..n {
                let pstart = start + k * size;
                for sub in (0..size).step_by(4096) {
                    let pa = match g.backing {
                        BackingGen::Zeroed => None,
                        BackingGen::Frames => Some(frames[k as usize] + sub),
                        BackingGen::Alias => Some(frames[0] + sub),
                    };
                    let words = pa.map(|pa| words_of(self.keys[&pa])).unwrap_or([0; 4]);
                    let data = if g.kind == Kind::Shared {
                        let cell = match pa {
                            Some(pa) => cells
                                .entry(pa)
                                .or_insert_with(|| Rc::new(RefCell::new(words)))
                                .clone(),
                            None => Rc::new(RefCell::new(words)),
                        };
                        Data::Shared(cell)
                    } else {
                        Data::Priv(words)
                    };
                    let huge_base = g.huge.then_some(pstart);
                    pages.insert(
                        pstart + sub,
                        MPage {
                            data: Some(data),
                            kind: g.kind,
                            perm,
                            huge_base,
                            split: false,
                        },
                    );
                }
            }
        }
        match b.seal() {
            Ok(t) => {
                let slots = pages.keys().map(|p| p >> 30).collect();
                let fp = template_fingerprint(&self.m, &t);
                self.templates.push(MT {
                    t,
                    pages,
                    slots,
                    fp,
                });
            }
            Err(Error::OutOfFrames) => self.oom_ok(),
            Err(e) => panic!("seal: {e:?}"),
        }
    }

    /// Compare every space with its model, and check the invariants.
    fn check(&self) {
        for (n, ms) in self.spaces.iter().enumerate() {
            for (&va, p) in &ms.pages {
                let Some(tr) = ms.s.translate(VirtAddr::new(va)) else {
                    assert!(
                        p.data.is_none() && p.kind == Kind::Private,
                        "space {n}: {va:#x} absent, model {p:?}"
                    );
                    continue;
                };
                let f = frame(tr.phys.as_u64());
                let got = OFFS.map(|o| {
                    let mut b = [0u8; 8];
                    self.m.read(f, o as usize, &mut b);
                    u64::from_le_bytes(b)
                });
                assert_eq!(got, p.words(), "space {n}: contents of {va:#x}");
                assert_eq!(tr.executable, p.perm.exec, "space {n}: exec at {va:#x}");
                match (p.perm.write, p.kind) {
                    (true, Kind::Shared) => {
                        assert!(tr.writable, "space {n}: shared {va:#x} writable")
                    }
                    (true, _) => assert!(
                        tr.writable ^ tr.copy_on_write,
                        "space {n}: {va:#x} writable or COW"
                    ),
                    (false, _) => assert!(
                        !tr.writable && !tr.copy_on_write,
                        "space {n}: {va:#x} read-only"
                    ),
                }
                assert_eq!(
                    tr.page_size == PageSize::Size2MiB,
                    p.huge_base.is_some() && !p.split,
                    "space {n}: page size at {va:#x}"
                );
            }
            for i in 0..n_cand() {
                if !ms.pages.contains_key(&cand(i)) {
                    assert!(
                        ms.s.translate(VirtAddr::new(cand(i))).is_none(),
                        "space {n}: {:#x} should be unmapped",
                        cand(i)
                    );
                }
            }
        }
        for t in &self.templates {
            assert_eq!(
                template_fingerprint(&self.m, &t.t),
                t.fp,
                "a template was written"
            );
        }
        let spaces: Vec<&AddressSpace<SimMem>> = self.spaces.iter().map(|s| &s.s).collect();
        let templates: Vec<&Template<SimMem>> = self.templates.iter().map(|t| &t.t).collect();
        // Templates dropped by the test stay alive while a space spawned from them lives:
        // `check_counts` adds the ones the spaces hold.
        let mut ext: Vec<PhysFrame> = self.external.iter().map(|e| e.0).collect();
        // Roots of dropped spaces the memory keeps for reuse: one reference each, nothing below.
        ext.extend(self.m.kept_roots());
        check_counts(&self.m, &spaces, &templates, &ext);
    }
}

fn splits(pages: &BTreeMap<u64, MPage>, b: u64) -> bool {
    pages
        .get(&b)
        .and_then(|p| p.huge_base)
        .is_some_and(|hb| hb != b)
}

/// Run a program, checking after every step; returns the access trace, the number of
/// allocations made and the number of out-of-frames errors seen.
fn run_program(builds: &[Op], ops: &[Op], fail_at: Option<u64>) -> (Vec<String>, u64, usize) {
    let m = SimMem::new(1 << 16);
    m.keep_roots(2);
    let mut w = World {
        m: m.clone(),
        templates: vec![],
        spaces: vec![],
        external: vec![],
        inject: fail_at.is_some(),
        ooms: 0,
        trace: vec![],
        keys: HashMap::new(),
        kernel: model_kernel_half(),
    };
    m.fail_nth_alloc(fail_at);
    for op in builds.iter().chain(ops) {
        w.run(op);
        w.check();
    }
    assert!(
        w.ooms <= 1,
        "one injected failure, {} out-of-frames errors",
        w.ooms
    );
    let allocs = m.alloc_count();
    let World {
        templates,
        spaces,
        external,
        trace,
        ooms,
        ..
    } = w;
    drop(spaces);
    drop(templates);
    m.trim_roots();
    for (f, huge) in external {
        if huge {
            m.dec_ref_huge(PhysFrame::containing_address(f.start_address()));
        } else {
            m.dec_ref(f);
        }
    }
    assert_eq!(m.frames_in_use(), 0, "frames leaked");
    (trace, allocs, ooms)
}

fn force_mode(ops: &[Op], mode: Mode) -> Vec<Op> {
    ops.iter()
        .map(|op| match op {
            Op::Spawn { tpls, .. } => Op::Spawn {
                tpls: tpls.clone(),
                mode,
            },
            op => op.clone(),
        })
        .collect()
}

fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        max_shrink_iters: 4096,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES))]

    /// Random programs against the model.
    #[test]
    fn programs_match_the_model(
        builds in prop::collection::vec(build(), 1..=3),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run_program(&builds, &ops, None);
    }
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES / 4))]

    /// `Share` and `Copy` are observably identical: the same program with every spawn in one
    /// mode, then in the other, gives the same trace (and both match the model).
    #[test]
    fn share_and_copy_are_indistinguishable(
        builds in prop::collection::vec(build(), 1..=3),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let (share, _, _) = run_program(&builds, &force_mode(&ops, Mode::Share), None);
        let (copy, _, _) = run_program(&builds, &force_mode(&ops, Mode::Copy), None);
        prop_assert_eq!(share, copy);
    }


    /// The same with one allocation failing somewhere: the state stays consistent, nothing leaks.
    #[test]
    fn programs_survive_an_allocation_failure(
        builds in prop::collection::vec(build(), 1..=3),
        ops in prop::collection::vec(op(), 1..40),
        fail_at in 1..400u64,
    ) {
        run_program(&builds, &ops, Some(fail_at));
    }
}

/// A fork-server chain: template T → space A (writes) → snapshot S → space C (writes) →
/// snapshot G → space D (writes), in random modes, with 4 KiB and 2 MiB `Private` pages (so
/// borrowed tables, borrowed leaves and split 2 MiB pages are everywhere), then the six handles
/// dropped in the order `order` (0..720, a permutation of [T, A, S, C, G, D]). Without `huge`
/// the 2 MiB page is a 4 KiB one. `run_program`
/// checks the model, every count, every borrowed frame kept by its space's templates (invariant
/// 11) after each step, and that nothing is left at the end.
fn fork_chain(
    modes: [Mode; 3],
    writes: &[Vec<(usize, usize, u64)>; 3],
    order: usize,
    huge: bool,
) -> Vec<Op> {
    let r = |slot_delta, off, pages, kind, huge, backing| RegionGen {
        slot_delta,
        off,
        pages,
        kind,
        exec: false,
        huge,
        backing,
    };
    let mut ops = vec![Op::Build {
        slot: 0,
        regions: vec![
            r(0, 0, 6, Kind::Private, false, BackingGen::Frames),
            r(0, 5, 1, Kind::Private, huge, BackingGen::Zeroed),
            r(1, 6, 3, Kind::Private, false, BackingGen::Alias),
        ],
    }];
    // Candidate 0 is the start of slot 1, candidate 12 the start of slot 2.
    let whole = vec![(0, GIB / 4096), (12, GIB / 4096)];
    for (g, ws) in writes.iter().enumerate() {
        ops.push(Op::Spawn {
            tpls: vec![g],
            mode: modes[g],
        });
        for &(page, word, value) in ws {
            ops.push(Op::Write {
                sp: g,
                page,
                word,
                value,
            });
        }
        if g < 2 {
            ops.push(Op::Snapshot {
                sp: g,
                ranges: whole.clone(),
            });
        }
    }
    // The handles, in creation order: templates T, S, G are 0, 1, 2; spaces A, C, D are 0, 1, 2.
    let mut left: Vec<usize> = (0..6).collect();
    let (mut templates, mut spaces): (Vec<usize>, Vec<usize>) = (vec![0, 2, 4], vec![1, 3, 5]);
    let mut k = order;
    for n in (1..=6).rev() {
        let h = left.remove(k % n);
        k /= n;
        if let Some(t) = templates.iter().position(|&x| x == h) {
            templates.remove(t);
            ops.push(Op::DropTemplate { t });
        } else {
            let sp = spaces.iter().position(|&x| x == h).expect("a space");
            spaces.remove(sp);
            ops.push(Op::DropSpace { sp });
        }
    }
    ops
}

fn chain_writes() -> impl Strategy<Value = Vec<(usize, usize, u64)>> {
    prop::collection::vec((access_page(), 0..4usize, 1..1000u64), 1..8)
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES / 10))]

    /// Borrowed entries through two generations of snapshots, in any drop order.
    #[test]
    fn fork_chains_borrow_and_give_everything_back(
        modes in [mode(), mode(), mode()],
        writes in [chain_writes(), chain_writes(), chain_writes()],
        order in 0..720usize,
    ) {
        // Writes to unmapped candidates fail as the model says; the checks are run_program's.
        let (trace, _, _) = run_program(&[], &fork_chain(modes, &writes, order, true), None);
        prop_assert!(trace.iter().any(|t| t.starts_with("write")));
    }
}

/// The chain once per drop order, both modes, the same writes: all 720 orders leave nothing
/// (4 KiB pages only, to keep it quick: the property above splits 2 MiB pages too).
#[test]
fn fork_chain_every_drop_order() {
    // Hot pages 0 and 6 (slot 1: pages 0 and 510) and 8 (aliased, slot 2).
    let ws: Vec<(usize, usize, u64)> = [0, 6, 8]
        .iter()
        .enumerate()
        .map(|(i, &h)| (n_cand() + h, i % 4, 10 + i as u64))
        .collect();
    for order in 0..720 {
        let mode = if order % 2 == 0 {
            Mode::Share
        } else {
            Mode::Copy
        };
        let ops = fork_chain(
            [mode, Mode::Share, mode],
            &[ws.clone(), ws.clone(), ws.clone()],
            order,
            false,
        );
        let (trace, _, _) = run_program(&[], &ops, None);
        assert!(
            trace.iter().all(|t| t.contains("Ok")),
            "order {order}: {trace:#?}"
        );
    }
}

/// One generation of a repeated-snapshot chain: which space forks (the zygote, space 0, or the
/// newest space), the ranges (0: slots 1 and 2; 1: L4 entry 0 whole; 2: both L4 entries; 3: a
/// few pages of slot 1), whether it snapshots twice in a row, the child's mode, and the writes
/// (and one `protect` or `map`) the parent makes before and the child after.
#[derive(Clone, Debug)]
struct Generation {
    from_zygote: bool,
    ranges: usize,
    twice: bool,
    mode: Mode,
    before: Vec<(usize, usize, u64)>,
    after: Vec<(usize, usize, u64)>,
    extra: Option<Op>,
}

fn generation() -> impl Strategy<Value = Generation> {
    let extra = prop_oneof![
        2 => Just(None),
        1 => (access_page(), len_pages(), perm()).prop_map(|(page, pages, perm)| Some(Op::Protect { sp: 0, page, pages, perm })),
        1 => (0..n_cand(), 1..=4u64).prop_map(|(page, pages)| Some(Op::Map { sp: 0, page, pages, perm: Perm::RW, populate: false })),
    ];
    let writes = || prop::collection::vec((access_page(), 0..4usize, 1..1000u64), 0..4);
    (
        any::<bool>(),
        0..4usize,
        any::<bool>(),
        mode(),
        writes(),
        writes(),
        extra,
    )
        .prop_map(
            |(from_zygote, ranges, twice, mode, before, after, extra)| Generation {
                from_zygote,
                ranges,
                twice,
                mode,
                before,
                after,
                extra,
            },
        )
}

/// Template T (4 KiB and 2 MiB `Private` pages, given and aliased frames) → zygote (`Share`),
/// then per generation: the forking space writes, snapshots (maybe twice), a child is spawned
/// from the snapshot alone, the child writes. Children fork in turn (chains of snapshots of
/// spaces spawned from snapshots) or the zygote forks again (a snapshot per spawn).
fn repeated_snapshots(gens: &[Generation]) -> Vec<Op> {
    let r = |slot_delta, off, pages, kind, huge, backing| RegionGen {
        slot_delta,
        off,
        pages,
        kind,
        exec: false,
        huge,
        backing,
    };
    let mut ops = vec![
        Op::Build {
            slot: 0,
            regions: vec![
                r(0, 0, 6, Kind::Private, false, BackingGen::Frames),
                r(0, 5, 1, Kind::Private, true, BackingGen::Zeroed),
                r(1, 6, 3, Kind::Private, false, BackingGen::Alias),
            ],
        },
        Op::Spawn {
            tpls: vec![0],
            mode: Mode::Share,
        },
    ];
    let slot = |k: usize| (k * PAGE_OFFS.len(), GIB / 4096);
    // Generation n forks with n + 1 spaces alive (each fork adds one), the newest at n.
    for (n, g) in gens.iter().enumerate() {
        let sp = if g.from_zygote { 0 } else { n };
        let write = |sp, &(page, word, value): &(usize, usize, u64)| Op::Write {
            sp,
            page,
            word,
            value,
        };
        ops.extend(g.before.iter().map(|w| write(sp, w)));
        match &g.extra {
            Some(Op::Protect {
                page, pages, perm, ..
            }) => ops.push(Op::Protect {
                sp,
                page: *page,
                pages: *pages,
                perm: *perm,
            }),
            Some(Op::Map { page, pages, .. }) => ops.push(Op::Map {
                sp,
                page: *page,
                pages: *pages,
                perm: Perm::RW,
                populate: false,
            }),
            _ => {}
        }
        let ranges = match g.ranges {
            0 => vec![slot(0), slot(1)],
            1 => vec![(n_cand(), 0)],
            2 => vec![(n_cand(), 0), (n_cand() + 1, 0)],
            _ => vec![(0, 8)],
        };
        ops.push(Op::Fork {
            sp,
            ranges,
            twice: g.twice,
            mode: g.mode,
        });
        ops.extend(g.after.iter().map(|w| write(n + 1, w)));
    }
    ops
}

proptest! {
    #![proptest_config(config(DEFAULT_CASES / 20))]

    /// Incremental snapshots (invariant 12) through chains of forks and a zygote that snapshots
    /// at every spawn: the model, every count and every borrowed frame after every step, the
    /// clean fast path where the space holds its last snapshot, nothing left at the end.
    #[test]
    fn repeated_snapshots_of_forked_spaces_match_the_model(
        gens in prop::collection::vec(generation(), 1..7),
    ) {
        let (trace, _, _) = run_program(&[], &repeated_snapshots(&gens), None);
        prop_assert!(trace.iter().all(|t| !t.contains("OutOfFrames")));
    }
}

/// A fork-server scenario touching every operation, with both modes and all backings.
fn scenario() -> (Vec<Op>, Vec<Op>) {
    let r = |slot_delta, off, pages, kind, huge, backing| RegionGen {
        slot_delta,
        off,
        pages,
        kind,
        exec: false,
        huge,
        backing,
    };
    let builds = vec![
        Op::Build {
            slot: 0,
            regions: vec![
                r(0, 0, 3, Kind::ReadOnly, false, BackingGen::Frames),
                r(0, 5, 3, Kind::Private, false, BackingGen::Zeroed),
                r(1, 0, 1, Kind::Private, true, BackingGen::Zeroed),
            ],
        },
        Op::Build {
            slot: 3,
            regions: vec![r(0, 9, 4, Kind::Shared, false, BackingGen::Alias)],
        },
    ];
    // Candidate pages: 5..=7 private data (slot 1), 0..=2 read-only image, 19 the 2 MiB private
    // page (slot 2), 57 the shared alias (slot 513), 24.. free memory in slot 3.
    let ops = vec![
        Op::Spawn {
            tpls: vec![0, 1],
            mode: Mode::Share,
        },
        Op::Spawn {
            tpls: vec![0, 1],
            mode: Mode::Copy,
        },
        Op::Write {
            sp: 0,
            page: 5,
            word: 1,
            value: 5,
        },
        Op::Write {
            sp: 0,
            page: 19,
            word: 3,
            value: 6,
        },
        Op::Write {
            sp: 1,
            page: 5,
            word: 1,
            value: 7,
        },
        Op::Write {
            sp: 1,
            page: 57,
            word: 0,
            value: 8,
        },
        Op::Map {
            sp: 0,
            page: 29,
            pages: 4,
            perm: Perm::RW,
            populate: true,
        },
        Op::Map {
            sp: 0,
            page: 24,
            pages: 2,
            perm: Perm::RW,
            populate: false,
        },
        Op::Write {
            sp: 0,
            page: 24,
            word: 0,
            value: 9,
        },
        Op::Protect {
            sp: 0,
            page: 5,
            pages: 2,
            perm: Perm::R,
        },
        Op::Unmap {
            sp: 1,
            page: 6,
            pages: 1,
        },
        Op::Snapshot {
            sp: 0,
            ranges: vec![(0, GIB / 4096), (24, 1024)],
        },
        Op::Spawn {
            tpls: vec![2, 1],
            mode: Mode::Share,
        },
        Op::Spawn {
            tpls: vec![2, 1],
            mode: Mode::Copy,
        },
        Op::Write {
            sp: 2,
            page: 24,
            word: 2,
            value: 10,
        },
        Op::Write {
            sp: 3,
            page: 7,
            word: 2,
            value: 11,
        },
        Op::Write {
            sp: 0,
            page: 24,
            word: 2,
            value: 12,
        },
        Op::Read {
            sp: 2,
            page: 25,
            word: 0,
        },
        Op::Read {
            sp: 3,
            page: 0,
            word: 3,
        },
        Op::DropTemplate { t: 0 },
        Op::DropSpace { sp: 0 },
        Op::Write {
            sp: 1,
            page: 7,
            word: 0,
            value: 13,
        },
        Op::Unmap {
            sp: 2,
            page: 24,
            pages: 1024,
        },
    ];
    (builds, ops)
}

/// Fail the N-th frame allocation of the scenario, for every N: after each failure the state
/// matches the model (the failed operation changed nothing visible) and nothing leaks.
#[test]
fn every_allocation_failure_is_survived() {
    let (builds, ops) = scenario();
    let (trace, allocs, _) = run_program(&builds, &ops, None);
    assert!(trace.iter().all(|t| t.contains("Ok")), "{trace:#?}");
    assert!(allocs > 50, "scenario allocates ({allocs})");
    for n in 1..=allocs {
        let (_, _, ooms) = run_program(&builds, &ops, Some(n));
        assert_eq!(
            ooms, 1,
            "allocation {n} failed: exactly one operation reports it"
        );
    }
}
