//! `vpc instances`, `vpc volumes` and `vpc snapshots`: the `InstanceService` and
//! `VolumeService`.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use tonic::Code;
use vpc_proto::v1::{
    self as pb, instance_service_client::InstanceServiceClient,
    volume_service_client::VolumeServiceClient,
};

use crate::{
    api::{
        Api, CliError, IdsArgs, PageArgs, Table, name_tag, need, paged, parse_tag, revision,
        show_done, show_list, show_one, tags_text,
    },
    output::{time_text, write_stdout},
};

/// `--wait`: block until the change is done, with a progress line on a terminal.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct WaitFlag {
    /// Wait until the change is done: instances running (run, start), stopped, terminated;
    /// volumes available (create, detach) or attached (attach). Fails at once when it cannot
    /// happen any more (a failed launch, a volume in error), as the `wait` commands.
    #[arg(long)]
    wait: bool,
    /// Seconds --wait waits at most.
    #[arg(long, default_value_t = 120, requires = "wait")]
    wait_timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum InstancesCommand {
    /// Launch instances in a subnet (placed on a host, given an address and a MAC).
    Run {
        /// The subnet.
        #[arg(long, visible_alias = "subnet-id")]
        subnet: String,
        /// How many (1-100).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Security group (repeatable, up to 5; none: the VPC's default group).
        #[arg(long = "security-group", visible_alias = "security-group-id")]
        security_groups: Vec<String>,
        /// A free address of the subnet (only with --count 1).
        #[arg(long, visible_alias = "private-ip-address")]
        private_ip: Option<String>,
        /// Place on this host (default: the host with fewest instances).
        #[arg(long, visible_alias = "host-id")]
        host: Option<String>,
        /// Instance type (default t3.micro).
        #[arg(long)]
        instance_type: Option<String>,
        /// User data (up to 16 KiB), served at /latest/user-data; a script (`#!...`) runs
        /// once, at the first start. `file://PATH` reads it from a file.
        #[arg(long, value_name = "TEXT", value_parser = parse_user_data)]
        user_data: Option<UserData>,
        /// Read the user data from this file.
        #[arg(
            long,
            value_name = "PATH",
            value_parser = read_user_data,
            conflicts_with = "user_data"
        )]
        user_data_file: Option<UserData>,
        /// Command run with /bin/sh -c at every start (up to 4 KiB); see `instances console`.
        #[arg(long, value_name = "CMD")]
        command: Option<String>,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// List instances (all, the ids given, or those of --subnet).
    #[command(visible_alias = "ls")]
    List(InstanceListArgs),
    /// Show instances in detail.
    Describe(InstanceListArgs),
    /// Stop instances (they keep their address, MAC, root filesystem and volumes).
    Stop {
        /// The instances.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Start stopped instances.
    Start {
        /// The instances.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Terminate instances (their addresses are released, target groups drop them).
    #[command(visible_alias = "rm")]
    Terminate {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Print an instance's console output, raw.
    ///
    /// The stdout and stderr of its command and user data script: the last 64 KiB its host
    /// reported. With `-o json`: `{instanceId, output (base64), timestampMs}`.
    #[command(visible_alias = "console-output")]
    Console { id: String },
    /// Run a command inside a running instance, as `docker exec` / `kubectl exec`.
    ///
    /// The command runs with /bin/sh -c in all of the instance's namespaces (mount, PID, UTS,
    /// IPC, network), started by its host's agent. Its stdout and stderr are printed and
    /// `vpc` exits with its exit status (124 when it timed out). With `-o json`:
    /// `{exitCode, stdout, stderr (base64), timedOut}`.
    Exec {
        /// The instance.
        id: String,
        /// Seconds before the command is killed (1-600).
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        /// Pass this process's standard input to the command (at most 1 MiB).
        #[arg(short = 'i', long)]
        stdin: bool,
        /// The command, after `--` (its words are joined with spaces for /bin/sh -c).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Wait until instances reach a state.
    ///
    /// Polls every 100 ms; prints the instances once all are in the state. Fails (exit 1) at
    /// once when one cannot reach it any more, as the aws CLI's waiters: running fails on
    /// stopping, shutting-down and terminated (a failed launch is terminated, with its
    /// reason); stopped fails on shutting-down and terminated.
    Wait {
        /// The instances.
        #[arg(required = true)]
        ids: Vec<String>,
        /// The state to wait for.
        #[arg(long)]
        state: InstanceWaitState,
        #[command(flatten)]
        timeout: TimeoutArgs,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct InstanceListArgs {
    /// Only these (an unknown id is NOT_FOUND).
    ids: Vec<String>,
    /// Only instances of this subnet.
    #[arg(long, visible_alias = "subnet-id")]
    subnet: Option<String>,
    #[command(flatten)]
    page: PageArgs,
}

/// `--timeout` of the wait commands.
#[derive(clap::Args, Debug, Clone)]
pub struct TimeoutArgs {
    /// Give up after this many seconds (exit 1).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
}

/// The states `vpc instances wait` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InstanceWaitState {
    Running,
    Stopped,
    Terminated,
}

/// The states `vpc volumes wait` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VolumeWaitState {
    /// Created, or detached.
    Available,
    /// Attached (the attachment is in place on the host).
    InUse,
    /// Gone.
    Deleted,
}

/// The states `vpc snapshots wait` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SnapshotWaitState {
    Completed,
    /// Gone.
    Deleted,
}

/// User data bytes (a newtype: clap would take a `Vec<u8>` for repeated values).
#[derive(Clone, Debug)]
pub struct UserData(Vec<u8>);

/// `--user-data`: the text itself, or `file://PATH` (`fileb://PATH`) as the aws CLI takes.
fn parse_user_data(s: &str) -> Result<UserData, String> {
    match s
        .strip_prefix("file://")
        .or_else(|| s.strip_prefix("fileb://"))
    {
        Some(path) => read_user_data(path),
        None => Ok(UserData(s.as_bytes().to_vec())),
    }
}

/// `--user-data-file`: the file's bytes.
fn read_user_data(path: &str) -> Result<UserData, String> {
    std::fs::read(path)
        .map(UserData)
        .map_err(|e| format!("reading {path}: {e}"))
}

#[derive(Subcommand, Debug)]
pub enum VolumesCommand {
    /// Create a volume, empty or from a snapshot.
    Create {
        /// Size in GiB (1-16384; with --snapshot, default and minimum: the snapshot's).
        #[arg(long, required_unless_present = "snapshot")]
        size: Option<u32>,
        /// Create it on this host (default: the host with fewest volumes); only instances of
        /// that host can attach it.
        #[arg(long, visible_alias = "host-id")]
        host: Option<String>,
        /// Restore this snapshot into it.
        #[arg(long, visible_alias = "snapshot-id")]
        snapshot: Option<String>,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List volumes (all, or the ids given).
    #[command(visible_alias = "ls")]
    List(IdsArgs),
    /// Show volumes in detail.
    Describe(IdsArgs),
    /// Attach a volume to an instance of its host, as /dev/DEVICE (and mounted with
    /// --mount-path).
    Attach {
        /// The volume.
        id: String,
        /// The instance.
        #[arg(long, visible_alias = "instance-id")]
        instance: String,
        /// Device name: xvdf or /dev/xvdf.
        #[arg(long)]
        device: String,
        /// Mount its ext4 filesystem (made on first use) at this absolute path in the
        /// instance.
        #[arg(long)]
        mount_path: Option<String>,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Detach a volume from its instance (the data stays on the volume).
    Detach {
        /// The volume.
        id: String,
    },
    /// Delete a volume (refused while attached).
    #[command(visible_alias = "rm")]
    Delete { id: String },
    /// Wait until volumes reach a state.
    ///
    /// Polls every 100 ms; prints the volumes once all are in the state (`deleted`: gone).
    /// Fails (exit 1) at once on the error state, a deletion, or an attachment its host
    /// reports it cannot make.
    Wait {
        /// The volumes.
        #[arg(required = true)]
        ids: Vec<String>,
        /// The state to wait for (in-use: attached on the host).
        #[arg(long)]
        state: VolumeWaitState,
        #[command(flatten)]
        timeout: TimeoutArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotsCommand {
    /// Snapshot a volume (a point-in-time copy in the snapshot store).
    Create {
        /// The volume.
        #[arg(long, visible_alias = "volume-id")]
        volume: String,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<pb::Tag>,
        /// Idempotency token.
        #[arg(long)]
        client_token: Option<String>,
    },
    /// List snapshots (all, or the ids given).
    #[command(visible_alias = "ls")]
    List(IdsArgs),
    /// Show snapshots in detail.
    Describe(IdsArgs),
    /// Delete a snapshot (refused while a volume is being created from it).
    #[command(visible_alias = "rm")]
    Delete { id: String },
    /// Wait until snapshots reach a state.
    ///
    /// Polls every 100 ms; prints the snapshots once all are in the state (`deleted`: gone).
    /// Fails (exit 1) at once on the error state or a deletion.
    Wait {
        /// The snapshots.
        #[arg(required = true)]
        ids: Vec<String>,
        /// The state to wait for.
        #[arg(long)]
        state: SnapshotWaitState,
        #[command(flatten)]
        timeout: TimeoutArgs,
    },
}

fn instance_table(items: &[pb::Instance]) -> Table {
    let mut t = Table::new(&[
        "INSTANCE ID",
        "TYPE",
        "SUBNET ID",
        "PRIVATE IP",
        "HOST",
        "STATE",
        "NAME",
    ])
    .wide(&[
        "MAC",
        "VCPUS",
        "MEMORY (MiB)",
        "SECURITY GROUPS",
        "LAUNCHED",
        "REASON",
        "TAGS",
    ]);
    for i in items {
        t.row(vec![
            i.instance_id.clone(),
            i.instance_type.clone(),
            i.subnet_id.clone(),
            i.private_ip_address.clone(),
            i.host_id.clone(),
            i.state.clone(),
            name_tag(&i.tags),
            i.mac_address.clone(),
            i.vcpus.to_string(),
            i.memory_mib.to_string(),
            i.security_group_ids.join(","),
            time_text(i.launch_time_ms),
            i.state_reason.clone(),
            tags_text(&i.tags),
        ]);
    }
    t
}

fn volume_table(items: &[pb::Volume]) -> Table {
    let mut t = Table::new(&[
        "VOLUME ID",
        "SIZE (GiB)",
        "HOST",
        "STATE",
        "ATTACHED TO",
        "DEVICE",
        "ATTACHMENT",
        "NAME",
    ])
    .wide(&["SNAPSHOT", "MOUNT PATH", "CREATED", "REASON", "TAGS"]);
    for v in items {
        t.row(vec![
            v.volume_id.clone(),
            v.size_gib.to_string(),
            v.host_id.clone(),
            v.state.clone(),
            v.attached_instance_id.clone(),
            v.device.clone(),
            v.attachment_state.clone(),
            name_tag(&v.tags),
            v.snapshot_id.clone(),
            v.mount_path.clone(),
            time_text(v.create_time_ms),
            v.state_reason.clone(),
            tags_text(&v.tags),
        ]);
    }
    t
}

fn snapshot_table(items: &[pb::Snapshot]) -> Table {
    let mut t = Table::new(&[
        "SNAPSHOT ID",
        "VOLUME ID",
        "SIZE (GiB)",
        "STATE",
        "DESCRIPTION",
        "NAME",
    ])
    .wide(&["STARTED", "REASON", "TAGS"]);
    for s in items {
        t.row(vec![
            s.snapshot_id.clone(),
            s.volume_id.clone(),
            s.volume_size_gib.to_string(),
            s.state.clone(),
            s.description.clone(),
            name_tag(&s.tags),
            time_text(s.start_time_ms),
            s.state_reason.clone(),
            tags_text(&s.tags),
        ]);
    }
    t
}

pub async fn instances(api: &Api, cmd: InstancesCommand) -> Result<(), CliError> {
    let mut c = InstanceServiceClient::new(api.channel.clone());
    match cmd {
        InstancesCommand::Run {
            subnet,
            count,
            security_groups,
            private_ip,
            host,
            instance_type,
            user_data,
            user_data_file,
            command,
            tags,
            client_token,
            wait,
        } => {
            let r = c
                .run_instances(pb::RunInstancesRequest {
                    subnet_id: subnet,
                    security_group_ids: security_groups,
                    private_ip_address: private_ip.unwrap_or_default(),
                    host_id: host.unwrap_or_default(),
                    instance_type: instance_type.unwrap_or_default(),
                    count,
                    tags,
                    client_token: client_token.unwrap_or_default(),
                    user_data: user_data
                        .or(user_data_file)
                        .map(|u| u.0)
                        .unwrap_or_default(),
                    command: command.unwrap_or_default(),
                })
                .await?;
            let items = r.into_inner().instances;
            finish(api, &c, items, wait, InstanceWaitState::Running).await?;
        }
        InstancesCommand::List(a) => list_instances(api, a, false).await?,
        InstancesCommand::Describe(a) => list_instances(api, a, true).await?,
        InstancesCommand::Stop { ids, wait } => {
            let r = c
                .stop_instances(pb::StopInstancesRequest { instance_ids: ids })
                .await?;
            let items = r.into_inner().instances;
            finish(api, &c, items, wait, InstanceWaitState::Stopped).await?;
        }
        InstancesCommand::Start { ids, wait } => {
            let r = c
                .start_instances(pb::StartInstancesRequest { instance_ids: ids })
                .await?;
            let items = r.into_inner().instances;
            finish(api, &c, items, wait, InstanceWaitState::Running).await?;
        }
        InstancesCommand::Terminate { ids, wait } => {
            let r = c
                .terminate_instances(pb::TerminateInstancesRequest { instance_ids: ids })
                .await?;
            let items = r.into_inner().instances;
            finish(api, &c, items, wait, InstanceWaitState::Terminated).await?;
        }
        InstancesCommand::Console { id } => {
            let r = c
                .get_console_output(pb::GetConsoleOutputRequest { instance_id: id })
                .await?
                .into_inner();
            let raw = || {
                if r.output.is_empty() {
                    eprintln!("(no console output from {} yet)", r.instance_id);
                } else {
                    write_stdout(&r.output);
                }
            };
            // `vpc instances console i-... | grep` must see the bytes.
            api.emit_raw(
                || {
                    json!({
                        "instanceId": r.instance_id,
                        "output": base64(&r.output),
                        "timestampMs": r.timestamp_ms,
                    })
                },
                raw,
            );
        }
        InstancesCommand::Exec {
            id,
            timeout,
            stdin,
            command,
        } => {
            let input = if stdin {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                    .map_err(|e| CliError::Local(anyhow::anyhow!("reading standard input: {e}")))?;
                buf
            } else {
                Vec::new()
            };
            let r = c
                .exec_instance(pb::ExecInstanceRequest {
                    instance_id: id,
                    command: command.join(" "),
                    timeout_seconds: timeout,
                    stdin: input,
                })
                .await?
                .into_inner();
            let raw = || {
                write_stdout(&r.stdout);
                use std::io::Write as _;
                let _ = std::io::stderr().write_all(&r.stderr);
                if r.timed_out {
                    eprintln!("error: the command was killed after {timeout} s");
                }
            };
            api.emit_raw(
                || {
                    json!({
                        "exitCode": r.exit_code,
                        "stdout": base64(&r.stdout),
                        "stderr": base64(&r.stderr),
                        "timedOut": r.timed_out,
                    })
                },
                raw,
            );
            let code = if r.timed_out {
                124
            } else {
                r.exit_code.clamp(0, 255)
            };
            std::process::exit(code);
        }
        InstancesCommand::Wait {
            ids,
            state,
            timeout,
        } => {
            let items = wait_instances(&c, &ids, state, timeout.timeout).await?;
            show_list(api, "instances", &items, false, instance_table);
        }
    }
    Ok(())
}

/// Shows the instances a change returned, or with `--wait` waits until they reach `state`
/// and shows them then.
async fn finish(
    api: &Api,
    c: &InstanceServiceClient<crate::api::Authed>,
    items: Vec<pb::Instance>,
    wait: WaitFlag,
    state: InstanceWaitState,
) -> Result<(), CliError> {
    let items = if wait.wait {
        let ids: Vec<String> = items.iter().map(|i| i.instance_id.clone()).collect();
        wait_instances(c, &ids, state, wait.wait_timeout).await?
    } else {
        items
    };
    show_list(api, "instances", &items, false, instance_table);
    Ok(())
}

/// Waits until every instance of `ids` is in `state`; returns them.
async fn wait_instances(
    c: &InstanceServiceClient<crate::api::Authed>,
    ids: &[String],
    state: InstanceWaitState,
    timeout: u64,
) -> Result<Vec<pb::Instance>, CliError> {
    let want = state
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned());
    let done = wait_for("instance", &want, ids, timeout, |id| {
        let mut c = c.clone();
        async move {
            let r = c
                .describe_instances(pb::DescribeInstancesRequest {
                    instance_ids: vec![id.clone()],
                    ..Default::default()
                })
                .await?;
            let i = need(r.into_inner().instances.pop(), "instance")?;
            Ok(instance_poll(i, state))
        }
    })
    .await?;
    Ok(done.into_iter().flatten().collect())
}

/// Where an instance stands for `instances wait --state want`: AWS's waiters fail on the
/// states the instance cannot leave for `want` (instance-running on shutting-down,
/// terminated, stopping; instance-stopped on shutting-down, terminated).
fn instance_poll(i: pb::Instance, want: InstanceWaitState) -> Poll<pb::Instance> {
    use InstanceWaitState::*;
    let reached = matches!(
        (want, i.state.as_str()),
        (Running, "running") | (Stopped, "stopped") | (Terminated, "terminated")
    );
    let hopeless = matches!(
        (want, i.state.as_str()),
        (Running, "shutting-down" | "terminated" | "stopping")
            | (Stopped, "shutting-down" | "terminated")
    );
    if reached {
        Poll::Done(Some(i))
    } else if hopeless {
        Poll::Failed(format!("is {}{}", i.state, reason(&i.state_reason)))
    } else {
        Poll::Waiting(i.state)
    }
}

/// ` (why)`, or nothing.
fn reason(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    }
}

async fn list_instances(api: &Api, a: InstanceListArgs, describe: bool) -> Result<(), CliError> {
    let c = InstanceServiceClient::new(api.channel.clone());
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let (instance_ids, subnet_id) = (a.ids.clone(), a.subnet.clone().unwrap_or_default());
        async move {
            let r = c
                .describe_instances(pb::DescribeInstancesRequest {
                    instance_ids,
                    subnet_id,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.instances, r.next_token))
        }
    })
    .await?;
    show_list(api, "instances", &items, describe, instance_table);
    Ok(())
}

pub async fn volumes(api: &Api, cmd: VolumesCommand) -> Result<(), CliError> {
    let mut c = VolumeServiceClient::new(api.channel.clone());
    match cmd {
        VolumesCommand::Create {
            size,
            host,
            snapshot,
            tags,
            client_token,
        } => {
            let r = c
                .create_volume(pb::CreateVolumeRequest {
                    size_gib: size.unwrap_or(0),
                    tags,
                    client_token: client_token.unwrap_or_default(),
                    host_id: host.unwrap_or_default(),
                    snapshot_id: snapshot.unwrap_or_default(),
                })
                .await?;
            let v = need(r.into_inner().volume, "volume")?;
            show_one(api, "volume", &v, volume_table);
        }
        VolumesCommand::List(a) => list_volumes(api, a, false).await?,
        VolumesCommand::Describe(a) => list_volumes(api, a, true).await?,
        VolumesCommand::Attach {
            id,
            instance,
            device,
            mount_path,
            wait,
        } => {
            let r = c
                .attach_volume(pb::AttachVolumeRequest {
                    volume_id: id,
                    instance_id: instance,
                    device,
                    mount_path: mount_path.unwrap_or_default(),
                })
                .await?;
            let v = need(r.into_inner().volume, "volume")?;
            finish_volume(api, &c, v, wait, VolumeWaitState::InUse).await?;
        }
        VolumesCommand::Detach { id } => {
            let r = c
                .detach_volume(pb::DetachVolumeRequest { volume_id: id })
                .await?;
            let v = need(r.into_inner().volume, "volume")?;
            show_one(api, "volume", &v, volume_table);
        }
        VolumesCommand::Delete { id } => {
            let r = c
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id.clone(),
                })
                .await?;
            show_done(api, &id, "deleted", revision(&r));
        }
        VolumesCommand::Wait {
            ids,
            state,
            timeout,
        } => {
            let items = wait_volumes(&c, &ids, state, timeout.timeout).await?;
            if state == VolumeWaitState::Deleted {
                show_deleted(api, &ids);
            } else {
                show_list(api, "volumes", &items, false, volume_table);
            }
        }
    }
    Ok(())
}

/// Where a volume stands for `volumes wait --state want`. An `error` state, a stuck
/// attachment (attaching, with a reason) or a deletion fail at once.
/// Waits until every volume of `ids` is in `state`; returns them (none for `deleted`).
async fn wait_volumes(
    c: &VolumeServiceClient<crate::api::Authed>,
    ids: &[String],
    state: VolumeWaitState,
    timeout: u64,
) -> Result<Vec<pb::Volume>, CliError> {
    let want = state
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned());
    let done = wait_for("volume", &want, ids, timeout, |id| {
        let mut c = c.clone();
        async move {
            let r = c
                .describe_volumes(pb::DescribeVolumesRequest {
                    volume_ids: vec![id],
                    ..Default::default()
                })
                .await;
            match r {
                Err(s) if s.code() == Code::NotFound && state == VolumeWaitState::Deleted => {
                    Ok(Poll::Done(None))
                }
                Err(s) => Err(s.into()),
                Ok(r) => Ok(volume_poll(
                    need(r.into_inner().volumes.pop(), "volume")?,
                    state,
                )),
            }
        }
    })
    .await?;
    Ok(done.into_iter().flatten().collect())
}

/// Shows a volume a change returned, or with `--wait` waits until it is in `state`.
async fn finish_volume(
    api: &Api,
    c: &VolumeServiceClient<crate::api::Authed>,
    v: pb::Volume,
    wait: WaitFlag,
    state: VolumeWaitState,
) -> Result<(), CliError> {
    let v = if wait.wait {
        let ids = [v.volume_id.clone()];
        wait_volumes(c, &ids, state, wait.wait_timeout)
            .await?
            .pop()
            .unwrap_or(v)
    } else {
        v
    };
    show_one(api, "volume", &v, volume_table);
    Ok(())
}

fn volume_poll(v: pb::Volume, want: VolumeWaitState) -> Poll<pb::Volume> {
    use VolumeWaitState::*;
    let reached = match want {
        Available => v.state == "available",
        InUse => v.state == "in-use" && v.attachment_state == "attached",
        Deleted => false,
    };
    if reached {
        return Poll::Done(Some(v));
    }
    let failed = match want {
        Available | InUse => {
            v.state == "error"
                || v.state == "deleting"
                || (want == InUse
                    && v.attachment_state == "attaching"
                    && !v.state_reason.is_empty())
        }
        Deleted => false,
    };
    let state = if v.attachment_state.is_empty() {
        v.state
    } else {
        format!("{} ({})", v.state, v.attachment_state)
    };
    if failed {
        Poll::Failed(format!("is {state}{}", reason(&v.state_reason)))
    } else {
        Poll::Waiting(state)
    }
}

async fn list_volumes(api: &Api, a: IdsArgs, describe: bool) -> Result<(), CliError> {
    let c = VolumeServiceClient::new(api.channel.clone());
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let volume_ids = a.ids.clone();
        async move {
            let r = c
                .describe_volumes(pb::DescribeVolumesRequest {
                    volume_ids,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.volumes, r.next_token))
        }
    })
    .await?;
    show_list(api, "volumes", &items, describe, volume_table);
    Ok(())
}

pub async fn snapshots(api: &Api, cmd: SnapshotsCommand) -> Result<(), CliError> {
    let mut c = VolumeServiceClient::new(api.channel.clone());
    match cmd {
        SnapshotsCommand::Create {
            volume,
            description,
            tags,
            client_token,
        } => {
            let r = c
                .create_snapshot(pb::CreateSnapshotRequest {
                    volume_id: volume,
                    description: description.unwrap_or_default(),
                    tags,
                    client_token: client_token.unwrap_or_default(),
                })
                .await?;
            let s = need(r.into_inner().snapshot, "snapshot")?;
            show_one(api, "snapshot", &s, snapshot_table);
        }
        SnapshotsCommand::List(a) => list_snapshots(api, a, false).await?,
        SnapshotsCommand::Describe(a) => list_snapshots(api, a, true).await?,
        SnapshotsCommand::Delete { id } => {
            let r = c
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                })
                .await?;
            show_done(api, &id, "deleted", revision(&r));
        }
        SnapshotsCommand::Wait {
            ids,
            state,
            timeout,
        } => {
            let want = state
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().to_owned());
            let done = wait_for("snapshot", &want, &ids, timeout.timeout, |id| {
                let mut c = c.clone();
                async move {
                    let r = c
                        .describe_snapshots(pb::DescribeSnapshotsRequest {
                            snapshot_ids: vec![id],
                            ..Default::default()
                        })
                        .await;
                    let s = match r {
                        Err(s)
                            if s.code() == Code::NotFound
                                && state == SnapshotWaitState::Deleted =>
                        {
                            return Ok(Poll::Done(None));
                        }
                        Err(s) => return Err(s.into()),
                        Ok(r) => need(r.into_inner().snapshots.pop(), "snapshot")?,
                    };
                    Ok(match (state, s.state.as_str()) {
                        (SnapshotWaitState::Completed, "completed") => Poll::Done(Some(s)),
                        (SnapshotWaitState::Completed, "error" | "deleting") => {
                            Poll::Failed(format!("is {}{}", s.state, reason(&s.state_reason)))
                        }
                        _ => Poll::Waiting(s.state),
                    })
                }
            })
            .await?;
            let items: Vec<_> = done.iter().flatten().cloned().collect();
            if state == SnapshotWaitState::Deleted {
                show_deleted(api, &ids);
            } else {
                show_list(api, "snapshots", &items, false, snapshot_table);
            }
        }
    }
    Ok(())
}

async fn list_snapshots(api: &Api, a: IdsArgs, describe: bool) -> Result<(), CliError> {
    let c = VolumeServiceClient::new(api.channel.clone());
    let items = paged(&a.page, |page| {
        let mut c = c.clone();
        let snapshot_ids = a.ids.clone();
        async move {
            let r = c
                .describe_snapshots(pb::DescribeSnapshotsRequest {
                    snapshot_ids,
                    page: Some(page),
                })
                .await?
                .into_inner();
            Ok((r.snapshots, r.next_token))
        }
    })
    .await?;
    show_list(api, "snapshots", &items, describe, snapshot_table);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Waiting.

/// What one look at a resource found.
#[derive(Debug)]
enum Poll<T> {
    /// In the state waited for (`None`: gone, when waiting for its deletion).
    Done(Option<T>),
    /// Not yet; its state now.
    Waiting(String),
    /// It cannot reach the state any more: why (`is terminated (...)`).
    Failed(String),
}

/// Polls every id (`poll`) every 100 ms until each is [`Poll::Done`]; returns what the last
/// polls found, in the order of `ids` (duplicates dropped). A [`Poll::Failed`] or an error
/// ends it at once; so does `timeout_secs` passing (an error naming the ids still waited
/// for and their states). Both exit 1, as the aws CLI's waiters fail.
async fn wait_for<T, F, Fut>(
    what: &str,
    want: &str,
    ids: &[String],
    timeout_secs: u64,
    mut poll: F,
) -> Result<Vec<Option<T>>, CliError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Poll<T>, CliError>>,
{
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let mut ids: Vec<&String> = ids.iter().collect();
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    let mut found: Vec<Option<Option<T>>> = ids.iter().map(|_| None).collect();
    let mut states: Vec<String> = vec![String::new(); ids.len()];
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let spinner = ['|', '/', '-', '\\'];
    let mut tick = 0usize;
    let clear = |on: bool| {
        if on {
            eprint!("\r\x1b[2K");
        }
    };
    loop {
        for (i, id) in ids.iter().enumerate() {
            if found[i].is_some() {
                continue;
            }
            match poll((*id).clone()).await? {
                Poll::Done(v) => found[i] = Some(v),
                Poll::Waiting(s) => states[i] = s,
                Poll::Failed(why) => {
                    clear(progress);
                    return Err(CliError::Local(anyhow!(
                        "{what} {id} {why}: it will not be {want}"
                    )));
                }
            }
        }
        if found.iter().all(Option::is_some) {
            clear(progress);
            return Ok(found.into_iter().flatten().collect());
        }
        if progress {
            let ready = found.iter().filter(|f| f.is_some()).count();
            let now: Vec<&str> = states
                .iter()
                .map(String::as_str)
                .filter(|s| !s.is_empty())
                .collect();
            eprint!(
                "\r\x1b[2K{} waiting for {what}s to be {want}: {ready}/{} ({}) {:.0}s",
                spinner[tick % spinner.len()],
                ids.len(),
                now.join(", "),
                started.elapsed().as_secs_f64()
            );
            tick += 1;
        }
        if Instant::now() >= deadline {
            clear(progress);
            let pending = ids
                .iter()
                .zip(&found)
                .zip(&states)
                .filter(|((_, f), _)| f.is_none())
                .map(|((id, _), s)| format!("{id} ({s})"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(CliError::Local(anyhow!(
                "timed out after {timeout_secs}s waiting for {what}s to be {want}: {pending}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `<id> deleted` for each (table), or `{}` (JSON) after a wait for deletion.
fn show_deleted(api: &Api, ids: &[String]) {
    api.emit(
        || json!({}),
        |_| {
            let lines: String = ids.iter().map(|id| format!("{id} deleted\n")).collect();
            write_stdout(lines.as_bytes());
        },
    );
}

/// Standard base64 with padding (proto3 JSON's encoding of `bytes`).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_encodes() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"hello\n\xff"), "aGVsbG8K/w==");
    }

    #[test]
    fn user_data_text_or_file() {
        assert_eq!(
            parse_user_data("#!/bin/sh\necho hi").unwrap().0,
            b"#!/bin/sh\necho hi"
        );
        let path = std::env::temp_dir().join(format!("vpc-cli-ud-{}", std::process::id()));
        std::fs::write(&path, b"\x00bytes").unwrap();
        let p = path.display().to_string();
        assert_eq!(
            parse_user_data(&format!("file://{p}")).unwrap().0,
            b"\x00bytes"
        );
        assert_eq!(
            parse_user_data(&format!("fileb://{p}")).unwrap().0,
            b"\x00bytes"
        );
        assert_eq!(read_user_data(&p).unwrap().0, b"\x00bytes");
        std::fs::remove_file(&path).unwrap();
        assert!(
            parse_user_data("file:///nonexistent/x")
                .unwrap_err()
                .contains("/nonexistent/x")
        );
    }

    fn inst(state: &str, why: &str) -> pb::Instance {
        pb::Instance {
            instance_id: "i-1".into(),
            state: state.into(),
            state_reason: why.into(),
            ..Default::default()
        }
    }

    #[test]
    fn instance_waits() {
        use InstanceWaitState::*;
        assert!(matches!(
            instance_poll(inst("running", ""), Running),
            Poll::Done(Some(_))
        ));
        assert!(
            matches!(instance_poll(inst("pending", ""), Running), Poll::Waiting(s) if s == "pending")
        );
        let Poll::Failed(why) =
            instance_poll(inst("terminated", "Server.LaunchFailed: nope"), Running)
        else {
            panic!()
        };
        assert_eq!(why, "is terminated (Server.LaunchFailed: nope)");
        assert!(matches!(
            instance_poll(inst("pending", ""), Stopped),
            Poll::Waiting(_)
        ));
        assert!(matches!(
            instance_poll(inst("terminated", ""), Stopped),
            Poll::Failed(_)
        ));
        assert!(matches!(
            instance_poll(inst("running", ""), Terminated),
            Poll::Waiting(_)
        ));
        assert!(matches!(
            instance_poll(inst("terminated", ""), Terminated),
            Poll::Done(_)
        ));
    }

    #[test]
    fn volume_waits() {
        use VolumeWaitState::*;
        let vol = |state: &str, att: &str, why: &str| pb::Volume {
            state: state.into(),
            attachment_state: att.into(),
            state_reason: why.into(),
            ..Default::default()
        };
        assert!(matches!(
            volume_poll(vol("available", "", ""), Available),
            Poll::Done(_)
        ));
        assert!(matches!(
            volume_poll(vol("creating", "", ""), Available),
            Poll::Waiting(_)
        ));
        assert!(
            matches!(volume_poll(vol("error", "", "disk full"), Available), Poll::Failed(w) if w.contains("disk full"))
        );
        assert!(
            matches!(volume_poll(vol("in-use", "attaching", ""), InUse), Poll::Waiting(s) if s == "in-use (attaching)")
        );
        assert!(matches!(
            volume_poll(vol("in-use", "attaching", "no such instance"), InUse),
            Poll::Failed(_)
        ));
        assert!(matches!(
            volume_poll(vol("in-use", "attached", ""), InUse),
            Poll::Done(_)
        ));
        assert!(matches!(
            volume_poll(vol("in-use", "detaching", ""), Available),
            Poll::Waiting(_)
        ));
        assert!(matches!(
            volume_poll(vol("available", "", ""), Deleted),
            Poll::Waiting(_)
        ));
    }

    #[tokio::test]
    async fn waits_time_out_and_fail_fast() {
        let ids = vec!["a".to_owned(), "b".to_owned(), "a".to_owned()];
        let e = wait_for("instance", "running", &ids, 0, |id| async move {
            Ok(if id == "a" {
                Poll::Done(Some(1))
            } else {
                Poll::Waiting("pending".into())
            })
        })
        .await
        .unwrap_err();
        assert_eq!(
            e.render("u"),
            "error: timed out after 0s waiting for instances to be running: b (pending)\n"
        );
        assert_eq!(e.exit_code(), 1);
        let e = wait_for("instance", "running", &ids, 5, |_| async move {
            Ok(Poll::<u8>::Failed("is terminated (why)".into()))
        })
        .await
        .unwrap_err();
        assert_eq!(
            e.render("u"),
            "error: instance a is terminated (why): it will not be running\n"
        );
        let mut n = 0;
        let got = wait_for("volume", "available", &ids, 5, |_| {
            n += 1;
            let k = n;
            async move {
                Ok(if k > 3 {
                    Poll::Done(Some(k))
                } else {
                    Poll::Waiting("creating".into())
                })
            }
        })
        .await
        .unwrap();
        // Polls: a, b, a, b (4: done), a (5: done); in the order of the ids.
        assert_eq!(got, vec![Some(5), Some(4)]);
    }
}
