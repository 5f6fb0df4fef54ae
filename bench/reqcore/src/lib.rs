//! The request benchmark's shared core (issue #13): the warm state a fork server holds and the
//! handler one request runs, compiled unchanged into Stencil's `apps/spawnbench` (`req.rs`) and
//! into the Linux peer (`bench/linux-peer`, its request mode), so both systems run the same
//! code on the same data.
//!
//! - [`State::build`] makes the warm state as ordinary Rust data: a `hashbrown` [`HashMap`]
//!   index (key → record position) plus a `Vec` of [`RECORD_BYTES`]-byte records, about `bytes`
//!   in all, every page written. It is deterministic: the keys, values and payloads come from a
//!   fixed generator and the index uses a fixed-seed hasher, so both systems build the same table.
//! - [`handle`] is one request: [`LOOKUPS`] lookups of pseudo-random keys through the index,
//!   then `W` writes, each to a record on a different 4 KiB page, spread evenly over the records.
//!   It returns a checksum of everything it read and wrote.
//! - [`expected`] computes that checksum directly — the records by position, without the index
//!   and without writing — so the parent can check every request's answer (a request that
//!   computes the wrong answer is a failed benchmark, not a number).
//!
//! `#![no_std]` + `alloc`: no I/O, no clock, no allocation in [`handle`] or [`expected`] (a
//! forked Linux child may run them, and Stencil's zygote computes [`expected`] without writing
//! its own memory).

#![no_std]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt;

use foldhash::fast::FixedState;
use hashbrown::HashMap;

/// Lookups per request (the K).
pub const LOOKUPS: usize = 100;
/// The write counts the benchmark measures (the W: pages written per request).
pub const WRITES: [u32; 4] = [0, 1, 16, 256];
/// The `kind` of each [`WRITES`] series in the benchmark's `RESULT` lines (and its CSV).
pub const KINDS: [&str; 4] = ["request_w0", "request_w1", "request_w16", "request_w256"];
/// State sizes of the full benchmark: 16 MiB, 256 MiB, 1 GiB.
pub const SIZES: [u64; 3] = [16 << 20, 256 << 20, 1 << 30];
/// State sizes of `--quick`.
pub const QUICK_SIZES: [u64; 1] = [16 << 20];
/// Requests run and discarded before each series' samples.
pub const WARMUP: usize = 2;

/// Bytes of one record.
pub const RECORD_BYTES: usize = 480;
/// Bytes of a record's payload.
pub const PAYLOAD: usize = RECORD_BYTES - 24;
/// Bytes of state per record: the record plus its share of the index (a `(u64, u32)` bucket,
/// 16 bytes, and a control byte, at a load of one half: 34 bytes), rounded to a power of two so
/// that a power-of-two size gives a power-of-two record count.
pub const BYTES_PER_RECORD: u64 = 512;
/// The page size the writes are spread by.
pub const PAGE: usize = 4096;
/// Records between two writes at least: `STRIDE_MIN * RECORD_BYTES >= PAGE`, so every write of
/// a request lands on a page of its own.
pub const STRIDE_MIN: usize = PAGE.div_ceil(RECORD_BYTES);
/// The smallest state [`State::build`] makes: room for 256 writes on distinct pages.
pub const MIN_BYTES: u64 = 2 << 20;

const KEY_SEED: u64 = 0x5eed_0f5e_ed5e_ed01;
const VALUE_SEED: u64 = 0x7a1e_0000_c0ff_ee00;
const HASH_SEED: u64 = 0x1de7_0000_0000_0013;
/// What a lookup folds in when the index has no entry for a key, or one that leads to a record
/// with another key: values no record digest is expected to take.
const MISSING: u64 = 0xdead_0000_0000_0001;
const WRONG_RECORD: u64 = 0xdead_0000_0000_0002;

/// One record of the warm state.
#[derive(Clone, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Record {
    /// The key the index maps to this record.
    pub key: u64,
    /// The record's value; a write adds the request's running checksum to it.
    pub value: u64,
    /// Writes this record has seen.
    pub hits: u64,
    /// Data a lookup reads one byte of.
    pub payload: [u8; PAYLOAD],
}

const _: () = assert!(core::mem::size_of::<Record>() == RECORD_BYTES);

/// The warm state: an index plus records (see the crate docs).
#[derive(Clone)]
pub struct State {
    index: HashMap<u64, u32, FixedState>,
    records: Vec<Record>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("records", &self.records.len())
            .field("heap_bytes", &self.heap_bytes())
            .finish_non_exhaustive()
    }
}

/// Why [`State::build`] made no state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// Below [`MIN_BYTES`].
    TooSmall { bytes: u64 },
    /// More records than a `u32` position (or this machine's `usize`) can name.
    TooLarge { bytes: u64 },
    /// The allocator refused the records or the index.
    OutOfMemory { what: &'static str, bytes: u64 },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::TooSmall { bytes } => write!(
                f,
                "a state of {bytes} bytes is below the smallest, {MIN_BYTES} bytes (256 writes \
                 on distinct pages need that many records)"
            ),
            BuildError::TooLarge { bytes } => write!(
                f,
                "a state of {bytes} bytes has more records than a u32 position can name"
            ),
            BuildError::OutOfMemory { what, bytes } => {
                write!(f, "out of memory for the {what} ({bytes} bytes)")
            }
        }
    }
}

/// Why [`Request::new`] made no request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// More writes than the state has records [`STRIDE_MIN`] apart.
    TooManyWrites { writes: u32, max: u32 },
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::TooManyWrites { writes, max } => write!(
                f,
                "{writes} writes on distinct pages do not fit this state (at most {max})"
            ),
        }
    }
}

/// SplitMix64's output function: a bijection on `u64` that mixes well.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A SplitMix64 stream: the request's deterministic choices.
struct Stream(u64);

impl Stream {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
}

/// The key of record `i` (distinct for distinct `i`: `mix` is a bijection).
pub fn key_of(i: u64) -> u64 {
    mix(i ^ KEY_SEED)
}

fn value_of(key: u64) -> u64 {
    mix(key ^ VALUE_SEED)
}

fn payload_byte(key: u64) -> u8 {
    key.to_le_bytes()[7]
}

/// What a lookup of a record folds into the checksum; `r` chose the payload byte.
fn digest(rec: &Record, r: u64) -> u64 {
    // In range: the remainder is below PAYLOAD.
    let at = ((r >> 40) % PAYLOAD as u64) as usize;
    rec.value ^ rec.hits.rotate_left(32) ^ (u64::from(rec.payload[at]) << 8)
}

/// The seed of request `i` of the series with `writes` writes (the same on both systems).
pub fn request_seed(i: u64, writes: u32) -> u64 {
    mix(i ^ (u64::from(writes) << 40) ^ 0x0e0e_5eed)
}

/// A checksum as a task's exit code (Stencil's children answer through it): 31 bits, never
/// negative.
pub fn exit_code(checksum: u64) -> i32 {
    let folded = (checksum ^ (checksum >> 31) ^ (checksum >> 62)) & 0x7fff_ffff;
    // In range: 31 bits.
    folded as i32
}

/// Sample requests per (size, mode, W) series: the big states cost Linux tens of millions of
/// instructions per fork, so they get fewer.
pub fn samples(bytes: u64, quick: bool) -> usize {
    match (quick, bytes) {
        (false, b) if b <= 16 << 20 => 200,
        (false, b) if b <= 256 << 20 => 60,
        (false, _) => 20,
        (true, b) if b <= 16 << 20 => 40,
        (true, _) => 10,
    }
}

impl State {
    /// Builds a state of about `bytes` (records of [`RECORD_BYTES`] plus the index; the exact
    /// figure is [`heap_bytes`](Self::heap_bytes)), every page of it written.
    pub fn build(bytes: u64) -> Result<State, BuildError> {
        if bytes < MIN_BYTES {
            return Err(BuildError::TooSmall { bytes });
        }
        let n = bytes / BYTES_PER_RECORD;
        let count = usize::try_from(n)
            .ok()
            .filter(|_| u32::try_from(n).is_ok())
            .ok_or(BuildError::TooLarge { bytes })?;
        // The records first: the biggest allocation starts where the allocator's region does
        // (the Linux peer's arena is 2 MiB-aligned).
        let mut records = Vec::new();
        records
            .try_reserve_exact(count)
            .map_err(|_| BuildError::OutOfMemory {
                what: "records",
                bytes: n.saturating_mul(RECORD_BYTES as u64),
            })?;
        let mut index = HashMap::with_hasher(FixedState::with_seed(HASH_SEED));
        index
            .try_reserve(count)
            .map_err(|_| BuildError::OutOfMemory {
                what: "index",
                bytes: n.saturating_mul(34),
            })?;
        for i in 0..n {
            let key = key_of(i);
            records.push(Record {
                key,
                value: value_of(key),
                hits: 0,
                payload: [payload_byte(key); PAYLOAD],
            });
            // In range: `n` fits a u32 (checked above).
            index.insert(key, i as u32);
        }
        Ok(State { index, records })
    }

    /// Number of records.
    pub fn records(&self) -> usize {
        self.records.len()
    }

    /// Bytes the state's two allocations hold (records and index).
    pub fn heap_bytes(&self) -> u64 {
        let records = self.records.capacity() * RECORD_BYTES;
        (records + self.index.allocation_size()) as u64
    }

    /// The most writes one request may make (each on a page of its own).
    pub fn max_writes(&self) -> u32 {
        u32::try_from(self.records.len() / STRIDE_MIN).unwrap_or(u32::MAX)
    }

    /// Record `i`, if there is one.
    pub fn record(&self, i: usize) -> Option<&Record> {
        self.records.get(i)
    }
}

/// One request: its seed (which keys it looks up, where its writes start) and its write count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    seed: u64,
    writes: u32,
}

impl Request {
    /// A request with `writes` writes against `state`; an error if they do not fit on distinct
    /// pages.
    pub fn new(seed: u64, writes: u32, state: &State) -> Result<Request, RequestError> {
        let max = state.max_writes();
        if writes > max {
            return Err(RequestError::TooManyWrites { writes, max });
        }
        Ok(Request { seed, writes })
    }

    /// The write count.
    pub fn writes(&self) -> u32 {
        self.writes
    }
}

/// Where a request's writes go: the first record, the distance between two, and how many
/// (never more than fit `STRIDE_MIN` apart: a request built for a bigger state writes fewer).
fn spread(records: usize, writes: u32, s: &mut Stream) -> (usize, usize, usize) {
    let start = s.next();
    let most = records / STRIDE_MIN;
    let w = usize::try_from(writes).map_or(most, |w| w.min(most));
    if w == 0 {
        return (0, 0, 0);
    }
    let stride = records / w;
    // In range: the remainder is below `stride`, a usize.
    ((start % stride as u64) as usize, stride, w)
}

/// Runs one request on `state` (a fork's own copy): the lookups through the index, then the
/// writes. Returns the checksum; allocates nothing.
pub fn handle(state: &mut State, req: &Request) -> u64 {
    let n = state.records.len();
    let mut s = Stream(req.seed);
    let mut acc = req.seed;
    if n == 0 {
        return acc;
    }
    for _ in 0..LOOKUPS {
        let r = s.next();
        let key = key_of(r % n as u64);
        let seen = match state.index.get(&key) {
            Some(&pos) => match state.records.get(pos as usize) {
                Some(rec) if rec.key == key => digest(rec, r),
                _ => WRONG_RECORD,
            },
            None => MISSING,
        };
        acc = mix(acc ^ seen);
    }
    let (first, stride, w) = spread(n, req.writes, &mut s);
    for j in 0..w {
        if let Some(rec) = state.records.get_mut(first + j * stride) {
            rec.hits = rec.hits.wrapping_add(1);
            rec.value = rec.value.wrapping_add(acc);
            acc = mix(acc ^ rec.value ^ rec.hits);
        }
    }
    acc
}

/// The checksum [`handle`] returns for `req` on `state`, computed directly: each looked-up
/// record by its position (not through the index), each write's result without writing.
pub fn expected(state: &State, req: &Request) -> u64 {
    let n = state.records.len();
    let mut s = Stream(req.seed);
    let mut acc = req.seed;
    if n == 0 {
        return acc;
    }
    for _ in 0..LOOKUPS {
        let r = s.next();
        let i = r % n as u64;
        // In range: `i < n`, a usize.
        let seen = match state.records.get(i as usize) {
            Some(rec) if rec.key == key_of(i) => digest(rec, r),
            _ => WRONG_RECORD,
        };
        acc = mix(acc ^ seen);
    }
    let (first, stride, w) = spread(n, req.writes, &mut s);
    for j in 0..w {
        if let Some(rec) = state.records.get(first + j * stride) {
            let hits = rec.hits.wrapping_add(1);
            let value = rec.value.wrapping_add(acc);
            acc = mix(acc ^ value ^ hits);
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use alloc::collections::BTreeSet;
    use alloc::string::ToString;

    fn changed(a: &State, b: &State) -> Vec<usize> {
        (0..a.records())
            .filter(|&i| a.records[i] != b.records[i])
            .collect()
    }

    #[test]
    fn handler_matches_the_direct_computation() {
        let warm = State::build(MIN_BYTES).unwrap();
        assert_eq!(warm.records(), 4096);
        for w in WRITES {
            for i in 0..25 {
                let req = Request::new(request_seed(i, w), w, &warm).unwrap();
                let want = expected(&warm, &req);
                let mut fork = warm.clone();
                assert_eq!(handle(&mut fork, &req), want, "request {i}, W={w}");
                // Exactly W records changed, each on a page of its own.
                let c = changed(&warm, &fork);
                assert_eq!(c.len(), w as usize, "request {i}, W={w}");
                let pages: BTreeSet<usize> = c
                    .iter()
                    .map(|&r| (&fork.records[r] as *const Record as usize) / PAGE)
                    .collect();
                assert_eq!(
                    pages.len(),
                    w as usize,
                    "request {i}, W={w}: distinct pages"
                );
                for &r in &c {
                    assert_eq!(fork.records[r].hits, 1);
                    assert_eq!(fork.records[r].key, warm.records[r].key);
                    assert_eq!(fork.records[r].payload, warm.records[r].payload);
                }
            }
        }
    }

    #[test]
    fn writes_spread_over_the_whole_state() {
        let warm = State::build(4 << 20).unwrap();
        let req = Request::new(request_seed(3, 256), 256, &warm).unwrap();
        let mut fork = warm.clone();
        handle(&mut fork, &req);
        let c = changed(&warm, &fork);
        let stride = warm.records() / 256;
        assert!(c[0] < stride, "the first write is in the first stride");
        assert!(
            *c.last().unwrap() >= warm.records() - stride,
            "the last in the last"
        );
        assert!(c.windows(2).all(|p| p[1] - p[0] == stride), "evenly apart");
    }

    #[test]
    fn requests_in_a_row_on_one_state_stay_consistent() {
        // A state that served requests (as a zygote that changed its state would) still agrees.
        let mut s = State::build(MIN_BYTES).unwrap();
        let mut seen = BTreeSet::new();
        for i in 0..40 {
            let req = Request::new(request_seed(i, 16), 16, &s).unwrap();
            let want = expected(&s, &req);
            assert_eq!(handle(&mut s, &req), want, "request {i}");
            seen.insert(want);
        }
        assert_eq!(seen.len(), 40, "different requests, different checksums");
        assert!(
            s.records.iter().any(|r| r.hits > 1),
            "some record was written twice"
        );
    }

    #[test]
    fn the_state_is_deterministic_and_indexed() {
        let a = State::build(MIN_BYTES).unwrap();
        let b = State::build(MIN_BYTES).unwrap();
        assert_eq!(a.records, b.records);
        for (i, rec) in a.records.iter().enumerate() {
            assert_eq!(rec.key, key_of(i as u64));
            assert_eq!(a.index.get(&rec.key), Some(&(i as u32)));
            assert_eq!(rec.hits, 0);
            assert!(rec.payload.iter().all(|&p| p == payload_byte(rec.key)));
        }
        assert_eq!(a.index.len(), a.records());
        let req = Request::new(request_seed(0, 1), 1, &a).unwrap();
        assert_eq!(expected(&a, &req), expected(&b, &req));
        // Build the state the size asks for: records plus index, within 2 %.
        let bytes = 16 << 20;
        let big = State::build(bytes).unwrap();
        assert_eq!(big.records() as u64, bytes / BYTES_PER_RECORD);
        let ratio = big.heap_bytes() as f64 / bytes as f64;
        assert!((0.98..1.02).contains(&ratio), "{ratio}");
    }

    #[test]
    fn a_wrong_state_gives_a_wrong_checksum() {
        let warm = State::build(MIN_BYTES).unwrap();
        let req = Request::new(request_seed(7, 0), 0, &warm).unwrap();
        let want = expected(&warm, &req);
        // The index sends every key to record 0.
        let mut bad = warm.clone();
        for v in bad.index.values_mut() {
            *v = 0;
        }
        assert_ne!(handle(&mut bad, &req), want);
        // One looked-up record's value changed.
        let mut bad = warm.clone();
        for rec in bad.records.iter_mut() {
            rec.value ^= 1;
        }
        assert_ne!(handle(&mut bad, &req), want);
        // An index that lost its keys.
        let mut bad = warm.clone();
        bad.index.clear();
        assert_ne!(handle(&mut bad, &req), want);
    }

    #[test]
    fn bad_sizes_and_write_counts_are_errors() {
        assert_eq!(
            State::build(MIN_BYTES - 1).unwrap_err(),
            BuildError::TooSmall {
                bytes: MIN_BYTES - 1
            }
        );
        let huge = 1u64 << 50;
        assert_eq!(
            State::build(huge).unwrap_err(),
            BuildError::TooLarge { bytes: huge }
        );
        assert!(
            State::build(0)
                .unwrap_err()
                .to_string()
                .contains("below the smallest")
        );
        let s = State::build(MIN_BYTES).unwrap();
        assert_eq!(s.max_writes(), 455);
        let e = Request::new(1, 456, &s).unwrap_err();
        assert_eq!(
            e,
            RequestError::TooManyWrites {
                writes: 456,
                max: 455
            }
        );
        assert!(e.to_string().contains("at most 455"));
        assert!(Request::new(1, 455, &s).is_ok());
    }

    #[test]
    fn exit_codes_are_never_negative() {
        for c in [0, 1, u64::MAX, 1 << 31, 0x8000_0000_0000_0000, 0x7fff_ffff] {
            assert!(exit_code(c) >= 0, "{c:#x}");
        }
        assert_ne!(exit_code(1), exit_code(2));
        assert_eq!(samples(16 << 20, false), 200);
        assert!(samples(1 << 30, true) <= samples(1 << 30, false));
    }
}
