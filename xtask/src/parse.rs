//! Parsers for the values a user types on xtask's command line (and in a test case's
//! `[[package.metadata.stencil.test]]` table): guest memory sizes and timeouts. `-p HOST:GUEST`
//! is [`crate::qemu::PortForward`]'s `FromStr`. Each one rejects bad input with a message that
//! says what is accepted; none panics, overflows or silently rounds (property tests below).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// The least guest memory libos boots with. Measured by booting `hello` (TCG, microvm and q35) at
/// decreasing sizes: 4 MiB boots and runs it (3 MiB RAM seen, 0 MiB free); at 3 MiB libos panics
/// during boot, at 2 MiB the guest crashes or panics, at 1 MiB it hangs. Apps that build
/// templates need more.
pub const MIN_MEM_MIB: u64 = 4;

/// The most `--mem` accepts: 1 TiB (QEMU itself refuses more than the host can address).
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Guest memory, a whole number of MiB in `MIN_MEM_MIB..=MAX_MEM_MIB`.
///
/// The syntax is QEMU's `-m`: a plain number is MiB; a suffix `K`, `M`, `G` or `T` (either case)
/// scales it by 2^10, 2^20, 2^30 or 2^40 bytes. The size must be a whole number of MiB (QEMU would
/// round anything else; xtask says so instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize {
    mib: u64,
}

impl MemSize {
    /// `--mem`'s default, 256 MiB.
    pub const DEFAULT: MemSize = MemSize { mib: 256 };

    /// The size in MiB.
    pub fn mib(self) -> u64 {
        self.mib
    }

    /// The size as QEMU's `-m` argument, e.g. `256M`.
    pub fn qemu_arg(self) -> String {
        format!("{}M", self.mib())
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mib.is_multiple_of(1024) {
            write!(f, "{}G", self.mib / 1024)
        } else {
            write!(f, "{}M", self.mib)
        }
    }
}

impl FromStr for MemSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let syntax = "a size like 256M, 2G or 512 (MiB); suffixes K, M, G, T";
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, suffix) = s.split_at(digits_end);
        if digits.is_empty() {
            return Err(format!("'{s}' is not a memory size: expected {syntax}"));
        }
        let shift = match suffix {
            "" | "M" | "m" => 20,
            "K" | "k" => 10,
            "G" | "g" => 30,
            "T" | "t" => 40,
            _ => {
                return Err(format!(
                    "'{s}': unknown size suffix '{suffix}': expected {syntax}"
                ));
            }
        };
        let too_big = || format!("'{s}' is too large: at most {} GiB", MAX_MEM_MIB / 1024);
        // A number too long for u64 is certainly too big (digits are all ASCII digits here).
        let n: u64 = digits.parse().map_err(|_| too_big())?;
        let bytes = n.checked_mul(1u64 << shift).ok_or_else(too_big)?;
        if !bytes.is_multiple_of(MIB) {
            return Err(format!(
                "'{s}' is not a whole number of MiB (QEMU would round it)"
            ));
        }
        let mib = bytes / MIB;
        if mib < MIN_MEM_MIB {
            return Err(format!(
                "'{s}' is too small: libos needs at least {MIN_MEM_MIB} MiB to boot"
            ));
        }
        if mib > MAX_MEM_MIB {
            return Err(too_big());
        }
        Ok(MemSize { mib })
    }
}

/// The longest timeout accepted: one year (a guard against overflow, not a policy).
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// `--timeout SECS`: whole seconds; `0` means no timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

impl FromStr for Timeout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let secs = parse_secs(s)?;
        Ok(Timeout((secs != 0).then(|| Duration::from_secs(secs))))
    }
}

/// Whole seconds, `0..=MAX_TIMEOUT_SECS`, ASCII digits only.
pub fn parse_secs(s: &str) -> Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "'{s}' is not a number of seconds (expected whole seconds, e.g. 30; 0: none)"
        ));
    }
    match s.parse::<u64>() {
        Ok(n) if n <= MAX_TIMEOUT_SECS => Ok(n),
        _ => Err(format!(
            "'{s}' seconds is too long: at most {MAX_TIMEOUT_SECS} (one year)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::PortForward;
    use proptest::prelude::*;

    /// Cases per property, the same in every run (CI included).
    const CASES: u32 = 256;

    fn mem(s: &str) -> Result<u64, String> {
        s.parse::<MemSize>().map(MemSize::mib)
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(mem("256M"), Ok(256));
        assert_eq!(mem("256"), Ok(256));
        assert_eq!(mem("2G"), Ok(2048));
        assert_eq!(mem("2g"), Ok(2048));
        assert_eq!(mem("1T"), Ok(1 << 20));
        assert_eq!(mem("16384K"), Ok(16));
        assert_eq!(mem("4"), Ok(4));
        for bad in [
            "", "0", "0M", "M", "-1G", "2GB", " 2G", "2G ", "1.5G", "+2G", "3", "3M", "1025K",
        ] {
            assert!(mem(bad).is_err(), "{bad:?} accepted");
        }
        assert!(mem("0").unwrap_err().contains("too small"));
        assert!(mem("1025K").unwrap_err().contains("whole number of MiB"));
        assert!(mem("2T").unwrap_err().contains("too large"));
        assert!(
            mem("99999999999999999999999G")
                .unwrap_err()
                .contains("too large")
        );
        assert!(mem("17179869184T").unwrap_err().contains("too large"));
        assert!(mem("x").unwrap_err().contains("not a memory size"));
        assert!(mem("2X").unwrap_err().contains("unknown size suffix"));
        assert_eq!("256M".parse::<MemSize>().unwrap().qemu_arg(), "256M");
        assert_eq!("2G".parse::<MemSize>().unwrap().qemu_arg(), "2048M");
    }

    #[test]
    fn timeouts() {
        assert_eq!("0".parse(), Ok(Timeout(None)));
        assert_eq!("30".parse(), Ok(Timeout(Some(Duration::from_secs(30)))));
        for bad in [
            "",
            "-1",
            "+3",
            "1.5",
            "3s",
            " 3",
            "31536001",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<Timeout>().is_err(), "{bad:?} accepted");
        }
        assert!(parse_secs("31536001").unwrap_err().contains("too long"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// No string makes a parser panic; every error is a message naming the input.
        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            if let Err(e) = s.parse::<MemSize>() {
                prop_assert!(e.contains(&format!("'{s}'")), "{e}");
            }
            if let Err(e) = s.parse::<Timeout>() {
                prop_assert!(e.contains(&format!("'{s}'")), "{e}");
            }
            if let Err(e) = s.parse::<PortForward>() {
                prop_assert!(!e.is_empty());
            }
        }

        /// Near-miss strings (digits, suffix letters, separators) are accepted exactly when they
        /// are valid, and an accepted value is what the string says.
        #[test]
        fn mem_accepts_exactly_the_valid_forms(s in "[0-9]{0,22}[KMGTkmgtBX .-]{0,2}") {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            let suffix = &s[digits.len()..];
            let shift = match suffix {
                "" | "M" | "m" => Some(20u32),
                "K" | "k" => Some(10),
                "G" | "g" => Some(30),
                "T" | "t" => Some(40),
                _ => None,
            };
            let expected = shift.and_then(|sh| {
                let n: u128 = digits.parse().ok()?;
                let bytes = n << sh;
                let mib = bytes >> 20;
                (bytes.is_multiple_of(1 << 20)
                    && (u128::from(MIN_MEM_MIB)..=u128::from(MAX_MEM_MIB)).contains(&mib))
                .then(|| u64::try_from(mib).unwrap())
            });
            match (mem(&s), expected) {
                (Ok(got), Some(want)) => prop_assert_eq!(got, want),
                (Err(_), None) => {}
                (got, want) => prop_assert!(false, "{s:?}: got {got:?}, want {want:?}"),
            }
        }

        /// Every valid size round-trips through its display form and its QEMU argument.
        #[test]
        fn mem_round_trips(mib in MIN_MEM_MIB..=MAX_MEM_MIB) {
            let m: MemSize = format!("{mib}M").parse().unwrap();
            prop_assert_eq!(m.mib(), mib);
            prop_assert_eq!(m.to_string().parse::<MemSize>(), Ok(m));
            prop_assert_eq!(m.qemu_arg().parse::<MemSize>(), Ok(m));
            prop_assert_eq!(format!("{}K", mib * 1024).parse::<MemSize>(), Ok(m));
        }

        /// Every number of seconds in range is accepted as itself; anything above is refused.
        #[test]
        fn timeout_round_trips(secs in any::<u64>()) {
            let got = secs.to_string().parse::<Timeout>();
            if secs == 0 {
                prop_assert_eq!(got, Ok(Timeout(None)));
            } else if secs <= MAX_TIMEOUT_SECS {
                prop_assert_eq!(got, Ok(Timeout(Some(Duration::from_secs(secs)))));
            } else {
                prop_assert!(got.unwrap_err().contains("too long"));
            }
        }

        /// Every HOST:GUEST pair (and plain PORT) of valid ports is accepted as itself; port 0
        /// and numbers above 65535 are refused.
        #[test]
        fn ports_round_trip(host in any::<u32>(), guest in any::<u32>(), sep in prop::bool::ANY) {
            let s = if sep { format!("{host}:{guest}") } else { format!("{host}") };
            let guest = if sep { guest } else { host };
            let valid = |p: u32| (1..=65535).contains(&p);
            match s.parse::<PortForward>() {
                Ok(p) => {
                    prop_assert!(valid(host) && valid(guest), "{s:?} accepted");
                    prop_assert_eq!((u32::from(p.host), u32::from(p.guest)), (host, guest));
                    let back = if sep { format!("{}:{}", p.host, p.guest) } else { format!("{}", p.host) };
                    prop_assert_eq!(back, s);
                }
                Err(e) => {
                    prop_assert!(!(valid(host) && valid(guest)), "{s:?} refused: {e}");
                    prop_assert!(e.contains("port number"), "{e}");
                }
            }
        }

        /// Ports with a sign, a space or a letter next to the digits are refused, never misread.
        #[test]
        fn ports_refuse_garbage(s in "[+ a-]?[0-9]{0,6}(:[+ -]?[0-9]{0,6})?[: a]?") {
            if let Ok(p) = s.parse::<PortForward>() {
                prop_assert!(s.bytes().all(|b| b.is_ascii_digit() || b == b':'), "{s:?} accepted");
                let numbers: Vec<u16> = s.split(':').map(|n| n.parse().unwrap()).collect();
                prop_assert!(numbers == [p.host] || numbers == [p.host, p.guest], "{s:?} read as {p:?}");
            } else if let Err(e) = s.parse::<PortForward>() {
                prop_assert!(e.contains(&format!("'{s}'")), "{e}");
            }
        }
    }
}
