//! The QEMU command line, generated from a typed [`VmConfig`]. Pure: the only
//! place that knows QEMU's option syntax, unit-tested without starting QEMU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::accel::Accel;

/// How guest RAM is backed. Later snapshots need RAM in a file on tmpfs; a
/// plain run can use anonymous memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "path")]
pub enum MemoryBackend {
    /// `memory-backend-ram`: anonymous memory.
    Anonymous,
    /// `memory-backend-file,share=on`: RAM lives in this file (on tmpfs), and
    /// writes reach the file.
    SharedFile(PathBuf),
    /// `memory-backend-file,share=off`: the file is mapped copy-on-write
    /// (MAP_PRIVATE); the guest starts with its contents and never changes it.
    PrivateFile(PathBuf),
}

/// Page size of a sandbox's own RAM ([`MemoryBackend::SharedFile`]).
///
/// A live branch write-protects all guest RAM with userfaultfd while the guest
/// is stopped; on 4 KiB pages that costs time in proportion to guest size.
/// Huge pages make it nearly constant (bench/results/hugepages.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugePages {
    /// The RAM file on tmpfs, 4 KiB pages.
    #[default]
    Off,
    /// 2 MiB hugetlb pages: `memory-backend-memfd,hugetlb=on,hugetlbsize=2M`.
    /// The host must have them reserved (`vm.nr_hugepages`), or QEMU fails
    /// at start. RAM lives in an anonymous memfd, not in the backend's file
    /// path (nothing to clean up; it goes when QEMU exits); a live branch
    /// streams it, a full snapshot reads it through `/proc/PID/fd`
    /// ([`crate::Vm::guest_ram_file`]).
    Hugetlb,
    /// 2 MiB hugetlb pages taken as the guest touches them
    /// (`reserve=off`: no reservation at start, so a guest costs the host
    /// only what it uses). The host's pool must be able to grow on demand
    /// (`vm.nr_overcommit_hugepages`, which forkd-core manages as root): a
    /// fault the pool cannot serve kills QEMU with SIGBUS.
    #[serde(rename = "hugetlb-on-demand")]
    HugetlbOnDemand,
}

/// A virtio-blk disk: a qcow2 overlay whose backing file is a read-only base.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Disk {
    pub overlay: PathBuf,
}

/// Guest networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    None,
    /// QEMU's user-mode (slirp) stack. Its gateway is the host's loopback and
    /// it reaches every address the host does: kept only so that snapshots
    /// made with it can still be spawned (slirp's state is in their device
    /// state), never chosen for a new sandbox.
    User,
    /// A virtio NIC whose frames go over `-netdev stream` to forkd's own
    /// gateway (`forkd-net`), listening on [`VmConfig::net_socket`], which
    /// enforces the sandbox's egress policy. The guest sees the same
    /// addresses as under slirp.
    Gateway,
}

/// What the network gateway lets out: the sandbox's egress rules as the
/// user gave them (`forkd-net` parses and enforces them). Recorded with the
/// config, so children inherit them.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Egress {
    /// Nothing gets out (`--net none` for a VM that has a NIC).
    #[serde(default)]
    pub deny_all: bool,
    #[serde(default)]
    pub allow_out: Vec<String>,
    #[serde(default)]
    pub deny_out: Vec<String>,
}

/// Resource limits of the QEMU process (its cgroup). Recorded with the
/// config, so children inherit them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// The memory limit of the whole QEMU process; guest RAM plus
    /// [`qemu_overhead_mib`] when absent.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// CPU time as a percentage of one host CPU (150 = 1.5 CPUs); no quota
    /// when absent.
    #[serde(default)]
    pub cpu_quota_pct: Option<u32>,
}

/// Tasks (threads) a QEMU may have: its vCPUs, I/O and migration threads and
/// a worker pool of at most 64; a guest cannot make host threads.
pub const PIDS_MAX: u32 = 256;

/// Host memory a QEMU needs beyond guest RAM, in MiB: its own heap, device
/// state and, under TCG, the translation cache (QEMU's default reserves up
/// to 1 GiB and fills it as the guest runs new code; `tcg_tb_mib` bounds it).
/// Measured in `forkd-vm/tests` (see [`QEMU_BASE_OVERHEAD_MIB`]).
pub fn qemu_overhead_mib(accel: Accel, tcg_tb_mib: Option<u32>) -> u64 {
    match accel {
        Accel::Kvm => QEMU_BASE_OVERHEAD_MIB,
        Accel::Tcg => QEMU_BASE_OVERHEAD_MIB + u64::from(tcg_tb_mib.unwrap_or(TCG_DEFAULT_TB_MIB)),
    }
}

/// QEMU's own memory beside guest RAM and the TCG cache: measured peak
/// 60-70 MiB for a microvm with forkd's devices, doubled for headroom.
pub const QEMU_BASE_OVERHEAD_MIB: u64 = 128;
/// QEMU 7.2's default TCG translation-cache size on a 64-bit host.
pub const TCG_DEFAULT_TB_MIB: u32 = 1024;

/// Everything QEMU needs to start a VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub cpus: u32,
    pub mem_mib: u64,
    pub memory: MemoryBackend,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Extra kernel command-line words (after forkd's own).
    pub kernel_args: Vec<String>,
    pub hostname: String,
    pub disks: Vec<Disk>,
    pub network: Network,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    pub console_log: PathBuf,
    /// Start with `-incoming defer`: the guest state comes from a device-state
    /// stream loaded over QMP (`migrate-incoming`), not from a boot.
    #[serde(default)]
    pub incoming: bool,
    /// TCG translation-cache size in MiB (`-accel tcg,tb-size=`); QEMU's
    /// default when absent. Ignored under KVM. Not part of the migrated
    /// state, so children may differ from their parent.
    #[serde(default)]
    pub tcg_tb_mib: Option<u32>,
    /// Huge pages for a sandbox's own RAM. Applies to
    /// [`MemoryBackend::SharedFile`] only: children map a snapshot image
    /// ([`MemoryBackend::PrivateFile`]) and ignore it, so a child may
    /// inherit its parent's config unchanged.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Populate all of a sandbox's own RAM when QEMU starts (`prealloc=on`):
    /// the first live branch then no longer populates it inside the pause.
    /// Costs the whole guest size in host memory from the start. Like
    /// `huge_pages`, [`MemoryBackend::SharedFile`] only (prealloc of a
    /// private mapping would copy the whole image).
    #[serde(default)]
    pub prealloc: bool,
    /// A child ([`MemoryBackend::PrivateFile`]) that maps a copy of its
    /// image held in 2 MiB hugetlb pages ([`crate::hugeram`]) instead of the
    /// image on tmpfs: its own live branches write-protect 2 MiB entries.
    /// The copy is the descriptor in `ram_fd`; the image's path stays in
    /// `memory` (the same bytes, which a branch of the child diffs against).
    #[serde(default)]
    pub private_hugetlb: bool,
    /// Whether the balloon offers free-page reporting (the guest hands
    /// freed 2 MiB blocks back and QEMU discards them). On for RAM on 4 KiB
    /// pages, whose discarded pages come back cheaply; off for RAM in
    /// hugetlb pages ([`VmConfig::wants_page_reporting`]). A child keeps its
    /// parent's choice: the balloon's features are part of the device state
    /// it restores.
    #[serde(default = "reporting_by_default")]
    pub page_reporting: bool,
    /// The hugetlb memfd QEMU inherits and maps (`private_hugetlb`); a
    /// descriptor of the launching process, never recorded.
    #[serde(skip)]
    pub ram_fd: Option<i32>,
    /// The host TSC frequency the guest kernel is told under TCG (see
    /// [`crate::accel::host_tsc_khz`]); [`crate::accel::FALLBACK_TSC_KHZ`]
    /// when absent.
    #[serde(default)]
    pub tsc_khz: Option<u64>,
    /// Where the network gateway listens ([`Network::Gateway`]).
    #[serde(default)]
    pub net_socket: Option<PathBuf>,
    /// The gateway's egress rules ([`Network::Gateway`]).
    #[serde(default)]
    pub egress: Egress,
    /// The QEMU process's resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// The unprivileged user QEMU drops to (`-runas`), decided at launch on
    /// each host ([`crate::confine::run_as_for`]), never recorded.
    #[serde(skip)]
    pub run_as: Option<crate::confine::RunAs>,
    /// How this QEMU binary is told `run_as` (asked of the binary at launch).
    #[serde(skip)]
    pub user_option: crate::confine::UserOption,
}

/// Smallest guest the kernel and agent boot in.
pub const MIN_MEM_MIB: u64 = 64;
/// Largest vCPU count accepted (microvm's limit is higher; this is a sanity bound).
pub const MAX_CPUS: u32 = 64;

impl VmConfig {
    /// Checks values a user controls before QEMU sees them.
    pub fn validate(&self) -> Result<(), String> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(format!(
                "--cpus {} is out of range 1..={MAX_CPUS}",
                self.cpus
            ));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(format!(
                "--mem {} MiB is too small: the guest needs at least {MIN_MEM_MIB} MiB",
                self.mem_mib
            ));
        }
        if !valid_hostname(&self.hostname) {
            return Err(format!(
                "hostname {:?} is not a valid host name",
                self.hostname
            ));
        }
        if self.huge_pages != HugePages::Off && !self.mem_mib.is_multiple_of(2) {
            return Err(format!(
                "--mem {} MiB is not a multiple of the 2 MiB huge page size",
                self.mem_mib
            ));
        }
        if self.private_hugetlb
            && (self.ram_fd.is_none() || !matches!(self.memory, MemoryBackend::PrivateFile(_)))
        {
            return Err(
                "a child on huge pages needs the hugetlb copy of its RAM image (none was made)"
                    .into(),
            );
        }
        if self.network == Network::Gateway && self.net_socket.is_none() {
            return Err("a gateway network needs the gateway's socket".into());
        }
        if let Some(limit) = self.limits.memory_limit_mib {
            if limit < self.mem_mib + MIN_MEM_MIB {
                return Err(format!(
                    "memory limit {limit} MiB is too small for a guest of {} MiB: QEMU needs the guest's RAM plus at least {MIN_MEM_MIB} MiB",
                    self.mem_mib
                ));
            }
        }
        if self.limits.cpu_quota_pct == Some(0) {
            return Err(
                "a CPU quota of 0 would stop the VM: give a positive share of a CPU".into(),
            );
        }
        for (what, p) in [("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            if !p.is_file() {
                return Err(format!("{what} {} does not exist", p.display()));
            }
        }
        Ok(())
    }

    /// Whether this VM's own RAM is in a hugetlb memfd: it has no file a
    /// snapshot could copy (only a live branch, which streams RAM, works).
    /// Why QEMU would die of SIGBUS with this configuration: the memory
    /// behind guest RAM ran out where it cannot be swapped or refused.
    pub fn sigbus_cause(&self) -> Option<&'static str> {
        if self.ram_in_hugetlb_memfd() || self.private_hugetlb {
            return Some("the huge-page pool ran out");
        }
        match self.memory {
            MemoryBackend::SharedFile(_) => Some("the runtime tmpfs is full"),
            MemoryBackend::PrivateFile(_) => Some("the RAM image it maps was truncated"),
            MemoryBackend::Anonymous => None,
        }
    }

    /// Whether a sandbox that boots with `huge_pages` should offer the guest
    /// free-page reporting. Not on hugetlb RAM: a 2 MiB page the guest
    /// reports is given back to the host's allocator, and the next time QEMU
    /// touches it (at the latest when a live branch populates guest RAM,
    /// inside the pause) a fresh 2 MiB page must be found, which took
    /// 0.2–4.5 ms each on a fragmented host. A guest reports its free memory
    /// in small batches for a minute after boot and again after every large
    /// free, so those refaults landed in branch pauses (17–75 ms at 2 GiB)
    /// and in the guest's stalls while RAM streamed out (heartbeat gap p99
    /// 315–813 ms with reporting, 56–89 ms without, 2 GiB guests on a
    /// 2-core TCG host: bench/results/branch.md). The cost: memory a
    /// hugetlb guest frees stays with it until it exits (in practice it
    /// did anyway: a 2 GiB guest that filled and freed 1 GiB of tmpfs still
    /// held it 2 minutes later with reporting on).
    pub fn wants_page_reporting(huge_pages: HugePages) -> bool {
        huge_pages == HugePages::Off
    }

    pub fn ram_in_hugetlb_memfd(&self) -> bool {
        self.huge_pages != HugePages::Off && matches!(self.memory, MemoryBackend::SharedFile(_))
    }

    /// Extra time QEMU may take before it answers on QMP and the guest
    /// boots. With `prealloc` QEMU first populates all guest RAM in its main
    /// thread, which grows with the guest (8 GiB took more than 10 s on a
    /// loaded 2-core host): 5 s per GiB then, nothing otherwise.
    pub fn prealloc_allowance(&self) -> Duration {
        if self.prealloc && matches!(self.memory, MemoryBackend::SharedFile(_)) {
            Duration::from_secs(5 * self.mem_mib.div_ceil(1024))
        } else {
            Duration::ZERO
        }
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut words: Vec<String> = ["console=ttyS0", "quiet", "panic=-1", "reboot=t"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        words.extend(
            self.accel
                .kernel_args(self.tsc_khz.unwrap_or(crate::accel::FALLBACK_TSC_KHZ)),
        );
        words.push(format!("forkd.hostname={}", self.hostname));
        if !self.disks.is_empty() {
            words.push("forkd.root=/dev/vda".into());
        }
        if matches!(self.network, Network::User | Network::Gateway) {
            // The gateway shows the guest slirp's addresses.
            words.push("forkd.net=user".into());
        }
        words.extend(self.kernel_args.iter().cloned());
        words.join(" ")
    }

    /// The memory limit of this VM's QEMU process, in bytes.
    pub fn memory_limit_bytes(&self) -> u64 {
        let mib = self
            .limits
            .memory_limit_mib
            .unwrap_or(self.mem_mib + qemu_overhead_mib(self.accel, self.tcg_tb_mib));
        mib << 20
    }

    /// The full argument vector after the QEMU binary.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        // Every QEMU runs under seccomp; one started by root drops to an
        // unprivileged user once it has opened its files.
        push(&["-sandbox", crate::confine::seccomp_option(self.run_as)]);
        if let Some(r) = self.run_as {
            let [flag, value] = self.user_option.args(r);
            push(&[&flag, &value]);
        }
        push(&["-machine", "microvm,x-option-roms=off,isa-serial=on,rtc=on"]);
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => match self.tcg_tb_mib {
                Some(mib) => {
                    let accel = format!("tcg,tb-size={mib}");
                    push(&["-accel", &accel]);
                }
                None => push(&["-accel", "tcg"]),
            },
        }
        let cpus = self.cpus.to_string();
        push(&["-smp", &cpus]);
        let size = format!("{}M", self.mem_mib);
        push(&["-m", &size]);
        match &self.memory {
            MemoryBackend::Anonymous => {}
            MemoryBackend::SharedFile(p) | MemoryBackend::PrivateFile(p) => {
                let share = matches!(self.memory, MemoryBackend::SharedFile(_));
                let mut obj = if self.ram_in_hugetlb_memfd() {
                    format!("memory-backend-memfd,id=mem0,size={size},share=on,hugetlb=on,hugetlbsize=2M")
                } else if let (false, Some(fd)) =
                    (share, self.ram_fd.filter(|_| self.private_hugetlb))
                {
                    // QEMU opens the inherited memfd again by its /proc
                    // path (and sees hugetlbfs: 2 MiB pages); no
                    // reservation, so a copy-on-write page is taken only
                    // when the guest writes.
                    format!(
                        "memory-backend-file,id=mem0,size={size},mem-path=/proc/self/fd/{fd},share=off,reserve=off"
                    )
                } else {
                    format!(
                        "memory-backend-file,id=mem0,size={size},mem-path={},share={}",
                        opt_escape(p),
                        if share { "on" } else { "off" }
                    )
                };
                if share && self.prealloc {
                    obj.push_str(",prealloc=on");
                }
                if self.ram_in_hugetlb_memfd() && self.huge_pages == HugePages::HugetlbOnDemand {
                    obj.push_str(",reserve=off");
                }
                push(&["-object", &obj, "-machine", "memory-backend=mem0"]);
            }
        }
        push(&["-kernel", &path_str(&self.kernel)]);
        push(&["-initrd", &path_str(&self.initramfs)]);
        let cmdline = self.cmdline();
        push(&["-append", &cmdline]);

        // Boot messages go to the log file; once the guest runs code of its
        // own, QEMU's ring instead ([`crate::console`]).
        let console = format!(
            "file,id={},path={}",
            crate::console::CHARDEV,
            opt_escape(&self.console_log)
        );
        let serial = format!("chardev:{}", crate::console::CHARDEV);
        push(&["-chardev", &console, "-serial", &serial]);
        let qmp = format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            opt_escape(&self.qmp_socket)
        );
        push(&["-chardev", &qmp, "-mon", "chardev=qmp0,mode=control"]);
        let agent = format!(
            "socket,id=agent0,path={},server=on,wait=off",
            opt_escape(&self.agent_socket)
        );
        push(&["-chardev", &agent, "-device", "virtio-serial-device"]);
        let port = format!(
            "virtserialport,chardev=agent0,name={}",
            forkd_protocol::PORT_NAME
        );
        push(&["-device", &port]);
        push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
        push(&["-device", "virtio-rng-device,rng=rng0"]);
        // The guest reports free 2 MiB blocks and QEMU discards them: holes in
        // a shared RAM file, so snapshots and their children carry only the
        // memory the guest uses, not stale free pages (not on hugetlb RAM:
        // see `wants_page_reporting`). The device is there either way.
        let reporting = if self.page_reporting { "on" } else { "off" };
        push(&[
            "-device",
            &format!("virtio-balloon-device,free-page-reporting={reporting}"),
        ]);

        for (i, d) in self.disks.iter().enumerate() {
            // JSON syntax: no comma escaping, the overlay's backing file is
            // opened from its qcow2 header (read-only).
            let node = serde_json::json!({
                "driver": "qcow2",
                "node-name": format!("disk{i}"),
                "file": { "driver": "file", "filename": path_str(&d.overlay) },
            });
            push(&["-blockdev", &node.to_string()]);
            let dev = format!("virtio-blk-device,drive=disk{i},id=vd{i}");
            push(&["-device", &dev]);
        }
        match (self.network, &self.net_socket) {
            (Network::User, _) => push(&[
                "-netdev",
                "user,id=net0",
                "-device",
                "virtio-net-device,netdev=net0",
            ]),
            (Network::Gateway, Some(sock)) => {
                let netdev = format!(
                    "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                    opt_escape(sock)
                );
                push(&[
                    "-netdev",
                    &netdev,
                    "-device",
                    "virtio-net-device,netdev=net0",
                ]);
            }
            (Network::Gateway, None) | (Network::None, _) => {}
        }
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        a
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// QEMU's option syntax separates with commas; a literal comma is doubled.
fn opt_escape(p: &Path) -> String {
    path_str(p).replace(',', ",,")
}

/// RFC 1123 host name label: 1-63 of `[A-Za-z0-9-]`, not starting or ending with `-`.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-')
}

fn reporting_by_default() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            qemu: "qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            cpus: 2,
            mem_mib: 256,
            memory: MemoryBackend::Anonymous,
            kernel: "/k/vmlinuz".into(),
            initramfs: "/k/initrd".into(),
            kernel_args: vec![],
            hostname: "vm-1".into(),
            disks: vec![],
            network: Network::None,
            qmp_socket: "/run/x/qmp.sock".into(),
            agent_socket: "/run/x/agent.sock".into(),
            console_log: "/run/x/console.log".into(),
            incoming: false,
            tcg_tb_mib: None,
            huge_pages: HugePages::Off,
            prealloc: false,
            private_hugetlb: false,
            page_reporting: true,
            ram_fd: None,
            tsc_khz: None,
            net_socket: None,
            egress: Egress::default(),
            limits: Limits::default(),
            run_as: None,
            user_option: Default::default(),
        }
    }

    #[test]
    fn free_page_reporting_is_offered_on_4k_ram_only() {
        let balloon = |c: &VmConfig| {
            value_after(&c.to_args(), "-device")
                .into_iter()
                .filter(|d| d.starts_with("virtio-balloon"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let mut c = config();
        assert_eq!(
            balloon(&c),
            ["virtio-balloon-device,free-page-reporting=on"]
        );
        c.page_reporting = false;
        assert_eq!(
            balloon(&c),
            ["virtio-balloon-device,free-page-reporting=off"]
        );
        assert!(VmConfig::wants_page_reporting(HugePages::Off));
        for huge in [HugePages::Hugetlb, HugePages::HugetlbOnDemand] {
            assert!(!VmConfig::wants_page_reporting(huge), "{huge:?}");
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_command_line_has_microvm_agent_port_and_tsc_hints() {
        let args = config().to_args();
        assert_eq!(value_after(&args, "-accel"), ["tcg"]);
        let mut small = config();
        small.tcg_tb_mib = Some(16);
        assert_eq!(value_after(&small.to_args(), "-accel"), ["tcg,tb-size=16"]);
        assert!(value_after(&args, "-machine")[0].starts_with("microvm"));
        assert_eq!(value_after(&args, "-m"), ["256M"]);
        assert_eq!(value_after(&args, "-smp"), ["2"]);
        let append = value_after(&args, "-append")[0];
        assert!(append.contains("tsc_early_khz=2000000 lpj=8000000"));
        assert!(append.contains("forkd.hostname=vm-1"));
        assert!(!append.contains("forkd.root"));
        assert!(args
            .iter()
            .any(|a| a == "virtserialport,chardev=agent0,name=org.forkd.agent"));
        assert!(args.contains(&"-no-reboot".to_string()));
        assert!(args
            .iter()
            .any(|a| a == "virtio-balloon-device,free-page-reporting=on"));
        assert!(!args.iter().any(|a| a.contains("memory-backend")));
    }

    #[test]
    fn kvm_uses_host_cpu_and_no_tsc_hints() {
        let mut c = config();
        c.accel = Accel::Kvm;
        let args = c.to_args();
        assert_eq!(value_after(&args, "-accel"), ["kvm"]);
        assert_eq!(value_after(&args, "-cpu"), ["host"]);
        assert!(!value_after(&args, "-append")[0].contains("tsc_early_khz"));
    }

    #[test]
    fn disks_network_and_file_memory() {
        let mut c = config();
        c.disks = vec![Disk {
            overlay: "/run/x/root,1.qcow2".into(),
        }];
        c.network = Network::User;
        c.memory = MemoryBackend::SharedFile("/dev/shm/a,b/ram".into());
        let args = c.to_args();
        let bd: serde_json::Value =
            serde_json::from_str(value_after(&args, "-blockdev")[0]).unwrap();
        assert_eq!(bd["file"]["filename"], "/run/x/root,1.qcow2");
        assert!(args
            .iter()
            .any(|a| a == "virtio-blk-device,drive=disk0,id=vd0"));
        assert!(args.iter().any(|a| a == "virtio-net-device,netdev=net0"));
        let obj = value_after(&args, "-object")
            .into_iter()
            .find(|o| o.starts_with("memory-backend-file"))
            .unwrap();
        assert!(obj.contains("mem-path=/dev/shm/a,,b/ram,share=on"), "{obj}");
        let append = value_after(&args, "-append")[0];
        assert!(append.contains("forkd.root=/dev/vda") && append.contains("forkd.net=user"));
        c.memory = MemoryBackend::PrivateFile("/dev/shm/img".into());
        c.incoming = true;
        let args = c.to_args();
        assert!(args.iter().any(|a| a.ends_with("share=off")));
        assert_eq!(value_after(&args, "-incoming"), ["defer"]);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
    }

    fn mem_object(c: &VmConfig) -> String {
        value_after(&c.to_args(), "-object")
            .into_iter()
            .find(|o| o.starts_with("memory-backend"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn hugetlb_and_prealloc_apply_to_a_sandbox_own_ram_only() {
        let mut c = config();
        c.memory = MemoryBackend::SharedFile("/dev/shm/x/ram".into());
        c.huge_pages = HugePages::Hugetlb;
        c.prealloc = true;
        assert_eq!(
            mem_object(&c),
            "memory-backend-memfd,id=mem0,size=256M,share=on,hugetlb=on,hugetlbsize=2M,prealloc=on"
        );
        assert!(c.to_args().iter().any(|a| a == "memory-backend=mem0"));
        c.huge_pages = HugePages::Off;
        assert_eq!(
            mem_object(&c),
            "memory-backend-file,id=mem0,size=256M,mem-path=/dev/shm/x/ram,share=on,prealloc=on"
        );
        // A child inherits its parent's options but maps the snapshot image.
        c.huge_pages = HugePages::Hugetlb;
        c.memory = MemoryBackend::PrivateFile("/dev/shm/snap/ram.img".into());
        assert_eq!(
            mem_object(&c),
            "memory-backend-file,id=mem0,size=256M,mem-path=/dev/shm/snap/ram.img,share=off"
        );
        // A child on huge pages maps the inherited hugetlb copy, and is
        // refused without one; the descriptor is never recorded.
        c.private_hugetlb = true;
        assert!(c.validate().unwrap_err().contains("hugetlb copy"));
        c.ram_fd = Some(7);
        assert_eq!(
            mem_object(&c),
            "memory-backend-file,id=mem0,size=256M,mem-path=/proc/self/fd/7,share=off,reserve=off"
        );
        assert_eq!(c.sigbus_cause(), Some("the huge-page pool ran out"));
        let back: VmConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert!(back.private_hugetlb && back.ram_fd.is_none());
        c.private_hugetlb = false;
        // Configs recorded before these options existed still load.
        let mut old = serde_json::to_value(config()).unwrap();
        old.as_object_mut().unwrap().remove("huge_pages");
        old.as_object_mut().unwrap().remove("prealloc");
        old.as_object_mut().unwrap().remove("private_hugetlb");
        old.as_object_mut().unwrap().remove("page_reporting");
        let back: VmConfig = serde_json::from_value(old).unwrap();
        assert_eq!((back.huge_pages, back.prealloc), (HugePages::Off, false));
        assert!(back.page_reporting, "sandboxes before the field reported");
        c.memory = MemoryBackend::SharedFile("/dev/shm/x/ram".into());
        c.huge_pages = HugePages::HugetlbOnDemand;
        c.prealloc = false;
        assert_eq!(
            mem_object(&c),
            "memory-backend-memfd,id=mem0,size=256M,share=on,hugetlb=on,hugetlbsize=2M,reserve=off"
        );
        assert!(c.ram_in_hugetlb_memfd());
        assert_eq!(
            serde_json::to_value(HugePages::HugetlbOnDemand).unwrap(),
            "hugetlb-on-demand"
        );
        let mut odd = config();
        odd.memory = MemoryBackend::SharedFile("/dev/shm/x/ram".into());
        odd.huge_pages = HugePages::Hugetlb;
        assert!(odd.ram_in_hugetlb_memfd());
        odd.mem_mib = 257;
        assert!(odd.validate().unwrap_err().contains("2 MiB huge page"));
    }

    #[test]
    fn start_allowance_grows_with_preallocated_ram_only() {
        let mut c = config();
        c.memory = MemoryBackend::SharedFile("/dev/shm/x/ram".into());
        c.mem_mib = 8192;
        assert_eq!(c.prealloc_allowance(), Duration::ZERO);
        c.prealloc = true;
        assert_eq!(c.prealloc_allowance(), Duration::from_secs(40));
        c.mem_mib = 512;
        assert_eq!(c.prealloc_allowance(), Duration::from_secs(5));
        // A child maps its image privately; nothing is preallocated.
        c.memory = MemoryBackend::PrivateFile("/dev/shm/img".into());
        assert_eq!(c.prealloc_allowance(), Duration::ZERO);
    }

    #[test]
    fn every_qemu_is_sandboxed_and_drops_to_its_user_under_root() {
        let mut c = config();
        let args = c.to_args();
        assert_eq!(
            value_after(&args, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert!(value_after(&args, "-runas").is_empty());
        c.run_as = Some(crate::confine::RunAs { uid: 990, gid: 991 });
        let args = c.to_args();
        assert_eq!(value_after(&args, "-runas"), ["990:991"]);
        assert!(value_after(&args, "-sandbox")[0].contains("spawn=deny"));
        // QEMU 9.1 and later: `-run-with user=` (10.0 has no `-runas`).
        c.user_option = crate::confine::UserOption::RunWith;
        let args = c.to_args();
        assert!(value_after(&args, "-runas").is_empty());
        assert_eq!(value_after(&args, "-run-with"), ["user=990:991"]);
        // Never recorded: each host decides.
        let json = serde_json::to_value(&c).unwrap();
        assert!(json.get("run_as").is_none());
    }

    #[test]
    fn the_gateway_network_is_a_stream_to_its_socket() {
        let mut c = config();
        c.network = Network::Gateway;
        assert!(c.validate().unwrap_err().contains("gateway"));
        c.net_socket = Some("/run/x,y/net.sock".into());
        let args = c.to_args();
        assert_eq!(
            value_after(&args, "-netdev"),
            ["stream,id=net0,server=off,addr.type=unix,addr.path=/run/x,,y/net.sock"]
        );
        assert!(value_after(&args, "-append")[0].contains("forkd.net=user"));
        assert!(!args.iter().any(|a| a.starts_with("user,")));
    }

    #[test]
    fn memory_limits_are_guest_ram_plus_overhead_unless_given() {
        let mut c = config();
        assert_eq!(c.memory_limit_bytes(), (256 + 128 + 1024) << 20);
        c.tcg_tb_mib = Some(64);
        assert_eq!(c.memory_limit_bytes(), (256 + 128 + 64) << 20);
        c.accel = Accel::Kvm;
        assert_eq!(c.memory_limit_bytes(), (256 + 128) << 20);
        c.limits.memory_limit_mib = Some(300);
        assert_eq!(c.memory_limit_bytes(), 300 << 20);
        c.kernel = std::env::current_exe().unwrap();
        c.initramfs = std::env::current_exe().unwrap();
        c.limits.memory_limit_mib = Some(200);
        assert!(c.validate().unwrap_err().contains("memory limit 200 MiB"));
        c.limits.memory_limit_mib = None;
        c.limits.cpu_quota_pct = Some(0);
        assert!(c.validate().unwrap_err().contains("CPU quota"));
        // Configs recorded before limits existed still load.
        let mut old = serde_json::to_value(config()).unwrap();
        old.as_object_mut().unwrap().remove("limits");
        old.as_object_mut().unwrap().remove("net_socket");
        let back: VmConfig = serde_json::from_value(old).unwrap();
        assert_eq!(back.limits, Limits::default());
    }

    #[test]
    fn validation_names_the_bad_value() {
        let mut c = config();
        c.cpus = 0;
        assert!(c.validate().unwrap_err().contains("--cpus 0"));
        c.cpus = 1;
        c.mem_mib = 16;
        assert!(c.validate().unwrap_err().contains("--mem 16"));
        c.mem_mib = 256;
        c.hostname = "bad host".into();
        assert!(c.validate().unwrap_err().contains("host name"));
        c.hostname = "ok".into();
        assert!(c
            .validate()
            .unwrap_err()
            .contains("kernel /k/vmlinuz does not exist"));
    }

    #[test]
    fn hostnames() {
        assert!(valid_hostname("sb-0a1"));
        assert!(!valid_hostname("-x"));
        assert!(!valid_hostname(&"a".repeat(64)));
        assert!(!valid_hostname("a.b"));
    }
}
