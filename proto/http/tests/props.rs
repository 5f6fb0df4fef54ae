//! Property tests of the request reader: arbitrary bytes never panic and do not depend on how
//! they are split; a well-formed request parses to what was sent however it is split; oversize
//! heads are refused; a head that is not complete by its deadline is refused however it trickles.
//!
//! Case counts are explicit (`CASES_*`); `PROPTEST_CASES` in the environment does not change them.

use core::time::Duration;

use proptest::prelude::*;
use stencil_http::{HeadError, Header, Limits, Method, Request, RequestReader};

const CASES_ARBITRARY: u32 = 1024;
const CASES_WELL_FORMED: u32 = 512;
const CASES_OVERSIZE: u32 = 256;
const CASES_DEADLINE: u32 = 512;

/// Splits `bytes` at `cuts` (taken modulo the length, sorted): the chunks a server might read.
fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

/// Feeds the chunks, all well before the deadline, then ends the stream: the final answer.
fn read_all(limits: Limits, chunks: &[&[u8]]) -> Result<Request, HeadError> {
    let mut r = RequestReader::new(limits);
    for c in chunks {
        if let Some(req) = r.feed(c, Duration::ZERO)? {
            return Ok(req);
        }
    }
    r.end_of_stream()
}

/// One request, as parts, and how to write it.
#[derive(Debug, Clone)]
struct Parts {
    method: String,
    path: String,
    query: Option<String>,
    minor: u8,
    headers: Vec<(String, String)>,
    crlf: bool,
    leading_empty_lines: usize,
}

impl Parts {
    fn render(&self) -> Vec<u8> {
        let nl = if self.crlf { "\r\n" } else { "\n" };
        let mut s = nl.repeat(self.leading_empty_lines);
        s.push_str(&format!("{} {}", self.method, self.path));
        if let Some(q) = &self.query {
            s.push_str(&format!("?{q}"));
        }
        s.push_str(&format!(" HTTP/1.{}{nl}", self.minor));
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}{nl}"));
        }
        s.push_str(nl);
        s.into_bytes()
    }

    /// What the parser must make of [`render`](Self::render)'s bytes.
    fn expected(&self) -> Request {
        Request {
            method: match self.method.as_str() {
                "GET" => Method::Get,
                "HEAD" => Method::Head,
                m => Method::Other(m.to_owned()),
            },
            path: self.path.clone(),
            query: self.query.clone(),
            minor_version: self.minor,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| Header {
                    name: k.clone(),
                    value: v.clone().into_bytes(),
                })
                .collect(),
            head_len: self.render().len(),
        }
    }
}

fn parts(max_headers: usize) -> impl Strategy<Value = Parts> {
    (
        prop_oneof![
            Just("GET".to_owned()),
            Just("HEAD".to_owned()),
            "[A-Z][A-Z_-]{0,9}"
        ],
        "/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,60}",
        proptest::option::of("[A-Za-z0-9._~=&%/?-]{0,30}"),
        0u8..=1,
        prop::collection::vec(
            (
                "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}",
                // No whitespace at either end: the parser trims it.
                "([!-~]([ -~]{0,40}[!-~])?)?",
            ),
            0..=max_headers,
        ),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(
            |(method, path, query, minor, headers, crlf, leading_empty_lines)| Parts {
                method,
                path,
                query,
                minor,
                headers,
                crlf,
                leading_empty_lines,
            },
        )
}

/// Bytes that look a little like HTTP: a real request with random bytes overwritten, inserted
/// or cut off, or plain noise.
fn noisy_bytes() -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        parts(6),
        prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..6),
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(p, edits, tail)| {
            let mut b = p.render();
            for (at, byte, how) in edits {
                let i = at % (b.len() + 1);
                match how {
                    0 if i < b.len() => b[i] = byte,
                    1 => b.insert(i, byte),
                    _ => b.truncate(i),
                }
            }
            b.extend_from_slice(&tail);
            b
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        prop::collection::vec(
            prop_oneof![
                Just(b'\r'),
                Just(b'\n'),
                Just(b' '),
                Just(b':'),
                any::<u8>()
            ],
            0..300
        ),
        mutated,
    ]
}

fn small_limits() -> impl Strategy<Value = Limits> {
    (1usize..700, 0usize..8).prop_map(|(max_head, max_headers)| Limits {
        max_head,
        max_headers,
        ..Limits::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_ARBITRARY))]

    /// Any bytes, any limits, any split: no panic, and the same answer as reading them in one
    /// piece.
    #[test]
    fn arbitrary_bytes_any_split_same_answer(
        bytes in noisy_bytes(),
        limits in small_limits(),
        cuts in prop::collection::vec(any::<usize>(), 0..24),
    ) {
        let whole = read_all(limits, &[&bytes]);
        let chunked = read_all(limits, &split(&bytes, &cuts));
        prop_assert_eq!(&chunked, &whole);
        // An answer is a request that fits the limits, or a refusal with a status (or none
        // owed: the peer sent nothing).
        match whole {
            Ok(req) => {
                prop_assert!(req.head_len <= limits.max_head && req.head_len <= bytes.len());
                prop_assert!(req.headers.len() <= limits.max_headers);
                prop_assert!(req.path.starts_with('/'));
            }
            Err(e) => prop_assert!(
                e.status().is_some() || e == HeadError::Incomplete { received: 0 },
                "{e:?} has no status"
            ),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_WELL_FORMED))]

    /// A well-formed request, followed by body bytes, split anywhere: parses to what was sent.
    #[test]
    fn well_formed_request_any_split_parses_to_what_was_sent(
        p in parts(12),
        body in prop::collection::vec(any::<u8>(), 0..64),
        cuts in prop::collection::vec(any::<usize>(), 0..32),
    ) {
        let mut bytes = p.render();
        bytes.extend_from_slice(&body);
        let got = read_all(Limits::default(), &split(&bytes, &cuts));
        prop_assert_eq!(got, Ok(p.expected()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_OVERSIZE))]

    /// A head longer than `max_head`, split anywhere: refused as too large.
    #[test]
    fn oversize_head_is_refused(
        p in parts(3),
        max_head in 16usize..2048,
        extra in 1usize..300,
        cuts in prop::collection::vec(any::<usize>(), 0..32),
    ) {
        let mut p = p;
        let len = p.render().len();
        // One more header whose value makes the head `extra` bytes longer than the limit.
        let line = "X-Pad: ".len() + if p.crlf { 2 } else { 1 };
        let pad = (max_head + extra).saturating_sub(len + line).max(1);
        p.headers.push(("X-Pad".to_owned(), "p".repeat(pad)));
        let bytes = p.render();
        prop_assert!(bytes.len() > max_head);
        let limits = Limits { max_head, ..Limits::default() };
        let got = read_all(limits, &split(&bytes, &cuts));
        prop_assert_eq!(got, Err(HeadError::TooLarge { limit: max_head }));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES_DEADLINE))]

    /// The bytes of a well-formed request arrive at arbitrary times, as a server reading with
    /// `time_left` as its timeout would see them: it is served exactly when its last byte arrived
    /// before the deadline, and refused with 408 otherwise, however it trickled in. Whether the
    /// server asks `time_left` before it feeds or just feeds late bytes makes no difference.
    #[test]
    fn head_not_complete_by_the_deadline_is_refused(
        p in parts(6),
        deadline_ms in 1u64..10_000,
        cuts in prop::collection::vec(any::<usize>(), 0..40),
        gaps_ms in prop::collection::vec(0u64..1500, 40),
        check_first in any::<bool>(),
    ) {
        let bytes = p.render();
        let chunks = split(&bytes, &cuts);
        let deadline = Duration::from_millis(deadline_ms);
        let limits = Limits { deadline, ..Limits::default() };
        let mut r = RequestReader::new(limits);
        let mut now = Duration::ZERO;
        let mut answer = None;
        for (c, gap) in chunks.iter().zip(&gaps_ms) {
            now += Duration::from_millis(*gap);
            // The server waits at most `time_left`; if that ran out, it answers without reading
            // (or it feeds what it read anyway, and the reader refuses it).
            if check_first && r.time_left(now).is_none() {
                prop_assert!(now >= deadline);
                answer = Some(Err(r.timed_out()));
                break;
            }
            if now < deadline {
                prop_assert_eq!(r.time_left(now), Some(deadline - now));
            }
            match r.feed(c, now) {
                Ok(None) => {}
                done => {
                    answer = Some(done.map(|req| req.expect("a complete head")));
                    break;
                }
            }
        }
        let answer = answer.expect("every byte was fed: the head is complete");
        if now < deadline {
            prop_assert_eq!(answer, Ok(p.expected()));
        } else {
            prop_assert_eq!(answer, Err(HeadError::TimedOut { deadline }));
            prop_assert_eq!(r.time_left(now), None);
        }
    }
}
