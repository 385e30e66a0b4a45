//! The proto3 JSON mapping rules the envd types need, as serde helpers.
//!
//! What the SDK emits (protobuf-py `to_json`): lowerCamelCase names, default
//! values omitted, `bytes` as padded standard base64, enums by name, 64-bit
//! integers as strings, timestamps as RFC 3339. What a proto3 JSON parser must
//! accept and so what these helpers accept: integers as numbers or strings,
//! `bytes` in standard or URL-safe base64 with or without padding, enums by
//! name or number, `null` for an absent field. Field-name aliases (snake_case)
//! are declared on the types themselves.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::de::{self, Deserializer, Visitor};
use serde::Serializer;
use std::fmt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Decodes proto3 `bytes`: any of the four base64 alphabets/paddings.
pub fn decode_bytes(s: &str) -> Option<Vec<u8>> {
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(s).ok())
}

/// `bytes` fields: serialize as padded standard base64.
pub mod bytes {
    use super::*;

    /// Serializes as padded standard base64.
    pub fn serialize<S: Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(value))
    }

    /// Accepts any base64 alphabet, padded or not; `null` is empty.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: Option<String> = serde::Deserialize::deserialize(d)?;
        match s {
            None => Ok(Vec::new()),
            Some(s) => {
                decode_bytes(&s).ok_or_else(|| de::Error::custom("bytes field is not base64"))
            }
        }
    }
}

struct IntVisitor {
    min: i128,
    max: i128,
    what: &'static str,
}

impl<'de> Visitor<'de> for IntVisitor {
    type Value = i128;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} as a JSON number or a decimal string", self.what)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
        self.check(v as i128)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
        self.check(v as i128)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<i128, E> {
        // proto3 JSON allows 1.0 and 1e3 for integers when exact.
        if v.fract() == 0.0 && v.abs() < 1e19 {
            self.check(v as i128)
        } else {
            Err(E::custom(format!(
                "{} must be an integer, got {v}",
                self.what
            )))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<i128, E> {
        let v = v.trim();
        if v.len() > 24 {
            return Err(E::custom(format!("{} is too long", self.what)));
        }
        let n: i128 = v
            .parse()
            .map_err(|_| E::custom(format!("{} must be an integer, got {v:?}", self.what)))?;
        self.check(n)
    }

    fn visit_unit<E: de::Error>(self) -> Result<i128, E> {
        Ok(0)
    }

    fn visit_none<E: de::Error>(self) -> Result<i128, E> {
        Ok(0)
    }
}

impl IntVisitor {
    fn check<E: de::Error>(&self, v: i128) -> Result<i128, E> {
        if v < self.min || v > self.max {
            Err(E::custom(format!("{} {v} is out of range", self.what)))
        } else {
            Ok(v)
        }
    }
}

macro_rules! int_module {
    ($name:ident, $t:ty, $what:literal, $doc:literal, $as_string:expr) => {
        #[doc = $doc]
        pub mod $name {
            use super::*;

            /// Serializes as proto3 JSON does for this type.
            pub fn serialize<S: Serializer>(value: &$t, s: S) -> Result<S::Ok, S::Error> {
                if $as_string {
                    s.serialize_str(&value.to_string())
                } else {
                    serde::Serialize::serialize(value, s)
                }
            }

            /// Accepts a number, an exact float or a decimal string; `null` is 0.
            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                let v = d.deserialize_any(IntVisitor {
                    min: <$t>::MIN as i128,
                    max: <$t>::MAX as i128,
                    what: $what,
                })?;
                Ok(v as $t)
            }
        }
    };
}

int_module!(u32_lenient, u32, "uint32", "`uint32` fields.", false);
int_module!(i32_lenient, i32, "int32", "`int32`/`sint32` fields.", false);
int_module!(
    i64_string,
    i64,
    "int64",
    "`int64` fields: strings on output.",
    true
);

/// Optional `uint32` (a oneof member or `optional` field).
pub mod opt_u32 {
    use super::*;

    /// Serializes the number when present.
    pub fn serialize<S: Serializer>(value: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.serialize_u32(*v),
            None => s.serialize_none(),
        }
    }

    /// Accepts a number or a string; `null` is absent.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        let v: Option<serde_json::Value> = serde::Deserialize::deserialize(d)?;
        match v {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => u32_lenient::deserialize(v)
                .map(Some)
                .map_err(de::Error::custom),
        }
    }
}

/// An enum that proto3 JSON writes by name and reads by name or number.
pub trait ProtoEnum: Sized + Copy + PartialEq + 'static {
    /// Every value with its proto name and number.
    const VALUES: &'static [(Self, &'static str, i32)];
    /// The value for unknown numbers (the `_UNSPECIFIED` one).
    const UNSPECIFIED: Self;
}

/// Serde for fields of a [`ProtoEnum`] type.
pub mod proto_enum {
    use super::*;

    /// Serializes the proto name.
    pub fn serialize<T: ProtoEnum, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        let name = T::VALUES
            .iter()
            .find(|(x, _, _)| x == v)
            .map(|(_, n, _)| *n)
            .unwrap_or("");
        s.serialize_str(name)
    }

    /// Accepts a name or a number; an unknown number is the unspecified
    /// value (proto3 open enums), an unknown name is an error.
    pub fn deserialize<'de, T: ProtoEnum, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let v: serde_json::Value = serde::Deserialize::deserialize(d)?;
        match v {
            serde_json::Value::Null => Ok(T::UNSPECIFIED),
            serde_json::Value::String(name) => T::VALUES
                .iter()
                .find(|(_, n, _)| *n == name)
                .map(|(x, _, _)| *x)
                .ok_or_else(|| de::Error::custom(format!("unknown enum value {name:?}"))),
            serde_json::Value::Number(n) => {
                let n = n
                    .as_i64()
                    .ok_or_else(|| de::Error::custom("enum number out of range"))?;
                Ok(T::VALUES
                    .iter()
                    .find(|(_, _, num)| i64::from(*num) == n)
                    .map(|(x, _, _)| *x)
                    .unwrap_or(T::UNSPECIFIED))
            }
            other => Err(de::Error::custom(format!(
                "an enum must be a name or a number, got {other}"
            ))),
        }
    }
}

/// `google.protobuf.Timestamp` as an RFC 3339 string (optional field).
pub mod timestamp {
    use super::*;

    /// RFC 3339 in UTC with `Z`, as protobuf writes it.
    pub fn serialize<S: Serializer>(v: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(t) => s.serialize_str(&format_rfc3339(*t).map_err(serde::ser::Error::custom)?),
        }
    }

    /// Any RFC 3339 timestamp; `null` is absent.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<OffsetDateTime>, D::Error> {
        let s: Option<String> = serde::Deserialize::deserialize(d)?;
        s.map(|s| parse_rfc3339(&s).map_err(de::Error::custom))
            .transpose()
    }
}

/// Formats `t` in UTC as RFC 3339 (`2026-12-01T10:00:00Z`).
pub fn format_rfc3339(t: OffsetDateTime) -> Result<String, String> {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .map_err(|e| format!("cannot format {t} as RFC 3339: {e}"))
}

/// Parses an RFC 3339 timestamp with any offset (the SDK's `startedAfter`
/// carries the caller's local offset).
pub fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, String> {
    if s.len() > 64 {
        return Err("timestamp is longer than 64 characters".to_owned());
    }
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 timestamp ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct T {
        #[serde(with = "i64_string", default)]
        size: i64,
        #[serde(with = "u32_lenient", default)]
        pid: u32,
        #[serde(with = "bytes", default)]
        data: Vec<u8>,
    }

    #[test]
    fn integers_and_bytes_in_every_accepted_form() {
        let t: T = serde_json::from_str(r#"{"size":"12","pid":"42","data":"aGk="}"#).unwrap();
        assert_eq!(
            t,
            T {
                size: 12,
                pid: 42,
                data: b"hi".to_vec()
            }
        );
        let t: T = serde_json::from_str(r#"{"size":12,"pid":42.0,"data":"aGk"}"#).unwrap();
        assert_eq!(t.size, 12);
        assert_eq!(t.pid, 42);
        assert_eq!(t.data, b"hi");
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"size":"12","pid":42,"data":"aGk="}"#
        );
        let t: T = serde_json::from_str(r#"{"size":null,"pid":null,"data":null}"#).unwrap();
        assert_eq!(
            t,
            T {
                size: 0,
                pid: 0,
                data: vec![]
            }
        );
        assert_eq!(decode_bytes("-_8="), Some(vec![0xfb, 0xff]));
        for bad in [
            r#"{"pid":-1}"#,
            r#"{"pid":4294967296}"#,
            r#"{"pid":1.5}"#,
            r#"{"pid":"x"}"#,
            r#"{"data":"!!"}"#,
            r#"{"pid":[1]}"#,
        ] {
            assert!(serde_json::from_str::<T>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_round_trip_and_accept_offsets() {
        let t = parse_rfc3339("2026-12-01T11:00:00+01:00").unwrap();
        assert_eq!(format_rfc3339(t).unwrap(), "2026-12-01T10:00:00Z");
        assert!(parse_rfc3339("yesterday").is_err());
        assert!(parse_rfc3339(&"9".repeat(100)).is_err());
    }
}
