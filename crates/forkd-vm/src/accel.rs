//! Choosing the accelerator: KVM where hardware virtualization is really
//! there, TCG otherwise. The decision is a pure function of a [`HostProbe`]
//! so that it is tested on every shape of host, not just this one.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// The TSC frequency a TCG guest is told when none was measured (records
/// written before forkd measured it).
pub const FALLBACK_TSC_KHZ: u64 = 2_000_000;

/// The guest kernel's timer frequency (Debian's `CONFIG_HZ`), for `lpj`.
const GUEST_HZ: u64 = 250;

impl Accel {
    /// Kernel command-line words this accelerator needs. Under TCG the
    /// guest reads the host's TSC (QEMU passes `rdtsc` through at host
    /// rate), and its calibration hangs on a busy host unless told the
    /// frequency: it must be told the host's real one, `tsc_khz`, or guest
    /// time runs at the wrong speed (a fixed 2 GHz on a 2.6 GHz host made
    /// `sleep 4` take 3.1 s). `tsc=reliable` keeps the TSC as the guest's
    /// clocksource: a microvm has no HPET or ACPI PM timer, so the kernel's
    /// watchdog compares the TSC with jiffies, which lag whenever the host
    /// is busy; it then marks the TSC unstable and falls back to jiffies, and
    /// guest time drifts seconds behind host time on a loaded host.
    pub fn kernel_args(self, tsc_khz: u64) -> Vec<String> {
        match self {
            Accel::Kvm => vec![],
            Accel::Tcg => vec![
                format!("tsc_early_khz={tsc_khz}"),
                format!("lpj={}", tsc_khz * 1000 / GUEST_HZ),
                "tsc=reliable".to_string(),
            ],
        }
    }
}

/// The host's TSC frequency in kHz, measured once per process against
/// `CLOCK_MONOTONIC` (the median of three 20 ms windows). `None` off x86 or
/// when the measurement is implausible.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    let window = std::time::Duration::from_millis(20);
    let mut samples: Vec<u64> = (0..3)
        .map(|_| {
            // SAFETY: rdtsc reads a counter and has no other effect; every
            // x86_64 CPU has it.
            #[allow(unused_unsafe)]
            let t0 = unsafe { core::arch::x86_64::_rdtsc() };
            let start = std::time::Instant::now();
            while start.elapsed() < window {
                std::hint::spin_loop();
            }
            let elapsed = start.elapsed();
            // SAFETY: as above.
            #[allow(unused_unsafe)]
            let t1 = unsafe { core::arch::x86_64::_rdtsc() };
            (t1.wrapping_sub(t0) as f64 / elapsed.as_secs_f64() / 1000.0) as u64
        })
        .collect();
    samples.sort_unstable();
    let khz = samples[1];
    // A TSC between 100 MHz and 10 GHz; anything else is a broken reading.
    (100_000..=10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the user asked for (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelRequest {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for AccelRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelRequest::Auto),
            "kvm" => Ok(AccelRequest::Kvm),
            "tcg" => Ok(AccelRequest::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg"
            )),
        }
    }
}

/// Facts about the host that decide the accelerator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostProbe {
    pub kvm_intel: bool,
    pub kvm_amd: bool,
    /// A paravirtual nested KVM (`kvm_pvm`): /dev/kvm exists but cannot boot a
    /// stock kernel.
    pub kvm_pvm: bool,
    pub dev_kvm_exists: bool,
    /// /dev/kvm could be opened read-write by this process.
    pub dev_kvm_usable: bool,
}

impl HostProbe {
    /// Reads the host: loaded modules from /sys/module, /dev/kvm access.
    pub fn read() -> HostProbe {
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        let dev = Path::new("/dev/kvm");
        HostProbe {
            kvm_intel: module("kvm_intel"),
            kvm_amd: module("kvm_amd"),
            kvm_pvm: module("kvm_pvm"),
            dev_kvm_exists: dev.exists(),
            dev_kvm_usable: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dev)
                .is_ok(),
        }
    }

    fn hardware_kvm(&self) -> bool {
        (self.kvm_intel || self.kvm_amd) && self.dev_kvm_usable
    }

    /// Why KVM is or is not usable, in one sentence.
    pub fn kvm_verdict(&self) -> String {
        if self.hardware_kvm() {
            let m = if self.kvm_intel {
                "kvm_intel"
            } else {
                "kvm_amd"
            };
            return format!("{m} is loaded and /dev/kvm is usable");
        }
        if self.kvm_pvm {
            return "/dev/kvm belongs to kvm_pvm, a paravirtual nested hypervisor that cannot \
                    boot a stock Linux guest"
                .into();
        }
        if !self.dev_kvm_exists {
            return "/dev/kvm does not exist (no hardware virtualization, or the kvm modules \
                    are not loaded: `modprobe kvm_intel` or `modprobe kvm_amd`)"
                .into();
        }
        if !(self.kvm_intel || self.kvm_amd) {
            return "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded".into();
        }
        "/dev/kvm is not accessible read-write by this user (add it to the `kvm` group)".into()
    }
}

/// The decision and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Picks the accelerator. `Kvm` requested on a host without hardware KVM is an
/// error naming why; `Tcg` is always possible.
pub fn choose(req: AccelRequest, host: &HostProbe) -> Result<AccelChoice, String> {
    match req {
        AccelRequest::Tcg => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "TCG requested".into(),
        }),
        AccelRequest::Kvm if host.hardware_kvm() => Ok(AccelChoice {
            accel: Accel::Kvm,
            reason: format!("KVM requested: {}", host.kvm_verdict()),
        }),
        AccelRequest::Kvm => Err(format!(
            "--accel kvm is not possible here: {}; use --accel tcg (software emulation)",
            host.kvm_verdict()
        )),
        AccelRequest::Auto if host.hardware_kvm() => Ok(AccelChoice {
            accel: Accel::Kvm,
            reason: host.kvm_verdict(),
        }),
        AccelRequest::Auto => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: format!("using TCG (software emulation): {}", host.kvm_verdict()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(intel: bool, pvm: bool, exists: bool, usable: bool) -> HostProbe {
        HostProbe {
            kvm_intel: intel,
            kvm_amd: false,
            kvm_pvm: pvm,
            dev_kvm_exists: exists,
            dev_kvm_usable: usable,
        }
    }

    #[test]
    fn auto_uses_kvm_only_with_hardware_support() {
        let c = choose(AccelRequest::Auto, &host(true, false, true, true)).unwrap();
        assert_eq!(c.accel, Accel::Kvm);
        let amd = HostProbe {
            kvm_amd: true,
            ..host(false, false, true, true)
        };
        assert_eq!(choose(AccelRequest::Auto, &amd).unwrap().accel, Accel::Kvm);
    }

    #[test]
    fn paravirtual_kvm_falls_back_to_tcg_and_says_why() {
        let c = choose(AccelRequest::Auto, &host(false, true, true, true)).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("kvm_pvm"), "{}", c.reason);
        let e = choose(AccelRequest::Kvm, &host(false, true, true, true)).unwrap_err();
        assert!(e.contains("--accel tcg"), "{e}");
    }

    #[test]
    fn unusable_dev_kvm_is_not_used() {
        let c = choose(AccelRequest::Auto, &host(true, false, true, false)).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("kvm` group"), "{}", c.reason);
        let none = choose(AccelRequest::Auto, &host(false, false, false, false)).unwrap();
        assert!(none.reason.contains("does not exist"));
    }

    #[test]
    fn tcg_is_always_possible_and_needs_tsc_hints() {
        let c = choose(AccelRequest::Tcg, &host(true, false, true, true)).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(
            Accel::Tcg.kernel_args(2_600_000),
            ["tsc_early_khz=2600000", "lpj=10400000", "tsc=reliable"]
        );
        assert!(Accel::Kvm.kernel_args(2_600_000).is_empty());
    }

    #[test]
    fn the_host_tsc_is_measured_plausibly_and_once() {
        let khz = host_tsc_khz().expect("x86_64 hosts have a TSC");
        assert!((100_000..=10_000_000).contains(&khz), "{khz}");
        assert_eq!(host_tsc_khz(), Some(khz));
    }

    #[test]
    fn accel_request_parses() {
        assert_eq!("kvm".parse::<AccelRequest>().unwrap(), AccelRequest::Kvm);
        assert!("hvf".parse::<AccelRequest>().is_err());
    }
}
