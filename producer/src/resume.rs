//! The record of a submission in progress, so that a `submit` that died half-way can be run
//! again and publish only what the broker had not confirmed.
//!
//! The record lives next to the input file (`<file>.submitting.json`), is rewritten (to a
//! temporary file, then renamed) as the confirmed watermark advances (how often is
//! `submit`'s decision: see `Progress` in [`crate::submit`]), and is deleted when the
//! submission completes. The watermark it holds is never ahead of what the broker
//! confirmed, so a resumed submission publishes again at most the items that were in
//! flight when the first one died; the fleet drops those duplicates by (job, index).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A submission that has started and not completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The job the submission started.
    pub job_id: String,
    /// xxh3-128 of the input file's bytes, in hex: a resumed submission must publish the
    /// very file the job was started with.
    pub content_hash: String,
    /// The provider it was submitted to; a resumed submission must name the same.
    pub provider: String,
    /// The `--model` override of the first run, which the resumed items keep.
    pub model: Option<String>,
    /// Requests in the file: the job's items.
    pub total: u64,
    /// When the job was submitted, ms since the Unix epoch; a resumed run keeps it.
    pub submitted_at_ms: u64,
    /// The first run's deadline (ms since the epoch), which the resumed items keep.
    pub deadline_ms: Option<u64>,
    /// Every item with an index below this is confirmed by the broker.
    pub confirmed: u64,
    /// The job's mode, kept so a resumed submission publishes where the first one did
    /// (absent in records of earlier versions: online).
    #[serde(default)]
    pub mode: Option<fleet::batch::JobMode>,
    /// The first run's `--fallback online`, kept like the mode (absent in earlier records: off).
    #[serde(default)]
    pub fallback_online: bool,
    /// `confirmed` counts positions of a batch-mode job's by-endpoint order (see
    /// `fleet::batch::ChunkLayout`), not indices. Absent in records of earlier versions,
    /// whose batch-mode items were published in index order.
    #[serde(default)]
    pub by_endpoint: bool,
}

/// Where the record of submitting `file` is kept.
pub fn record_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".submitting.json");
    file.with_file_name(name)
}

/// The content hash of a file, streaming.
pub fn content_hash(file: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(file)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(format!("{:032x}", hasher.digest128()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Reads the record of `file`, if there is one. A record that cannot be read is reported,
/// not ignored: silently starting a new job would strand the old one.
pub fn load(file: &Path) -> anyhow::Result<Option<Record>> {
    let path = record_path(file);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            anyhow::anyhow!("{} is not a submission record ({e}); delete it to start a new job", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// What a write of the record must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The process being killed (SIGKILL, a crash, the OOM killer): the rename reaches the
    /// page cache, which belongs to the kernel, not the process, so the next run reads the
    /// new record even though nothing was synced. The per-confirm-batch writes use this.
    ProcessKill,
    /// The machine losing power as well: the data is synced before the rename. Costs a
    /// disk flush (milliseconds), so it is kept for the few writes that are rare anyway:
    /// the first one and the last one of a run.
    PowerLoss,
}

/// Writes the record atomically (temporary file, then rename over the old record): a
/// reader sees the old record or the new one, never a torn one.
pub fn save(file: &Path, record: &Record, durability: Durability) -> std::io::Result<()> {
    let path = record_path(file);
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, record)?;
        if durability == Durability::PowerLoss {
            f.sync_data()?;
        }
    }
    std::fs::rename(&tmp, &path)
}

/// Deletes the record once the submission is complete.
pub fn remove(file: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(record_path(file)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_is_removed() {
        let dir = std::env::temp_dir().join(format!("resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("in.jsonl");
        std::fs::write(&file, "a\n").unwrap();
        assert_eq!(load(&file).unwrap(), None);
        let r = Record {
            job_id: "job_1".into(),
            content_hash: content_hash(&file).unwrap(),
            provider: "mock".into(),
            model: None,
            total: 1,
            submitted_at_ms: 5,
            deadline_ms: Some(9),
            confirmed: 0,
            mode: None,
            fallback_online: false,
            by_endpoint: false,
        };
        save(&file, &r, Durability::PowerLoss).unwrap();
        assert_eq!(record_path(&file), dir.join("in.jsonl.submitting.json"));
        assert_eq!(load(&file).unwrap(), Some(r.clone()));
        std::fs::write(&file, "b\n").unwrap();
        assert_ne!(content_hash(&file).unwrap(), r.content_hash, "another content, another hash");
        remove(&file).unwrap();
        assert_eq!(load(&file).unwrap(), None);
        remove(&file).unwrap();
    }
}
