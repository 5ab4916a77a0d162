//! The catalog commands — `channel`, `template`, `rollout` — their clap definitions and what
//! each does: one or two requests to the running plane, and how the answer is printed.

use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::OperatorClient;

#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// List every channel: where it stands (digest, module, version, serial) and who set it.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Point REPO:CHANNEL at a tag (resolved to a digest by the plane) or a digest; the plane
    /// verifies the module's signature and reads its serial first.
    Set {
        /// `REGISTRY/REPOSITORY`.
        repo: String,
        /// Channel name (`stable`, `candidate`, …).
        channel: String,
        /// A tag of the repository, or `sha256:…`.
        #[arg(value_name = "TAG|DIGEST")]
        at: String,
        /// Allow a module with a lower serial than the channel has (journaled as a rollback).
        #[arg(long)]
        allow_rollback: bool,
    },
    /// Point channel --to where channel --from is (verified again).
    Promote {
        /// `REGISTRY/REPOSITORY`.
        repo: String,
        /// The channel to copy (`candidate`).
        #[arg(long)]
        from: String,
        /// The channel to move (`stable`).
        #[arg(long)]
        to: String,
        /// Allow a lower serial than --to has (journaled as a rollback).
        #[arg(long)]
        allow_rollback: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Create or replace a template (a role's module catalog) with exactly these modules.
    Create {
        /// Template name.
        name: String,
        /// `REGISTRY/REPO:CHANNEL` or `REGISTRY/REPO@sha256:…[,serial=N]`; repeat for several.
        #[arg(long = "module", required = true)]
        modules: Vec<String>,
        /// Allow a module's serial to drop (a rollback).
        #[arg(long)]
        allow_rollback: bool,
        /// Seconds a root update entered by soft reboot has to pass its trial before the node
        /// goes back (30-3600; default: the node's 300).
        #[arg(long = "trial-deadline")]
        trial_deadline_s: Option<u64>,
    },
    /// Add modules to a template, or replace the entries of their module names.
    Add {
        /// Template name.
        name: String,
        /// `REGISTRY/REPO:CHANNEL` or `REGISTRY/REPO@sha256:…[,serial=N]`; repeat for several.
        #[arg(long = "module", required = true)]
        modules: Vec<String>,
        /// Allow a module's serial to drop (a rollback).
        #[arg(long)]
        allow_rollback: bool,
    },
    /// Remove one module (by name) from a template.
    Remove {
        /// Template name.
        name: String,
        /// Module name.
        module: String,
    },
    /// Show a template's entries: what each follows or pins, the digest and serial it serves.
    Show {
        /// Template name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the desired state the template's newest rendering gives (to --node, as that node
    /// would get it), without assigning anything.
    Render {
        /// Template name.
        name: String,
        /// Node id or name.
        #[arg(long)]
        node: Option<String>,
    },
    /// Make a node follow a template (its desired-state generation moves).
    Assign {
        /// Node id or name.
        node: String,
        /// Template name.
        template: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// How nodes of a template move to a new rendering: --batch N at a time, or --all at once.
    Set {
        /// Template name.
        template: String,
        /// Nodes per batch; the next batch starts when every node of this one reported the
        /// new modules.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        batch: Option<u32>,
        /// Every node at once (the default).
        #[arg(long)]
        all: bool,
    },
    /// Where a template's rollout stands: target, batch size, halt (which node, why), nodes.
    Status {
        /// Template name.
        template: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Lift a halt and start the next batch.
    Resume {
        /// Template name.
        template: String,
    },
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_change(v: &Value) {
    let c = &v["channel"];
    println!(
        "{}:{} -> {} ({} {}, serial {})",
        c["repo"].as_str().unwrap_or(""),
        c["channel"].as_str().unwrap_or(""),
        c["digest"].as_str().unwrap_or(""),
        c["name"].as_str().unwrap_or(""),
        c["version"].as_str().unwrap_or(""),
        c["serial"]
    );
    for t in v["rendered"].as_array().into_iter().flatten() {
        println!("  template {} rendered as revision {}", t[0].as_str().unwrap_or(""), t[1]);
    }
}

pub async fn channel(client: &OperatorClient, cmd: ChannelCommand) -> anyhow::Result<()> {
    match cmd {
        ChannelCommand::List { json } => {
            let list: Value = client.get("/v1/operator/channels").await?;
            if json {
                print_json(&list);
                return Ok(());
            }
            for c in list.as_array().into_iter().flatten() {
                println!(
                    "{}:{} {} {} {} serial {} (set by {})",
                    c["repo"].as_str().unwrap_or(""),
                    c["channel"].as_str().unwrap_or(""),
                    c["digest"].as_str().unwrap_or(""),
                    c["name"].as_str().unwrap_or(""),
                    c["version"].as_str().unwrap_or(""),
                    c["serial"],
                    c["set_by"].as_str().unwrap_or("")
                );
            }
        }
        ChannelCommand::Set { repo, channel, at, allow_rollback } => {
            let body = json!({"repo": repo, "channel": channel, "at": at, "allow_rollback": allow_rollback});
            print_change(&client.post("/v1/operator/channels", &body).await?);
        }
        ChannelCommand::Promote { repo, from, to, allow_rollback } => {
            let body = json!({"repo": repo, "from": from, "to": to, "allow_rollback": allow_rollback});
            print_change(&client.post("/v1/operator/channels/promote", &body).await?);
        }
    }
    Ok(())
}

fn print_revision(name: &str, v: &Value) {
    match v["revision"].as_i64() {
        Some(r) => println!("template {name}: rendered as revision {r}"),
        None => println!("template {name}: rendering unchanged"),
    }
}

pub async fn template(client: &OperatorClient, cmd: TemplateCommand) -> anyhow::Result<()> {
    match cmd {
        TemplateCommand::Create { name, modules, allow_rollback, trial_deadline_s } => {
            let mut body = json!({"name": name, "modules": modules, "allow_rollback": allow_rollback});
            if let Some(s) = trial_deadline_s {
                body["trial_deadline_s"] = s.into();
            }
            print_revision(&name, &client.post("/v1/operator/templates", &body).await?);
        }
        TemplateCommand::Add { name, modules, allow_rollback } => {
            let body = json!({"modules": modules, "allow_rollback": allow_rollback});
            print_revision(&name, &client.post(&format!("/v1/operator/templates/{name}/modules"), &body).await?);
        }
        TemplateCommand::Remove { name, module } => {
            print_revision(&name, &client.delete(&format!("/v1/operator/templates/{name}/modules/{module}")).await?);
        }
        TemplateCommand::Show { name, json } => {
            let t: Value = client.get(&format!("/v1/operator/templates/{name}")).await?;
            if json {
                print_json(&t);
                return Ok(());
            }
            println!("template {} (revision {})", t["name"].as_str().unwrap_or(""), t["revision"]);
            for e in t["entries"].as_array().into_iter().flatten() {
                let source = match e["channel"].as_str() {
                    Some(c) => format!("{}:{c}", e["repo"].as_str().unwrap_or("")),
                    None => format!("{} (pinned)", e["repo"].as_str().unwrap_or("")),
                };
                let verified = if e["verified"].as_bool() == Some(true) { "" } else { " unverified" };
                println!(
                    "  {:<20} {source} {} serial {}{verified}",
                    e["module"].as_str().unwrap_or(""),
                    e["digest"].as_str().unwrap_or(""),
                    e["serial"]
                );
            }
        }
        TemplateCommand::Render { name, node } => {
            let query = node.map(|n| format!("?node={n}")).unwrap_or_default();
            // The plane's bytes, as a node would receive them.
            let raw = client.get_raw(&format!("/v1/operator/templates/{name}/render{query}")).await?;
            println!("{}", String::from_utf8_lossy(&raw));
        }
        TemplateCommand::Assign { node, template } => {
            let _: Value =
                client.post(&format!("/v1/operator/nodes/{node}/template"), &json!({"template": template})).await?;
            println!("{node} now follows {template}");
        }
    }
    Ok(())
}

pub async fn rollout(client: &OperatorClient, cmd: RolloutCommand) -> anyhow::Result<()> {
    match cmd {
        RolloutCommand::Set { template, batch, all: _ } => {
            let s: Value =
                client.post(&format!("/v1/operator/templates/{template}/rollout"), &json!({"batch": batch})).await?;
            print_status(&s);
        }
        RolloutCommand::Status { template, json } => {
            let s: Value = client.get(&format!("/v1/operator/templates/{template}/rollout")).await?;
            if json {
                print_json(&s);
            } else {
                print_status(&s);
            }
        }
        RolloutCommand::Resume { template } => {
            let v: Value =
                client.post(&format!("/v1/operator/templates/{template}/rollout/resume"), &json!({})).await?;
            println!("rollout of {template} resumed: {} nodes moved to the next batch", v["moved"]);
        }
    }
    Ok(())
}

fn print_status(s: &Value) {
    let batch = s["batch"].as_i64().map_or("all at once".to_owned(), |b| format!("batches of {b}"));
    println!("template {} rollout to revision {} ({batch})", s["template"].as_str().unwrap_or(""), s["revision"]);
    match s["halted"].as_object() {
        Some(h) => println!(
            "  HALTED by node {} at {}: {}",
            h["node"].as_str().unwrap_or(""),
            h["at"],
            h["reason"].as_str().unwrap_or("")
        ),
        None => println!("  not halted"),
    }
    for (state, n) in s["counts"].as_object().into_iter().flatten() {
        let ids: Vec<&str> =
            s["nodes"][state.as_str()].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        println!("  {state:<8} {n:>6} {}", ids.join(" "));
    }
}
