//! The agent's side of `ExecInstance`: keeps an exec channel open to the control plane
//! (reconnecting with backoff) and runs each command it receives inside the instance's
//! namespaces (mount, UTS, IPC, network, PID; as `docker exec`), bounded in time and
//! output.

use std::{process::Stdio, time::Duration};

use controlplane::compute::runtime::Runtime;
use tokio::{io::AsyncWriteExt as _, sync::mpsc};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tracing::{info, warn};
use vpc_proto::v1 as pb;

use crate::cpclient::{CpConfig, connect};

/// Output kept per stream.
const MAX_OUTPUT: usize = 1 << 20;

/// Runs forever: (re)connects the exec channel and serves it. Trace hops go to `traces`
/// (the main loop, which owns the datapath).
pub async fn exec_loop(
    cfg: CpConfig,
    runtime: Runtime,
    traces: mpsc::Sender<crate::trace::HopRequest>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match serve(&cfg, &runtime, &traces).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => warn!(
                error = format!("{e:#}"),
                "exec channel to the control plane"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn serve(
    cfg: &CpConfig,
    runtime: &Runtime,
    traces: &mpsc::Sender<crate::trace::HopRequest>,
) -> anyhow::Result<()> {
    let mut client = connect(cfg).await?;
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::ExecResult {
        host_id: cfg.host_id.clone(),
        ..Default::default()
    })
    .await?;
    let mut commands = client
        .exec_channel(ReceiverStream::new(rx))
        .await?
        .into_inner();
    info!("exec channel open");
    while let Some(cmd) = commands.next().await {
        let cmd = cmd?;
        let (tx, runtime, traces) = (tx.clone(), runtime.clone(), traces.clone());
        tokio::spawn(async move {
            let result = match cmd.trace.clone() {
                Some(hop) => trace(&traces, cmd.id, hop).await,
                None => run(&runtime, cmd).await,
            };
            let _ = tx.send(result).await;
        });
    }
    Ok(())
}

/// Hands a trace hop to the main loop and waits for its result; never fails.
async fn trace(
    traces: &mpsc::Sender<crate::trace::HopRequest>,
    id: u64,
    hop: pb::TraceHop,
) -> pb::ExecResult {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut result = pb::ExecResult {
        id,
        ..Default::default()
    };
    if traces.send((hop, tx)).await.is_err() {
        result.error = "the agent is shutting down".into();
        return result;
    }
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(hop)) => result.trace = Some(hop),
        _ => result.error = "the trace did not finish within 10 s".into(),
    }
    result
}

/// Runs one command; never fails (failures are the result's `error`).
async fn run(runtime: &Runtime, cmd: pb::ExecCommand) -> pb::ExecResult {
    let mut result = pb::ExecResult {
        id: cmd.id,
        exit_code: -1,
        ..Default::default()
    };
    let Some(pid) = runtime.ns_pid(&cmd.instance_id) else {
        result.error = "the instance is not running on this host".into();
        return result;
    };
    let mut child = match tokio::process::Command::new("nsenter")
        .args(["--target", &pid.to_string()])
        .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--"])
        .args(["/bin/sh", "-c", &cmd.command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills nsenter and what it started in the
        // instance together.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            result.error = format!("starting nsenter: {e}");
            return result;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let data = cmd.stdin;
        tokio::spawn(async move {
            let _ = stdin.write_all(&data).await;
        });
    }
    let out = child.stdout.take().map(collect);
    let err = child.stderr.take().map(collect);
    let limit = Duration::from_secs(u64::from(cmd.timeout_seconds.max(1)));
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => {
            use std::os::unix::process::ExitStatusExt as _;
            result.exit_code = status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(-1);
        }
        Ok(Err(e)) => result.error = format!("waiting for the command: {e}"),
        Err(_) => {
            if let Some(pgid) = child.id() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
            result.timed_out = true;
            result.exit_code = 128 + 9;
        }
    }
    // What the command wrote, also when it was killed (bounded: a process that escaped the
    // group could keep a pipe open).
    for (reader, into) in [(out, &mut result.stdout), (err, &mut result.stderr)] {
        if let Some(reader) = reader
            && let Ok(Ok(bytes)) = tokio::time::timeout(Duration::from_secs(1), reader).await
        {
            *into = bytes;
        }
    }
    result
}

/// Reads a pipe to its end, keeping at most [`MAX_OUTPUT`] bytes.
fn collect<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    mut pipe: R,
) -> tokio::task::JoinHandle<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    tokio::spawn(async move {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let room = MAX_OUTPUT.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        kept
    })
}
