//! Running the `ironroot-build` binary built beside the tests (`cargo build --workspace`).

use std::path::PathBuf;
use std::process::{Command, Output};

/// The built `ironroot-build` binary (target/<profile>/ironroot-build).
pub fn binary() -> PathBuf {
    binary_named("ironroot-build")
}

/// A workspace binary built beside the tests (target/<profile>/NAME).
pub fn binary_named(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace` first (`./just test` does)", bin.display());
    bin
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Panics with the command's output unless it exited 0; returns stdout trimmed.
    pub fn ok(&self) -> String {
        assert_eq!(self.code, 0, "command failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self.stdout.trim().to_owned()
    }

    /// Asserts a refusal with `code` whose message contains `needle`.
    pub fn refused(&self, code: i32, needle: &str) {
        assert_eq!(
            self.code, code,
            "expected exit {code} mentioning {needle:?}\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(self.stderr.contains(needle), "expected {needle:?} in:\n{}", self.stderr);
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `ironroot-build ARGS…`.
pub fn build_cmd(args: &[&str]) -> Run {
    Command::new(binary()).args(args).output().expect("running ironroot-build").into()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// The subcommands and arguments of `cmd` (and below) without a `--help` line.
    fn undescribed(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" && arg.get_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            let path = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() {
                missing.push(path.clone());
            }
            undescribed(sub, &path, missing);
        }
    }

    /// Every subcommand and every argument of every binary says what it is for in `--help`.
    #[test]
    fn every_subcommand_and_argument_of_every_binary_is_described() {
        let mut missing = Vec::new();
        undescribed(&ironroot_build::cli::Cli::command(), "ironroot-build", &mut missing);
        undescribed(&ironroot_plane::cli::Cli::command(), "ironroot-plane", &mut missing);
        undescribed(&ironroot_agent::cli::Cli::command(), "ironroot-agent", &mut missing);
        assert!(missing.is_empty(), "without a description: {missing:#?}");
    }
}
