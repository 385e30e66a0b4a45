//! One cgroup per QEMU: a memory limit, a task limit and an optional CPU
//! quota, on cgroup v1 (one hierarchy per controller) or v2 (one unified
//! hierarchy). Groups are made under the cgroup forkd itself runs in
//! (`<own>/forkd/<name>`), so forkd never escapes limits set on it and
//! works wherever that cgroup is writable (root, or a delegated v2 subtree).
//!
//! QEMU enters its group before it executes: the caller opens each
//! `cgroup.procs` here and the child writes `0` ("myself") into them
//! between fork and exec ([`Group::enter_in_child`], async-signal-safe).
//! A group is removed when its QEMU has ended ([`release`]); groups left by
//! a forkd that died are removed by [`sweep`] once old (an `rmdir` of a
//! group that still has a task fails).
//!
//! Pure parts, tested without cgroups: reading `/proc/self/mountinfo` and
//! `/proc/self/cgroup` ([`Layout::from_texts`]) and the files and values a
//! limit becomes ([`Limits::files`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The controllers forkd uses.
pub const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
/// The directory under forkd's own cgroup that holds the VMs' groups.
pub const PARENT: &str = "forkd";
/// Period of a CPU quota, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup version a host uses for forkd's controllers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// The limits of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u32,
    /// Percent of one CPU (150 = one and a half); no quota when `None`.
    pub cpu_quota_pct: Option<u32>,
}

impl Limits {
    /// Each `(controller, file, value)` to write, in order (v1's
    /// `memory.memsw.limit_in_bytes`, which needs swap accounting, is
    /// written separately and only where it exists).
    pub fn files(&self, version: Version) -> Vec<(&'static str, &'static str, String)> {
        let quota = self
            .cpu_quota_pct
            .map(|p| (p as u64 * CPU_PERIOD_US / 100).max(1000));
        match version {
            Version::V1 => {
                let mut v = vec![
                    (
                        "memory",
                        "memory.limit_in_bytes",
                        self.memory_bytes.to_string(),
                    ),
                    ("pids", "pids.max", self.pids.to_string()),
                ];
                if let Some(q) = quota {
                    v.push(("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                    v.push(("cpu", "cpu.cfs_quota_us", q.to_string()));
                }
                v
            }
            Version::V2 => {
                let mut v = vec![
                    ("memory", "memory.max", self.memory_bytes.to_string()),
                    ("memory", "memory.swap.max", "0".to_string()),
                    ("pids", "pids.max", self.pids.to_string()),
                ];
                if let Some(q) = quota {
                    v.push(("cpu", "cpu.max", format!("{q} {CPU_PERIOD_US}")));
                }
                v
            }
        }
    }
}

/// Where forkd's groups live on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub version: Version,
    /// For v1 one directory per controller (`<mount>/<own>/forkd`); for v2
    /// one directory, listed once per controller.
    pub parents: Vec<(&'static str, PathBuf)>,
}

impl Layout {
    /// Reads this process's mounts and cgroups. `None` when the memory
    /// controller is mounted nowhere.
    pub fn detect() -> Option<Layout> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let cgroup = fs::read_to_string("/proc/self/cgroup").ok()?;
        let v2_controllers = |mount: &Path, own: &str| {
            fs::read_to_string(
                mount
                    .join(own.trim_start_matches('/'))
                    .join("cgroup.controllers"),
            )
            .or_else(|_| fs::read_to_string(mount.join("cgroup.controllers")))
            .unwrap_or_default()
        };
        Layout::from_texts(&mountinfo, &cgroup, v2_controllers)
    }

    /// [`Layout::detect`] from the two files' texts; `v2_controllers` reads
    /// a v2 group's `cgroup.controllers`.
    pub fn from_texts(
        mountinfo: &str,
        cgroup: &str,
        v2_controllers: impl Fn(&Path, &str) -> String,
    ) -> Option<Layout> {
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_proc_cgroup(cgroup);
        let own_v1 = |ctrl: &str| {
            own.iter()
                .find(|(h, _)| h.split(',').any(|c| c == ctrl))
                .map(|(_, p)| p.as_str())
        };
        // v1 where the memory controller has a v1 mount.
        let v1: Vec<(&'static str, PathBuf)> = CONTROLLERS
            .iter()
            .filter_map(|ctrl| {
                let m = mounts
                    .iter()
                    .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == *ctrl))?;
                let path = relative(own_v1(ctrl)?, &m.root)?;
                Some((*ctrl, m.point.join(path).join(PARENT)))
            })
            .collect();
        if v1.iter().any(|(c, _)| *c == "memory") {
            return Some(Layout {
                version: Version::V1,
                parents: v1,
            });
        }
        let m = mounts.iter().find(|m| m.fstype == "cgroup2")?;
        let own2 = own.iter().find(|(h, _)| h.is_empty()).map(|(_, p)| p)?;
        let available = v2_controllers(&m.point, own2);
        if !available.split_whitespace().any(|c| c == "memory") {
            return None;
        }
        let dir = m.point.join(relative(own2, &m.root)?).join(PARENT);
        Some(Layout {
            version: Version::V2,
            parents: CONTROLLERS
                .iter()
                .filter(|c| available.split_whitespace().any(|a| a == **c))
                .map(|c| (*c, dir.clone()))
                .collect(),
        })
    }

    /// The group directories of VM `name`, one per distinct parent.
    pub fn group_dirs(&self, name: &str) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (_, p) in &self.parents {
            let d = p.join(name);
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        dirs
    }

    fn dir_of(&self, controller: &str, name: &str) -> Option<PathBuf> {
        self.parents
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, p)| p.join(name))
    }
}

/// `own` (a path in the hierarchy) relative to a mount whose root is `root`.
fn relative(own: &str, root: &str) -> Option<PathBuf> {
    if root == "/" {
        return Some(PathBuf::from(own.trim_start_matches('/')));
    }
    let rest = own.strip_prefix(root)?;
    Some(PathBuf::from(rest.trim_start_matches('/')))
}

#[derive(Debug)]
struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    options: String,
}

/// Mount root, mount point, type and super options of each line.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let lf: Vec<&str> = left.split_whitespace().collect();
            let rf: Vec<&str> = right.split_whitespace().collect();
            Some(Mount {
                root: lf.get(3)?.to_string(),
                point: PathBuf::from(lf.get(4)?),
                fstype: rf.first()?.to_string(),
                options: rf.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// `(controllers, path)` of each `/proc/self/cgroup` line (v2: empty list).
fn parse_proc_cgroup(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            Some((ctrls.to_string(), path.to_string()))
        })
        .collect()
}

/// Why a group could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the cgroup {path}: {source}")]
pub struct CgroupError {
    pub path: String,
    pub source: io::Error,
}

fn err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError {
        path: path.display().to_string(),
        source,
    }
}

/// A VM's group, made and limited, with its `cgroup.procs` files open.
#[derive(Debug)]
pub struct Group {
    pub version: Version,
    pub dirs: Vec<PathBuf>,
    procs: Vec<File>,
}

impl Group {
    /// Makes group `name` with `limits` (removing empty groups of ended VMs
    /// first).
    pub fn create(layout: &Layout, name: &str, limits: &Limits) -> Result<Group, CgroupError> {
        sweep(layout);
        for (ctrl, parent) in &layout.parents {
            if !parent.is_dir() {
                fs::create_dir_all(parent).map_err(err(parent))?;
            }
            if layout.version == Version::V2 {
                // Hand the controllers down to the VMs' groups.
                let control = parent.join("cgroup.subtree_control");
                fs::write(&control, format!("+{ctrl}")).map_err(err(&control))?;
            }
        }
        let dirs = layout.group_dirs(name);
        let made = (|| {
            for d in &dirs {
                match fs::create_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(err(d)(e)),
                }
            }
            for (ctrl, file, value) in limits.files(layout.version) {
                let Some(dir) = layout.dir_of(ctrl, name) else {
                    continue;
                };
                let path = dir.join(file);
                // v2's swap file exists only with swap accounting.
                if file == "memory.swap.max" && !path.exists() {
                    continue;
                }
                fs::write(&path, &value).map_err(err(&path))?;
            }
            if layout.version == Version::V1 {
                if let Some(dir) = layout.dir_of("memory", name) {
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        fs::write(&memsw, limits.memory_bytes.to_string()).map_err(err(&memsw))?;
                    }
                }
            }
            let mut procs = Vec::new();
            for d in &dirs {
                let p = d.join("cgroup.procs");
                procs.push(OpenOptions::new().write(true).open(&p).map_err(err(&p))?);
            }
            Ok(procs)
        })();
        match made {
            Ok(procs) => Ok(Group {
                version: layout.version,
                dirs,
                procs,
            }),
            Err(e) => {
                for d in &dirs {
                    let _ = fs::remove_dir(d);
                }
                Err(e)
            }
        }
    }

    /// Moves the calling process into the group. Call only between fork
    /// and exec: it uses nothing but `write(2)` on files opened before.
    pub fn enter_in_child(fds: &[i32]) -> io::Result<()> {
        for fd in fds {
            // SAFETY: writes one byte from a static buffer to an fd that
            // stays open in the child until exec; async-signal-safe.
            let n = unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) };
            if n != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// The open `cgroup.procs` descriptors, for [`Group::enter_in_child`].
    pub fn procs_fds(&self) -> Vec<i32> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// Removes the groups of `name` (they must be empty).
pub fn remove(layout: &Layout, name: &str) {
    for d in layout.group_dirs(name) {
        let _ = fs::remove_dir(d);
    }
}

/// Removes the groups of VM `name` on this host, once its QEMU has exited.
pub fn release(name: &str) {
    if let Some(layout) = Layout::detect() {
        remove(&layout, name);
    }
}

/// How old an empty group must be before [`sweep`] removes it: a group is
/// empty between its creation and its QEMU entering it (milliseconds), and
/// another forkd process sweeping then must not take it away.
pub const SWEEP_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the empty VM groups under forkd's parents that are older than
/// [`SWEEP_AFTER`] (the QEMUs that were in them have ended).
pub fn sweep(layout: &Layout) {
    for (_, parent) in &layout.parents {
        let Ok(entries) = fs::read_dir(parent) else {
            continue;
        };
        for e in entries.flatten() {
            let old_enough = e
                .metadata()
                .ok()
                .filter(|m| m.is_dir())
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > SWEEP_AFTER);
            if old_enough {
                let _ = fs::remove_dir(e.path());
            }
        }
    }
}

/// The group (a path in its hierarchy) of controller `ctrl` that process
/// `pid` is in: the v1 hierarchy of `ctrl`, else the v2 one.
pub fn group_of(pid: u32, ctrl: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let lines = parse_proc_cgroup(&text);
    lines
        .iter()
        .find(|(h, _)| h.split(',').any(|c| c == ctrl))
        .or_else(|| lines.iter().find(|(h, _)| h.is_empty()))
        .map(|(_, p)| p.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "\
8:pids:/
4:memory:/process_api/abc
1:cpu:/
0::/
";

    #[test]
    fn v1_groups_nest_under_the_own_cgroup_of_each_controller() {
        let l = Layout::from_texts(MOUNTINFO_V1, CGROUP_V1, |_, _| String::new()).unwrap();
        assert_eq!(l.version, Version::V1);
        assert_eq!(
            l.group_dirs("sb-1"),
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/forkd/sb-1"),
                PathBuf::from("/sys/fs/cgroup/pids/forkd/sb-1"),
                PathBuf::from("/sys/fs/cgroup/cpu/forkd/sb-1"),
            ]
        );
    }

    #[test]
    fn v2_is_used_when_the_unified_hierarchy_has_the_memory_controller() {
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let cgroup = "0::/system.slice/forkd.service\n";
        let l = Layout::from_texts(mountinfo, cgroup, |m, own| {
            assert_eq!(m, Path::new("/sys/fs/cgroup"));
            assert_eq!(own, "/system.slice/forkd.service");
            "cpuset cpu io memory pids".into()
        })
        .unwrap();
        assert_eq!(l.version, Version::V2);
        assert_eq!(
            l.group_dirs("sb-2"),
            vec![PathBuf::from(
                "/sys/fs/cgroup/system.slice/forkd.service/forkd/sb-2"
            )]
        );
        assert_eq!(l.parents.len(), 3);
        // Without the memory controller there is nothing to limit with.
        assert!(Layout::from_texts(mountinfo, cgroup, |_, _| "pids".into()).is_none());
        // A container whose mount root is its own cgroup.
        let inner = "30 23 0:26 /lxc/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let l = Layout::from_texts(inner, "0::/lxc/c1/app\n", |_, _| "memory pids".into()).unwrap();
        assert_eq!(
            l.group_dirs("x"),
            vec![PathBuf::from("/sys/fs/cgroup/app/forkd/x")]
        );
    }

    #[test]
    fn limits_become_each_version_files() {
        let l = Limits {
            memory_bytes: 512 << 20,
            pids: 256,
            cpu_quota_pct: Some(150),
        };
        assert_eq!(
            l.files(Version::V1),
            vec![
                ("memory", "memory.limit_in_bytes", "536870912".to_string()),
                ("pids", "pids.max", "256".to_string()),
                ("cpu", "cpu.cfs_period_us", "100000".to_string()),
                ("cpu", "cpu.cfs_quota_us", "150000".to_string()),
            ]
        );
        let v2 = l.files(Version::V2);
        assert!(v2.contains(&("cpu", "cpu.max", "150000 100000".to_string())));
        assert!(v2.contains(&("memory", "memory.max", "536870912".to_string())));
        let no_quota = Limits {
            cpu_quota_pct: None,
            ..l
        };
        assert!(!no_quota.files(Version::V1).iter().any(|f| f.0 == "cpu"));
        // A tiny quota is raised to the kernel's 1 ms minimum.
        let tiny = Limits {
            cpu_quota_pct: Some(0),
            ..l
        };
        assert!(tiny
            .files(Version::V1)
            .contains(&("cpu", "cpu.cfs_quota_us", "1000".to_string())));
    }
}
