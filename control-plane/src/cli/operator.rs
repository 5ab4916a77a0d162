//! The operator commands: each one request (or a few) to the running plane over mTLS, and the
//! way its answer is printed.

use anyhow::Context as _;
use ironroot_contract::wire::{JournalCheckpoint, MAX_CHECKPOINT, TaskSpec};
use serde_json::{Value, json};

use super::args::{AuditCommand, Command, NodeCommand, TaskCommand, TokenCommand};
use crate::client::OperatorClient;
use crate::exit::CommandError;

/// Journal records fetched per request by `audit list`.
const AUDIT_PAGE: i64 = 1000;

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub async fn run(client: &OperatorClient, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => anyhow::bail!("serve is not an operator command"),
        Command::Token(TokenCommand::Create { node, mac, smbios_uuid, template, ttl }) => {
            let v: Value = client
                .post(
                    "/v1/operator/tokens",
                    &json!({"node": node, "mac": mac, "smbios_uuid": smbios_uuid, "template": template, "ttl_s": ttl.map(|d| d.as_secs())}),
                )
                .await?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        Command::Node(cmd) => node(client, cmd).await?,
        Command::Channel(cmd) => super::catalog::channel(client, cmd).await?,
        Command::Template(cmd) => super::catalog::template(client, cmd).await?,
        Command::Rollout(cmd) => super::catalog::rollout(client, cmd).await?,
        Command::Task(cmd) => task(client, cmd).await?,
        Command::Audit(cmd) => audit(client, cmd).await?,
    }
    Ok(())
}

async fn node(client: &OperatorClient, cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Provision { name, template, memory, disk, nics, disk_bus, uefi } => {
            let body = json!({
                "name": name, "template": template, "memory_mib": memory, "disk": disk,
                "nics": nics, "disk_bus": disk_bus, "uefi": uefi,
            });
            let v: Value = client.post("/v1/operator/nodes", &body).await?;
            let id = v["node_id"].as_str().unwrap_or("");
            match v["pid"].as_u64() {
                Some(pid) => println!("{name} ({id}) is booting: QEMU under pid {pid}; `node console {name}` shows it"),
                None => println!("{name} ({id}) provisioned; its QEMU command was recorded in the journal, not run"),
            }
        }
        NodeCommand::Terminate { id } => {
            let v: Value = client.post(&format!("/v1/operator/nodes/{id}/terminate"), &json!({})).await?;
            let machine = &v["machine"];
            match (machine["how"].as_str(), machine["pid"].as_u64()) {
                (Some("powered-off"), Some(pid)) => {
                    println!(
                        "{id}: machine (pid {pid}) powered off ({}); revoked",
                        machine["status"].as_str().unwrap_or("")
                    );
                }
                (Some("recorded"), _) => println!("{id}: recorded machine forgotten; revoked"),
                (Some(_), _) => println!("{id}: machine had already ended; revoked"),
                (None, _) => println!("{id}: no machine running; revoked"),
            }
        }
        NodeCommand::Console { id } => {
            use std::io::Write as _;
            let log = client.get_raw(&format!("/v1/operator/nodes/{id}/console")).await?;
            std::io::stdout().write_all(&log).context("writing the console log")?;
        }
        NodeCommand::List { json } => {
            let nodes: Value = client.get("/v1/operator/nodes").await?;
            if json {
                print_json(&nodes);
                return Ok(());
            }
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
        NodeCommand::Show { id, json } => {
            let node: Value = client.get(&format!("/v1/operator/nodes/{id}")).await?;
            if json {
                print_json(&node);
            } else {
                for (k, v) in node.as_object().into_iter().flatten() {
                    println!("{k:>18}: {v}");
                }
            }
        }
        NodeCommand::Receipts { id, json } => {
            let receipts: Value = client.get(&format!("/v1/operator/nodes/{id}/receipts")).await?;
            if json {
                print_json(&receipts);
                return Ok(());
            }
            for r in receipts.as_array().into_iter().flatten() {
                let version = |side: &str| r[side]["version"].as_str().unwrap_or("-").to_owned();
                println!(
                    "{:>6} {} {:<12} {:<20} {} -> {} {}{}",
                    r["seq"],
                    r["finished"],
                    r["outcome"].as_str().unwrap_or(""),
                    r["module"].as_str().unwrap_or(""),
                    version("from"),
                    version("to"),
                    r["transaction"].as_str().unwrap_or(""),
                    r["reason"].as_str().map(|w| format!(": {w}")).unwrap_or_default()
                );
            }
        }
        NodeCommand::Revoke { id } => {
            let _: Value = client.post(&format!("/v1/operator/nodes/{id}/revoke"), &json!({})).await?;
            println!("revoked {id}");
        }
        NodeCommand::Reprovision { id } => {
            let _: Value = client.post(&format!("/v1/operator/nodes/{id}/reprovision"), &json!({})).await?;
            println!("{id} may enroll again with a new token");
        }
        NodeCommand::State { id, to } => {
            let v: Value = client.post(&format!("/v1/operator/nodes/{id}/state"), &json!({"state": to})).await?;
            println!("{id} is {}", v["state"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

async fn task(client: &OperatorClient, cmd: TaskCommand) -> anyhow::Result<()> {
    let (node, spec, deadline_s) = match cmd {
        TaskCommand::List { node } => {
            let tasks: Value = client.get(&format!("/v1/operator/nodes/{node}/tasks")).await?;
            print_json(&tasks);
            return Ok(());
        }
        TaskCommand::Cancel { task } => {
            let v: Value = client.post(&format!("/v1/operator/tasks/{task}/cancel"), &json!({})).await?;
            println!("{task} {}", v["state"].as_str().unwrap_or_default());
            return Ok(());
        }
        TaskCommand::Exec { node, argv } => (node, TaskSpec::Exec { argv }, None),
        TaskCommand::Drain { node } => (node, TaskSpec::Drain, None),
        TaskCommand::Vet { node } => (node, TaskSpec::Vet, None),
        TaskCommand::ModuleUpdate { node, deadline_s } => (node, TaskSpec::ModuleUpdate, deadline_s),
        TaskCommand::Reboot { node } => (node, TaskSpec::Reboot, None),
        TaskCommand::SoftReboot { node } => (node, TaskSpec::SoftReboot, None),
    };
    let query = deadline_s.map(|s| format!("?deadline_s={s}")).unwrap_or_default();
    let v: Value = client.post(&format!("/v1/operator/nodes/{node}/tasks{query}"), &spec).await?;
    println!("{}", v["task"].as_str().unwrap_or_default());
    Ok(())
}

async fn audit(client: &OperatorClient, cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::List { after } => {
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
        AuditCommand::Verify { against } => {
            let report: Value = match against {
                None => client.get("/v1/operator/audit/verify").await?,
                Some(path) => {
                    // One byte past the cap is enough to refuse an oversized file.
                    let mut bytes = Vec::new();
                    std::fs::File::open(&path)
                        .and_then(|f| {
                            std::io::Read::read_to_end(
                                &mut std::io::Read::take(f, MAX_CHECKPOINT as u64 + 1),
                                &mut bytes,
                            )
                        })
                        .with_context(|| format!("reading {}", path.display()))?;
                    let checkpoint =
                        JournalCheckpoint::parse(&bytes).with_context(|| format!("checkpoint {}", path.display()))?;
                    client.post("/v1/operator/audit/verify", &json!({"against": checkpoint})).await?
                }
            };
            print_verify(&report)?;
        }
        AuditCommand::Checkpoint { export } => {
            let c: Value = if export {
                client.get("/v1/operator/audit/checkpoint").await?
            } else {
                client.post("/v1/operator/audit/checkpoint", &json!({})).await?
            };
            if c.is_null() {
                anyhow::bail!("the journal has no checkpoint yet (it is empty)");
            }
            println!("{}", serde_json::to_string(&c).unwrap_or_default());
        }
    }
    Ok(())
}

fn print_verify(report: &Value) -> anyhow::Result<()> {
    if let Some(b) = report["broken"].as_array() {
        return Err(CommandError::JournalBroken {
            seq: b.first().and_then(Value::as_i64).unwrap_or(0),
            reason: b.get(1).and_then(Value::as_str).unwrap_or("").to_owned(),
        }
        .into());
    }
    let records = report["records"].as_i64().unwrap_or(0);
    let unanchored = report["unanchored"].as_i64().unwrap_or(0);
    match report["anchored_through"].as_i64() {
        Some(through) => println!(
            "audit chain intact: {records} records; 1-{through} anchored by a checkpoint signed at {}; {}",
            report["anchored_at"],
            if unanchored == 0 {
                "none after it".to_owned()
            } else {
                format!("{}-{records} not yet anchored ({unanchored})", through + 1)
            }
        ),
        None => println!("audit chain intact: {records} records; none anchored by a checkpoint yet"),
    }
    Ok(())
}
