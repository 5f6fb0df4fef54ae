//! End-to-end checks of `cargo xtask run --elf` with tiny hand-made PVH guests (no libos needed):
//! exit-code mapping, crash, timeout, signals, and that QEMU never outlives xtask.
//! The QEMU tests are skipped (with a note) when qemu-system-x86_64 is not on PATH.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{have_qemu, xtask};

const LOAD: u32 = 0x10_0000;
const NOTE_OFF: usize = 0xc0;
const CODE_OFF: usize = 0x100;
const IDT_OFF: usize = 0xf0;

/// A minimal ELF64 that QEMU boots through PVH: one PT_LOAD at 1 MiB holding everything, one
/// PT_NOTE with XEN_ELFNOTE_PHYS32_ENTRY, and 32-bit `code` at the entry point.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; CODE_OFF + code.len()];
    let entry = LOAD + CODE_OFF as u32;
    // ELF header.
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&u64::from(entry).to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let total = f.len() as u64;
    let mut phdr =
        |at: usize, kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
            f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            f[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
            f[at + 48..at + 56].copy_from_slice(&align.to_le_bytes());
        };
    phdr(64, 1, 5, 0, u64::from(LOAD), total, 0x1000); // PT_LOAD, R+X
    let note_addr = u64::from(LOAD) + NOTE_OFF as u64;
    phdr(120, 4, 4, NOTE_OFF as u64, note_addr, 20, 4); // PT_NOTE
    // The note: namesz 4, descsz 4, type 18, "Xen\0", entry.
    let note = [4u32, 4, 18, u32::from_le_bytes(*b"Xen\0"), entry];
    for (i, w) in note.iter().enumerate() {
        f[NOTE_OFF + 4 * i..NOTE_OFF + 4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    // A zero-limit IDT descriptor stays all zero at IDT_OFF.
    f[CODE_OFF..].copy_from_slice(code);
    f
}

/// 32-bit code: print `text` on COM1.
fn print(text: &str) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text.bytes() {
        c.extend([0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    c
}

/// 32-bit code: write `v` to isa-debug-exit (QEMU exits (v << 1) | 1).
fn debug_exit(v: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf4, 0x00, 0xb8]; // mov dx, 0xf4; mov eax, imm32
    c.extend(v.to_le_bytes());
    c.push(0xef); // out dx, eax
    c
}

fn halt_forever() -> Vec<u8> {
    vec![0xf4, 0xeb, 0xfd] // hlt; jmp hlt
}

fn triple_fault() -> Vec<u8> {
    let mut c = vec![0x0f, 0x01, 0x1d]; // lidt [abs32]: a zero-limit IDT
    c.extend((LOAD + IDT_OFF as u32).to_le_bytes());
    c.push(0xcc); // int3 -> #GP -> #DF -> triple fault
    c
}

fn write_guest(name: &str, code: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xtask-plumbing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, pvh_elf(code)).unwrap();
    path
}

fn run_elf(elf: &Path, extra: &[&str]) -> Output {
    xtask()
        .args(["run", "--accel", "tcg", "--elf"])
        .arg(elf)
        .args(extra)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn dry_run_prints_the_command_line() {
    let elf = write_guest("dry.elf", &halt_forever());
    let out = run_elf(
        &elf,
        &[
            "--dry-run",
            "--log",
            "debug",
            "--no-share",
            "--",
            "a b",
            "c\"d",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    assert!(line.starts_with("qemu-system-x86_64 -M microvm,"), "{line}");
    assert!(
        line.contains(r#"-append 'log=debug share=off -- "a b" "c\"d"'"#),
        "{line}"
    );
    assert!(
        line.contains("-device isa-debug-exit,iobase=0xf4,iosize=0x04"),
        "{line}"
    );
}

#[test]
fn bad_usage_exits_113() {
    let out = xtask().args(["run", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(113));
    let out = xtask()
        .args(["run", "--elf", "/nonexistent/kernel"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(113));
    let out = xtask().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}

/// Bad values are refused before anything is built or booted: exit 113 and a message naming
/// the value (nothing is silently ignored, rounded or replaced by a default).
#[test]
fn bad_values_are_refused_with_a_message() {
    let elf = write_guest("values.elf", &halt_forever());
    let cases: &[(&[&str], &str)] = &[
        (&["--smp", "2"], "Stencil runs on one CPU for now"),
        (
            &["--mem", "0"],
            "'0' is too small: libos needs at least 4 MiB",
        ),
        (&["--mem", "1.5G"], "unknown size suffix '.5G'"),
        (&["--mem", "1025K"], "not a whole number of MiB"),
        (&["--mem", "99999999999999999999G"], "too large"),
        (&["--timeout=-1"], "'-1' is not a number of seconds"),
        (&["--timeout", "99999999999"], "too long"),
        (&["--port", "0:80"], "'0' in '0:80' is not a port number"),
        (
            &["--port", "80:+81"],
            "'+81' in '80:+81' is not a port number",
        ),
        (&["--gdb=0"], "--gdb"),
    ];
    for (args, want) in cases {
        let out = run_elf(&elf, args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(113), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want `{want}` in: {err}");
    }
}

/// `--gdb` puts the stub on 127.0.0.1 (not QEMU's `-s`, which binds every address and may fall
/// back to another), and a port that is taken is refused before QEMU starts.
#[test]
fn gdb_stub_address_is_exact() {
    let elf = write_guest("gdb.elf", &halt_forever());
    let out = run_elf(&elf, &["--gdb", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    assert!(line.contains(" -gdb tcp:127.0.0.1:1234 -S"), "{line}");
    assert!(!line.contains(" -s "), "{line}");
    let out = run_elf(&elf, &["--gdb=4321", "--dry-run"]);
    assert!(text(&out.stdout).contains(" -gdb tcp:127.0.0.1:4321 -S"));
    if !have_qemu("QEMU plumbing test") {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = run_elf(&elf, &[&format!("--gdb={port}")]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(113), "{err}");
    assert!(
        err.contains(&format!("--gdb: port {port} is not available on 127.0.0.1")),
        "{err}"
    );
}

#[test]
fn missing_qemu_names_the_install_command() {
    let elf = write_guest("noqemu.elf", &halt_forever());
    let out = xtask()
        .env("PATH", "/nonexistent")
        .args(["run", "--accel", "tcg", "--elf"])
        .arg(&elf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(113));
    assert!(text(&out.stderr).contains("sudo apt-get install qemu-system-x86"));
}

#[test]
fn exit_codes_come_back() {
    if !have_qemu("QEMU plumbing test") {
        return;
    }
    let mut ok = print("hello\n");
    ok.extend(debug_exit(1)); // code 0
    let out = run_elf(&write_guest("ok.elf", &ok), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");

    let out = run_elf(
        &write_guest("seven.elf", &debug_exit(8)),
        &["--machine", "q35"],
    );
    assert_eq!(out.status.code(), Some(7));
    assert!(text(&out.stderr).contains("exited with code 7"));

    let out = run_elf(&write_guest("panic.elf", &debug_exit(101)), &[]);
    assert_eq!(out.status.code(), Some(100));
    assert!(text(&out.stderr).contains("stencil: guest panicked (exit 100)"));

    let out = run_elf(&write_guest("crash.elf", &triple_fault()), &[]);
    assert_eq!(out.status.code(), Some(110), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("crashed"));
}

#[test]
fn hung_guest_is_killed_at_the_timeout() {
    if !have_qemu("QEMU plumbing test") {
        return;
    }
    let start = Instant::now();
    let out = run_elf(
        &write_guest("hang.elf", &halt_forever()),
        &["--timeout", "1"],
    );
    assert_eq!(out.status.code(), Some(111));
    assert!(text(&out.stderr).contains("timeout"));
    assert!(start.elapsed() < Duration::from_secs(20));
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        kids.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    kids
}

/// Gone, or a zombie waiting for init (it runs no more).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits up to 5 s for `pid` to die; if it does not, kills it (a test must not leak QEMU either).
fn wait_dead(pid: u32) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if is_dead(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
    false
}

/// Starts xtask on a guest that prints and hangs; returns it once QEMU runs, with QEMU's pid.
fn start_hanging(name: &str) -> (std::process::Child, u32) {
    let mut code = print("up\n");
    code.extend(halt_forever());
    let elf = write_guest(name, &code);
    let mut child = xtask()
        .args(["run", "--accel", "tcg", "--timeout", "30", "--elf"])
        .arg(&elf)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = [0u8; 3];
    out.read_exact(&mut seen).unwrap(); // the guest is running
    assert_eq!(&seen, b"up\n");
    let kids = children_of(child.id());
    assert_eq!(
        kids.len(),
        1,
        "xtask should have exactly one child, QEMU: {kids:?}"
    );
    (child, kids[0])
}

fn signal(pid: u32, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
    assert!(status.unwrap().success());
}

#[test]
fn sigint_kills_qemu_and_exits_130() {
    if !have_qemu("QEMU plumbing test") {
        return;
    }
    let (mut child, qemu) = start_hanging("sigint.elf");
    signal(child.id(), 2);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(wait_dead(qemu), "QEMU {qemu} outlived xtask");
}

#[test]
fn sigkill_of_xtask_takes_qemu_down() {
    if !have_qemu("QEMU plumbing test") {
        return;
    }
    let (mut child, qemu) = start_hanging("sigkill.elf");
    signal(child.id(), 9);
    let _ = child.wait();
    assert!(wait_dead(qemu), "QEMU {qemu} outlived a killed xtask");
}
