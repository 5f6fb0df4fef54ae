//! Unit tests: the request grammar, the limits and the deadline, one case each.

use core::time::Duration;

use stencil_http::{
    DEFAULT_DEADLINE, DEFAULT_MAX_HEAD, DEFAULT_MAX_HEADERS, HeadError, Header, Limits, Method,
    Request, RequestReader, parse_head,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn parse(raw: &[u8]) -> Result<Option<Request>, HeadError> {
    parse_head(raw, &Limits::default())
}

#[test]
fn defaults_are_documented_values() {
    let l = Limits::default();
    assert_eq!(l.max_head, DEFAULT_MAX_HEAD);
    assert_eq!(l.max_headers, DEFAULT_MAX_HEADERS);
    assert_eq!(l.deadline, DEFAULT_DEADLINE);
    assert_eq!((DEFAULT_MAX_HEAD, DEFAULT_MAX_HEADERS), (8192, 32));
    assert_eq!(DEFAULT_DEADLINE, Duration::from_secs(5));
}

#[test]
fn parses_a_get_with_headers_and_query() {
    let raw = b"GET /udp-echo?port=5000 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Empty:\r\nUser-Agent:  curl/8 \r\n\r\nBODY";
    let req = parse(raw).unwrap().unwrap();
    assert_eq!(req.method, Method::Get);
    assert_eq!(req.path, "/udp-echo");
    assert_eq!(req.query.as_deref(), Some("port=5000"));
    assert_eq!(req.minor_version, 1);
    assert_eq!(
        req.head_len,
        raw.len() - 4,
        "the body is not part of the head"
    );
    assert_eq!(req.header("host"), Some(&b"127.0.0.1:8080"[..]));
    assert_eq!(
        req.header("user-agent"),
        Some(&b"curl/8"[..]),
        "value trimmed"
    );
    assert_eq!(req.header("x-empty"), Some(&b""[..]));
    assert_eq!(req.header("missing"), None);
    assert_eq!(
        req.headers[0],
        Header {
            name: "Host".into(),
            value: b"127.0.0.1:8080".to_vec()
        }
    );
}

#[test]
fn methods_versions_and_line_ends() {
    let req = parse(b"HEAD / HTTP/1.0\n\n").unwrap().unwrap();
    assert_eq!(
        (req.method, req.minor_version, req.head_len),
        (Method::Head, 0, 17)
    );
    let req = parse(b"\r\n\r\nPOST /x HTTP/1.1\r\n\r\n").unwrap().unwrap();
    assert_eq!(req.method, Method::Other("POST".into()));
    assert_eq!(req.method.as_str(), "POST");
    // Methods are case-sensitive.
    let req = parse(b"get / HTTP/1.1\r\n\r\n").unwrap().unwrap();
    assert_eq!(req.method, Method::Other("get".into()));
    // A query may be empty, and only the first '?' splits.
    let req = parse(b"GET /a??b HTTP/1.1\r\n\r\n").unwrap().unwrap();
    assert_eq!(
        (req.path.as_str(), req.query.as_deref()),
        ("/a", Some("?b"))
    );
}

#[test]
fn incomplete_heads_ask_for_more() {
    for raw in [
        &b""[..],
        b"\r\n",
        b"GET",
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r",
    ] {
        assert_eq!(parse(raw), Ok(None), "{:?}", String::from_utf8_lossy(raw));
    }
}

#[test]
fn refuses_bad_heads_with_the_right_error() {
    let cases: [(&[u8], HeadError); 7] = [
        (b"GET / HTTP/2.0\r\n\r\n", HeadError::UnsupportedVersion),
        (b"GET / FTP/1.1\r\n\r\n", HeadError::UnsupportedVersion),
        (b"GET * HTTP/1.1\r\n\r\n", HeadError::BadTarget),
        (b"GET http://a/ HTTP/1.1\r\n\r\n", HeadError::BadTarget),
        (
            b"G(T / HTTP/1.1\r\n\r\n",
            HeadError::Malformed("invalid method or target"),
        ),
        (
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            HeadError::Malformed("invalid header name"),
        ),
        (
            b"GET / HTTP/1.1\r\nA: \x01\r\n\r\n",
            HeadError::Malformed("invalid header value"),
        ),
    ];
    for (raw, want) in cases {
        assert_eq!(parse(raw), Err(want), "{:?}", String::from_utf8_lossy(raw));
    }
}

#[test]
fn errors_map_to_statuses() {
    let s = |e: HeadError| e.status().map(|(c, _)| c);
    assert_eq!(s(HeadError::TooLarge { limit: 1 }), Some(431));
    assert_eq!(s(HeadError::TooManyHeaders { limit: 1 }), Some(431));
    assert_eq!(s(HeadError::UnsupportedVersion), Some(505));
    assert_eq!(s(HeadError::BadTarget), Some(400));
    assert_eq!(s(HeadError::Malformed("x")), Some(400));
    assert_eq!(s(HeadError::TimedOut { deadline: ms(1) }), Some(408));
    assert_eq!(s(HeadError::Incomplete { received: 3 }), Some(400));
    assert_eq!(s(HeadError::Incomplete { received: 0 }), None);
    assert_eq!(
        HeadError::TimedOut { deadline: ms(2000) }.to_string(),
        "request head not complete within 2000 ms"
    );
    assert_eq!(
        HeadError::TooLarge { limit: 8192 }.to_string(),
        "request head longer than 8192 bytes"
    );
}

#[test]
fn head_size_limit_is_exact() {
    let limits = Limits {
        max_head: 64,
        ..Limits::default()
    };
    let head = |len: usize| {
        // "GET / HTTP/1.1\r\nA: " + value + "\r\n\r\n" = 23 + value bytes
        let mut h = b"GET / HTTP/1.1\r\nA: ".to_vec();
        h.resize(len - 4, b'v');
        h.extend_from_slice(b"\r\n\r\n");
        assert_eq!(h.len(), len);
        h
    };
    assert!(parse_head(&head(64), &limits).unwrap().is_some());
    assert_eq!(
        parse_head(&head(65), &limits),
        Err(HeadError::TooLarge { limit: 64 })
    );
    // The limit needs 64 bytes to decide: fewer of an unfinished head ask for more.
    assert_eq!(parse_head(&head(65)[..63], &limits), Ok(None));
}

#[test]
fn header_count_limit_is_exact() {
    let limits = Limits {
        max_headers: 3,
        ..Limits::default()
    };
    let with = |n: usize| {
        let mut h = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..n {
            h.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        h.extend_from_slice(b"\r\n");
        h
    };
    assert_eq!(
        parse_head(&with(3), &limits)
            .unwrap()
            .unwrap()
            .headers
            .len(),
        3
    );
    assert_eq!(
        parse_head(&with(4), &limits),
        Err(HeadError::TooManyHeaders { limit: 3 })
    );
}

#[test]
fn reader_answers_once_and_repeats_the_answer() {
    let mut r = RequestReader::new(Limits::default());
    assert_eq!(r.feed(b"GET /a HTTP/1.1\r\n", ms(1)), Ok(None));
    let req = r.feed(b"\r\nextra", ms(2)).unwrap().unwrap();
    assert_eq!(req.path, "/a");
    assert_eq!(r.received(), 24);
    // After the answer: the same answer, whatever comes (even past the deadline).
    assert_eq!(r.feed(b"junk", ms(60_000)), Ok(Some(req.clone())));
    assert_eq!(r.end_of_stream(), Ok(req));
}

#[test]
fn reader_deadline() {
    let limits = Limits {
        deadline: ms(2000),
        ..Limits::default()
    };
    let mut r = RequestReader::new(limits);
    assert_eq!(r.time_left(ms(0)), Some(ms(2000)));
    assert_eq!(r.time_left(ms(1500)), Some(ms(500)));
    assert_eq!(r.time_left(ms(2000)), None);
    assert_eq!(r.time_left(ms(9999)), None);
    assert_eq!(r.feed(b"GET / HTTP/1.1\r\n", ms(1999)), Ok(None));
    // The completing bytes arrive at the deadline: too late.
    let late = HeadError::TimedOut { deadline: ms(2000) };
    assert_eq!(r.feed(b"\r\n", ms(2000)), Err(late.clone()));
    assert_eq!(r.end_of_stream(), Err(late.clone()));
    // A server whose read timed out asks the reader directly.
    let mut r = RequestReader::new(limits);
    assert_eq!(r.timed_out(), late);
    assert_eq!(r.feed(b"GET / HTTP/1.1\r\n\r\n", ms(1)), Err(late));
}

#[test]
fn reader_end_of_stream() {
    let mut r = RequestReader::new(Limits::default());
    assert_eq!(
        r.end_of_stream(),
        Err(HeadError::Incomplete { received: 0 })
    );
    let mut r = RequestReader::new(Limits::default());
    assert_eq!(r.feed(b"GET / HTTP/1.1\r\nHo", ms(0)), Ok(None));
    assert_eq!(
        r.end_of_stream(),
        Err(HeadError::Incomplete { received: 18 })
    );
    // A grammar error that no empty line followed is found at the end of the stream.
    let mut r = RequestReader::new(Limits::default());
    assert_eq!(r.feed(b"GET / HTTP/1.1\r\nBad Name", ms(0)), Ok(None));
    assert_eq!(
        r.end_of_stream(),
        Err(HeadError::Malformed("invalid header name"))
    );
}

#[test]
fn reader_refuses_an_endless_head_at_the_limit() {
    let mut r = RequestReader::new(Limits::default());
    let line =
        b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    assert_eq!(r.feed(b"GET / HTTP/1.1\r\n", ms(0)), Ok(None));
    let mut answer = Ok(None);
    let mut fed = 16;
    while answer == Ok(None) {
        answer = r.feed(line, ms(1));
        fed += line.len();
        assert!(
            fed < DEFAULT_MAX_HEAD + line.len(),
            "no answer after {fed} bytes"
        );
    }
    // 32 header lines fit in 8 KiB at 78 bytes each... the header count runs out first.
    assert_eq!(answer, Err(HeadError::TooManyHeaders { limit: 32 }));
    let mut r = RequestReader::new(Limits::default());
    let big = vec![b'a'; 9000];
    assert_eq!(r.feed(b"GET /", ms(0)), Ok(None));
    assert_eq!(
        r.feed(&big, ms(0)),
        Err(HeadError::TooLarge {
            limit: DEFAULT_MAX_HEAD
        })
    );
    assert_eq!(
        r.received(),
        9005,
        "bytes past the limit are counted, not kept"
    );
}
