//! `ironroot-plane`'s command line: the clap definitions (every command and flag has its one
//! line of help; the catalog commands' are in `cli::catalog`). What each command does is in
//! `cli` (serve), `cli::operator` and `cli::catalog`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub use super::catalog::{ChannelCommand, RolloutCommand, TemplateCommand};
use crate::provider::ProviderKind;

#[derive(Debug, Parser)]
#[command(name = "ironroot-plane", version, about = "The ironroot reference control plane and its operator CLI")]
pub struct Cli {
    #[command(flatten)]
    pub target: Target,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Target {
    /// The plane's state directory (its CA, operator certificate and address).
    #[arg(long, global = true, env = "IRONROOT_PLANE_STATE")]
    pub state: Option<PathBuf>,
    /// HOST:PORT of a running plane (default: read from STATE/address).
    #[arg(long, global = true)]
    pub plane: Option<String>,
    /// Operator certificate (default: STATE/operator.pem).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Operator key (default: STATE/operator.key).
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// The plane CA certificate (default: STATE/ca.pem).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the plane (creates its CA, certificates and journal key in --state on first start).
    Serve(Box<ServeArgs>),
    /// Bootstrap tokens: single-use secrets a node enrolls with.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Nodes: provision, terminate, list, show, console, revoke, re-provision, move through the lifecycle.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Release channels: REPO:CHANNEL names one verified module; templates follow channels.
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Templates: a role's module catalog (channels or digests), rendered for and assigned to nodes.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Rollouts: how a template's nodes move to a new rendering (batches, halt, resume).
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Tasks queued for a node (leased by its agent).
    #[command(subcommand)]
    Task(TaskCommand),
    /// The hash-chained audit journal and its signed checkpoints.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: String,
    /// Extra DNS names or addresses for the server certificate (127.0.0.1 and localhost always).
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// Default lifetime of a bootstrap token (at most 30 days).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub token_ttl: Duration,
    /// Lifetime of a node certificate.
    #[arg(long, default_value = "72h", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// How often nodes heartbeat (the silence sweep runs at a third of it).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// A running node silent this long becomes `suspect`.
    #[arg(long, default_value = "95s", value_parser = parse_duration)]
    pub suspect_after: Duration,
    /// ... and this long, `silent`.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub silent_after: Duration,
    /// A node served a new rendering that has not reported it (or a receipt for it) within
    /// the template's trial deadline and this long is failed and halts the rollout
    /// [default: 180 s (the node's own trial guard acts after 60 s) + 5 heartbeat intervals].
    #[arg(long, value_parser = parse_duration)]
    pub rollout_grace: Option<Duration>,
    /// How long a leased task stays with its node before it is delivered again.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub task_lease: Duration,
    /// Enrollment attempts allowed per remote address at once, then --enroll-rate per second.
    #[arg(long, default_value_t = 10)]
    pub enroll_burst: u32,
    /// Enrollment attempts per second per remote address after the burst.
    #[arg(long, default_value_t = 0.5)]
    pub enroll_rate: f64,
    /// A TLS handshake that has not finished in this long is dropped.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// A request's headers must arrive within this of its first byte; also the idle timeout of a
    /// connection that presented no client certificate.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// A connection with a client certificate and no request for this long is closed (must be
    /// above --heartbeat-interval, so nodes keep their connection between heartbeats).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections without a client certificate open at once, in total.
    #[arg(long, default_value_t = 4096)]
    pub max_anonymous: usize,
    /// Connections without a client certificate open at once from one address.
    #[arg(long, default_value_t = 1024)]
    pub max_anonymous_per_address: usize,
    /// How often the journal's head is signed into a checkpoint (also at shutdown).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
    /// A public key (PEM) module signatures must verify with before a module is published in a
    /// channel or pinned in a template; repeat for several. Without one, channels are refused.
    #[arg(long = "trust", value_name = "KEY.pub")]
    pub trust: Vec<PathBuf>,
    /// A CA certificate bundle (PEM) to trust for registries (their reads then use TLS).
    #[arg(long, value_name = "PEM")]
    pub registry_ca: Option<PathBuf>,
    /// User name for registry basic or token auth; the password comes from
    /// $IRONROOT_REGISTRY_PASSWORD.
    #[arg(long)]
    pub registry_user: Option<String>,
    /// `NAME=HOST:PORT`: the plane reads registry NAME (as module references and nodes name it)
    /// at HOST:PORT, for a registry the plane reaches under another address than its nodes (the
    /// lab's 10.0.2.100:PORT is the plane's 127.0.0.1:PORT); repeat for several. References,
    /// channels and desired state keep NAME; TLS is checked against HOST.
    #[arg(long = "registry-alias", value_name = "NAME=HOST:PORT", value_parser = parse_alias)]
    pub registry_aliases: Vec<(String, String)>,
    /// Machines for `node provision`: `disabled` refuses, `recorder` journals the QEMU command
    /// without running it, `qemu` boots a VM (TCG) from --bundle.
    #[arg(long, value_enum, default_value = "disabled")]
    pub provider: ProviderKind,
    /// The image bundle machines boot (vmlinuz, initrd.img, cmdline: what `just image` writes).
    #[arg(long, value_name = "DIR", default_value = "target/image")]
    pub bundle: PathBuf,
    /// A host loopback port machines reach as 10.0.2.100:PORT (a registry); repeat for several.
    /// The plane's own port always is; nothing else is reachable.
    #[arg(long = "machine-forward", value_name = "PORT")]
    pub machine_forwards: Vec<u16>,
    /// Hard limit on a machine's life: QEMU is killed after it, even if the plane is not running.
    #[arg(long, default_value = "8h", value_parser = parse_duration)]
    pub machine_lifetime: Duration,
    /// The QEMU binary, a name on PATH or a path (QEMU 10 or later).
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use bootstrap token; prints it.
    Create {
        /// Bind the token to this node name.
        #[arg(long)]
        node: Option<String>,
        /// Bind the token to this MAC address.
        #[arg(long)]
        mac: Option<String>,
        /// Bind the token to this SMBIOS product UUID.
        #[arg(long)]
        smbios_uuid: Option<String>,
        /// Template the node starts on (its first boot gets these modules).
        #[arg(long)]
        template: Option<String>,
        /// Lifetime, 1 s to 30 days (default: the plane's --token-ttl).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Create a node and its single-use token and boot a machine for it (serve --provider).
    Provision {
        /// Node name: 1-63 characters of a-z, 0-9 and '-'.
        name: String,
        /// Template the node starts on (its first boot gets these modules).
        #[arg(long)]
        template: Option<String>,
        /// Memory, 512-16384 MiB (default 2048).
        #[arg(long, value_name = "MiB")]
        memory: Option<u32>,
        /// A disk for the node's store, like 8G (1G-1T; default: none, the store is in RAM).
        #[arg(long, value_name = "SIZE")]
        disk: Option<String>,
        /// A NIC, in slot order (repeatable, at most 4; default one virtio). e1000e and igb
        /// need the generic kernel (`just lab KERNEL=generic`).
        #[arg(long = "nic", value_enum)]
        nics: Vec<crate::provider::qemu::NicModel>,
        /// The disk's bus: virtio (/dev/vda, default), nvme (/dev/nvme0n1) or ahci (/dev/sda).
        #[arg(long, value_enum, requires = "disk")]
        disk_bus: Option<crate::provider::qemu::DiskBus>,
        /// Boot through UEFI firmware (OVMF) instead of SeaBIOS.
        #[arg(long)]
        uefi: bool,
    },
    /// Power off a node's machine (only the QEMU this plane started, by its PID) and revoke it.
    Terminate {
        /// Node id or name.
        id: String,
    },
    /// Print a node's serial console log (its last MiB).
    Console {
        /// Node id or name.
        id: String,
    },
    /// List every node with its state, generation and phase.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one node (by id or name): reports, timings, modules, store, last error.
    Show {
        /// Node id or name.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke every certificate of a node, at once.
    Revoke {
        /// Node id or name.
        id: String,
    },
    /// Allow a node to enroll again (its old certificates stop working).
    Reprovision {
        /// Node id or name.
        id: String,
    },
    /// A node's receipts: every module change it committed, rolled back or failed.
    Receipts {
        /// Node id or name.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a node through its lifecycle (draining, terminated, quarantined, …).
    State {
        /// Node id or name.
        id: String,
        /// The state to move to.
        #[arg(value_name = "STATE")]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Queue a command for a node's agent; prints the task id.
    Exec {
        /// Node id or name.
        node: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Move a node to `draining` and queue a drain task.
    Drain {
        /// Node id or name.
        node: String,
    },
    /// Queue a vetting run.
    Vet {
        /// Node id or name.
        node: String,
    },
    /// Ask a node to reconcile its modules now (fetch the desired state and apply it); the
    /// task ends when the reconcile does.
    ModuleUpdate {
        /// Node id or name.
        node: String,
        /// Seconds the task may take; past them it is answered `timed-out` (the change under
        /// way still ends on its own, committed or rolled back).
        #[arg(long = "deadline", value_name = "SECS")]
        deadline_s: Option<u64>,
    },
    /// Reboot a node (a netbooted node boots again from the network).
    Reboot {
        /// Node id or name.
        node: String,
    },
    /// Restart a node's userspace (systemd's soft reboot); the kernel keeps running.
    SoftReboot {
        /// Node id or name.
        node: String,
    },
    /// Cancel a task the node has not finished: it is not delivered (again), and its result is
    /// `cancelled`.
    Cancel {
        /// The task id.
        task: String,
    },
    /// Show a node's tasks and their results (JSON).
    List {
        /// Node id or name.
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the journal, oldest first.
    List {
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Check the hash chain and every signed checkpoint; names the first broken record and
    /// the records not yet anchored by a checkpoint.
    Verify {
        /// Also check that the journal still holds this exported checkpoint.
        #[arg(long, value_name = "FILE")]
        against: Option<PathBuf>,
    },
    /// Sign a checkpoint of the journal's head now and print it (JSON).
    Checkpoint {
        /// Print the newest signed checkpoint without signing a new one, to keep elsewhere.
        #[arg(long)]
        export: bool,
    },
}

/// `90`, `90s`, `30m`, `1h`, `3d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("duration {s:?} is not like 90s, 30m, 1h, 3d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("duration {s:?}: unit must be s, m, h or d")),
    };
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(|| format!("duration {s:?} is too long"))
}

/// `NAME=HOST:PORT`, both registry hosts as a reference spells them (a port optional).
fn parse_alias(arg: &str) -> Result<(String, String), String> {
    let (name, at) = arg.split_once('=').ok_or_else(|| format!("{arg:?} is not NAME=HOST:PORT"))?;
    for host in [name, at] {
        crate::publish::split_repo(&format!("{host}/x"))
            .map_err(|_| format!("{host:?} in {arg:?} is not a registry host[:port]"))?;
    }
    Ok((name.to_owned(), at.to_owned()))
}
