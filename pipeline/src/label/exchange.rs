//! `rlhf label export` / `import`: a queue to and from Label Studio or
//! Argilla, through their JSON formats (`rlhf_datasets::label_exchange`).

use std::path::Path;

use anyhow::Context;
use rlhf_datasets::label_exchange::{self, Format};
use rlhf_datasets::labels::{read_groups, Queue, GROUPS_FILE};

use crate::cli::ExchangeFormat;

impl From<ExchangeFormat> for Format {
    fn from(f: ExchangeFormat) -> Self {
        match f {
            ExchangeFormat::LabelStudio => Format::LabelStudio,
            ExchangeFormat::Argilla => Format::Argilla,
        }
    }
}

/// Largest export file read back (Label Studio's exports repeat each
/// task's data in every annotation's task; 1 GiB is far above a round).
const MAX_IMPORT_BYTES: u64 = 1 << 30;

fn is_queue(dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        dir.join(GROUPS_FILE).exists(),
        "{}: not a labelling queue (no {GROUPS_FILE})",
        dir.display()
    );
    Ok(())
}

/// Reads the groups only, so a queue being served can be exported.
pub fn export(dir: &Path, format: Format, out: &Path) -> anyhow::Result<()> {
    is_queue(dir)?;
    let groups = &read_groups(dir)?;
    if let Some(i) = groups.iter().position(|g| g.responses.len() < 2) {
        anyhow::bail!(
            "{}: group {i} holds one answer, labelled thumbs up or down on rlhf's own page (`rlhf label serve`); the export is for rankings",
            dir.display()
        );
    }
    let json = serde_json::to_vec_pretty(&label_exchange::export(groups, format))?;
    rlhf_datasets::atomic::write_file(out, &json)?;
    println!("{}: {} groups", out.display(), groups.len());
    if format == Format::LabelStudio {
        let k = groups.iter().map(|g| g.responses.len()).max().unwrap_or(0);
        let config = out.with_extension("xml");
        rlhf_datasets::atomic::write_file(
            &config,
            label_exchange::label_studio_config(k).as_bytes(),
        )?;
        println!(
            "{}: the labelling config (Settings -> Labeling Interface -> Code)",
            config.display()
        );
    }
    Ok(())
}

/// Adds the file's labels through the queue's lock: refused, naming the
/// server's pid, while the queue is served (its rows live in that
/// process's memory and would erase these at its next write).
pub fn import(dir: &Path, format: Format, file: &Path) -> anyhow::Result<()> {
    is_queue(dir)?;
    let mut queue = Queue::open(dir, &[], 1)?;
    rlhf_datasets::files::bounded_size(file, MAX_IMPORT_BYTES, "the import limit")
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: expected a UTF-8 JSON export", file.display()))?;
    let read = label_exchange::import(format, &text, queue.groups(), file)?;
    let counts = queue
        .import(&read.labels)
        .with_context(|| format!("{}: no label was added", file.display()))?;
    let (left, total) = queue.progress();
    println!(
        "{}",
        serde_json::json!({
            "added": counts.added, "already_there": counts.already_there,
            "says_nothing": counts.says_nothing,
            "incomplete": read.incomplete, "drafts": read.drafts,
            "groups_left": left, "groups": total,
        })
    );
    if counts.says_nothing > 0 {
        tracing::warn!(
            "{}: {} label(s) tie every answer, which says nothing; left out",
            file.display(),
            counts.says_nothing
        );
    }
    if read.incomplete + read.drafts > 0 {
        tracing::warn!(
            "{}: {} unfinished ranking(s) and {} draft(s) left out",
            file.display(),
            read.incomplete,
            read.drafts
        );
    }
    Ok(())
}
