//! Attacks from inside a real guest (TCG here) on the host, on private
//! networks, on sibling sandboxes and on the host's resources; each test
//! asserts the attack fails and the host side is unharmed.
//!
//! "The internet" and "a private network" are a network namespace each test
//! makes (a veth pair in 10.213.N.0/24): listeners there and on the host
//! answer every connection with a secret banner, so a guest that reaches
//! one prints its secret. Creating namespaces needs root (as CI runs).

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use forkd_core::fleet::ChildOverrides;
use forkd_core::{BootOptions, Env, Fleet};
use forkd_ops::{Network, PartialFailure};

fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

/// A network namespace joined to the host by a veth pair: the host side
/// is one of the host's own addresses, the namespace side a private
/// address only this test uses.
struct Inet {
    name: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

impl Inet {
    fn new(tag: &str) -> Inet {
        // A subnet of its own per namespace of this process (tests run in
        // parallel; two veths with one subnet would confuse the routes).
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let n = (std::process::id() as usize % 40) * 6 + k % 6 + 10;
        let name = format!("fkdt-{tag}-{}", std::process::id());
        let veth = format!("fk{}{}", &tag[..2], n);
        let peer = format!("{veth}p");
        let host_ip = Ipv4Addr::new(10, 213, n as u8, 1);
        let ns_ip = Ipv4Addr::new(10, 213, n as u8, 2);
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip(8)");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &name, "ip"];
            a.extend_from_slice(args);
            ip(&a);
        };
        inside(&["addr", "add", &format!("{ns_ip}/24"), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        Inet {
            name,
            host_ip,
            ns_ip,
        }
    }

    /// A listener inside the namespace on `ns_ip`; returns its port.
    fn listen_inside(&self, banner: &str) -> u16 {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (ip, banner) = (self.ns_ip, banner.to_string());
        std::thread::spawn(move || {
            // SAFETY: moves only this thread into the namespace.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let l = TcpListener::bind((ip, 0)).unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            serve_banner(l, &banner);
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap()
    }
}

impl Drop for Inet {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Answers every connection with `banner` and a newline.
fn serve_banner(l: TcpListener, banner: &str) {
    for mut c in l.incoming().flatten() {
        let _ = c.write_all(format!("{banner}\n").as_bytes());
    }
}

/// A listener on the host at `addr` (port 0: any); returns its port.
fn listen_on_host(addr: &str, banner: &str) -> u16 {
    let l = TcpListener::bind((addr, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let banner = banner.to_string();
    std::thread::spawn(move || serve_banner(l, &banner));
    port
}

/// Every address of the host's interfaces (`ip -o addr`), IPv6 link-local
/// left out (a guest cannot name the interface).
fn host_addresses() -> Vec<String> {
    let out = Command::new("ip").args(["-o", "addr"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let fam = f.nth(2)?;
            let addr = f.next()?.split('/').next()?.to_string();
            (matches!(fam, "inet" | "inet6") && !addr.starts_with("fe80")).then_some(addr)
        })
        .collect()
}

struct World {
    env: Env,
    fleet: Fleet,
}

impl World {
    fn new(name: &str) -> World {
        let root = std::env::temp_dir().join(format!("forkd-iso-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let env = Env {
            home: root.join("home"),
            runtime: root.join("run"),
        };
        let fleet = Fleet::open(&env).unwrap();
        World { env, fleet }
    }

    fn create(&self, opts: &BootOptions) -> String {
        self.fleet
            .create(common::artifacts(), "busybox", opts)
            .unwrap()
            .0
            .id
    }

    fn run(&self, id: &str, script: &str) -> String {
        common::run_ok(&self.fleet, id, script)
    }

    /// What the guest of `id` reads from `addr:port` (empty: nothing).
    fn probe(&self, id: &str, addr: &str, port: u16) -> String {
        self.run(id, &format!("(sleep 1) | nc -w 3 {addr} {port} 2>&1; true"))
    }

    /// What the sandbox's DNS server (10.0.2.3) says about `name`, as
    /// busybox nslookup prints it (`NXDOMAIN`, `REFUSED`, addresses).
    fn dns(&self, id: &str, name: &str) -> String {
        self.run(id, &format!("nslookup {name} 10.0.2.3 2>&1; true"))
    }

    fn qemu_pid(&self, id: &str) -> u32 {
        self.fleet.sandbox_view(id).unwrap().pid
    }
}

impl Drop for World {
    fn drop(&mut self) {
        common::kill_all(&self.fleet);
        let _ = std::fs::remove_dir_all(self.env.home.parent().unwrap());
    }
}

/// Whether busybox nslookup output says the name has no address: the only
/// `Address` line is the server's own.
fn not_found(nslookup: &str) -> bool {
    nslookup.matches("Address").count() == 1
        && (nslookup.contains("NXDOMAIN") || nslookup.contains("Can't find"))
}

fn egress(allow: &[&str], deny: &[&str]) -> BootOptions {
    BootOptions {
        egress: forkd_vm::Egress {
            deny_all: false,
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
        },
        ..BootOptions::default()
    }
}

#[test]
fn a_guest_reaches_nothing_of_the_host_nor_private_space_by_any_route() {
    if !is_root() {
        eprintln!("skipped: making network namespaces needs root");
        return;
    }
    let inet = Inet::new("deny");
    let secret = "forkd-iso-secret";
    let loopback = listen_on_host("127.0.0.1", secret);
    let any = listen_on_host("0.0.0.0", secret);
    let private = inet.listen_inside(secret);
    // The listeners answer the host itself.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", loopback)).unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut c, &mut got).unwrap_or_default();
    assert!(got.contains(secret));

    let w = World::new("deny");
    let id = w.create(&BootOptions::default());
    let mut attempts = vec![
        ("10.0.2.2".to_string(), loopback),
        ("10.0.2.2".to_string(), any),
        ("10.0.2.3".to_string(), any),
        ("127.0.0.1".to_string(), loopback),
        (inet.ns_ip.to_string(), private),
        (inet.host_ip.to_string(), any),
        ("169.254.169.254".to_string(), 80),
        ("100.100.100.200".to_string(), any),
    ];
    for a in host_addresses() {
        attempts.push((a.clone(), any));
        attempts.push((a, loopback));
    }
    for (addr, port) in &attempts {
        let out = w.probe(&id, addr, *port);
        assert!(
            !out.contains(secret),
            "the guest reached {addr}:{port}: {out}"
        );
    }
    // Names that resolve to the host's loopback are not handed out.
    let answer = w.dns(&id, "localhost");
    assert!(not_found(&answer), "{answer}");
    // The host side is unharmed: the listeners still answer, the guest runs.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", loopback)).unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut c, &mut got).unwrap_or_default();
    assert!(got.contains(secret));
    assert_eq!(w.run(&id, "echo alive").trim(), "alive");
    // ls and info show the policy.
    assert_eq!(
        w.fleet.sandbox_view(&id).unwrap().network.mode,
        Network::Default
    );
}

#[test]
fn allow_out_and_deny_out_do_what_they_say() {
    if !is_root() {
        eprintln!("skipped: making network namespaces needs root");
        return;
    }
    let inet = Inet::new("policy");
    let secret = "forkd-iso-policy";
    let inside = inet.listen_inside(secret);
    let on_host = listen_on_host("0.0.0.0", secret);
    let w = World::new("policy");
    let ns = inet.ns_ip.to_string();

    // An allowed private address is reached, through the gateway.
    let allowed = w.create(&egress(&[&format!("{ns}/32")], &[]));
    assert!(w.probe(&allowed, &ns, inside).contains(secret));
    // ... and nothing else: not the host's side of the same link.
    assert!(!w
        .probe(&allowed, &inet.host_ip.to_string(), on_host)
        .contains(secret));
    let view = w.fleet.sandbox_view(&allowed).unwrap().network;
    assert_eq!(view.allow_out, [format!("{ns}/32")]);

    // A broad allow never opens the host; a deny beats an allow.
    let subnet = format!("{}/24", inet.host_ip);
    let denied = w.create(&egress(&[&subnet, "0.0.0.0/0"], &[&ns]));
    assert!(!w.probe(&denied, &ns, inside).contains(secret));
    assert!(!w
        .probe(&denied, &inet.host_ip.to_string(), on_host)
        .contains(secret));
    assert!(!w.probe(&denied, "10.0.2.2", on_host).contains(secret));

    // Under an allow-list of names, other names are not even looked up (no
    // leaking data through DNS queries): REFUSED.
    // (This host has no internet: a name that is looked up is not found.)
    let looked_up = w.dns(&allowed, "leak-the-secret.example.com");
    assert!(
        not_found(&looked_up) && !looked_up.contains("REFUSED"),
        "{looked_up}"
    );
    let names = w.create(&egress(&["pypi.org"], &["evil.example"]));
    for name in ["leak-the-secret.example.com", "www.evil.example"] {
        let refused = w.dns(&names, name);
        assert!(refused.contains("REFUSED"), "{name}: {refused}");
    }

    // A rule that does not parse is refused before anything starts.
    let bad = w.fleet.create(
        common::artifacts(),
        "busybox",
        &egress(&["not a rule"], &[]),
    );
    assert!(matches!(bad, Err(forkd_core::CoreError::BadRequest(_))));
}

#[test]
fn children_inherit_the_policy_and_cannot_reach_each_other() {
    if !is_root() {
        eprintln!("skipped: making network namespaces needs root");
        return;
    }
    let inet = Inet::new("kids");
    let secret = "forkd-iso-kids";
    let inside = inet.listen_inside(secret);
    let ns = inet.ns_ip.to_string();
    let w = World::new("kids");
    let parent = w.create(&egress(&[&ns], &[]));
    w.fleet.snapshot(&parent, "net").unwrap();
    let kids: Vec<String> = w
        .fleet
        .spawn("net", 2, 2, true, PartialFailure::Kill, &|_, _| {})
        .unwrap()
        .into_iter()
        .map(|c| c.unwrap().sandbox.id)
        .collect();
    // Each child runs a listener; its sibling tries every address it has.
    for k in &kids {
        w.run(
            k,
            &format!("(while :; do echo {secret}-{k} | nc -l -p 7777; done) >/dev/null 2>&1 &"),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let (a, b) = (&kids[0], &kids[1]);
    assert!(
        w.probe(a, "127.0.0.1", 7777)
            .contains(&format!("{secret}-{a}")),
        "the listener answers inside its own guest"
    );
    let mut targets = vec!["10.0.2.2".to_string(), "10.0.2.16".to_string()];
    targets.extend(host_addresses());
    for t in &targets {
        let out = w.probe(b, t, 7777);
        assert!(
            !out.contains(&format!("{secret}-{a}")),
            "{b} reached {a} via {t}: {out}"
        );
    }
    // Both inherited the snapshot's policy.
    for k in &kids {
        assert!(w.probe(k, &ns, inside).contains(secret), "{k}");
        assert_eq!(
            w.fleet.sandbox_view(k).unwrap().network.allow_out,
            [ns.as_str()]
        );
    }
    let detail = w.fleet.snapshot_detail("net").unwrap();
    assert_eq!(detail.network.unwrap().allow_out, [ns.as_str()]);
    // A child can be shut off the network at spawn.
    let off = w
        .fleet
        .spawn_with(
            "net",
            1,
            1,
            true,
            PartialFailure::Kill,
            &ChildOverrides {
                network: Some(Network::None),
                ..Default::default()
            },
            &|_, _| {},
        )
        .unwrap()
        .remove(0)
        .unwrap()
        .sandbox;
    assert_eq!(off.network.mode, Network::None);
    assert!(!w.probe(&off.id, &ns, inside).contains(secret));
}

/// The cgroup directory of sandbox `id` (QEMU `pid`) for controller
/// `ctrl`, checked against the group the kernel says QEMU is in.
fn cgroup_dir(id: &str, pid: u32, ctrl: &str) -> PathBuf {
    let rel = forkd_vm::cgroup::group_of(pid, ctrl).unwrap();
    assert!(rel.ends_with(&format!("/forkd/{id}")), "QEMU is in {rel}");
    let layout = forkd_vm::cgroup::Layout::detect().unwrap();
    let (_, parent) = layout.parents.iter().find(|(c, _)| *c == ctrl).unwrap();
    parent.join(id)
}

fn read(p: PathBuf) -> String {
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

#[test]
fn qemu_is_confined_and_a_hostile_guest_leaves_its_siblings_responsive() {
    let w = World::new("confine");
    let hog = w.create(&BootOptions {
        limits: forkd_vm::Limits {
            memory_limit_mib: None,
            cpu_quota_pct: Some(50),
        },
        ..BootOptions::default()
    });
    let sibling = w.create(&BootOptions::default());
    let pid = w.qemu_pid(&hog);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    if is_root() {
        assert_ne!(uid, 0, "QEMU runs as root");
        let sibling_uid = std::fs::read_to_string(format!("/proc/{}/status", w.qemu_pid(&sibling)))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Uid:").map(str::to_string))
            .unwrap();
        assert!(
            !sibling_uid.split_whitespace().any(|u| u == uid.to_string()),
            "two QEMUs share uid {uid}"
        );
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(String::from_utf8_lossy(&cmdline).contains("spawn=deny"));
    }
    if forkd_vm::cgroup::Layout::detect().is_some() && is_root() {
        let accel =
            forkd_vm::accel::choose(forkd_vm::AccelRequest::Auto, &forkd_vm::HostProbe::read())
                .unwrap()
                .accel;
        let expected = (256 + forkd_vm::config::qemu_overhead_mib(accel, None)) << 20;
        let mem = cgroup_dir(&hog, pid, "memory");
        assert_eq!(
            read(mem.join("memory.limit_in_bytes")),
            expected.to_string()
        );
        assert_eq!(read(cgroup_dir(&hog, pid, "pids").join("pids.max")), "256");
        assert_eq!(
            read(cgroup_dir(&hog, pid, "cpu").join("cpu.cfs_quota_us")),
            "50000"
        );
    }
    // A fork bomb and a memory hog in one guest...
    w.run(
        &hog,
        "(dd if=/dev/zero of=/tmp/hog bs=1M count=400 >/dev/null 2>&1; \
          b() { b | b & }; b) >/dev/null 2>&1 & echo started",
    );
    std::thread::sleep(Duration::from_secs(3));
    // ... leave the sibling responsive.
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(w.run(&sibling, "echo fine").trim(), "fine");
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    }
    // The hog's QEMU stayed within its limits on the host.
    if is_root() && forkd_vm::cgroup::Layout::detect().is_some() {
        let mem = cgroup_dir(&hog, pid, "memory");
        let peak: u64 = read(mem.join("memory.max_usage_in_bytes")).parse().unwrap();
        let limit: u64 = read(mem.join("memory.limit_in_bytes")).parse().unwrap();
        assert!(peak <= limit, "{peak} > {limit}");
        let tasks: u32 = read(cgroup_dir(&hog, pid, "pids").join("pids.current"))
            .parse()
            .unwrap();
        assert!(tasks <= 256);
    }
}

#[test]
fn a_qemu_at_its_memory_limit_is_held_there_and_its_sibling_runs_on() {
    if !is_root() || forkd_vm::cgroup::Layout::detect().is_none() {
        eprintln!("skipped: needs root and a memory cgroup");
        return;
    }
    let w = World::new("oom");
    let limit_mib = 256 + 64;
    let tight = w.create(&BootOptions {
        limits: forkd_vm::Limits {
            memory_limit_mib: Some(limit_mib),
            cpu_quota_pct: None,
        },
        ..BootOptions::default()
    });
    let sibling = w.create(&BootOptions::default());
    let pid = w.qemu_pid(&tight);
    let mem = cgroup_dir(&tight, pid, "memory");
    assert_eq!(
        read(mem.join("memory.limit_in_bytes")),
        (limit_mib << 20).to_string()
    );
    // Guest RAM in use (170 MiB of tmpfs on top of what the guest booted
    // with) plus QEMU's own memory is more than the limit: unconfined, this
    // QEMU would grow past it. The kernel holds it at the limit (reclaiming
    // its file pages) or stops it.
    let fill = forkd_protocol::ExecRequest {
        timeout_ms: Some(90_000),
        ..common::sh(
            "mkdir -p /mnt/fill && mount -t tmpfs -o size=200m tmpfs /mnt/fill && \
             dd if=/dev/zero of=/mnt/fill/x bs=1M count=170",
        )
    };
    let _ = w.fleet.exec(&tight, fill, None, |_, _| {});
    let peak: u64 = read(mem.join("memory.max_usage_in_bytes")).parse().unwrap();
    assert_eq!(
        peak,
        limit_mib << 20,
        "the QEMU never reached its limit: the fill was too small to test it"
    );
    let now: u64 = read(mem.join("memory.usage_in_bytes")).parse().unwrap();
    assert!(now <= limit_mib << 20);
    // Its sibling is unaffected.
    assert_eq!(w.run(&sibling, "echo fine").trim(), "fine");
}
