//! The effectful shell around the pure core ([`Node`]): one `select!` loop that turns plane
//! answers, timers, finished jobs and signals into [`Event`]s, and carries out the [`Action`]s
//! the core answers with — journal appends (synced before anything after them runs), plane
//! calls and long jobs (spawned; each reports back as an event), sd-notify.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ironroot_contract::run_state::BootRecord;
use ironroot_contract::wire::{AuditBatch, NodeAuditRecord, NodeReport, RECEIPT_KIND};
use sd_notify::NotifyState;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::jobs::Runner;
use super::journal::Journal;
use super::node::{Action, Event, Node, Now};
use super::{ServeError, notify, replay, watchdog_period};
use crate::plane::PlaneClient;

/// Records per delivery, and the bytes they may take (under the plane's body limit).
const BATCH_RECORDS: usize = 200;
const BATCH_BYTES: usize = ironroot_contract::wire::MAX_BODY / 2;
/// The loop wakes at least this often (wall-clock deadlines: renewal, expiry).
const MAX_SLEEP: Duration = Duration::from_secs(5);

fn wall() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Everything the loop carries out actions with.
#[derive(Debug)]
pub struct Shell {
    pub record: BootRecord,
    pub run_dir: std::path::PathBuf,
    pub client: Arc<RwLock<PlaneClient>>,
    pub journal: Journal,
    pub node: Node,
    pub runner: Arc<Runner>,
    pub report: NodeReport,
    /// The certificate's expiry (moves with renewals).
    pub not_after: u64,
    started: Instant,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    live_written: Vec<String>,
}

impl Shell {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        record: BootRecord,
        run_dir: std::path::PathBuf,
        client: PlaneClient,
        journal: Journal,
        node: Node,
        runner: Runner,
        report: NodeReport,
        not_after: u64,
        started: Instant,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            record,
            run_dir,
            client: Arc::new(RwLock::new(client)),
            journal,
            node,
            runner: Arc::new(runner),
            report,
            not_after,
            started,
            tx,
            rx,
            live_written: Vec::new(),
        }
    }

    fn now(&self) -> Now {
        Now { mono: self.started.elapsed(), wall: wall() }
    }

    fn client(&self) -> PlaneClient {
        self.client.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs until SIGTERM (once every long job is done) or an unrecoverable error.
    pub async fn run(mut self, first: Vec<Action>) -> Result<(), ServeError> {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(ServeError::Signal)?;
        let mut watchdog = tokio::time::interval(watchdog_period().unwrap_or(Duration::from_secs(3600)));
        if self.perform(first) {
            return Ok(());
        }
        let head = self.journal.head();
        if self.feed(Event::Journaled(head)) {
            return Ok(());
        }
        loop {
            let wake = self.node.next_wake().map_or(MAX_SLEEP, |w| w.saturating_sub(self.started.elapsed()));
            let event = tokio::select! {
                _ = term.recv() => Event::Terminate,
                _ = tokio::signal::ctrl_c() => Event::Terminate,
                _ = watchdog.tick() => {
                    notify(&[NotifyState::Watchdog]);
                    continue;
                }
                _ = tokio::time::sleep(wake.min(MAX_SLEEP)) => Event::Tick,
                Some(event) = self.rx.recv() => event,
            };
            if wall() >= self.not_after {
                // The core says so first (status, and a `cert.expired` record the journal keeps
                // for whoever delivers it next); then the service ends for good.
                self.feed(Event::Tick);
                return Err(ServeError::Expired { not_after: self.not_after as i64 });
            }
            if self.feed(event) {
                break;
            }
        }
        notify(&[NotifyState::Stopping]);
        tracing::info!("stopping");
        Ok(())
    }

    /// Hands one event to the core and carries out its answer; true when the service ends.
    fn feed(&mut self, event: Event) -> bool {
        let event = match event {
            Event::Delivered(Ok(upto)) => match self.journal.delivered(upto) {
                Ok(()) => Event::Delivered(Ok(upto)),
                Err(e) => Event::Delivered(Err(crate::exit::describe(&e))),
            },
            Event::Renewed(Ok(not_after)) => {
                self.not_after = not_after;
                Event::Renewed(Ok(not_after))
            }
            other => other,
        };
        let actions = self.node.on(event, self.now());
        let exit = self.perform(actions);
        self.write_live();
        exit
    }

    /// Keeps `live.json` what the rollout says is live.
    fn write_live(&mut self) {
        let live: Vec<&super::rollout::ModuleInfo> = self.node.rollout.live().filter(|m| m.role.is_live()).collect();
        let names: Vec<String> = live.iter().map(|m| format!("{}@{}", m.name, m.digest)).collect();
        if names != self.live_written {
            match replay::write_live(&self.run_dir, &live) {
                Ok(()) => self.live_written = names,
                Err(e) => tracing::warn!(error = %e, "writing live.json"),
            }
        }
    }

    /// Carries out actions in order; true on `Exit`. After a record that cannot be journaled
    /// no job runs (nothing runs that was not written down first), the core hears why, and
    /// plane calls go on (the heartbeat, and the delivery that makes room again).
    fn perform(&mut self, actions: Vec<Action>) -> bool {
        let mut journaled = None;
        let mut not_journaled = None;
        for action in actions {
            match action {
                Action::Record { kind, data } => {
                    let step = (kind == "txn").then(|| data.get("step").and_then(|s| s.as_str()).map(str::to_owned));
                    let step = step.flatten();
                    // A new change needs room for all its records: it is refused while the
                    // plane has not taken enough of the journal.
                    let appended = if step.as_deref() == Some("planned") && !self.journal.has_room_for_change() {
                        Err(crate::exit::describe(&super::journal::JournalError::Full {
                            bytes: self.journal.undelivered_bytes(),
                        }))
                    } else {
                        self.journal.append(wall(), &kind, data).map_err(|e| crate::exit::describe(&e))
                    };
                    match appended {
                        Ok(seq) => {
                            if step.as_deref() == Some("planned") {
                                self.journal.pin(Some(seq));
                            } else if kind == RECEIPT_KIND {
                                self.journal.pin(None);
                            }
                            journaled = Some(seq);
                        }
                        Err(why) => {
                            tracing::error!(error = %why, %kind, "journal append failed; no job runs on it");
                            not_journaled.get_or_insert(Event::NotJournaled { kind, step, why });
                        }
                    }
                }
                Action::Run(_) if not_journaled.is_some() => {}
                Action::Report { handshake, last_reconcile } => self.spawn_report(handshake, last_reconcile),
                Action::FetchDesired => {
                    let (client, node) = (self.client(), self.record.node_id.clone());
                    self.spawn(async move {
                        Event::Desired(client.desired(&node).await.map_err(|e| crate::exit::describe(&e)))
                    });
                }
                Action::Lease { wait } => {
                    let (client, node) = (self.client(), self.record.node_id.clone());
                    self.spawn(async move {
                        Event::Leased(client.lease(&node, wait).await.map_err(|e| crate::exit::describe(&e)))
                    });
                }
                Action::Post { task, result } => {
                    let client = self.client();
                    self.spawn(async move {
                        let r = client.post_result(&task, &result).await.map_err(|e| crate::exit::describe(&e));
                        Event::Posted { task, result: r }
                    });
                }
                Action::Renew => {
                    let (shared, record) = (Arc::clone(&self.client), self.record.clone());
                    let client = self.client();
                    self.spawn(async move {
                        match super::renew::renew(&record, &client).await {
                            Ok((renewed, not_after)) => {
                                *shared.write().unwrap_or_else(|e| e.into_inner()) = renewed;
                                Event::Renewed(Ok(not_after))
                            }
                            Err(why) => Event::Renewed(Err(why)),
                        }
                    });
                }
                Action::Deliver { after } => self.spawn_delivery(after),
                Action::Run(job) => {
                    // On a blocking thread of its own: jobs hold borrows across awaits that the
                    // compiler cannot prove Send, and mount calls block anyway.
                    let (runner, tx) = (Arc::clone(&self.runner), self.tx.clone());
                    let handle = tokio::runtime::Handle::current();
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.send(Event::Job(handle.block_on(runner.run(*job))));
                    });
                }
                Action::Ready => notify(&[NotifyState::Ready]),
                Action::Status(s) => notify(&[NotifyState::Status(&s)]),
                Action::Exit => return true,
            }
        }
        if let Some(seq) = journaled {
            let _ = self.tx.send(Event::Journaled(seq));
        }
        if let Some(event) = not_journaled {
            let _ = self.tx.send(event);
        }
        false
    }

    fn spawn(&self, f: impl std::future::Future<Output = Event> + Send + 'static) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(f.await);
        });
    }

    fn spawn_report(&self, handshake: bool, last_reconcile: Option<String>) {
        let mut report = self.report.clone();
        report.last_reconcile = last_reconcile;
        let mut digests: Vec<_> = self.node.rollout.live().map(|m| m.digest).collect();
        digests.sort();
        report.module_digests = digests;
        report.agent = super::usage::read();
        let (client, node) = (self.client(), self.record.node_id.clone());
        self.spawn(async move {
            let result =
                if handshake { client.handshake(&node, &report).await } else { client.heartbeat(&node, &report).await };
            if let Err(e) = &result {
                tracing::warn!(error = %crate::exit::describe(e), "plane exchange failed");
            }
            Event::Reported { handshake, result: result.map_err(|e| crate::exit::describe(&e)) }
        });
    }

    /// Sends the journal's records after `after`, oldest first, a bounded batch at a time.
    fn spawn_delivery(&self, after: u64) {
        let mut records = Vec::new();
        let mut bytes = 0;
        for r in self.journal.pending().iter().filter(|r| r.seq > after) {
            let record = NodeAuditRecord { seq: r.seq, time: r.time, kind: r.kind.clone(), data: r.data.clone() };
            let size = serde_json::to_vec(&record).map_or(0, |v| v.len());
            if !records.is_empty() && (records.len() >= BATCH_RECORDS || bytes + size > BATCH_BYTES) {
                break;
            }
            bytes += size;
            records.push(record);
        }
        let Some(last) = records.last().map(|r| r.seq) else {
            let _ = self.tx.send(Event::Delivered(Ok(after)));
            return;
        };
        let (client, node) = (self.client(), self.record.node_id.clone());
        self.spawn(async move {
            let result = client.audit(&node, &AuditBatch { records }).await;
            Event::Delivered(result.map(|()| last).map_err(|e| crate::exit::describe(&e)))
        });
    }
}
