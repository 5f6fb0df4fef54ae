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

const DEFAULT_CASES: u32 = 2000;
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
    huge_base: Option<u64>,
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
    Build { slot: usize, regions: Vec<RegionGen> },
    Spawn { tpls: Vec<usize>, mode: Mode },
    Read { sp: usize, page: usize, word: usize },
    Write { sp: usize, page: usize, word: usize, value: u64 },
    Exec { sp: usize, page: usize },
    Map { sp: usize, page: usize, pages: u64, perm: Perm, populate: bool },
    Unmap { sp: usize, page: usize, pages: u64 },
    Protect { sp: usize, page: usize, pages: u64, perm: Perm },
    Snapshot { sp: usize, ranges: Vec<(usize, u64)> },
    DropSpace { sp: usize },
    DropTemplate { t: usize },
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Private), Just(Kind::Shared), Just(Kind::ReadOnly)]
}
fn perm() -> impl Strategy<Value = Perm> {
    prop_oneof![Just(Perm::RW), Just(Perm::R), Just(Perm::RX), Just(Perm::RWX)]
}
fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Share), Just(Mode::Copy)]
}
fn len_pages() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 1..=8u64, 1 => Just(512u64), 1 => Just(1024u64)]
}
fn region() -> impl Strategy<Value = RegionGen> {
    let backing = prop_oneof![Just(BackingGen::Zeroed), Just(BackingGen::Frames), Just(BackingGen::Alias)];
    (0..2u64, 0..PAGE_OFFS.len(), 1..=6u64, kind(), any::<bool>(), prop::bool::weighted(0.15), backing)
        .prop_map(|(slot_delta, off, pages, kind, exec, huge, backing)| RegionGen { slot_delta, off, pages, kind, exec, huge, backing })
}
fn build() -> impl Strategy<Value = Op> {
    (0..SLOTS.len(), prop::collection::vec(region(), 1..=3)).prop_map(|(slot, regions)| Op::Build { slot, regions })
}
fn op() -> impl Strategy<Value = Op> {
    let sp = 0..4usize;
    let page = 0..n_cand();
    prop_oneof![
        2 => build(),
        3 => (prop::collection::vec(0..4usize, 1..=2), mode()).prop_map(|(tpls, mode)| Op::Spawn { tpls, mode }),
        4 => (sp.clone(), page.clone(), 0..4usize).prop_map(|(sp, page, word)| Op::Read { sp, page, word }),
        6 => (sp.clone(), page.clone(), 0..4usize, 1..1000u64).prop_map(|(sp, page, word, value)| Op::Write { sp, page, word, value }),
        1 => (sp.clone(), page.clone()).prop_map(|(sp, page)| Op::Exec { sp, page }),
        2 => (sp.clone(), page.clone(), len_pages(), perm(), any::<bool>())
            .prop_map(|(sp, page, pages, perm, populate)| Op::Map { sp, page, pages, perm, populate }),
        2 => (sp.clone(), page.clone(), len_pages()).prop_map(|(sp, page, pages)| Op::Unmap { sp, page, pages }),
        2 => (sp.clone(), page.clone(), len_pages(), perm()).prop_map(|(sp, page, pages, perm)| Op::Protect { sp, page, pages, perm }),
        2 => (sp.clone(), prop::collection::vec((page.clone(), prop_oneof![len_pages(), Just(GIB / 4096)]), 1..=2))
            .prop_map(|(sp, ranges)| Op::Snapshot { sp, ranges }),
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
}

fn words_of(pa: u64) -> [u64; 4] {
    OFFS.map(|o| pattern(pa, o))
}

fn fill(m: &SimMem, f: PhysFrame) {
    for o in OFFS {
        m.write(f, o as usize, &pattern(f.start_address().as_u64(), o).to_le_bytes());
    }
}

impl World {
    fn oom_ok(&mut self) {
        assert!(self.inject, "out of frames without an injected failure");
        self.ooms += 1;
    }

    fn test_frame(&mut self, huge: bool) -> Option<u64> {
        if huge {
            let run = self.m.alloc_huge_frame()?;
            let base = run.start_address().as_u64();
            for k in 0..512 {
                fill(&self.m, frame(base + k * 4096));
            }
            self.external.push((frame(base), true));
            Some(base)
        } else {
            let f = self.m.alloc_frame()?;
            fill(&self.m, f);
            self.external.push((f, false));
            Some(f.start_address().as_u64())
        }
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
                let ts: Vec<&Template<SimMem>> = idx.iter().map(|&i| &self.templates[i].t).collect();
                match AddressSpace::new(&self.m, &ts, *mode, None) {
                    Ok(s) => {
                        assert!(!conflict, "spawn should have failed with a slot conflict");
                        let mut pages = BTreeMap::new();
                        for &i in &idx {
                            pages.extend(self.templates[i].pages.iter().map(|(k, v)| (*k, v.clone())));
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
                let va = cand(*page) + OFFS[*word];
                let m = self.m.clone();
                let ms = &mut self.spaces[i];
                let expected = ms.pages.get(&cand(*page)).map(|p| p.words()[*word]);
                match (read_u64(&mut ms.s, &m, va), expected) {
                    (Ok(v), Some(e)) => assert_eq!(v, e, "read {va:#x}"),
                    (Err(Fault::Unmapped { .. }), None) => {}
                    (Err(Fault::OutOfFrames { .. }), Some(_)) => self.oom_ok(),
                    (r, e) => panic!("read {va:#x}: {r:?}, model {e:?}"),
                }
            }
            Op::Write { sp, page, word, value } => {
                let Some(i) = self.sp(*sp) else { return };
                let va = cand(*page) + OFFS[*word];
                let m = self.m.clone();
                let ms = &mut self.spaces[i];
                let mp = ms.pages.get_mut(&cand(*page));
                let r = write_u64(&mut ms.s, &m, va, *value);
                match (r, mp) {
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
                let va = cand(*page);
                let m = self.m.clone();
                let ms = &mut self.spaces[i];
                let exec = ms.pages.get(&va).map(|p| p.perm.exec);
                match (access(&mut ms.s, &m, va, Access::Execute), exec) {
                    (Ok(_), Some(true)) | (Err(Fault::ExecuteNoExec { .. }), Some(false)) | (Err(Fault::Unmapped { .. }), None) => {}
                    (Err(Fault::OutOfFrames { .. }), Some(true)) => self.oom_ok(),
                    (r, e) => panic!("exec {va:#x}: {r:?}, model {e:?}"),
                }
            }
            Op::Map { sp, page, pages, perm, populate } => {
                let Some(i) = self.sp(*sp) else { return };
                let (start, end) = (cand(*page), cand(*page) + pages * 4096);
                let ms = &mut self.spaces[i];
                let overlap = ms.pages.range(start..end).next().is_some();
                match ms.s.map(VirtAddr::new(start), pages * 4096, *perm, "map", *populate) {
                    Ok(f) => {
                        f.ignore();
                        assert!(!overlap, "map over existing pages");
                        for p in (start..end).step_by(4096) {
                            ms.pages.insert(p, MPage { data: None, kind: Kind::Private, perm: *perm, huge_base: None });
                        }
                    }
                    Err(Error::Overlap { .. }) => assert!(overlap),
                    Err(Error::OutOfFrames) => self.oom_ok(),
                    Err(e) => panic!("map: {e:?}"),
                }
            }
            Op::Unmap { sp, page, pages } => {
                let Some(i) = self.sp(*sp) else { return };
                let (start, end) = (cand(*page), cand(*page) + pages * 4096);
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
            Op::Protect { sp, page, pages, perm } => {
                let Some(i) = self.sp(*sp) else { return };
                let (start, end) = (cand(*page), cand(*page) + pages * 4096);
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
                match (ms.s.protect(VirtAddr::new(start), pages * 4096, *perm), expect) {
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
            Op::Snapshot { sp, ranges } => {
                let Some(i) = self.sp(*sp) else { return };
                let mut rs: Vec<(u64, u64)> = ranges.iter().map(|(p, n)| (cand(*p), cand(*p) + n * 4096)).collect();
                rs.sort();
                let ms = &mut self.spaces[i];
                let overlap = rs.windows(2).any(|w| w[1].0 < w[0].1);
                let split = !overlap && rs.iter().any(|&(s, e)| splits(&ms.pages, s) || splits(&ms.pages, e));
                let args: Vec<(VirtAddr, u64)> = rs.iter().map(|&(s, e)| (VirtAddr::new(s), e - s)).collect();
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
                        self.templates.push(MT { t, pages, slots, fp });
                    }
                    Err(Error::Overlap { .. }) => assert!(overlap),
                    Err(Error::SplitsHugePage { .. }) => assert!(split),
                    Err(Error::OutOfFrames) => self.oom_ok(),
                    Err(e) => panic!("snapshot: {e:?}"),
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
                BackingGen::Frames => Backing::Frames(frames.iter().map(|&f| PhysAddr::new(f)).collect()),
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
            let perm = Perm { write: g.kind != Kind::ReadOnly, exec: g.exec };
            for k in 0..n {
                let pstart = start + k * size;
                for sub in (0..size).step_by(4096) {
                    let pa = match g.backing {
                        BackingGen::Zeroed => None,
                        BackingGen::Frames => Some(frames[k as usize] + sub),
                        BackingGen::Alias => Some(frames[0] + sub),
                    };
                    let words = pa.map(words_of).unwrap_or([0; 4]);
                    let data = if g.kind == Kind::Shared {
                        let cell = match pa {
                            Some(pa) => cells.entry(pa).or_insert_with(|| Rc::new(RefCell::new(words))).clone(),
                            None => Rc::new(RefCell::new(words)),
                        };
                        Data::Shared(cell)
                    } else {
                        Data::Priv(words)
                    };
                    let huge_base = g.huge.then_some(pstart);
                    pages.insert(pstart + sub, MPage { data: Some(data), kind: g.kind, perm, huge_base });
                }
            }
        }
        match b.seal() {
            Ok(t) => {
                let slots = pages.keys().map(|p| p >> 30).collect();
                let fp = template_fingerprint(&self.m, &t);
                self.templates.push(MT { t, pages, slots, fp });
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
                    assert!(p.data.is_none() && p.kind == Kind::Private, "space {n}: {va:#x} absent, model {p:?}");
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
                    (true, Kind::Shared) => assert!(tr.writable, "space {n}: shared {va:#x} writable"),
                    (true, _) => assert!(tr.writable ^ tr.copy_on_write, "space {n}: {va:#x} writable or COW"),
                    (false, _) => assert!(!tr.writable && !tr.copy_on_write, "space {n}: {va:#x} read-only"),
                }
                assert_eq!(tr.page_size == PageSize::Size2MiB, p.huge_base.is_some(), "space {n}: page size at {va:#x}");
            }
            for i in 0..n_cand() {
                if !ms.pages.contains_key(&cand(i)) {
                    assert!(ms.s.translate(VirtAddr::new(cand(i))).is_none(), "space {n}: {:#x} should be unmapped", cand(i));
                }
            }
        }
        for t in &self.templates {
            assert_eq!(template_fingerprint(&self.m, &t.t), t.fp, "a template was written");
        }
        let mut roots: Vec<PhysFrame> = self.spaces.iter().map(|s| s.s.root()).collect();
        // Templates dropped by the test stay alive while a space spawned from them lives.
        let mut troots: Vec<PhysFrame> = self.templates.iter().map(|t| t.t.root()).collect();
        troots.extend(self.spaces.iter().flat_map(|s| s.s.templates().iter().map(|t| t.root())));
        troots.sort();
        troots.dedup();
        roots.extend(troots);
        let ext: Vec<PhysFrame> = self.external.iter().map(|e| e.0).collect();
        check_counts(&self.m, &roots, &ext);
    }
}

fn splits(pages: &BTreeMap<u64, MPage>, b: u64) -> bool {
    pages.get(&b).and_then(|p| p.huge_base).is_some_and(|hb| hb != b)
}

fn run_program(builds: &[Op], ops: &[Op], fail_at: Option<u64>) {
    let m = SimMem::new(1 << 16);
    let mut w = World { m: m.clone(), templates: vec![], spaces: vec![], external: vec![], inject: fail_at.is_some(), ooms: 0 };
    m.fail_nth_alloc(fail_at);
    for op in builds.iter().chain(ops) {
        w.run(op);
        w.check();
    }
    assert!(w.ooms <= 1, "one injected failure, {} out-of-frames errors", w.ooms);
    let World { templates, spaces, external, .. } = w;
    drop(spaces);
    drop(templates);
    for (f, huge) in external {
        if huge {
            m.dec_ref_huge(PhysFrame::containing_address(f.start_address()));
        } else {
            m.dec_ref(f);
        }
    }
    assert_eq!(m.frames_in_use(), 0, "frames leaked");
}

fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    ProptestConfig {
        cases,
        max_shrink_iters: 4096,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
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
