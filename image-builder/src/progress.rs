//! Progress for people at a terminal: a bar or spinner on stderr when it is a TTY and output is
//! not JSON; nothing otherwise, so scripts and CI logs see only results.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A reporter that shows itself only on an interactive stderr.
    pub fn new(enabled: bool) -> Self {
        let show = enabled && std::io::stderr().is_terminal();
        Self { bar: show.then(ProgressBar::no_length) }
    }

    /// Starts a phase with a spinner and a message.
    pub fn phase(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.reset();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_message(msg.to_owned());
            b.enable_steady_tick(Duration::from_millis(120));
        }
    }

    /// Starts a phase measured in bytes.
    pub fn bytes(&self, msg: &str, total: u64) {
        if let Some(b) = &self.bar {
            b.reset();
            b.set_length(total);
            b.set_position(0);
            b.set_style(
                ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_message(msg.to_owned());
        }
    }

    pub fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
