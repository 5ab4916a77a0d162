//! The `ironroot-plane` command line: `serve`, and the operator commands that talk to a
//! running plane over mTLS.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use ironroot_spec::wire::TaskSpec;
use serde_json::{Value, json};

use crate::client::{ClientConfig, OperatorClient};
use crate::store::Settings;

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
    state: Option<PathBuf>,
    /// HOST:PORT of a running plane (default: read from STATE/address).
    #[arg(long, global = true)]
    plane: Option<String>,
    /// Operator certificate, key and plane CA (default: from the state directory).
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the plane (creates its CA and certificates in --state on first start).
    Serve(ServeArgs),
    #[command(subcommand)]
    Token(TokenCommand),
    #[command(subcommand)]
    Node(NodeCommand),
    #[command(subcommand)]
    Template(TemplateCommand),
    #[command(subcommand)]
    Task(TaskCommand),
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    /// Extra DNS names or addresses for the server certificate (127.0.0.1 and localhost always).
    #[arg(long = "name")]
    names: Vec<String>,
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    token_ttl: Duration,
    #[arg(long, default_value = "72h", value_parser = parse_duration)]
    cert_ttl: Duration,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    #[arg(long, default_value = "95s", value_parser = parse_duration)]
    suspect_after: Duration,
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    silent_after: Duration,
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    task_lease: Duration,
    /// Enrollment attempts allowed per remote address at once, then --enroll-rate per second.
    #[arg(long, default_value_t = 10)]
    enroll_burst: u32,
    #[arg(long, default_value_t = 0.5)]
    enroll_rate: f64,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use bootstrap token; prints it.
    Create {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        mac: Option<String>,
        #[arg(long)]
        smbios_uuid: Option<String>,
        /// Template the node starts on (its first boot gets these modules).
        #[arg(long)]
        template: Option<String>,
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke every certificate of a node, at once.
    Revoke { id: String },
    /// Allow a node to enroll again (its old certificates stop working).
    Reprovision { id: String },
    /// Move a node through its lifecycle (draining, terminated, quarantined, …).
    State {
        id: String,
        #[arg(value_name = "STATE")]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Create or replace a template: modules pinned by digest, with their serials.
    Create {
        name: String,
        #[arg(long = "module", required = true)]
        modules: Vec<String>,
    },
    Assign {
        node: String,
        template: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    Exec {
        node: String,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    Drain {
        node: String,
    },
    Probe {
        node: String,
    },
    List {
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    List {
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Check the whole hash chain; names the first broken record.
    Verify,
}

/// Journal records fetched per request by `audit list`.
const AUDIT_PAGE: i64 = 1000;

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
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(state: PathBuf, args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings {
        token_ttl: args.token_ttl,
        cert_ttl: args.cert_ttl,
        heartbeat_interval: args.heartbeat_interval,
        suspect_after: args.suspect_after,
        silent_after: args.silent_after,
        task_lease: args.task_lease,
        enroll_burst: args.enroll_burst,
        enroll_per_second: args.enroll_rate,
    };
    let mut names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    names.extend(args.names);
    let (plane, tls) = crate::server::open_state(&state, &names, settings)?;
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr().context("local address")?;
    crate::ca::write_secret(&crate::server::StateDir(state.clone()).address(), &format!("{addr}\n"), 0o644)?;
    tracing::info!(%addr, state = %state.display(), "plane listening");
    crate::server::serve(Arc::new(plane), tls, listener).await
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    if let Command::Serve(args) = cli.command {
        let state = cli.target.state.context("serve needs --state DIR")?;
        return serve(state, args).await;
    }
    let t = cli.target;
    let client =
        OperatorClient::connect(&ClientConfig { state: t.state, plane: t.plane, cert: t.cert, key: t.key, ca: t.ca })?;
    match cli.command {
        Command::Serve(_) => bail!("serve was handled above"),
        Command::Token(TokenCommand::Create { node, mac, smbios_uuid, template, ttl }) => {
            let v: Value = client
                .post(
                    "/v1/operator/tokens",
                    &json!({"node": node, "mac": mac, "smbios_uuid": smbios_uuid, "template": template, "ttl_s": ttl.map(|d| d.as_secs())}),
                )
                .await?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        Command::Node(NodeCommand::List { json }) => {
            let nodes: Value = client.get("/v1/operator/nodes").await?;
            if json {
                print_json(&nodes);
            } else {
                println!("{:<20} {:<24} {:<14} {:>5} {:<10} last seen", "ID", "NAME", "STATE", "GEN", "PHASE");
                for n in nodes.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<24} {:<14} {:>5} {:<10} {}",
                        n["id"].as_str().unwrap_or(""),
                        n["name"].as_str().unwrap_or("-"),
                        n["state"].as_str().unwrap_or(""),
                        n["generation"],
                        n["phase"].as_str().unwrap_or("-"),
                        n["last_seen"]
                    );
                }
            }
        }
        Command::Node(NodeCommand::Show { id, json }) => {
            let node: Value = client.get(&format!("/v1/operator/nodes/{id}")).await?;
            if json {
                print_json(&node);
            } else {
                for (k, v) in node.as_object().into_iter().flatten() {
                    println!("{k:>18}: {v}");
                }
            }
        }
        Command::Node(NodeCommand::Revoke { id }) => {
            let _: Value = client.post(&format!("/v1/operator/nodes/{id}/revoke"), &json!({})).await?;
            println!("revoked {id}");
        }
        Command::Node(NodeCommand::Reprovision { id }) => {
            let _: Value = client.post(&format!("/v1/operator/nodes/{id}/reprovision"), &json!({})).await?;
            println!("{id} may enroll again with a new token");
        }
        Command::Node(NodeCommand::State { id, to }) => {
            let v: Value = client.post(&format!("/v1/operator/nodes/{id}/state"), &json!({"state": to})).await?;
            println!("{id} is {}", v["state"].as_str().unwrap_or(""));
        }
        Command::Template(TemplateCommand::Create { name, modules }) => {
            let _: Value = client.post("/v1/operator/templates", &json!({"name": name, "modules": modules})).await?;
            println!("template {name}: {} modules", modules.len());
        }
        Command::Template(TemplateCommand::Assign { node, template }) => {
            let _: Value =
                client.post(&format!("/v1/operator/nodes/{node}/template"), &json!({"template": template})).await?;
            println!("{node} now follows {template}");
        }
        Command::Task(cmd) => task(&client, cmd).await?,
        Command::Audit(AuditCommand::List { after }) => {
            // The server pages; walk every page.
            let mut after = after;
            loop {
                let records: Value =
                    client.get(&format!("/v1/operator/audit?after={after}&limit={AUDIT_PAGE}")).await?;
                let page = records.as_array().cloned().unwrap_or_default();
                for r in &page {
                    println!(
                        "{:>6} {} {:<24} {:<28} {} {}",
                        r["seq"],
                        r["time"],
                        r["actor"].as_str().unwrap_or(""),
                        r["kind"].as_str().unwrap_or(""),
                        r["subject"].as_str().unwrap_or(""),
                        r["data"]
                    );
                }
                match page.last().and_then(|r| r["seq"].as_i64()) {
                    Some(last) if page.len() as i64 == AUDIT_PAGE => after = last,
                    _ => break,
                }
            }
        }
        Command::Audit(AuditCommand::Verify) => {
            let report: Value = client.get("/v1/operator/audit/verify").await?;
            match report["broken"].as_array() {
                Some(b) => bail!(
                    "audit chain broken at record {}: {}",
                    b.first().unwrap_or(&Value::Null),
                    b.get(1).and_then(Value::as_str).unwrap_or("")
                ),
                None => println!("audit chain intact: {} records", report["records"]),
            }
        }
    }
    Ok(())
}

async fn task(client: &OperatorClient, cmd: TaskCommand) -> anyhow::Result<()> {
    let (node, spec) = match cmd {
        TaskCommand::List { node } => {
            let tasks: Value = client.get(&format!("/v1/operator/nodes/{node}/tasks")).await?;
            print_json(&tasks);
            return Ok(());
        }
        TaskCommand::Exec { node, argv } => (node, TaskSpec::Exec { argv }),
        TaskCommand::Drain { node } => (node, TaskSpec::Drain),
        TaskCommand::Probe { node } => (node, TaskSpec::Probe),
    };
    let v: Value = client.post(&format!("/v1/operator/nodes/{node}/tasks"), &spec).await?;
    println!("{}", v["task"].as_str().unwrap_or_default());
    Ok(())
}
