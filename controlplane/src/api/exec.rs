//! `ExecInstance`: commands run inside instances, relayed to their hosts' agents.
//!
//! Each agent keeps one `ExecChannel` stream open to the control plane (it dials out, so
//! hosts need no listening port). [`ExecHub`] maps a host to its stream's sender and each
//! request id to the caller waiting for its result. A request for a host whose agent has no
//! channel to this replica is UNAVAILABLE; a result that never comes times out.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use vpc_proto::v1 as pb;

use super::error::ApiError;

/// Commands queued per host before senders wait.
const QUEUE: usize = 64;
/// Beyond the command's own timeout: the agent's time to start and report it.
const SLACK: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Inner {
    /// host -> (channel generation, sender)
    hosts: HashMap<String, (u64, mpsc::Sender<pb::ExecCommand>)>,
    /// request id -> waiting caller
    pending: HashMap<u64, oneshot::Sender<pb::ExecResult>>,
}

/// The agents' exec channels on this replica.
#[derive(Debug, Default)]
pub struct ExecHub {
    inner: Mutex<Inner>,
    next: AtomicU64,
}

impl ExecHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A host's agent opened its channel (replacing an older one): returns the channel's
    /// generation and the commands to send it.
    pub fn attach(&self, host: &str) -> (u64, mpsc::Receiver<pb::ExecCommand>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let generation = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().hosts.insert(host.to_owned(), (generation, tx));
        (generation, rx)
    }

    /// The channel of `generation` closed (a newer one stays).
    pub fn detach(&self, host: &str, generation: u64) {
        let mut g = self.lock();
        if g.hosts.get(host).is_some_and(|(n, _)| *n == generation) {
            g.hosts.remove(host);
        }
    }

    /// A result arrived.
    pub fn complete(&self, result: pb::ExecResult) {
        if let Some(tx) = self.lock().pending.remove(&result.id) {
            let _ = tx.send(result);
        }
    }

    /// Sends `cmd` to `host`'s agent and waits for its result (the command's timeout plus
    /// slack).
    pub async fn run(
        &self,
        host: &str,
        mut cmd: pb::ExecCommand,
    ) -> Result<pb::ExecResult, ApiError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        cmd.id = id;
        let wait = Duration::from_secs(u64::from(cmd.timeout_seconds)) + SLACK;
        let (tx, rx) = oneshot::channel();
        let sender = {
            let mut g = self.lock();
            let Some((_, sender)) = g.hosts.get(host).cloned() else {
                return Err(ApiError::Unavailable(format!(
                    "host {host} has no exec channel to this control plane (its agent is not connected)"
                )));
            };
            g.pending.insert(id, tx);
            sender
        };
        let forget = |hub: &ExecHub| hub.lock().pending.remove(&id);
        if sender.send(cmd).await.is_err() {
            forget(self);
            return Err(ApiError::Unavailable(format!(
                "host {host}'s exec channel closed"
            )));
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(ApiError::Unavailable(format!(
                "host {host}'s exec channel closed"
            ))),
            Err(_) => {
                forget(self);
                Err(ApiError::Unavailable(format!(
                    "host {host} did not answer within {} s",
                    wait.as_secs()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_to_the_attached_host_and_matches_results() {
        let hub = std::sync::Arc::new(ExecHub::default());
        let err = hub.run("h1", pb::ExecCommand::default()).await.unwrap_err();
        assert!(matches!(err, ApiError::Unavailable(_)), "{err:?}");
        let (g1, _old) = hub.attach("h1");
        let (g2, mut rx) = hub.attach("h1");
        hub.detach("h1", g1); // an old channel closing leaves the new one
        let agent = {
            let hub = std::sync::Arc::clone(&hub);
            tokio::spawn(async move {
                let cmd = rx.recv().await.unwrap();
                assert_eq!(cmd.command, "echo hi");
                hub.complete(pb::ExecResult {
                    id: cmd.id,
                    exit_code: 3,
                    stdout: b"hi\n".to_vec(),
                    ..Default::default()
                });
            })
        };
        let r = hub
            .run(
                "h1",
                pb::ExecCommand {
                    command: "echo hi".into(),
                    timeout_seconds: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!((r.exit_code, r.stdout.as_slice()), (3, b"hi\n".as_slice()));
        agent.await.unwrap();
        hub.detach("h1", g2);
        assert!(hub.run("h1", pb::ExecCommand::default()).await.is_err());
    }
}
