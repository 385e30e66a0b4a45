//! Names a caller chooses: snapshot tags and sandbox ids. Every place that
//! turns one into a path or a URL goes through [`validate_tag`] or
//! [`validate_id`].

/// Longest tag (and sandbox id) accepted.
pub const MAX_NAME_LEN: usize = 64;

/// A tag or id that breaks the naming rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: {rule}")]
pub struct InvalidName {
    /// `tag` or `sandbox id`.
    pub what: &'static str,
    pub value: String,
    pub rule: &'static str,
}

/// Checks a snapshot tag: `[A-Za-z0-9._-]{1,64}`, not starting with `.` (which
/// also rules out `.` and `..` and keeps tags apart from the store's own hidden
/// `.staging-*` / `.trash-*` directories).
pub fn validate_tag(tag: &str) -> Result<(), InvalidName> {
    check("tag", tag)
}

/// Checks a sandbox id by the same rule as tags (ids are made by forkd, but
/// callers name them in paths and URLs).
pub fn validate_id(id: &str) -> Result<(), InvalidName> {
    check("sandbox id", id)
}

fn check(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let rule = if name.is_empty() {
        Some("it must not be empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is at most 64 characters long")
    } else if name == "." || name == ".." {
        Some("`.` and `..` are not names")
    } else if name.starts_with('.') {
        Some("it must not start with `.`")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("it may only contain letters, digits, `.`, `_` and `-`")
    } else {
        None
    };
    match rule {
        Some(rule) => Err(InvalidName {
            what,
            value: name.to_owned(),
            rule,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_validation_table() {
        let long_ok = "a".repeat(64);
        let too_long = "a".repeat(65);
        let cases: &[(&str, bool)] = &[
            ("py", true),
            ("Py-3.12_base", true),
            ("a", true),
            ("0", true),
            ("a.b", true),
            ("a..b", true),
            ("-x", true),
            ("x.", true),
            (&long_ok, true),
            ("", false),
            (&too_long, false),
            (".", false),
            ("..", false),
            (".hidden", false),
            (".staging-x", false),
            ("a/b", false),
            ("../etc", false),
            ("a b", false),
            ("a\0b", false),
            ("é", false),
            ("a:b", false),
            ("tag\n", false),
        ];
        for (tag, ok) in cases {
            let result = validate_tag(tag);
            assert_eq!(result.is_ok(), *ok, "tag {tag:?}: {result:?}");
            if let Err(err) = result {
                let msg = err.to_string();
                assert!(msg.starts_with(&format!("invalid tag `{tag}`: ")), "{msg}");
            }
        }
        assert_eq!(
            validate_id("sb/1").unwrap_err().to_string(),
            "invalid sandbox id `sb/1`: it may only contain letters, digits, `.`, `_` and `-`"
        );
    }
}
