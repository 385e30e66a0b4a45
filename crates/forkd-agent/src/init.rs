//! PID-1 duties: bring the guest up and take it down.
//!
//! Mounts the kernel filesystems, loads the virtio modules listed in
//! `/etc/forkd/modules` (in the order the host resolved), sets the hostname,
//! configures the user-mode network, mounts the root disk at `/mnt/root`, and
//! finds the agent's virtio-serial port. Everything the host wants is read from
//! the kernel command line (`forkd.root=`, `forkd.net=`, `forkd.hostname=`), so
//! the initramfs is the same for every VM. Only ever called inside a guest.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::log;
use crate::reaper::nap;

/// Where the root disk is mounted; commands are chrooted here.
pub const ROOT_MOUNT: &str = "/mnt/root";
/// The ordered module list the host writes into the initramfs.
pub const MODULE_LIST: &str = "/etc/forkd/modules";
const MODULE_DIR: &str = "/lib/modules";

/// Settings from the kernel command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub root: Option<String>,
    pub net: Option<String>,
    pub hostname: Option<String>,
}

impl BootParams {
    /// Parses `forkd.*=` words of a kernel command line; others are ignored.
    pub fn parse(cmdline: &str) -> BootParams {
        let mut p = BootParams::default();
        for word in cmdline.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                match k {
                    "forkd.root" => p.root = Some(v.to_string()),
                    "forkd.net" => p.net = Some(v.to_string()),
                    "forkd.hostname" => p.hostname = Some(v.to_string()),
                    _ => {}
                }
            }
        }
        p
    }
}

/// What boot produced for the server.
pub struct Booted {
    pub root: Option<PathBuf>,
    pub port: PathBuf,
}

/// Brings the guest up. Failures that leave the guest unusable are returned;
/// the caller logs them and powers off so the host sees QEMU exit.
pub fn boot() -> io::Result<Booted> {
    mount("proc", "/proc", "proc", 0, "")?;
    mount("sysfs", "/sys", "sysfs", 0, "")?;
    mount("devtmpfs", "/dev", "devtmpfs", 0, "")?;
    reopen_console();
    let _ = fs::create_dir_all("/dev/pts");
    let _ = mount("devpts", "/dev/pts", "devpts", 0, "");
    let _ = mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777");
    let _ = mount("tmpfs", "/run", "tmpfs", 0, "mode=755");

    let params = BootParams::parse(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    load_modules()?;
    set_hostname(params.hostname.as_deref().unwrap_or("forkd"));
    run_quiet(&["/bin/busybox", "ip", "link", "set", "lo", "up"]);
    if params.net.as_deref() == Some("user") {
        configure_user_net();
    }
    let root = match &params.root {
        Some(dev) => Some(mount_root(dev)?),
        None => None,
    };
    let port = find_port(Duration::from_secs(10))?;
    Ok(Booted { root, port })
}

/// Makes fds 0-2 the console if the kernel could not open it for us.
fn reopen_console() {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
    if unsafe { libc::fcntl(2, libc::F_GETFD) } >= 0 {
        return;
    }
    if let Ok(c) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which are free.
            unsafe { libc::dup2(c.as_raw_fd(), fd) };
        }
    }
}

fn load_modules() -> io::Result<()> {
    let list = match fs::read_to_string(MODULE_LIST) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULE_DIR).join(name);
        let f = File::open(&path)?;
        let params = CString::default();
        // SAFETY: finit_module reads the module from a valid open fd and the
        // empty, NUL-terminated parameter string.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("loading module {name}: {e}"),
                ));
            }
        }
    }
    Ok(())
}

fn set_hostname(name: &str) {
    // SAFETY: sethostname reads `len` bytes from a valid buffer.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
}

/// QEMU's user-mode network: fixed addresses, no DHCP round trip at boot.
fn configure_user_net() {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !Path::new("/sys/class/net/eth0").exists() && Instant::now() < deadline {
        nap(10);
    }
    run_quiet(&["/bin/busybox", "ip", "link", "set", "eth0", "up"]);
    run_quiet(&[
        "/bin/busybox",
        "ip",
        "addr",
        "add",
        "10.0.2.15/24",
        "dev",
        "eth0",
    ]);
    run_quiet(&[
        "/bin/busybox",
        "ip",
        "route",
        "add",
        "default",
        "via",
        "10.0.2.2",
    ]);
}

fn mount_root(dev: &str) -> io::Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(dev).exists() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("root disk {dev} did not appear within 10 s"),
            ));
        }
        nap(10);
    }
    fs::create_dir_all(ROOT_MOUNT)?;
    mount(dev, ROOT_MOUNT, "ext4", libc::MS_NOATIME, "")?;
    let root = PathBuf::from(ROOT_MOUNT);
    for (src, dst, fstype, opts) in [
        ("proc", "proc", "proc", ""),
        ("sysfs", "sys", "sysfs", ""),
        ("devtmpfs", "dev", "devtmpfs", ""),
        ("devpts", "dev/pts", "devpts", ""),
        ("tmpfs", "tmp", "tmpfs", "mode=1777"),
        ("tmpfs", "run", "tmpfs", "mode=755"),
    ] {
        let target = root.join(dst);
        let _ = fs::create_dir_all(&target);
        if let Err(e) = mount(src, target.to_str().unwrap_or_default(), fstype, 0, opts) {
            log(&format!("mount {dst} in the root disk: {e}"));
        }
    }
    Ok(root)
}

/// Finds `/dev/vportNpM` whose name is the agent port.
fn find_port(timeout: Duration) -> io::Result<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == forkd_protocol::PORT_NAME {
                    let dev = Path::new("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("virtio-serial port {} not found", forkd_protocol::PORT_NAME),
            ));
        }
        nap(10);
    }
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (src_c, target_c, fstype_c, data_c) = (c(src)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let r = unsafe {
        libc::mount(
            src_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(());
        }
        return Err(io::Error::new(
            e.kind(),
            format!("mount {src} on {target}: {e}"),
        ));
    }
    Ok(())
}

fn run_quiet(argv: &[&str]) {
    let r = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status();
    if let Err(e) = r {
        log(&format!("{}: {e}", argv.join(" ")));
    }
}

/// Syncs, unmounts the root disk and powers the machine off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // Stop everything else so the root disk can be unmounted cleanly.
    // SAFETY: kill(-1) signals every process but PID 1; no memory effects.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    nap(20);
    for target in [
        "/mnt/root/dev/pts",
        "/mnt/root/dev",
        "/mnt/root/proc",
        "/mnt/root/sys",
        "/mnt/root/tmp",
        "/mnt/root/run",
        ROOT_MOUNT,
    ] {
        if let Ok(t) = CString::new(target) {
            // SAFETY: valid NUL-terminated path; MNT_DETACH never blocks.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }
    // SAFETY: sync, then reboot(2) with the power-off command; as PID 1 with
    // CAP_SYS_BOOT this halts the VM and QEMU (started with -no-reboot) exits.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure; exiting PID 1 panics the kernel, which
    // with panic=-1 and -no-reboot also ends QEMU.
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_params_pick_forkd_words_only() {
        let p = BootParams::parse(
            "console=ttyS0 forkd.root=/dev/vda quiet forkd.net=user forkd.hostname=sb-1 root=/dev/sda",
        );
        assert_eq!(p.root.as_deref(), Some("/dev/vda"));
        assert_eq!(p.net.as_deref(), Some("user"));
        assert_eq!(p.hostname.as_deref(), Some("sb-1"));
        assert_eq!(BootParams::parse("quiet"), BootParams::default());
    }
}
