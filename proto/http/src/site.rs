//! The content an httpd serves, as ordinary Rust data: the same code builds it for Stencil's
//! `apps/httpd` (in its zygote's heap) and for the Linux peer `bench/linux-httpd` (in the
//! warmed process that forks a child per connection), so both serve the same bytes from the same
//! structure.
//!
//! [`warm`] builds a [`Site`]: a `hashbrown::HashMap<String, Page>` of an index page (`/`), a text
//! page (`/hello.txt`) and `content_mib` MiB of binary files (`/file/N`, [`FILE_SIZE`] bytes each,
//! byte `i` of file `n` is [`file_byte`]`(n, i)`). Each [`Page`] holds its response head, rendered
//! once by [`response_head`], and its body. Every byte is written while warming: the pages are in
//! memory before the first request.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;

/// Size of each binary file of the content set.
pub const FILE_SIZE: u64 = 64 << 10;
/// Largest `content_mib` [`warm`] accepts: the content must fit memory anyway; this bound only
/// keeps the size arithmetic exact.
pub const MAX_CONTENT_MIB: u64 = 1 << 20;
/// The `Server` header of every response.
pub const SERVER: &str = "stencil-httpd";

/// The head of a response with a body of `len` bytes of type `mime`; the connection closes
/// after it.
pub fn response_head(status: &str, mime: &str, len: u64) -> String {
    format!(
        "HTTP/1.1 {status}\r\nServer: {SERVER}\r\nContent-Type: {mime}\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

/// One served file, ready to write: the warm state is a map of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The response head (with the content type and length) for a GET or HEAD of this page,
    /// rendered while warming.
    pub head: String,
    /// The body.
    pub body: Vec<u8>,
}

impl Page {
    /// A `200 OK` page of type `mime`.
    pub fn new(mime: &str, body: Vec<u8>) -> Page {
        Page {
            head: response_head("200 OK", mime, body.len() as u64),
            body,
        }
    }
}

/// The warm state: every served page by path.
#[derive(Debug)]
pub struct Site {
    /// The pages by request path (`/`, `/hello.txt`, `/file/0`, ...).
    pub pages: HashMap<String, Page>,
    /// Bytes of all bodies.
    pub bytes: u64,
}

/// Why [`warm`] could not build the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmError {
    /// `content_mib` is above [`MAX_CONTENT_MIB`].
    TooLarge {
        /// What was asked.
        content_mib: u64,
    },
    /// An allocation failed (the message says which).
    NoMemory(String),
}

impl core::fmt::Display for WarmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            WarmError::TooLarge { content_mib } => write!(
                f,
                "a content set of {content_mib} MiB: at most {MAX_CONTENT_MIB} MiB"
            ),
            WarmError::NoMemory(what) => write!(f, "{what}"),
        }
    }
}

impl core::error::Error for WarmError {}

/// Byte `i` of binary file `n`: a pattern a client can check.
pub fn file_byte(n: u64, i: u64) -> u8 {
    (i.wrapping_mul(31) ^ n.wrapping_mul(7)) as u8
}

/// How many binary files a content set of `content_mib` MiB has.
pub fn file_count(content_mib: u64) -> Result<u64, WarmError> {
    if content_mib > MAX_CONTENT_MIB {
        return Err(WarmError::TooLarge { content_mib });
    }
    // Bounded above: at most 2^40 bytes, so the shift does not overflow.
    Ok((content_mib << 20) / FILE_SIZE)
}

/// A body of `len` bytes made by `byte(i)`; `Err` if the memory is not there.
fn body(len: u64, byte: impl Fn(u64) -> u8) -> Result<Vec<u8>, WarmError> {
    let n = usize::try_from(len).map_err(|_| WarmError::NoMemory(format!("a {len}-byte page")))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| WarmError::NoMemory(format!("no memory for a {len}-byte page")))?;
    v.extend((0..len).map(byte));
    Ok(v)
}

/// The index page's HTML for a content set of `files` files.
fn index_html(files: u64) -> String {
    let mut index = String::from(
        "<!doctype html>\n<html><head><title>Stencil httpd</title></head><body>\n\
         <h1>Hello from Stencil httpd</h1>\n\
         <p>Every connection is served by a task spawned from a warmed zygote.</p>\n<ul>\n\
         <li><a href=\"/hello.txt\">/hello.txt</a></li>\n<li><a href=\"/stats\">/stats</a></li>\n",
    );
    for n in 0..files.min(8) {
        index.push_str(&format!(
            "<li><a href=\"/file/{n}\">/file/{n}</a> ({FILE_SIZE} bytes)</li>\n"
        ));
    }
    index.push_str(&format!(
        "</ul>\n<p>{files} files of {FILE_SIZE} bytes in the zygote's heap.</p>\n</body></html>\n"
    ));
    index
}

/// Builds the content set of `content_mib` MiB as Rust data in this heap.
pub fn warm(content_mib: u64) -> Result<Site, WarmError> {
    let files = file_count(content_mib)?;
    let mut pages = HashMap::new();
    pages
        .try_reserve(
            usize::try_from(files)
                .unwrap_or(usize::MAX)
                .saturating_add(2),
        )
        .map_err(|_| WarmError::NoMemory(format!("no memory for an index of {files} files")))?;
    pages.insert(
        String::from("/"),
        Page::new("text/html", index_html(files).into_bytes()),
    );
    pages.insert(
        String::from("/hello.txt"),
        Page::new("text/plain", b"Hello from a Stencil task!\n".to_vec()),
    );
    for n in 0..files {
        let b = body(FILE_SIZE, |i| file_byte(n, i))?;
        pages.insert(
            format!("/file/{n}"),
            Page::new("application/octet-stream", b),
        );
    }
    let bytes = pages.values().map(|p| p.body.len() as u64).sum();
    Ok(Site { pages, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_set_has_the_two_text_pages() {
        let site = warm(0).unwrap();
        assert_eq!(site.pages.len(), 2);
        let hello = &site.pages["/hello.txt"];
        assert_eq!(hello.body, b"Hello from a Stencil task!\n");
        assert_eq!(
            hello.head,
            "HTTP/1.1 200 OK\r\nServer: stencil-httpd\r\nContent-Type: text/plain\r\n\
             Content-Length: 27\r\nConnection: close\r\n\r\n"
        );
        let index = core::str::from_utf8(&site.pages["/"].body).unwrap();
        assert!(index.contains("Hello from Stencil httpd"));
        assert!(index.contains("<p>0 files of 65536 bytes"));
        assert!(!index.contains("/file/0"));
        assert_eq!(site.bytes, (27 + index.len()) as u64);
    }

    #[test]
    fn files_follow_the_pattern() {
        let site = warm(1).unwrap();
        // 1 MiB of 64 KiB files, the index and the text page.
        assert_eq!(site.pages.len(), 16 + 2);
        for n in [0u64, 7, 15] {
            let page = &site.pages[format!("/file/{n}").as_str()];
            assert_eq!(page.body.len() as u64, FILE_SIZE);
            for i in [0u64, 1, 4095, FILE_SIZE - 1] {
                assert_eq!(page.body[i as usize], file_byte(n, i), "file {n} byte {i}");
            }
            assert!(
                page.head
                    .contains("Content-Type: application/octet-stream\r\n")
            );
            assert!(page.head.contains("Content-Length: 65536\r\n"));
        }
        assert!(!site.pages.contains_key("/file/16"));
        let index = core::str::from_utf8(&site.pages["/"].body).unwrap();
        assert!(index.contains("/file/7"));
        assert!(
            !index.contains("/file/8\""),
            "the index lists at most 8 files"
        );
        assert!(site.bytes > 16 * FILE_SIZE);
    }

    #[test]
    fn pattern_differs_between_files() {
        assert_eq!(file_byte(0, 0), 0);
        assert_eq!(file_byte(0, 1), 31);
        assert_eq!(file_byte(1, 0), 7);
        assert_ne!(file_byte(1, 5), file_byte(2, 5));
    }

    #[test]
    fn too_large_is_an_error_not_an_overflow() {
        assert_eq!(file_count(MAX_CONTENT_MIB), Ok(MAX_CONTENT_MIB * 16));
        let e = file_count(MAX_CONTENT_MIB + 1).unwrap_err();
        assert_eq!(
            e,
            WarmError::TooLarge {
                content_mib: MAX_CONTENT_MIB + 1
            }
        );
        assert!(alloc::string::ToString::to_string(&e).contains("at most 1048576 MiB"));
        assert!(warm(u64::MAX).is_err());
    }
}
