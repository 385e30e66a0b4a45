//! The egress policy: which destinations a sandbox may reach. Pure: rules
//! parsed from the user's words, and verdicts for an address or a DNS name,
//! tested without a network.
//!
//! The rules, in order:
//! 1. a `deny` rule that matches (a CIDR holding the address, or a domain the
//!    address was resolved from) denies;
//! 2. an `allow` rule that matches allows, except that an address in
//!    *protected* space (the host's loopback, the host's own addresses,
//!    link-local, private, shared and unique-local ranges) is opened only by
//!    an allow CIDR that lies inside that protected range: `--allow-out
//!    10.1.2.0/24` opens that subnet, `--allow-out 0.0.0.0/0` never opens the
//!    host, and no domain rule does (a public name that resolves to 127.0.0.1
//!    stays unreachable: DNS rebinding);
//! 3. protected space is denied;
//! 4. with any allow rule the policy is an allow-list: everything else is
//!    denied; without one, the public internet is allowed.
//!
//! Domain rules see only the names this sandbox resolved through its own DNS
//! server (the gateway's): a connection to a bare address is judged by CIDR
//! rules alone.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why a rule could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("egress rule {0:?} is neither a CIDR (10.0.0.0/8, 2001:db8::/32, 1.2.3.4) nor a domain name (pypi.org, *.github.com)")]
    BadRule(String),
    #[error("egress rule {0:?} is empty")]
    Empty(String),
}

/// One `--allow-out`/`--deny-out` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// An address range (a single address is a /32 or /128).
    Cidr(IpNet),
    /// A domain: `example.com` matches it and every name below it;
    /// `*.example.com` only the names below it.
    Domain { name: String, subdomains_only: bool },
}

impl Rule {
    /// Parses a CIDR, an address or a domain name (lower-cased, a trailing
    /// dot dropped).
    pub fn parse(s: &str) -> Result<Rule, PolicyError> {
        let t = s.trim();
        if t.is_empty() {
            return Err(PolicyError::Empty(s.into()));
        }
        if let Ok(net) = t.parse::<IpNet>() {
            return Ok(Rule::Cidr(net.trunc()));
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Rule::Cidr(IpNet::from(ip)));
        }
        let (subdomains_only, rest) = match t.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, t),
        };
        let name = rest.trim_end_matches('.').to_ascii_lowercase();
        if !valid_domain(&name) {
            return Err(PolicyError::BadRule(s.into()));
        }
        Ok(Rule::Domain {
            name,
            subdomains_only,
        })
    }

    fn matches_name(&self, candidate: &str) -> bool {
        let Rule::Domain {
            name,
            subdomains_only,
        } = self
        else {
            return false;
        };
        let c = candidate.trim_end_matches('.').to_ascii_lowercase();
        let below = c.len() > name.len()
            && c.ends_with(name.as_str())
            && c.as_bytes()[c.len() - name.len() - 1] == b'.';
        below || (!subdomains_only && c == *name)
    }

    fn cidr(&self) -> Option<&IpNet> {
        match self {
            Rule::Cidr(n) => Some(n),
            Rule::Domain { .. } => None,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Cidr(n) => write!(f, "{n}"),
            Rule::Domain {
                name,
                subdomains_only: true,
            } => write!(f, "*.{name}"),
            Rule::Domain { name, .. } => write!(f, "{name}"),
        }
    }
}

/// RFC 1123 labels, at least one dot or a single label, 253 bytes at most.
fn valid_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        // A bare number is an address typo, not a name.
        && !name.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// Which part of protected space an address is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protected {
    /// 127.0.0.0/8, ::1: the host's loopback.
    Loopback,
    /// An address of one of the host's own interfaces.
    HostAddress,
    /// 169.254.0.0/16, fe80::/10: link-local, where cloud metadata services live.
    LinkLocal,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7.
    Private,
    /// 100.64.0.0/10 (carrier-grade NAT, often a provider's internal network).
    Shared,
    /// 0.0.0.0/8, multicast, broadcast, reserved and documentation ranges.
    NotRoutable,
}

impl Protected {
    pub fn describe(self) -> &'static str {
        match self {
            Protected::Loopback => "the host's loopback",
            Protected::HostAddress => "an address of the host itself",
            Protected::LinkLocal => "link-local space (cloud metadata services)",
            Protected::Private => "private address space",
            Protected::Shared => "shared address space (100.64.0.0/10)",
            Protected::NotRoutable => "a reserved, multicast or broadcast address",
        }
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len).expect("prefix length <= 32"))
}

fn v6(s: &str, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new(s.parse::<Ipv6Addr>().expect("literal"), len).expect("prefix <= 128"))
}

/// The protected ranges other than the host's own addresses, most specific
/// reason first.
pub fn protected_ranges() -> Vec<(IpNet, Protected)> {
    vec![
        (v4(127, 0, 0, 0, 8), Protected::Loopback),
        (v6("::1", 128), Protected::Loopback),
        (v4(169, 254, 0, 0, 16), Protected::LinkLocal),
        (v6("fe80::", 10), Protected::LinkLocal),
        (v4(10, 0, 0, 0, 8), Protected::Private),
        (v4(172, 16, 0, 0, 12), Protected::Private),
        (v4(192, 168, 0, 0, 16), Protected::Private),
        (v6("fc00::", 7), Protected::Private),
        (v4(100, 64, 0, 0, 10), Protected::Shared),
        (v4(0, 0, 0, 0, 8), Protected::NotRoutable),
        (v4(192, 0, 0, 0, 24), Protected::NotRoutable),
        (v4(192, 0, 2, 0, 24), Protected::NotRoutable),
        (v4(198, 18, 0, 0, 15), Protected::NotRoutable),
        (v4(198, 51, 100, 0, 24), Protected::NotRoutable),
        (v4(203, 0, 113, 0, 24), Protected::NotRoutable),
        (v4(224, 0, 0, 0, 4), Protected::NotRoutable),
        (v4(240, 0, 0, 0, 4), Protected::NotRoutable),
        (v6("::", 128), Protected::NotRoutable),
        (v6("ff00::", 8), Protected::NotRoutable),
        // IPv4-mapped and NAT64 forms would reach IPv4 space by another name.
        (v6("::ffff:0:0", 96), Protected::NotRoutable),
        (v6("64:ff9b::", 96), Protected::NotRoutable),
    ]
}

/// The protected range holding `ip`, if any (a host address as a /32 or /128).
pub fn protected(ip: IpAddr, host_addrs: &[IpAddr]) -> Option<(IpNet, Protected)> {
    if host_addrs.contains(&ip) {
        return Some((IpNet::from(ip), Protected::HostAddress));
    }
    protected_ranges()
        .into_iter()
        .find(|(n, _)| n.contains(&ip))
}

/// A sandbox's network mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing gets out (a NIC that reaches nothing, for children of a
    /// snapshot with a network device).
    None,
    /// The rules decide.
    Default,
}

/// A parsed egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub mode: Mode,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
}

/// What the policy says about a destination, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// `--net none`.
    NoNetwork,
    DeniedByRule(String),
    Protected(Protected),
    NotAllowListed,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        *self == Verdict::Allow
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow => write!(f, "allowed"),
            Verdict::NoNetwork => write!(f, "denied: the sandbox has no network"),
            Verdict::DeniedByRule(r) => write!(f, "denied by --deny-out {r}"),
            Verdict::Protected(p) => write!(f, "denied: {}", p.describe()),
            Verdict::NotAllowListed => write!(f, "denied: no --allow-out rule matches"),
        }
    }
}

impl EgressPolicy {
    /// Parses `--allow-out` and `--deny-out` values.
    pub fn parse(
        mode: Mode,
        allow: &[String],
        deny: &[String],
    ) -> Result<EgressPolicy, PolicyError> {
        let parse_all = |v: &[String]| {
            v.iter()
                .map(|s| Rule::parse(s))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(EgressPolicy {
            mode,
            allow: parse_all(allow)?,
            deny: parse_all(deny)?,
        })
    }

    /// The default: the public internet, nothing of the host's.
    pub fn default_policy() -> EgressPolicy {
        EgressPolicy {
            mode: Mode::Default,
            allow: vec![],
            deny: vec![],
        }
    }

    /// May the sandbox connect to `ip`? `names` are the names the sandbox
    /// resolved to `ip`; `host_addrs` the host's own addresses.
    pub fn decide(&self, ip: IpAddr, names: &[String], host_addrs: &[IpAddr]) -> Verdict {
        if self.mode == Mode::None {
            return Verdict::NoNetwork;
        }
        let name_match = |r: &Rule| names.iter().any(|n| r.matches_name(n));
        if let Some(r) = self
            .deny
            .iter()
            .find(|r| r.cidr().is_some_and(|n| n.contains(&ip)) || name_match(r))
        {
            return Verdict::DeniedByRule(r.to_string());
        }
        let guarded = protected(ip, host_addrs);
        let allowed = self.allow.iter().any(|r| match (r, &guarded) {
            (Rule::Cidr(n), None) => n.contains(&ip),
            // Only a rule that lies inside the protected range opens it.
            (Rule::Cidr(n), Some((range, _))) => n.contains(&ip) && range.contains(n),
            (Rule::Domain { .. }, None) => name_match(r),
            (Rule::Domain { .. }, Some(_)) => false,
        });
        if allowed {
            Verdict::Allow
        } else if let Some((_, why)) = guarded {
            Verdict::Protected(why)
        } else if !self.allow.is_empty() {
            Verdict::NotAllowListed
        } else {
            Verdict::Allow
        }
    }

    /// Does the sandbox's DNS server resolve `name` at all? Names denied by
    /// a rule are not; when the allow-list names domains, only those are, so
    /// a guest cannot leak data through lookups of names it may not reach.
    pub fn may_resolve(&self, name: &str) -> bool {
        if self.mode == Mode::None || self.deny.iter().any(|r| r.matches_name(name)) {
            return false;
        }
        let domains = self.allow.iter().filter(|r| r.cidr().is_none());
        let mut domains = domains.peekable();
        domains.peek().is_none() || domains.any(|r| r.matches_name(name))
    }

    /// Whether a resolved address may be handed to the guest: protected
    /// addresses are dropped from answers unless a CIDR rule opens them.
    pub fn may_answer(&self, name: &str, ip: IpAddr, host_addrs: &[IpAddr]) -> bool {
        protected(ip, host_addrs).is_none()
            || self.decide(ip, &[name.to_string()], host_addrs).allowed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        EgressPolicy::parse(Mode::Default, &s(allow), &s(deny)).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const HOST: [IpAddr; 1] = [IpAddr::V4(Ipv4Addr::new(203, 0, 114, 7))];

    #[test]
    fn rules_parse_cidrs_addresses_and_domains() {
        assert_eq!(
            Rule::parse("10.1.2.3/24").unwrap(),
            Rule::Cidr("10.1.2.0/24".parse().unwrap())
        );
        assert_eq!(
            Rule::parse("1.2.3.4").unwrap(),
            Rule::Cidr("1.2.3.4/32".parse().unwrap())
        );
        assert_eq!(Rule::parse("::1").unwrap().to_string(), "::1/128");
        assert_eq!(Rule::parse("PyPI.org.").unwrap().to_string(), "pypi.org");
        assert_eq!(
            Rule::parse("*.github.com").unwrap().to_string(),
            "*.github.com"
        );
        for bad in [
            "",
            "  ",
            "a b",
            "-x.com",
            "1.2.3",
            "10.0.0.0/33",
            "x..y",
            "*.",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Rule::parse("a b")
            .unwrap_err()
            .to_string()
            .contains("neither a CIDR"));
    }

    #[test]
    fn domains_match_themselves_and_below_and_wildcards_only_below() {
        let d = Rule::parse("pypi.org").unwrap();
        assert!(d.matches_name("pypi.org"));
        assert!(d.matches_name("files.PYPI.org."));
        assert!(!d.matches_name("notpypi.org"));
        assert!(!d.matches_name("pypi.org.evil.com"));
        let w = Rule::parse("*.github.com").unwrap();
        assert!(w.matches_name("api.github.com"));
        assert!(!w.matches_name("github.com"));
    }

    #[test]
    fn the_default_reaches_the_internet_and_nothing_of_the_host() {
        let p = EgressPolicy::default_policy();
        assert_eq!(p.decide(ip("93.184.216.34"), &[], &HOST), Verdict::Allow);
        assert_eq!(p.decide(ip("2606:4700::1111"), &[], &HOST), Verdict::Allow);
        for (addr, why) in [
            ("127.0.0.1", Protected::Loopback),
            ("127.255.0.9", Protected::Loopback),
            ("::1", Protected::Loopback),
            ("203.0.114.7", Protected::HostAddress),
            ("169.254.169.254", Protected::LinkLocal),
            ("fe80::1", Protected::LinkLocal),
            ("10.0.2.2", Protected::Private),
            ("172.31.255.1", Protected::Private),
            ("192.168.1.1", Protected::Private),
            ("fd00::1", Protected::Private),
            ("100.100.100.200", Protected::Shared),
            ("0.0.0.0", Protected::NotRoutable),
            ("255.255.255.255", Protected::NotRoutable),
            ("224.0.0.1", Protected::NotRoutable),
            ("::ffff:127.0.0.1", Protected::NotRoutable),
            ("64:ff9b::a00:1", Protected::NotRoutable),
        ] {
            assert_eq!(
                p.decide(ip(addr), &[], &HOST),
                Verdict::Protected(why),
                "{addr}"
            );
        }
        // 172.32/12 is public.
        assert!(p.decide(ip("172.32.0.1"), &[], &HOST).allowed());
    }

    #[test]
    fn none_denies_everything() {
        let p = EgressPolicy::parse(Mode::None, &["0.0.0.0/0".into()], &[]).unwrap();
        assert_eq!(p.decide(ip("1.1.1.1"), &[], &[]), Verdict::NoNetwork);
        assert!(!p.may_resolve("example.com"));
    }

    #[test]
    fn an_allow_list_denies_the_rest_and_domains_follow_resolved_names() {
        let p = policy(&["pypi.org", "*.github.com", "1.2.3.0/24"], &[]);
        assert!(p.decide(ip("1.2.3.9"), &[], &HOST).allowed());
        assert_eq!(p.decide(ip("8.8.8.8"), &[], &HOST), Verdict::NotAllowListed);
        let names = vec!["files.pypi.org".to_string()];
        assert!(p.decide(ip("151.101.0.223"), &names, &HOST).allowed());
        assert!(p
            .decide(ip("140.82.112.6"), &["api.github.com".into()], &HOST)
            .allowed());
        assert!(!p
            .decide(ip("140.82.112.6"), &["github.com".into()], &HOST)
            .allowed());
        assert!(p.may_resolve("pypi.org") && p.may_resolve("api.github.com"));
        assert!(!p.may_resolve("exfil-secret.evil.com"));
        // An allow-list of ranges only still resolves names.
        assert!(policy(&["1.2.3.0/24"], &[]).may_resolve("any.test"));
    }

    #[test]
    fn deny_beats_allow_and_denies_by_name_or_range() {
        let p = policy(&["0.0.0.0/0"], &["evil.com", "9.9.9.0/24"]);
        assert_eq!(
            p.decide(ip("9.9.9.9"), &[], &HOST),
            Verdict::DeniedByRule("9.9.9.0/24".into())
        );
        assert_eq!(
            p.decide(ip("5.5.5.5"), &["www.evil.com".into()], &HOST),
            Verdict::DeniedByRule("evil.com".into())
        );
        assert!(p.decide(ip("5.5.5.5"), &[], &HOST).allowed());
        assert!(!p.may_resolve("evil.com") && p.may_resolve("good.com"));
        // Without allow rules a deny list only subtracts.
        let d = policy(&[], &["8.8.8.8"]);
        assert!(!d.decide(ip("8.8.8.8"), &[], &HOST).allowed());
        assert!(d.decide(ip("8.8.4.4"), &[], &HOST).allowed());
    }

    #[test]
    fn protected_space_opens_only_to_a_rule_inside_it() {
        // A broad rule never opens the host.
        let broad = policy(&["0.0.0.0/0", "::/0"], &[]);
        assert_eq!(
            broad.decide(ip("127.0.0.1"), &[], &HOST),
            Verdict::Protected(Protected::Loopback)
        );
        assert!(!broad.decide(ip("10.9.9.9"), &[], &HOST).allowed());
        assert!(!broad.decide(ip("203.0.114.7"), &[], &HOST).allowed());
        // A narrow one does.
        let narrow = policy(&["10.200.0.0/24", "127.0.0.1"], &[]);
        assert!(narrow.decide(ip("10.200.0.5"), &[], &HOST).allowed());
        assert!(!narrow.decide(ip("10.200.1.5"), &[], &HOST).allowed());
        assert!(narrow.decide(ip("127.0.0.1"), &[], &HOST).allowed());
        assert!(!narrow.decide(ip("127.0.0.2"), &[], &HOST).allowed());
        // The host's own address opens only to exactly that address.
        let host = policy(&["203.0.114.0/24"], &[]);
        assert!(!host.decide(ip("203.0.114.7"), &[], &HOST).allowed());
        assert!(host.decide(ip("203.0.114.8"), &[], &HOST).allowed());
        // No domain opens protected space (DNS rebinding).
        let dom = policy(&["rebind.example"], &[]);
        let names = vec!["rebind.example".to_string()];
        assert!(!dom.decide(ip("127.0.0.1"), &names, &HOST).allowed());
        assert!(!dom.may_answer("rebind.example", ip("127.0.0.1"), &HOST));
        assert!(dom.may_answer("rebind.example", ip("93.184.216.34"), &HOST));
        assert!(narrow.may_answer("x.test", ip("10.200.0.7"), &HOST));
    }
}
