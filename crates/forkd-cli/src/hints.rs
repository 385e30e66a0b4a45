//! What to type: the seam's hints worded for the terminal, and errors
//! rendered as the CLI prints them. Only the CLI names `forkd` commands.

use forkd_ops::{Hint, OpError};

/// A hint as a `forkd` command line (or what to do in its words).
pub fn word(hint: &Hint) -> String {
    match hint {
        Hint::ListSandboxes => "`forkd ls` lists them".into(),
        Hint::ListSnapshots => "`forkd snapshots` lists them".into(),
        Hint::KillSandbox { id } => format!("remove it with `forkd kill {id}`"),
        Hint::RemoveSnapshot { tag } => format!("delete it with `forkd rmi {tag}`"),
        Hint::WaitForSnapshot { .. } => "retry when `forkd snapshots` says ready".into(),
        Hint::BranchLive { id } => format!("branch it live instead: `forkd branch {id}`"),
        Hint::RemoveDependentsOrForce { .. } => "kill those first or pass --force".into(),
        Hint::PickAnotherTag { tag } => {
            format!("pick another tag or delete it with `forkd rmi {tag}`")
        }
        Hint::BuildImage { image } => format!("build it with `forkd image build --image {image}`"),
        Hint::UsePythonImage => "create the sandbox with `--image debian-python`".into(),
        Hint::ProvideToken => "set FORKD_TOKEN to the token the daemon was started with (its --token-file or $FORKD_TOKEN)".into(),
    }
}

/// An operation's error as the CLI prints it: the message, then the hint.
pub fn render(e: &OpError) -> String {
    match &e.hint {
        Some(h) => format!("{}; {}", e.message, word(h)),
        None => e.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_one_sentence_with_the_command_to_type() {
        assert_eq!(
            render(&OpError::no_sandbox("sb-1")),
            "no sandbox `sb-1`; `forkd ls` lists them"
        );
        assert_eq!(render(&OpError::bad_input("bad")), "bad");
    }
}
