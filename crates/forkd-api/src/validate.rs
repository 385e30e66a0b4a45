//! Checks on decoded requests that serde's types cannot express (ranges, tags,
//! paths, base64), each failing with an [`ApiError::InvalidField`] that names the
//! field.
//!
//! Tags go through [`forkd_ops::validate_tag`], the one tag rule shared by the
//! API, the CLI and the store.

use base64::Engine;

use crate::error::ApiError;

/// A decoded request that can still be wrong.
pub trait Validate {
    /// `Ok` when every field is acceptable; otherwise the first bad field.
    fn validate(&self) -> Result<(), ApiError>;
}

/// The engine every `*_b64` field uses: standard alphabet, padded.
pub const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Checks a snapshot tag with the one tag rule.
pub fn tag(field: &str, value: &str) -> Result<(), ApiError> {
    forkd_ops::validate_tag(value).map_err(|e| ApiError::field(field, e.to_string()))
}

/// Checks that `value` lies in `min..=max`.
pub fn range<T>(field: &str, value: T, min: T, max: T) -> Result<(), ApiError>
where
    T: PartialOrd + std::fmt::Display,
{
    if value < min || value > max {
        return Err(ApiError::field(
            field,
            format!("{value} is out of range; it must be between {min} and {max}"),
        ));
    }
    Ok(())
}

/// Checks an absolute guest path: starts with `/`, no NUL byte, at most 4096
/// bytes (`PATH_MAX`).
pub fn guest_path(field: &str, value: &str) -> Result<(), ApiError> {
    if !value.starts_with('/') {
        return Err(ApiError::field(
            field,
            format!("{value:?} is not an absolute path; paths in the guest start with `/`"),
        ));
    }
    if value.contains('\0') {
        return Err(ApiError::field(field, "a path must not contain a NUL byte"));
    }
    if value.len() > 4096 {
        return Err(ApiError::field(field, "a path is at most 4096 bytes long"));
    }
    Ok(())
}

/// 1 to `max` bytes of letters, digits, `.`, `_` and `-`.
fn name_like(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a guest account name (or a numeric uid): 1 to 32 bytes of
/// letters, digits, `.`, `_` and `-`, not starting with `-`.
pub fn user(field: &str, value: &str) -> Result<(), ApiError> {
    let ok = name_like(value, 32) && !value.starts_with('-');
    if !ok {
        return Err(ApiError::field(
            field,
            format!(
                "{value:?} is not an account name (1-32 letters, digits, `.`, `_`, `-`) or a uid"
            ),
        ));
    }
    Ok(())
}

/// Checks a process tag: 1 to 64 bytes of letters, digits, `.`, `_` and
/// `-`, and not all digits (a number in a path is a pid).
pub fn process_tag(field: &str, value: &str) -> Result<(), ApiError> {
    let ok = name_like(value, 64);
    if !ok {
        return Err(ApiError::field(
            field,
            format!("{value:?} is not a process tag (1-64 letters, digits, `.`, `_`, `-`)"),
        ));
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::field(
            field,
            "a process tag must not be all digits (a number names a pid)",
        ));
    }
    Ok(())
}

/// Most egress rules one list may hold.
pub const MAX_EGRESS_RULES: usize = 256;

/// Bounds a list of egress rules (their syntax is the operation's to judge):
/// at most [`MAX_EGRESS_RULES`], each 1 to 255 bytes without control bytes.
pub fn egress_rules(field: &str, rules: &[String]) -> Result<(), ApiError> {
    if rules.len() > MAX_EGRESS_RULES {
        return Err(ApiError::field(
            field,
            format!(
                "{} rules are too many; at most {MAX_EGRESS_RULES}",
                rules.len()
            ),
        ));
    }
    for r in rules {
        if r.is_empty() || r.len() > 255 || r.chars().any(char::is_control) {
            return Err(ApiError::field(
                field,
                format!("{r:?} is not a rule: a CIDR or a domain name of 1 to 255 bytes"),
            ));
        }
    }
    Ok(())
}

/// Decodes a standard, padded base64 field.
pub fn base64(field: &str, value: &str) -> Result<Vec<u8>, ApiError> {
    BASE64
        .decode(value)
        .map_err(|e| ApiError::field(field, format!("not valid base64 (standard, padded): {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_rule_is_the_stores() {
        assert!(tag("tag", "py-3.12_a").is_ok());
        for bad in ["", ".hidden", "..", "a/b", "a b", &"x".repeat(65)] {
            let err = tag("tag", bad).unwrap_err();
            assert_eq!(err.field_name(), Some("tag"), "{bad:?}");
        }
    }

    #[test]
    fn range_names_the_bounds() {
        let err = range("n", 0, 1, 1000).unwrap_err();
        assert!(err.to_string().contains("between 1 and 1000"), "{err}");
        assert!(range("n", 1000, 1, 1000).is_ok());
    }

    #[test]
    fn users_and_process_tags() {
        assert!(user("user", "root").is_ok());
        assert!(user("user", "1000").is_ok());
        for bad in ["", "-x", "a:b", "a b", &"u".repeat(33)] {
            assert!(user("user", bad).is_err(), "{bad:?}");
        }
        assert!(process_tag("tag", "web-1").is_ok());
        assert!(process_tag("tag", "123").is_err());
        assert!(process_tag("tag", "a/b").is_err());
    }

    #[test]
    fn guest_paths() {
        assert!(guest_path("path", "/tmp/x").is_ok());
        assert!(guest_path("path", "tmp/x").is_err());
        assert!(guest_path("path", "/a\0b").is_err());
    }
}
