//! The Linux guest of `cargo xtask httpbench --peer linux`: Debian's kernel (the same one the
//! spawn benchmark boots, [`super::linux::kernel`]) with a network device, and `bench/linux-httpd`
//! as `/init`.
//!
//! Debian builds virtio-net as a module (`CONFIG_VIRTIO_NET=m`, and `CONFIG_VIRTIO`,
//! `CONFIG_VIRTIO_PCI`, `CONFIG_VIRTIO_MMIO`, `CONFIG_NET_FAILOVER`, `CONFIG_FAILOVER` too), so the
//! initramfs carries those `.ko` files and `/init` loads them. The package ships no
//! `modules.dep` (depmod makes it at install), so the load order comes from each module's own
//! `.modinfo` section (`depends=`): [`load_order`] puts dependencies first. Only the files that
//! can be needed ([`MODULE_PATTERNS`], about 650 KB) are unpacked from the package, not its
//! 400 MB of modules.
//!
//! Which NIC transport: on microvm the virtio-mmio devices are described in QEMU's ACPI tables
//! (`LNRO0005`, which `virtio_mmio` matches; Debian lacks `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`),
//! on q35 the NIC is `virtio-net-pci`. Linux boots on both. On microvm under TCG it needs its TSC
//! rate on the command line ([`tsc_options`]): microvm has no HPET or ACPI PM timer and the
//! PIT calibration fails under TCG, after which the boot stops (tried: bzImage and the PVH
//! vmlinux, rtc on and off).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection};

use super::cpio::{self, Entry};
use super::linux;
use crate::qemu::{Accel, Machine};

/// Debian's kernel, fetched once (the spawn benchmark's, with the NIC modules unpacked too).
pub use super::linux::kernel;

/// The package name of linux-httpd (and its binary).
pub const HTTPD: &str = "linux-httpd";

pub use super::linux::MODULE_PATTERNS;

/// The modules the NIC needs on `machine` (their dependencies are added by [`load_order`]).
pub fn nic_modules(machine: Machine) -> [&'static str; 2] {
    match machine {
        Machine::Microvm => ["virtio_mmio", "virtio_net"],
        Machine::Q35 => ["virtio_pci", "virtio_net"],
    }
}

/// What a module's `.modinfo` says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModInfo {
    pub name: String,
    pub depends: Vec<String>,
}

/// Parses a `.modinfo` section: NUL-separated `key=value` strings.
pub fn parse_modinfo(section: &[u8]) -> Result<ModInfo> {
    let mut name = None;
    let mut depends = Vec::new();
    for field in section.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let field = std::str::from_utf8(field).context("a .modinfo field is not UTF-8")?;
        if let Some(n) = field.strip_prefix("name=") {
            name = Some(n.to_owned());
        } else if let Some(d) = field.strip_prefix("depends=") {
            depends.extend(d.split(',').filter(|d| !d.is_empty()).map(str::to_owned));
        }
    }
    Ok(ModInfo {
        name: name.context(".modinfo has no name=")?,
        depends,
    })
}

/// Reads the `.modinfo` of the module at `path`.
pub fn modinfo(path: &Path) -> Result<ModInfo> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let elf = object::File::parse(&*bytes)
        .with_context(|| format!("{} is not an ELF module", path.display()))?;
    let section = elf
        .section_by_name(".modinfo")
        .with_context(|| format!("{} has no .modinfo section", path.display()))?;
    let data = section
        .data()
        .with_context(|| format!("cannot read .modinfo of {}", path.display()))?;
    parse_modinfo(data).with_context(|| format!("{}", path.display()))
}

/// The modules to load for `roots`, dependencies first, each once. `known` maps a module's name
/// to its dependencies; a dependency missing from it, or a cycle, is an error.
pub fn load_order(roots: &[&str], known: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        known: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        if out.iter().any(|o| o == name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            bail!(
                "modules depend on each other in a cycle: {} -> {name}",
                path.join(" -> ")
            );
        }
        let Some(deps) = known.get(name) else {
            match path.last() {
                Some(parent) => bail!("{parent} needs module {name}, which was not unpacked"),
                None => bail!("module {name} was not unpacked"),
            }
        };
        path.push(name.to_owned());
        for d in deps {
            visit(d, known, path, out)?;
        }
        path.pop();
        out.push(name.to_owned());
        Ok(())
    }
    let mut out = Vec::new();
    for r in roots {
        visit(r, known, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// The unpacked modules of one kernel: name -> (file, dependencies).
#[derive(Debug, Clone)]
pub struct Modules {
    pub version: String,
    pub by_name: BTreeMap<String, (PathBuf, Vec<String>)>,
}

impl Modules {
    /// The files to load on `machine`, in order.
    pub fn for_machine(&self, machine: Machine) -> Result<Vec<(String, PathBuf)>> {
        let deps = self
            .by_name
            .iter()
            .map(|(n, (_, d))| (n.clone(), d.clone()))
            .collect();
        let order = load_order(&nic_modules(machine), &deps)
            .with_context(|| format!("the NIC modules of kernel {}", self.version))?;
        Ok(order
            .into_iter()
            .map(|n| {
                let path = self.by_name[&n].0.clone();
                (n, path)
            })
            .collect())
    }
}

/// The kernel version of `boot/vmlinuz-<version>`.
pub fn kernel_version(kernel: &Path) -> Result<String> {
    kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("{} is not named vmlinuz-<version>", kernel.display()))
}

fn find_ko(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            find_ko(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "ko") {
            out.push(p);
        }
    }
    Ok(())
}

/// The modules already unpacked under `dir/lib/modules/<version>` (never fetches anything);
/// `None` if there are none.
pub fn cached_modules(dir: &Path, version: &str) -> Result<Option<Modules>> {
    let root = dir.join("lib/modules").join(version);
    if !root.is_dir() {
        return Ok(None);
    }
    let mut files = Vec::new();
    find_ko(&root, &mut files).with_context(|| format!("cannot list {}", root.display()))?;
    if files.is_empty() {
        return Ok(None);
    }
    let mut by_name = BTreeMap::new();
    for f in files {
        let info = modinfo(&f)?;
        by_name.insert(info.name, (f, info.depends));
    }
    Ok(Some(Modules {
        version: version.to_owned(),
        by_name,
    }))
}

/// The NIC modules of the kernel at `kernel` (cached in `dir`, target/linux-peer): unpacked
/// with the kernel on a first fetch; a cache from before (the kernel only) fetches the same
/// package again with `apt-get download` and unpacks only [`MODULE_PATTERNS`].
pub fn modules(dir: &Path, kernel: &Path) -> Result<Modules> {
    let version = kernel_version(kernel)?;
    if let Some(m) = cached_modules(dir, &version)? {
        return Ok(m);
    }
    let package = format!("linux-image-{version}");
    println!(
        "linux: the cached kernel {version} has no NIC modules unpacked yet: fetching {package} \
         again for them"
    );
    let deb = linux::download(dir, &package)
        .with_context(|| format!("or delete {} to fetch the newest kernel", dir.display()))?;
    linux::unpack(&deb, dir, &MODULE_PATTERNS)?;
    let _ = std::fs::remove_file(&deb);
    cached_modules(dir, &version)?
        .with_context(|| format!("{package} unpacked no modules under {}", dir.display()))
}

/// The initramfs entries: `/init` (linux-httpd), the modules under `/lib/modules/` and their
/// load order in `/modules.list` (read by linux-httpd), `/dev/console`.
pub fn initramfs_entries(init: Vec<u8>, modules: &[(String, PathBuf)]) -> Result<Vec<Entry>> {
    let mut entries = vec![
        Entry::dir("dev"),
        // The kernel opens /dev/console for init's stdin/stdout/stderr before devtmpfs exists.
        Entry::char_dev("dev/console", 0o600, 5, 1),
        Entry::dir("proc"),
        Entry::dir("sys"),
        Entry::dir("lib"),
        Entry::dir("lib/modules"),
    ];
    let mut list = String::from("# kernel modules linux-httpd loads, in this order\n");
    for (name, path) in modules {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let at = format!("lib/modules/{name}.ko");
        list.push_str(&at);
        list.push('\n');
        entries.push(Entry::file(&at, 0o644, data));
    }
    entries.push(Entry::file("modules.list", 0o644, list.into_bytes()));
    entries.push(Entry::file("init", 0o755, init));
    Ok(entries)
}

/// Writes `dir/httpd-<machine>.cpio.gz` for linux-httpd at `init` and returns its path.
pub fn initramfs(dir: &Path, init: &Path, modules: &Modules, machine: Machine) -> Result<PathBuf> {
    let bin = std::fs::read(init).with_context(|| format!("cannot read {}", init.display()))?;
    let entries = initramfs_entries(bin, &modules.for_machine(machine)?)?;
    let path = dir.join(format!("httpd-{machine}.cpio.gz"));
    let bytes = cpio::initramfs(&entries).context("compressing the initramfs")?;
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The host's TSC rate in kHz, measured against the monotonic clock over 100 ms.
pub fn host_tsc_khz() -> u64 {
    fn rdtsc() -> u64 {
        // SAFETY: RDTSC exists on every x86_64 CPU and only reads the time-stamp counter.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(100));
    let (dt, dc) = (t0.elapsed(), rdtsc().wrapping_sub(c0));
    (u128::from(dc) * 1_000_000 / dt.as_micros().max(1) / 1000) as u64
}

/// Kernel options for the clock: on microvm under TCG the TSC rate (the guest's TSC is the
/// host's there) and `tsc=reliable` (there is no other clock to check it against).
pub fn tsc_options(machine: Machine, accel: Accel, host_khz: impl FnOnce() -> u64) -> String {
    match (machine, accel) {
        (Machine::Microvm, Accel::Tcg) => {
            format!(" tsc_early_khz={} tsc=reliable", host_khz())
        }
        _ => String::new(),
    }
}

/// linux-httpd's kernel command line: the spawn benchmark's options, the clock options, and
/// after `--` (the kernel passes it to `/init`) httpd's `--content-mib` and the page size:
/// `--pages 4k` (THP off for the server) or `--pages thp` (its heap grown so that the kernel's
/// `transparent_hugepage=always` backs it with huge pages).
pub fn cmdline(
    machine: Machine,
    accel: Accel,
    content_mib: u64,
    thp: bool,
    host_khz: impl FnOnce() -> u64,
) -> String {
    let pages = if thp { "thp" } else { "4k" };
    format!(
        "{}{} -- --content-mib {content_mib} --pages {pages}",
        linux::GUEST_CMDLINE,
        tsc_options(machine, accel, host_khz)
    )
}

/// Builds linux-httpd as a static executable and returns its path.
pub fn build_httpd(root: &Path) -> Result<PathBuf> {
    linux::build_static(root, HTTPD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn known(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(n, d)| ((*n).to_owned(), d.iter().map(|s| (*s).to_owned()).collect()))
            .collect()
    }

    /// Debian 6.1's dependencies, as their .modinfo sections say.
    fn debian() -> BTreeMap<String, Vec<String>> {
        known(&[
            ("virtio_ring", &[]),
            ("virtio", &["virtio_ring"]),
            ("failover", &[]),
            ("net_failover", &["failover"]),
            ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
            ("virtio_mmio", &["virtio", "virtio_ring"]),
            ("virtio_pci_legacy_dev", &[]),
            ("virtio_pci_modern_dev", &[]),
            (
                "virtio_pci",
                &[
                    "virtio_ring",
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio",
                ],
            ),
            ("virtio_balloon", &["virtio", "virtio_ring"]),
        ])
    }

    #[test]
    fn modinfo_fields() {
        let s = b"license=GPL\0\0depends=virtio_ring,virtio,net_failover\0name=virtio_net\0\
                  alias=virtio:d00000001v*\0";
        let m = parse_modinfo(s).unwrap();
        assert_eq!(m.name, "virtio_net");
        assert_eq!(m.depends, ["virtio_ring", "virtio", "net_failover"]);
        let none = parse_modinfo(b"depends=\0name=failover\0").unwrap();
        assert!(none.depends.is_empty());
        assert!(parse_modinfo(b"depends=a\0").is_err(), "no name");
        assert!(parse_modinfo(b"name=\xff\0").is_err(), "not UTF-8");
    }

    #[test]
    fn dependencies_load_first() {
        let mmio = load_order(&nic_modules(Machine::Microvm), &debian()).unwrap();
        assert_eq!(
            mmio,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        let pci = load_order(&nic_modules(Machine::Q35), &debian()).unwrap();
        assert_eq!(pci.len(), 8, "{pci:?}");
        assert!(
            !pci.iter()
                .any(|m| m == "virtio_mmio" || m == "virtio_balloon")
        );
        for (i, m) in pci.iter().enumerate() {
            for d in &debian()[m] {
                let at = pci.iter().position(|p| p == d).unwrap();
                assert!(at < i, "{d} before {m} in {pci:?}");
            }
        }
    }

    #[test]
    fn a_missing_module_or_a_cycle_is_an_error() {
        let mut k = debian();
        k.remove("failover");
        let e = load_order(&["virtio_net"], &k).unwrap_err().to_string();
        assert_eq!(
            e,
            "net_failover needs module failover, which was not unpacked"
        );
        let e = load_order(&["nope"], &k).unwrap_err().to_string();
        assert_eq!(e, "module nope was not unpacked");
        let cyc = known(&[("a", &["b"]), ("b", &["a"])]);
        let e = load_order(&["a"], &cyc).unwrap_err().to_string();
        assert!(e.contains("cycle: a -> b -> a"), "{e}");
    }

    #[test]
    fn version_of_the_kernel_file() {
        assert_eq!(
            kernel_version(Path::new("/t/boot/vmlinuz-6.1.0-57-amd64")).unwrap(),
            "6.1.0-57-amd64"
        );
        assert!(kernel_version(Path::new("/t/boot/bzImage")).is_err());
        assert!(kernel_version(Path::new("/t/boot/vmlinuz-")).is_err());
    }

    #[test]
    fn clock_options_only_on_microvm_under_tcg() {
        let line = cmdline(Machine::Microvm, Accel::Tcg, 64, false, || 2_599_998);
        assert!(
            line.ends_with(" tsc_early_khz=2599998 tsc=reliable -- --content-mib 64 --pages 4k"),
            "{line}"
        );
        assert!(line.starts_with(linux::GUEST_CMDLINE));
        let q35 = cmdline(Machine::Q35, Accel::Tcg, 4, true, || unreachable!());
        assert_eq!(
            q35,
            format!("{} -- --content-mib 4 --pages thp", linux::GUEST_CMDLINE)
        );
        assert!(!cmdline(Machine::Microvm, Accel::Kvm, 4, true, || 1).contains("tsc"));
        // The measured rate is a plausible one (0.1 .. 10 GHz).
        let khz = host_tsc_khz();
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
    }

    /// The names and contents of a gzip'd newc archive.
    fn read_initramfs(gz: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .unwrap();
        let mut out = BTreeMap::new();
        let mut a = &raw[..];
        let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        let pad = |n: usize| n.div_ceil(4) * 4;
        loop {
            assert_eq!(&a[..6], b"070701");
            let size = hex(&a[54..62]);
            let namesize = hex(&a[94..102]);
            let name = std::str::from_utf8(&a[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            let data_at = pad(110 + namesize);
            if name == "TRAILER!!!" {
                return out;
            }
            out.insert(name, a[data_at..data_at + size].to_vec());
            a = &a[pad(data_at + size)..];
        }
    }

    #[test]
    fn initramfs_lists_the_modules_in_order() {
        let tmp = std::env::temp_dir().join(format!("stencil-linux-net-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let mut mods = Vec::new();
        for n in ["virtio_ring", "virtio", "virtio_mmio"] {
            let p = tmp.join(format!("{n}.ko"));
            std::fs::File::create(&p)
                .unwrap()
                .write_all(n.as_bytes())
                .unwrap();
            mods.push((n.to_owned(), p));
        }
        let entries = initramfs_entries(b"init!".to_vec(), &mods).unwrap();
        let files = read_initramfs(&cpio::initramfs(&entries).unwrap());
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(files["init"], b"init!");
        assert_eq!(files["lib/modules/virtio.ko"], b"virtio");
        let list = String::from_utf8(files["modules.list"].clone()).unwrap();
        let lines: Vec<&str> = list.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "lib/modules/virtio_ring.ko",
                "lib/modules/virtio.ko",
                "lib/modules/virtio_mmio.ko"
            ]
        );
        assert!(files.contains_key("dev/console"));
    }

    /// With Debian's kernel cached (by `cargo xtask bench` or `httpbench --peer linux`), the
    /// real modules resolve and go into the initramfs. Nothing is fetched: without the cache the
    /// test says so on stderr and checks nothing else.
    #[test]
    fn cached_kernel_initramfs_holds_the_nic_modules() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux-peer");
        let skip = |why: String| {
            // Straight to the stream: libtest captures print!/eprint! of passing tests.
            let _ = writeln!(
                std::io::stderr(),
                "cached_kernel_initramfs_holds_the_nic_modules: skipped: {why}"
            );
        };
        let Some(kernel) = std::fs::read_dir(dir.join("boot")).ok().and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| kernel_version(p).is_ok())
        }) else {
            return skip(format!("no Debian kernel cached in {}", dir.display()));
        };
        let version = kernel_version(&kernel).unwrap();
        let Some(mods) = cached_modules(&dir, &version).unwrap() else {
            return skip(format!(
                "kernel {version} is cached without its NIC modules (httpbench --peer linux \
                 unpacks them)"
            ));
        };
        for machine in [Machine::Microvm, Machine::Q35] {
            let order = mods.for_machine(machine).unwrap();
            let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names.last(), Some(&"virtio_net"), "{names:?}");
            assert!(names.contains(&nic_modules(machine)[0]));
            let entries = initramfs_entries(b"init".to_vec(), &order).unwrap();
            let files = read_initramfs(&cpio::initramfs(&entries).unwrap());
            for (name, path) in &order {
                let data = &files[&format!("lib/modules/{name}.ko")];
                assert_eq!(data, &std::fs::read(path).unwrap());
                assert_eq!(&data[..4], b"\x7fELF");
            }
        }
    }
}
