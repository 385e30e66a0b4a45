//! The lifecycles of sandboxes and snapshots, as types.
//!
//! A state travels as itself from the state database to the wire; strings
//! appear only at the edges (SQL, JSON, the terminal), produced by `as_str`
//! and parsed by `FromStr`, both here and nowhere else.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A string that names no value of a state enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}` (expected {expected})")]
pub struct UnknownState {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static str,
}

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $expected:literal {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$(Self::$variant),+];

            /// The one spelling of this value (database, JSON, terminal).
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(UnknownState { kind: $kind, value: s.to_owned(), expected: $expected }),
                }
            }
        }
    };
}

text_enum!(
    /// Lifecycle of a sandbox.
    SandboxState, "sandbox state", "starting, running, pooled or dead" {
        /// Being started: the record exists before its QEMU does, so that a
        /// creator that dies mid-start leaves nothing unseen (recovery kills
        /// what it started).
        Starting = "starting",
        /// Its QEMU runs and it is handed out.
        Running = "running",
        /// Started and waiting in a snapshot's warm pool.
        Pooled = "pooled",
        /// Its QEMU is gone.
        Dead = "dead",
    }
);

text_enum!(
    /// Lifecycle of a snapshot: `writing` until it is published.
    SnapshotStatus, "snapshot status", "writing, ready, failed or broken" {
        /// Still being written by a branch that did not wait; not spawnable yet.
        Writing = "writing",
        /// Complete: children can be spawned from it.
        Ready = "ready",
        /// Writing failed; kept for diagnosis, never spawnable.
        Failed = "failed",
        /// Was ready, but something it needs is gone (a file, the snapshot
        /// it is layered on, the kernel it was made with): never spawnable,
        /// the error says why. Found by cheap checks when listed, not stored.
        Broken = "broken",
    }
);

text_enum!(
    /// How a branch writes its snapshot.
    BranchMode, "branch mode", "live or full" {
        /// Background snapshot: the pause does not contain the RAM copy.
        Live = "live",
        /// Stop, copy everything, resume: the pause grows with guest memory.
        Full = "full",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_round_trips_through_its_one_spelling() {
        for s in SandboxState::ALL {
            assert_eq!(s.as_str().parse::<SandboxState>().unwrap(), *s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        for s in SnapshotStatus::ALL {
            assert_eq!(s.as_str().parse::<SnapshotStatus>().unwrap(), *s);
            assert_eq!(s.to_string(), s.as_str());
        }
        for m in BranchMode::ALL {
            assert_eq!(m.as_str().parse::<BranchMode>().unwrap(), *m);
        }
    }

    #[test]
    fn an_unknown_spelling_names_what_is_expected() {
        let e = "zombie".parse::<SandboxState>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown sandbox state `zombie` (expected starting, running, pooled or dead)"
        );
        assert!("Ready".parse::<SnapshotStatus>().is_err());
    }
}
