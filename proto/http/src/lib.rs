//! HTTP/1.x request heads for Stencil's `httpd`: the request line and headers, parsed by the
//! [`httparse`] crate and wrapped with this server's limits, plus a per-request deadline.
//!
//! `#![no_std]` + `alloc`, no I/O and no clock of its own, so the same code runs in the guest and
//! in host tests (unit tests and proptests in `tests/`).
//!
//! - [`parse_head`] parses a buffer that holds (the start of) a request: `Ok(None)` means the head
//!   is not complete yet.
//! - [`RequestReader`] is what a server feeds: every chunk that arrives on a connection, together
//!   with the time since the connection was accepted. It answers with the request once the head is
//!   complete, or with a [`HeadError`] once the head is too large, malformed, or late.
//!
//! What counts as complete: the request line and the headers up to and including the empty line
//! that ends them (`\r\n\r\n`; bare `\n` line ends are accepted too, and empty lines before the
//! request line are skipped). Bytes after the head (a body, a pipelined request) are not part of
//! it: [`Request::head_len`] says where the head ends.
//!
//! Limits ([`Limits`], defaults in brackets): the head must end within `max_head` bytes
//! [8 KiB] and carry at most `max_headers` headers [32], and it must be complete before
//! `deadline` has passed since the connection was accepted [5 s]: a client that trickles its
//! request (a "slowloris") is cut off however the bytes arrive. On top of httparse's grammar the
//! target must be in origin form (start with `/`).
//!
//! [`site`] is the content both servers warm and serve (Stencil's `apps/httpd` and its Linux peer
//! `bench/linux-httpd`): the same pages, built by the same code.

#![no_std]

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

pub mod site;

/// Default for [`Limits::max_head`]: longest request head, in bytes.
pub const DEFAULT_MAX_HEAD: usize = 8 << 10;
/// Default for [`Limits::max_headers`].
pub const DEFAULT_MAX_HEADERS: usize = 32;
/// Default for [`Limits::deadline`]: time from accept to a complete head.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// What a request head may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The head (request line, headers, the empty line) must end within this many bytes.
    pub max_head: usize,
    /// At most this many header lines.
    pub max_headers: usize,
    /// The head must be complete before this much time has passed since the accept.
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: DEFAULT_MAX_HEAD,
            max_headers: DEFAULT_MAX_HEADERS,
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// The request method. Methods are case-sensitive: `get` is [`Method::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// Any other token (`POST`, `DELETE`, ...).
    Other(String),
}

impl Method {
    fn from_token(t: &str) -> Method {
        match t {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            other => Method::Other(String::from(other)),
        }
    }

    /// The method as it appeared on the request line.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Other(s) => s,
        }
    }
}

/// One header line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The name as sent (compare with [`str::eq_ignore_ascii_case`]).
    pub name: String,
    /// The value without the whitespace around it; may hold any byte except CR/LF (obs-text).
    pub value: Vec<u8>,
}

/// A complete request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The target up to `?` (always starts with `/`; not percent-decoded).
    pub path: String,
    /// What follows the first `?` of the target, if there is one.
    pub query: Option<String>,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<Header>,
    /// Bytes of the head, the final empty line included (and any empty lines before it).
    pub head_len: usize,
}

impl Request {
    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }
}

/// Why a request head was refused. [`HeadError::status`] gives the response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// The head did not end within [`Limits::max_head`] bytes.
    TooLarge { limit: usize },
    /// More than [`Limits::max_headers`] header lines.
    TooManyHeaders { limit: usize },
    /// Not HTTP/1.0 or HTTP/1.1.
    UnsupportedVersion,
    /// The target is not in origin form (`/path?query`): `*`, `http://...`, ...
    BadTarget,
    /// Breaks the grammar; says where (httparse's description: "invalid token", ...).
    Malformed(&'static str),
    /// The head was not complete when [`Limits::deadline`] passed.
    TimedOut { deadline: Duration },
    /// The peer ended the connection after `received` bytes, before the head was complete
    /// (0: it sent nothing).
    Incomplete { received: usize },
}

impl HeadError {
    /// The status code and reason phrase to answer with, or `None` where no answer is due
    /// (the peer closed the connection without sending anything).
    pub fn status(&self) -> Option<(u16, &'static str)> {
        Some(match self {
            HeadError::TooLarge { .. } | HeadError::TooManyHeaders { .. } => {
                (431, "Request Header Fields Too Large")
            }
            HeadError::UnsupportedVersion => (505, "HTTP Version Not Supported"),
            HeadError::BadTarget | HeadError::Malformed(_) => (400, "Bad Request"),
            HeadError::TimedOut { .. } => (408, "Request Timeout"),
            HeadError::Incomplete { received: 0 } => return None,
            HeadError::Incomplete { .. } => (400, "Bad Request"),
        })
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge { limit } => {
                write!(f, "request head longer than {limit} bytes")
            }
            HeadError::TooManyHeaders { limit } => {
                write!(f, "more than {limit} header lines")
            }
            HeadError::UnsupportedVersion => f.write_str("only HTTP/1.0 and HTTP/1.1 are served"),
            HeadError::BadTarget => f.write_str("the request target must start with '/'"),
            HeadError::Malformed(what) => write!(f, "malformed request head: {what}"),
            HeadError::TimedOut { deadline } => write!(
                f,
                "request head not complete within {} ms",
                deadline.as_millis()
            ),
            HeadError::Incomplete { received } => write!(
                f,
                "connection closed after {received} bytes, before the request head was complete"
            ),
        }
    }
}

/// Parses the request head at the start of `buf`, within `limits`' size and header count (the
/// deadline is [`RequestReader`]'s business). `Ok(None)`: not complete yet, send more.
///
/// Only the first `max_head` bytes are looked at; if they hold no complete head the answer is
/// [`HeadError::TooLarge`].
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Request>, HeadError> {
    let window = &buf[..buf.len().min(limits.max_head)];
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head => {
            return Err(HeadError::TooLarge {
                limit: limits.max_head,
            });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        Err(httparse::Error::Version) => return Err(HeadError::UnsupportedVersion),
        Err(e) => return Err(HeadError::Malformed(error_text(e))),
    };
    // A complete parse fills in all three.
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    if !target.starts_with('/') {
        return Err(HeadError::BadTarget);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(String::from(q))),
        None => (target, None),
    };
    Ok(Some(Request {
        method: Method::from_token(method),
        path: String::from(path),
        query,
        minor_version,
        headers: req
            .headers
            .iter()
            .map(|h| Header {
                name: String::from(h.name),
                value: Vec::from(h.value),
            })
            .collect(),
        head_len,
    }))
}

fn error_text(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line end",
        httparse::Error::Token => "invalid method or target",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::TooManyHeaders => "too many headers",
        // A response-only error; not expected from a request parse.
        httparse::Error::Status => "invalid status",
    }
}

/// Collects one connection's request head as it arrives and enforces [`Limits`], the deadline
/// included. The clock is the caller's: every call passes `now`, the time since the connection
/// was accepted.
///
/// ```
/// use core::time::Duration;
/// use stencil_http::{Limits, Method, RequestReader};
///
/// let mut r = RequestReader::new(Limits::default());
/// let ms = Duration::from_millis;
/// assert_eq!(r.feed(b"GET /hello.txt HT", ms(10)), Ok(None));
/// let req = r.feed(b"TP/1.1\r\nHost: x\r\n\r\n", ms(20)).unwrap().unwrap();
/// assert_eq!((req.method, req.path.as_str()), (Method::Get, "/hello.txt"));
/// ```
///
/// The head is parsed once its end (an empty line) has arrived, when `max_head` bytes have
/// arrived, or at the end of the stream, so a head trickled in byte by byte costs one parse, not
/// one per byte. The answer depends only on the bytes, not on how they were split into chunks
/// (the proptests check this), except that a head not complete by the deadline is
/// [`HeadError::TimedOut`].
#[derive(Debug, Clone)]
pub struct RequestReader {
    limits: Limits,
    /// The first `max_head` bytes received (a longer head is refused, so later bytes are never
    /// looked at).
    buf: Vec<u8>,
    /// Bytes received in all, `buf`'s and those past `max_head`.
    received: usize,
    /// Where to go on looking for the end of the head.
    scan: usize,
    /// The answer, once there is one; later calls repeat it.
    done: Option<Result<Request, HeadError>>,
}

impl RequestReader {
    /// A reader for a connection accepted at time zero of the caller's clock.
    pub fn new(limits: Limits) -> Self {
        RequestReader {
            limits,
            buf: Vec::new(),
            received: 0,
            scan: 0,
            done: None,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes received so far.
    pub fn received(&self) -> usize {
        self.received
    }

    /// How long the caller may wait for more bytes: the time until the deadline, or `None` once
    /// it has passed (then the answer is [`RequestReader::timed_out`]).
    pub fn time_left(&self, now: Duration) -> Option<Duration> {
        self.limits
            .deadline
            .checked_sub(now)
            .filter(|left| !left.is_zero())
    }

    /// The answer when the deadline has passed with no complete head: [`HeadError::TimedOut`]
    /// (or the answer already given, if there is one).
    pub fn timed_out(&mut self) -> HeadError {
        match &self.done {
            Some(Err(e)) => e.clone(),
            _ => {
                let e = HeadError::TimedOut {
                    deadline: self.limits.deadline,
                };
                self.done = Some(Err(e.clone()));
                e
            }
        }
    }

    /// Adds `chunk`, which arrived at `now`. `Ok(None)`: the head is not complete yet; wait for
    /// more (at most [`time_left`](Self::time_left)). Bytes that arrive when the deadline has
    /// passed are refused with [`HeadError::TimedOut`], even if they would complete the head.
    pub fn feed(&mut self, chunk: &[u8], now: Duration) -> Result<Option<Request>, HeadError> {
        if let Some(done) = &self.done {
            return done.clone().map(Some);
        }
        if self.time_left(now).is_none() {
            return Err(self.timed_out());
        }
        self.received = self.received.saturating_add(chunk.len());
        let room = self.limits.max_head.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if !self.head_may_be_complete() && self.buf.len() < self.limits.max_head {
            return Ok(None);
        }
        self.parse()
    }

    /// The peer closed its side. The answer: the request if the head was complete, else why not
    /// ([`HeadError::Incomplete`], or the grammar error in what did arrive).
    pub fn end_of_stream(&mut self) -> Result<Request, HeadError> {
        if let Some(done) = &self.done {
            return done.clone();
        }
        let r = match self.parse() {
            Ok(Some(req)) => Ok(req),
            Ok(None) => Err(HeadError::Incomplete {
                received: self.received,
            }),
            Err(e) => Err(e),
        };
        self.done = Some(r.clone());
        r
    }

    fn parse(&mut self) -> Result<Option<Request>, HeadError> {
        let r = parse_head(&self.buf, &self.limits);
        match &r {
            Ok(Some(req)) => self.done = Some(Ok(req.clone())),
            Err(e) => self.done = Some(Err(e.clone())),
            Ok(None) => {}
        }
        r
    }

    /// Whether `buf` holds an empty line after the request line's first byte: the only way a
    /// head can be complete. Scans each byte once over all calls.
    fn head_may_be_complete(&mut self) -> bool {
        let b = &self.buf;
        // Empty lines before the request line do not end the head (httparse skips them).
        if self.scan == 0 {
            match b.iter().position(|&c| c != b'\r' && c != b'\n') {
                Some(start) => self.scan = start,
                None => return false,
            }
        }
        while let Some(off) = b[self.scan..].iter().position(|&c| c == b'\n') {
            let at = self.scan + off;
            match (b.get(at + 1), b.get(at + 2)) {
                (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => return true,
                // Not decidable yet: look here again when more bytes arrive.
                (None, _) | (Some(b'\r'), None) => {
                    self.scan = at;
                    return false;
                }
                _ => self.scan = at + 1,
            }
        }
        self.scan = b.len().max(self.scan);
        false
    }
}
