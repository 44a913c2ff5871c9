//! `vpc apply -f`, `vpc diff -f`, `vpc delete -f`: declarative manifests (kubectl style).
//!
//! A manifest file is YAML (a stream of `---` documents, or a list) or JSON (an object or a
//! list) of resources:
//!
//! ```yaml
//! kind: Subnet          # Vpc, Subnet, SecurityGroup, NetworkAcl, Instance, Volume,
//!                       # TargetGroup, LoadBalancer
//! name: public          # the identity: the object's `Name` tag, unique per kind in the account
//! tags: { env: prod }   # optional, besides Name and vpc:managed-by=apply
//! spec: { vpc: two-tier, cidrBlock: 10.0.1.0/24 }   # references by name
//! ```
//!
//! apply creates what is missing (in dependency order, with client tokens derived from the
//! kind, name, spec and parents), converges what can change in place (security group rules,
//! network ACL entries and subnet associations, target group targets and settings,
//! listeners, tags) and refuses to touch a resource whose
//! immutable fields differ. diff shows what apply would do (exit 0: nothing, 1: changes, 2:
//! errors). delete removes the file's resources in reverse order, waiting for instances to
//! terminate (a network ACL's subnets go back to their VPC's default ACL first).
//!
//! `model` parses and checks files, `plan` compares desired and current (pure), `exec`
//! makes the API calls.

mod exec;
mod model;
mod plan;
#[cfg(test)]
mod tests;

use std::{io::Read as _, io::Write as _, time::Duration};

use serde_json::{Value, json};

use crate::api::{Api, CliError, name_tag};
use exec::Clients;
use model::{Kind, Problem, Resource, check_duplicates, creation_order, parse_file};
use plan::{Action, Current, check_refs, plan};

/// The tag apply puts on what it creates.
pub const MANAGED_BY: &str = "vpc:managed-by";

/// The files of apply, diff and delete.
#[derive(clap::Args, Debug, Clone)]
pub struct FileArgs {
    /// Manifest file: YAML (`---` documents or a list) or JSON; `-` reads stdin. Repeatable.
    #[arg(short = 'f', long = "filename", required = true, value_name = "FILE")]
    pub files: Vec<String>,
    /// delete: seconds to wait for instances to terminate.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub timeout: u64,
}

/// Reads and checks the files: every problem found, as one usage error (exit 2).
fn load(files: &[String]) -> Result<Vec<Resource>, CliError> {
    let mut all = Vec::new();
    let mut problems = Vec::new();
    for f in files {
        let (name, text) = if f == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CliError::Usage(format!("reading stdin: {e}")))?;
            ("stdin".to_owned(), s)
        } else {
            let text = std::fs::read_to_string(f)
                .map_err(|e| CliError::Usage(format!("reading {f}: {e}")))?;
            (f.clone(), text)
        };
        match parse_file(&name, &text) {
            Ok(rs) if rs.is_empty() => problems.push(Problem(format!("{name}: no resources"))),
            Ok(rs) => all.extend(rs),
            Err(ps) => problems.extend(ps),
        }
    }
    problems.extend(check_duplicates(&all));
    fail_on(problems)?;
    Ok(all)
}

/// The problems as one error whose lines each start with `error:`.
fn fail_on(problems: Vec<Problem>) -> Result<(), CliError> {
    if problems.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = problems.into_iter().map(|p| p.0).collect();
    Err(CliError::Usage(lines.join("\nerror: ")))
}

/// One output line: `<kind>/<name> <action>`, or a JSON object.
struct Row {
    kind: Kind,
    name: String,
    id: String,
    action: String,
    changes: Vec<String>,
}

/// kubectl's lines (`kind/name action`, or diff's `+ ~ =`), or with an asked-for format a
/// list of `{kind, name, id, action[, changes]}` (see [`Api::emit_raw`]).
fn show(api: &Api, rows: &[Row], diff: bool) {
    let text = || {
        let mut out = String::new();
        for r in rows {
            if diff {
                let sign = match r.action.as_str() {
                    "create" => "+",
                    "update" => "~",
                    "unchanged" => "=",
                    _ => "!",
                };
                out.push_str(&format!(
                    "{sign} {}/{} ({})\n",
                    r.kind.lower(),
                    r.name,
                    r.action
                ));
                for c in &r.changes {
                    out.push_str(&format!("    {c}\n"));
                }
            } else {
                out.push_str(&format!("{}/{} {}\n", r.kind.lower(), r.name, r.action));
            }
        }
        crate::output::write_stdout(out.as_bytes());
    };
    api.emit_raw(
        || {
            let v: Vec<Value> = rows
                .iter()
                .map(|r| {
                    let mut o = json!({
                        "kind": r.kind.title(),
                        "name": r.name,
                        "id": r.id,
                        "action": r.action,
                    });
                    if diff {
                        o["changes"] = json!(r.changes);
                    }
                    o
                })
                .collect();
            Value::Array(v)
        },
        text,
    );
}

async fn prepare(
    api: &Api,
    args: &FileArgs,
) -> Result<(Vec<Resource>, Clients, Current), CliError> {
    let all = load(&args.files)?;
    let mut c = Clients::new(api);
    let cur = exec::current(&mut c).await?;
    fail_on(check_refs(&all, &cur))?;
    Ok((all, c, cur))
}

fn immutable_problems(all: &[Resource], steps: &[plan::Step]) -> Vec<Problem> {
    let mut out = Vec::new();
    for s in steps {
        if let Action::Immutable(fields) = &s.action {
            for f in fields {
                let (field, msg) = f.split_once(": ").unwrap_or(("", f));
                out.push(all[s.index].problem(field, msg));
            }
        }
    }
    out
}

/// `vpc apply -f`.
pub async fn apply(api: &Api, args: FileArgs) -> Result<(), CliError> {
    let (all, mut c, mut cur) = prepare(api, &args).await?;
    let order = creation_order(&all);
    let first = plan(&all, &cur);
    let problems = immutable_problems(&all, &first);
    let mut rows: Vec<Row> = Vec::new();
    let mut created = vec![false; all.len()];
    // Creates, parents first.
    for &i in &order {
        if first[i].action == Action::Create {
            if let Err(e) = exec::create(&mut c, &all[i], &mut cur).await {
                show(api, &rows, false);
                return Err(e);
            }
            created[i] = true;
        }
    }
    // Then what changes in place (rules, targets, listeners, tags), everything existing.
    let second = plan(&all, &cur);
    for &i in &order {
        let r = &all[i];
        if matches!(first[i].action, Action::Immutable(_)) {
            continue;
        }
        let step = &second[i];
        let id = step.id.clone().unwrap_or_default();
        let mut action = if created[i] { "created" } else { "unchanged" };
        match &step.action {
            Action::Update(changes) => {
                for ch in changes {
                    if let Err(e) = exec::change(&mut c, r, &id, &ch.op).await {
                        show(api, &rows, false);
                        return Err(e);
                    }
                }
                if !created[i] {
                    action = "configured";
                }
            }
            Action::Immutable(_) | Action::Create => {
                // Created above; an immutable mismatch right after a create would be the
                // API normalizing a field differently.
            }
            Action::Unchanged => {}
        }
        rows.push(Row {
            kind: r.kind,
            name: r.name.clone(),
            id,
            action: action.into(),
            changes: Vec::new(),
        });
    }
    show(api, &rows, false);
    fail_on(problems)
}

/// `vpc diff -f`: exit 0 when apply would change nothing, 1 when it would, 2 on errors.
pub async fn diff(api: &Api, args: FileArgs) -> Result<(), CliError> {
    let (all, _c, cur) = prepare(api, &args).await?;
    let steps = plan(&all, &cur);
    let problems = immutable_problems(&all, &steps);
    let mut changed = false;
    let mut rows = Vec::new();
    for &i in &creation_order(&all) {
        let (r, s) = (&all[i], &steps[i]);
        let (action, changes) = match &s.action {
            Action::Create => ("create", Vec::new()),
            Action::Update(ch) => ("update", ch.iter().map(|c| c.text.clone()).collect()),
            Action::Unchanged => ("unchanged", Vec::new()),
            Action::Immutable(f) => ("immutable", f.clone()),
        };
        changed |= matches!(s.action, Action::Create | Action::Update(_));
        rows.push(Row {
            kind: r.kind,
            name: r.name.clone(),
            id: s.id.clone().unwrap_or_default(),
            action: action.into(),
            changes,
        });
    }
    show(api, &rows, true);
    fail_on(problems)?;
    if changed {
        let _ = std::io::stdout().flush();
        std::process::exit(1);
    }
    Ok(())
}

/// `vpc delete -f`: in reverse dependency order; instances are terminated and waited for.
pub async fn delete(api: &Api, args: FileArgs) -> Result<(), CliError> {
    let all = load(&args.files)?;
    let mut c = Clients::new(api);
    let cur = exec::current(&mut c).await?;
    let mut order = creation_order(&all);
    order.reverse();
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    // The ids of each resource (instances: every one not terminated, shutting-down ones
    // included, so they are waited for).
    let mut found: Vec<Vec<String>> = vec![Vec::new(); all.len()];
    for &i in &order {
        let r = &all[i];
        found[i] = if r.kind == Kind::Instance {
            cur.instances
                .iter()
                .filter(|x| x.state != "terminated" && name_tag(&x.tags) == r.name)
                .map(|x| x.instance_id.clone())
                .collect()
        } else {
            match cur.id(r.kind, &r.name) {
                Ok(id) => id.into_iter().collect(),
                Err(e) => {
                    problems.push(r.problem("name", &e));
                    Vec::new()
                }
            }
        };
    }
    fail_on(problems)?;
    let fail = |rows: &[Row], e: CliError| {
        show(api, rows, false);
        Err(e)
    };
    for rank in (0..=3u8).rev() {
        let here: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| all[i].kind.rank() == rank)
            .collect();
        // Security groups: first the rules between the groups going away.
        let peers: Vec<String> = here
            .iter()
            .filter(|&&i| all[i].kind == Kind::SecurityGroup)
            .flat_map(|&i| found[i].clone())
            .collect();
        for g in cur.groups.iter().filter(|g| peers.contains(&g.group_id)) {
            if let Err(s) = exec::revoke_refs(&mut c, g, &peers).await {
                return fail(&rows, s.into());
            }
        }
        let mut waiting = Vec::new();
        for &i in &here {
            let r = &all[i];
            if found[i].is_empty() {
                rows.push(Row {
                    kind: r.kind,
                    name: r.name.clone(),
                    id: String::new(),
                    action: "not found".into(),
                    changes: Vec::new(),
                });
                continue;
            }
            for id in &found[i] {
                let shutting = cur.instance(id).is_some_and(|x| x.state == "shutting-down");
                if !shutting && let Err(s) = exec::delete(&mut c, r.kind, id).await {
                    if s.code() == tonic::Code::NotFound {
                        continue;
                    }
                    return fail(&rows, exec::in_resource(r, s));
                }
            }
            if r.kind == Kind::Instance {
                waiting.push(i);
            } else {
                rows.push(Row {
                    kind: r.kind,
                    name: r.name.clone(),
                    id: found[i].join(","),
                    action: "deleted".into(),
                    changes: Vec::new(),
                });
            }
        }
        if !waiting.is_empty() {
            let ids: Vec<String> = waiting.iter().flat_map(|&i| found[i].clone()).collect();
            if let Err(e) =
                exec::wait_terminated(&mut c, &ids, Duration::from_secs(args.timeout)).await
            {
                return fail(&rows, e);
            }
            for i in waiting {
                rows.push(Row {
                    kind: all[i].kind,
                    name: all[i].name.clone(),
                    id: found[i].join(","),
                    action: "deleted".into(),
                    changes: Vec::new(),
                });
            }
        }
    }
    show(api, &rows, false);
    Ok(())
}
