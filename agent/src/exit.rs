//! The agent's exit codes (docs/interfaces/exit-codes.md). Units use them: a bad signature
//! (10 11 12) does not get better by restarting, nor does the service's unusable boot record or
//! node identity (30 31: `RestartPreventExitStatus=` in dist/systemd/ironroot-agent.service).

/// Why the agent exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// Anything not below: local I/O, unreadable input.
    Failure = 1,
    Usage = 2,
    /// No trusted signature.
    Signature = 10,
    /// Bytes differ from what was signed.
    Content = 11,
    /// Refused by policy: cap, rollback, index, not a module.
    Policy = 12,
    /// Registry unreachable or too slow (after retries).
    Transport = 13,
    /// Boot phases that failed for their own reasons.
    Discover = 20,
    Enroll = 21,
    Fetch = 22,
    Store = 23,
    Mount = 24,
    HandOff = 25,
    /// A NIC of the node has no driver in the initramfs.
    Hardware = 26,
    /// `serve`: boot.json cannot be read, is not a record of a known schema, or carries an
    /// invalid setting. The initramfs wrote it once; restarting reads the same file.
    BootRecord = 30,
    /// `serve`: the node key, certificate or plane CA cannot be read or used, or the
    /// certificate expired. Only a new boot (which enrolls again) gives the node another.
    NodeIdentity = 31,
}

/// An error and its causes, outermost first (`boot failed in phase enroll: enrollment: …`):
/// what the console and the logs show.
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut cur = err.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<ironroot_oci::verify::FailureKind> for Exit {
    fn from(kind: ironroot_oci::verify::FailureKind) -> Self {
        use ironroot_oci::verify::FailureKind;
        match kind {
            FailureKind::Signature => Self::Signature,
            FailureKind::Content => Self::Content,
            FailureKind::Policy => Self::Policy,
            FailureKind::Transport => Self::Transport,
            FailureKind::Local => Self::Failure,
        }
    }
}
