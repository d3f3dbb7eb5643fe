//! One function per command: ask the cluster through the [`Session`], print through [`render`].

use crate::args::{Output, PlanArgs};
use crate::error::CliError;
use crate::members::resize;
use crate::progress::{Bar, PRINT_EVERY};
use crate::render;
use crate::session::{ContextFile, Session};
use indicatif::{ProgressBar, ProgressStyle};
use kvs_api::{ClusterStatus, RebalancePhase, WriteResponse};
use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

/// How often `status` asks again while a view change runs.
const POLL_EVERY: Duration = Duration::from_millis(250);

fn print_json(doc: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(doc).map_err(|e| CliError::Invalid(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn stdout_write(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush()).map_err(|e| CliError::Invalid(format!("cannot write: {e}")))
}

pub async fn get(session: &Session, output: Output, key: &str, context: &ContextFile) -> Result<(), CliError> {
    let saved = context.load()?;
    let (stored, after) = session
        .first_answer(|node| {
            let client = session.kv(&node, &saved);
            async move { client.get(key).await.map(|stored| (stored, client.context())) }
        })
        .await?;
    context.save(&after)?;
    let stored = stored.ok_or_else(|| CliError::NotFound(key.to_owned()))?;
    match output {
        Output::Json => print_json(&render::stored_json(key, &stored)),
        Output::Table => {
            stdout_write(&stored.value)?;
            // A person at a terminal gets the prompt on a line of its own; a script gets the bytes.
            if std::io::stdout().is_terminal() && !stored.value.ends_with(b"\n") {
                println!();
            }
            Ok(())
        }
    }
}

/// The value to put: the argument, or standard input for `-`.
fn value_of(arg: &str) -> Result<bytes::Bytes, CliError> {
    if arg != "-" {
        return Ok(bytes::Bytes::copy_from_slice(arg.as_bytes()));
    }
    let mut value = Vec::new();
    std::io::stdin()
        .read_to_end(&mut value)
        .map_err(|e| CliError::Invalid(format!("cannot read the value from standard input: {e}")))?;
    Ok(value.into())
}

pub async fn put(
    session: &Session,
    output: Output,
    key: &str,
    value: &str,
    context: &ContextFile,
) -> Result<(), CliError> {
    let value = value_of(value)?;
    let saved = context.load()?;
    let written = session
        .first_answer(|node| {
            let (client, value) = (session.kv(&node, &saved), value.clone());
            async move { client.put(key, value).await }
        })
        .await?;
    finish_write(output, "stored", key, &written, context)
}

pub async fn del(session: &Session, output: Output, key: &str, context: &ContextFile) -> Result<(), CliError> {
    let saved = context.load()?;
    let written = session
        .first_answer(|node| {
            let client = session.kv(&node, &saved);
            async move { client.delete(key).await }
        })
        .await?;
    finish_write(output, "deleted", key, &written, context)
}

fn finish_write(
    output: Output,
    verb: &str,
    key: &str,
    written: &WriteResponse,
    context: &ContextFile,
) -> Result<(), CliError> {
    context.save(&written.causal_context)?;
    match output {
        Output::Json => print_json(&render::written_json(key, written)),
        Output::Table => {
            println!("{}", render::written(verb, key, written));
            Ok(())
        }
    }
}

async fn fetch_status(session: &Session) -> Result<ClusterStatus, CliError> {
    let admin = session.admin();
    session
        .first_answer(|node| {
            let admin = admin.clone();
            async move { admin.status(&node).await }
        })
        .await
}

fn changing(s: &ClusterStatus) -> bool {
    s.pending_epoch.is_some() || s.rebalance.phase.in_progress()
}

pub async fn status(session: &Session, output: Output, no_wait: bool) -> Result<(), CliError> {
    let mut current = fetch_status(session).await?;
    if output == Output::Table && !no_wait && changing(&current) {
        current = follow_change(session, current).await?;
    }
    match output {
        Output::Json => print_json(&current),
        Output::Table => {
            println!("{}", render::status(&current));
            Ok(())
        }
    }
}

/// Shows a view change's progress until it ends (and any change that follows it at once): a bar
/// on a terminal, else a line on standard error when the phase changes and every few seconds.
async fn follow_change(session: &Session, mut current: ClusterStatus) -> Result<ClusterStatus, CliError> {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {human_pos}/{human_len} records ({elapsed})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let tty = std::io::stderr().is_terminal();
    let (mut epoch, mut phase, mut printed) = (current.rebalance.epoch, None, None::<Instant>);
    while changing(&current) {
        let r = &current.rebalance;
        if r.epoch != epoch {
            bar.reset();
            epoch = r.epoch;
        }
        bar.set_length(r.total_keys.max(r.moved_keys).max(1));
        bar.set_position(r.moved_keys);
        bar.set_message(match r.phase {
            RebalancePhase::Pending => format!("to epoch {}", r.epoch),
            other => format!("to epoch {}: {other}", r.epoch),
        });
        let due = printed.is_none_or(|at| at.elapsed() >= PRINT_EVERY) || phase != Some(r.phase);
        if !tty && due {
            eprintln!("{}", render::change_line(&current));
            (phase, printed) = (Some(r.phase), Some(Instant::now()));
        }
        tokio::time::sleep(POLL_EVERY).await;
        current = fetch_status(session).await?;
    }
    bar.finish_and_clear();
    Ok(current)
}

pub async fn plan(session: &Session, output: Output, args: &PlanArgs) -> Result<(), CliError> {
    let status = fetch_status(session).await?;
    let layout = status.layout.ok_or_else(|| {
        CliError::Unavailable(format!("{} has no view yet; ask a member of the cluster (--endpoints)", status.node))
    })?;
    let current: Vec<String> = layout.members().cloned().collect();
    let members = match (&args.members, args.replicas) {
        (Some(members), _) => members.iter().map(|m| m.trim().to_owned()).collect(),
        (None, Some(n)) => resize(&current, n).map_err(CliError::Invalid)?,
        (None, None) => current,
    };
    let k = args.replication_factor.unwrap_or(layout.replication_factor);
    let admin = session.admin();
    let plan = session
        .first_answer(|node| {
            let (admin, members) = (admin.clone(), members.clone());
            async move { admin.plan_view(&node, members, k).await }
        })
        .await?;
    match output {
        Output::Json => print_json(&plan),
        Output::Table => {
            println!("{}", render::plan(&plan));
            Ok(())
        }
    }
}

fn backup_error(e: kvs_backup::BackupError) -> CliError {
    use kvs_backup::BackupError as E;
    match e {
        E::Refused(_) | E::NoBackup { .. } | E::Damaged { .. } | E::Format(_) => CliError::Invalid(e.to_string()),
        E::Destination(kvs_backup::DestinationError::Unsupported { .. }) => CliError::Invalid(e.to_string()),
        _ => CliError::Unavailable(e.to_string()),
    }
}

fn destination(url: &str) -> Result<kvs_backup::Destination, CliError> {
    kvs_backup::Destination::open(url).map_err(|e| backup_error(e.into()))
}

fn summary(m: &kvs_backup::Manifest) -> String {
    format!(
        "{} records ({} keys, {} deletions) in {} partition files, {} bytes; view epoch {}, cut {}",
        render::count(m.records),
        render::count(m.live_keys),
        render::count(m.tombstones),
        m.partitions.len(),
        render::count(m.bytes),
        m.view_epoch,
        m.cut
    )
}

fn print_manifest(output: Output, verb: &str, url: &str, m: &kvs_backup::Manifest) -> Result<(), CliError> {
    match output {
        Output::Json => print_json(m),
        Output::Table => {
            println!("{verb} {url}: {}", summary(m));
            Ok(())
        }
    }
}

pub async fn backup(session: &Session, output: Output, to: &str, cluster_name: Option<String>) -> Result<(), CliError> {
    let dest = destination(to)?;
    let options = kvs_backup::BackupOptions { cluster_name, ..Default::default() };
    let bar = Bar::new();
    let manifest = kvs_backup::backup(&session.cluster(), &dest, &options, &bar).await.map_err(backup_error);
    bar.finish();
    print_manifest(output, "backed up to", to, &manifest?)
}

pub async fn verify(output: Output, url: &str) -> Result<(), CliError> {
    let dest = destination(url)?;
    let bar = Bar::new();
    let report = kvs_backup::verify(&dest, &bar).await.map_err(backup_error);
    bar.finish();
    print_manifest(output, "verified", url, &report?.manifest)
}

pub async fn restore(session: &Session, output: Output, from: &str, overwrite: bool) -> Result<(), CliError> {
    let dest = destination(from)?;
    let bar = Bar::new();
    let manifest = kvs_backup::restore(&session.cluster(), &dest, overwrite, &bar).await.map_err(backup_error);
    bar.finish();
    print_manifest(output, "restored from", from, &manifest?)
}
