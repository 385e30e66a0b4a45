//! Paging of `GET /v2/sandboxes`: the opaque `x-next-token` header and the
//! page cut.
//!
//! Sandboxes are ordered by (start time, id), ascending or descending. A
//! token names the last sandbox of the page it ends, so a page stays correct
//! when sandboxes are created or killed between calls (no offsets that
//! shift). The token is `base64url("v1:" + order + ":" + started_at_ms + ":" +
//! id)` — opaque to the SDK, which only echoes it back as `nextToken`, and
//! checked here as hostile input (bounded length, strict grammar).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::control::{ApiError, MAX_LIST_LIMIT};

/// The response header carrying the next page's token.
pub const NEXT_TOKEN_HEADER: &str = "x-next-token";
/// Longest accepted `nextToken`.
pub const MAX_TOKEN_LEN: usize = 512;
/// Page size when the request gives no `limit`.
pub const DEFAULT_LIMIT: u32 = MAX_LIST_LIMIT;

/// The position after which the next page starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Whether the listing is newest first.
    pub descending: bool,
    /// Start time of the last sandbox of the previous page, ms since the epoch.
    pub started_at_ms: i64,
    /// Its id (breaks ties of equal start times).
    pub sandbox_id: String,
}

impl Cursor {
    /// The token for this cursor.
    pub fn encode(&self) -> String {
        let order = if self.descending { "d" } else { "a" };
        URL_SAFE_NO_PAD.encode(format!(
            "v1:{order}:{}:{}",
            self.started_at_ms, self.sandbox_id
        ))
    }

    /// Decodes a `nextToken`; 400 when it is not one this module made, or
    /// when it was made for the other order.
    pub fn decode(token: &str, descending: bool) -> Result<Cursor, ApiError> {
        let bad = || {
            ApiError::bad_request(
                "nextToken is not a token from x-next-token; start the listing again without it",
            )
        };
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(bad());
        }
        let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let mut parts = text.splitn(4, ':');
        let (Some("v1"), Some(order), Some(ms), Some(id)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let token_descending = match order {
            "a" => false,
            "d" => true,
            _ => return Err(bad()),
        };
        if token_descending != descending {
            return Err(ApiError::bad_request(
                "nextToken was made for the other order; keep `order` the same across pages",
            ));
        }
        let started_at_ms: i64 = ms.parse().map_err(|_| bad())?;
        if id.is_empty() || !crate::routes::is_valid_sandbox_id(id) {
            return Err(bad());
        }
        Ok(Cursor {
            descending,
            started_at_ms,
            sandbox_id: id.to_owned(),
        })
    }
}

/// One page of `items` (already filtered) and the token of the next page.
///
/// `key` gives each item's (start time in ms, id). Items are sorted here;
/// the page holds those strictly after `after` in the chosen order, at most
/// `limit` (default [`DEFAULT_LIMIT`]). The token is `None` on the last page.
pub fn page<T>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> (i64, String),
    descending: bool,
    after: Option<&Cursor>,
    limit: Option<u32>,
) -> (Vec<T>, Option<String>) {
    let limit = limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIST_LIMIT) as usize;
    items.sort_by_key(|item| key(item));
    if descending {
        items.reverse();
    }
    let past = |item: &T| -> bool {
        let Some(c) = after else { return true };
        let k = key(item);
        let c = (c.started_at_ms, c.sandbox_id.clone());
        if descending {
            k < c
        } else {
            k > c
        }
    };
    let mut rest: Vec<T> = items.into_iter().filter(|i| past(i)).collect();
    let more = rest.len() > limit;
    rest.truncate(limit);
    let token = if more {
        rest.last().map(|last| {
            let (started_at_ms, sandbox_id) = key(last);
            Cursor {
                descending,
                started_at_ms,
                sandbox_id,
            }
            .encode()
        })
    } else {
        None
    };
    (rest, token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tokens_round_trip_and_refuse_garbage() {
        let c = Cursor {
            descending: false,
            started_at_ms: 1_780_000_000_123,
            sandbox_id: "sbx-1".into(),
        };
        let t = c.encode();
        assert_eq!(Cursor::decode(&t, false).unwrap(), c);
        assert_eq!(Cursor::decode(&t, true).unwrap_err().code, 400);
        for bad in [
            "",
            "page2",
            "!!!",
            &"A".repeat(600),
            &URL_SAFE_NO_PAD.encode("v2:a:1:x"),
            &URL_SAFE_NO_PAD.encode("v1:a:x:y"),
            &URL_SAFE_NO_PAD.encode("v1:a:1:bad id"),
        ] {
            assert_eq!(Cursor::decode(bad, false).unwrap_err().code, 400, "{bad}");
        }
    }

    #[test]
    fn pages_cover_everything_once_in_order() {
        let items: Vec<(i64, String)> = (0..7).map(|i| (i / 2, format!("s{i}"))).collect();
        for descending in [false, true] {
            let mut seen = Vec::new();
            let mut cursor = None;
            loop {
                let (page, token) = page(
                    items.clone(),
                    |x| x.clone(),
                    descending,
                    cursor.as_ref(),
                    Some(3),
                );
                assert!(page.len() <= 3);
                seen.extend(page);
                match token {
                    Some(t) => cursor = Some(Cursor::decode(&t, descending).unwrap()),
                    None => break,
                }
            }
            let mut want = items.clone();
            want.sort();
            if descending {
                want.reverse();
            }
            assert_eq!(seen, want);
        }
        let (p, t) = page(
            Vec::<(i64, String)>::new(),
            |x| x.clone(),
            false,
            None,
            None,
        );
        assert!(p.is_empty() && t.is_none());
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in ".{0,700}") {
            let _ = Cursor::decode(&s, false);
            let _ = Cursor::decode(&s, true);
        }
    }
}
