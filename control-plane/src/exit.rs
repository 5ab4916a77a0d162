//! `ironroot-plane`'s exit codes (docs/interfaces/exit-codes.md): scripts branch on whether the
//! plane said no, could not be reached, or found its journal broken.

/// Why `ironroot-plane` exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// Anything not below: unreadable state or files, a server that could not start.
    Failure = 1,
    /// Command-line misuse (clap).
    Usage = 2,
    /// The plane refused the request (HTTP 4xx): the message names what was wrong.
    Refused = 3,
    /// The plane could not be reached, timed out, or failed (HTTP 5xx): try again.
    Unreachable = 4,
    /// `audit verify` found the journal broken (or not holding the checkpoint given).
    JournalBroken = 5,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A failed operator command, typed where scripts branch.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("reaching the plane at {base}")]
    Unreachable { base: String, source: reqwest::Error },
    #[error("plane refused ({status}, {code}): {message}")]
    Refused { status: u16, code: String, message: String },
    #[error("plane failed ({status}): {message}")]
    PlaneFailed { status: u16, message: String },
    #[error("audit chain broken at record {seq}: {reason}")]
    JournalBroken { seq: i64, reason: String },
}

/// The exit code for an error chain: the first typed cause decides, anything else is a failure.
pub fn exit_for(err: &anyhow::Error) -> Exit {
    match err.chain().find_map(|e| e.downcast_ref::<CommandError>()) {
        Some(CommandError::Refused { .. }) => Exit::Refused,
        Some(CommandError::Unreachable { .. } | CommandError::PlaneFailed { .. }) => Exit::Unreachable,
        Some(CommandError::JournalBroken { .. }) => Exit::JournalBroken,
        None => Exit::Failure,
    }
}
