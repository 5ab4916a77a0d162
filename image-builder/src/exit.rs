//! Exit codes of `ironroot-build`, documented in docs/interfaces/exit-codes.md. Units and
//! scripts branch on them (a bad signature is never worth a retry; a network failure may be).

use ironroot_oci::verify::FailureKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// Anything not classified below (local I/O, bad input files).
    Failure = 1,
    /// Command-line misuse (clap's own code).
    Usage = 2,
    /// No trusted signature for the content: missing, untrusted key, bad or copied signature.
    Signature = 10,
    /// Content does not match what was signed (digest, pack, image or config mismatch).
    Content = 11,
    /// Refused by policy: size cap, serial floor, image index, descriptor urls, not a module.
    Policy = 12,
    /// Registry unreachable, HTTP error or deadline passed; retrying may help.
    Transport = 13,
}

impl From<FailureKind> for Exit {
    fn from(k: FailureKind) -> Self {
        match k {
            FailureKind::Signature => Self::Signature,
            FailureKind::Content => Self::Content,
            FailureKind::Policy => Self::Policy,
            FailureKind::Transport => Self::Transport,
            FailureKind::Local => Self::Failure,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}
