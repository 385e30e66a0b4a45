//! The sandbox's DNS server, its pure half: read a guest's query, write the
//! answer. Every byte comes from the guest: parsing never panics and never
//! allocates more than the datagram holds (`simple-dns`).
//!
//! Only single-question `IN A` and `IN AAAA` queries are answered with
//! addresses (AAAA always empty: the gateway carries IPv4 only); anything
//! else gets `NOTIMP`, a name the policy does not resolve `REFUSED`.

use std::net::Ipv4Addr;

use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE};

/// TTL of the answers we give: short, so that a guest asks again and the
/// gateway sees (and remembers) the names behind the addresses it connects to.
pub const TTL_S: u32 = 30;

/// What a guest asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Lower-case, no trailing dot.
    pub name: String,
    pub kind: QueryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    A,
    Aaaa,
    /// Any other type or class, or more than one question.
    Other,
}

/// How to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Addresses(Vec<Ipv4Addr>),
    /// The name does not exist (or resolved to nothing we may hand out).
    NoSuchName,
    /// The policy does not resolve this name.
    Refused,
    NotImplemented,
    ServerFailure,
}

/// Reads a query; `None` for anything that is not a query we can answer to
/// (a reply, garbage): such datagrams are dropped.
pub fn parse_query(bytes: &[u8]) -> Option<Query> {
    let packet = Packet::parse(bytes).ok()?;
    if packet.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    let id = packet.id();
    let q = packet.questions.first()?;
    let name = q
        .qname
        .to_string()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let kind = match (packet.questions.len(), q.qtype, q.qclass) {
        (1, QTYPE::TYPE(TYPE::A), QCLASS::CLASS(CLASS::IN)) => QueryKind::A,
        (1, QTYPE::TYPE(TYPE::AAAA), QCLASS::CLASS(CLASS::IN)) => QueryKind::Aaaa,
        _ => QueryKind::Other,
    };
    Some(Query { id, name, kind })
}

/// The reply to `query_bytes` (which [`parse_query`] accepted). `None` when
/// it cannot be rebuilt (it then gets no answer, as a lost datagram).
pub fn reply(query_bytes: &[u8], answer: &Answer) -> Option<Vec<u8>> {
    let query = Packet::parse(query_bytes).ok()?;
    let mut out = Packet::new_reply(query.id());
    out.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        out.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    let question = query.questions.first()?.clone();
    *out.rcode_mut() = match answer {
        Answer::Addresses(_) => RCODE::NoError,
        Answer::NoSuchName => RCODE::NameError,
        Answer::Refused => RCODE::Refused,
        Answer::NotImplemented => RCODE::NotImplemented,
        Answer::ServerFailure => RCODE::ServerFailure,
    };
    if let Answer::Addresses(addrs) = answer {
        for a in addrs {
            out.answers.push(ResourceRecord::new(
                question.qname.clone(),
                CLASS::IN,
                TTL_S,
                RData::A(A::from(*a)),
            ));
        }
    }
    out.questions.push(question);
    out.build_bytes_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(0x1234);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(simple_dns::Question::new(
            simple_dns::Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap()
    }

    #[test]
    fn a_queries_are_read_and_answered_with_addresses() {
        let q = query("Files.PyPI.org", TYPE::A);
        assert_eq!(
            parse_query(&q).unwrap(),
            Query {
                id: 0x1234,
                name: "files.pypi.org".into(),
                kind: QueryKind::A
            }
        );
        let addrs = vec![Ipv4Addr::new(151, 101, 0, 223), Ipv4Addr::new(1, 2, 3, 4)];
        let r = reply(&q, &Answer::Addresses(addrs.clone())).unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.id(), 0x1234);
        assert!(p.has_flags(PacketFlag::RESPONSE));
        assert_eq!(p.rcode(), RCODE::NoError);
        let got: Vec<Ipv4Addr> = p
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect();
        assert_eq!(got, addrs);
        // A reply is not a query.
        assert_eq!(parse_query(&r), None);
    }

    #[test]
    fn refusals_and_other_types() {
        let q = query("evil.com", TYPE::A);
        let r = reply(&q, &Answer::Refused).unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.rcode(), RCODE::Refused);
        assert!(p.answers.is_empty());
        let mx = query("x.org", TYPE::MX);
        assert_eq!(parse_query(&mx).unwrap().kind, QueryKind::Other);
        assert_eq!(
            parse_query(&query("x.org", TYPE::AAAA)).unwrap().kind,
            QueryKind::Aaaa
        );
    }

    #[test]
    fn garbage_never_panics() {
        let q = query("example.com", TYPE::A);
        for n in 0..q.len() {
            let _ = parse_query(&q[..n]);
            let _ = reply(&q[..n], &Answer::NoSuchName);
        }
        let mut x: u32 = 7;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..(x % 80))
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = parse_query(&bytes);
        }
    }
}
