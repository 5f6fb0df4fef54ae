//! A tiny writer for the Linux initramfs format: a gzip'd cpio archive in the "newc" format
//! (`Documentation/driver-api/early-userspace/buffer-format.rst` in the kernel tree).
//!
//! Each entry is a 110-byte ASCII header — the magic `070701` and thirteen 8-digit hexadecimal
//! fields — followed by the NUL-terminated name, padded to a multiple of 4 bytes (counting the
//! header), then the data, padded to a multiple of 4. The archive ends with an entry named
//! `TRAILER!!!`. Written by hand so the bench needs no `cpio` binary.

use std::io::Write;

/// File type bits of `mode` (as in `st_mode`).
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFCHR: u32 = 0o020_000;

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path without a leading `/` (`init`, `dev/console`).
    pub name: String,
    /// Type and permission bits.
    pub mode: u32,
    /// Device number (major, minor) of a character or block device node.
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

impl Entry {
    pub fn dir(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            mode: S_IFDIR | 0o755,
            rdev: (0, 0),
            data: Vec::new(),
        }
    }

    pub fn file(name: &str, perm: u32, data: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            mode: S_IFREG | perm,
            rdev: (0, 0),
            data,
        }
    }

    pub fn char_dev(name: &str, perm: u32, major: u32, minor: u32) -> Self {
        Self {
            name: name.to_owned(),
            mode: S_IFCHR | perm,
            rdev: (major, minor),
            data: Vec::new(),
        }
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn field(v: u32) -> String {
    format!("{v:08x}")
}

/// Appends one newc member (`ino` is the entry's inode number; hard links are not used).
fn write_entry(out: &mut Vec<u8>, ino: u32, e: &Entry) {
    let is_dir = e.mode & 0o170_000 == S_IFDIR;
    let size = u32::try_from(e.data.len()).expect("cpio newc members are < 4 GiB");
    let namesize = u32::try_from(e.name.len() + 1).expect("short name");
    let fields = [
        ino,
        e.mode,
        0, // uid
        0, // gid
        if is_dir { 2 } else { 1 },
        0, // mtime: fixed, so the archive is reproducible
        size,
        0, // devmajor
        0, // devminor
        e.rdev.0,
        e.rdev.1,
        namesize,
        0, // check (only used by the "070702" CRC format)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(field(f).as_bytes());
    }
    out.extend_from_slice(e.name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(&e.data);
    pad4(out);
}

/// The uncompressed newc archive of `entries`, with its trailer.
pub fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).expect("few entries");
        write_entry(&mut out, ino, e);
    }
    let trailer = Entry {
        name: "TRAILER!!!".to_owned(),
        mode: 0,
        rdev: (0, 0),
        data: Vec::new(),
    };
    write_entry(&mut out, 0, &trailer);
    out
}

/// The archive, gzip'd: what the kernel takes as an initramfs (`-initrd`).
pub fn initramfs(entries: &[Entry]) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&archive(entries))?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back into entries (test-only reader).
    fn read(mut a: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let total = a.len();
        loop {
            let at = total - a.len();
            assert_eq!(at % 4, 0, "members start 4-aligned");
            assert_eq!(&a[..6], b"070701");
            let f = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) = (f(1), f(6), f(9), f(10), f(11));
            let name_end = 110 + namesize as usize;
            assert_eq!(a[name_end - 1], 0, "name is NUL-terminated");
            let name = std::str::from_utf8(&a[110..name_end - 1])
                .unwrap()
                .to_owned();
            let data_at = name_end.next_multiple_of(4);
            let data = a[data_at..data_at + size as usize].to_vec();
            let next = (data_at + size as usize).next_multiple_of(4);
            a = &a[next..];
            if name == "TRAILER!!!" {
                assert!(a.is_empty());
                return out;
            }
            out.push(Entry {
                name,
                mode,
                rdev: (rmaj, rmin),
                data,
            });
        }
    }

    #[test]
    fn console_header_by_hand() {
        let a = archive(&[Entry::char_dev("dev/console", 0o600, 5, 1)]);
        // Hand-computed: ino 1, mode 0o020600 = 0x2180, nlink 1, size 0, rdev 5:1,
        // namesize 12 ("dev/console" + NUL); 110 + 12 = 122 bytes, padded to 124.
        let expected_header = "070701\
            00000001000021800000000000000000000000010000000000000000\
            000000000000000000000005000000010000000c00000000";
        assert_eq!(&a[..110], expected_header.as_bytes());
        assert_eq!(&a[110..122], b"dev/console\0");
        assert_eq!(&a[122..124], b"\0\0");
        assert_eq!(&a[124..130], b"070701", "the trailer follows at 124");
        // Trailer: namesize 11 ("TRAILER!!!" + NUL): 110 + 11 = 121, padded to 124.
        assert_eq!(a.len(), 124 + 124);
    }

    #[test]
    fn round_trip() {
        let entries = vec![
            Entry::dir("dev"),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::file("init", 0o755, b"\x7fELF odd length".to_vec()),
            Entry::file("empty", 0o644, Vec::new()),
        ];
        let a = archive(&entries);
        assert_eq!(a.len() % 4, 0);
        assert_eq!(read(&a), entries);
    }

    #[test]
    fn gzip_round_trip() {
        use std::io::Read;
        let entries = [Entry::file("init", 0o755, vec![7; 10_000])];
        let gz = initramfs(&entries).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw, archive(&entries));
    }
}
