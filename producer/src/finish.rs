//! What `wait --ordered` and `wait --errors FILE` do to a collected output file: put its
//! lines in input order, and move the lines of items that did not succeed to a separate
//! error file, as OpenAI's batch API splits its output and error files.
//!
//! Both work on finished output lines, never on broker messages: `wait` first collects into
//! `<OUT>.collecting` exactly as it collects into `OUT` (resumable, each `custom_id` once),
//! and only a complete collection is turned into `OUT` (and the error file), through
//! temporary files renamed into place, after which the collection is removed. Run again
//! after that, `wait` puts `OUT` and the error file back together as the collection (it is
//! complete, so it returns at once) and writes them again.
//!
//! **Memory bound of `--ordered`** (an external merge sort): lines are read in runs of at
//! most [`RUN_BYTES`] of text, each run is sorted by its line's index (from its `id`,
//! `batch_req_<job>_<index>`) and written to a run file next to `OUT`; the runs are then
//! merged with one buffered reader each. Memory is one run plus a 64 KiB buffer per run:
//! for a million lines of 1 KiB, 16 runs, about 65 MiB, whatever the number of lines.
//! Disk: the collection and the runs, about twice the output, until the end.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use fleet::wire::ItemStatus;

use crate::collect::{self, Collected, WaitRequest};
use crate::output_format::OutputFormat;

/// Text of one sorted run held in memory at most.
pub const RUN_BYTES: usize = 64 << 20;
const READ_BUFFER: usize = 64 << 10;

/// How `wait` should finish its output.
#[derive(Debug, Clone, Copy, Default)]
pub struct Finish<'a> {
    /// Lines in input order.
    pub ordered: bool,
    /// Lines of items that did not succeed go here instead of the output.
    pub errors: Option<&'a Path>,
    /// The format of the lines (to tell a success in the split).
    pub format: OutputFormat,
}

impl Finish<'_> {
    /// Whether the output is written by [`finish`] rather than directly by `wait`.
    pub fn needed(&self) -> bool {
        self.ordered || self.errors.is_some()
    }
}

/// `producer wait` with `--ordered` / `--errors`: collects into the collection, then
/// finishes the output from it. Without either, the plain [`collect::wait`].
pub async fn wait(cfg: &fleet::Config, req: &WaitRequest<'_>, finish: &Finish<'_>) -> anyhow::Result<Collected> {
    if !finish.needed() {
        return collect::wait(cfg, req).await;
    }
    prepare(req.job_id, req.output, finish)?;
    let collecting = collection_path(req.output);
    let inner = WaitRequest {
        job_id: req.job_id,
        output: &collecting,
        progress: req.progress,
        timeout: req.timeout,
        format: req.format,
    };
    let collected = collect::wait(cfg, &inner).await?;
    self::finish(req.output, finish)?;
    Ok(collected)
}

/// Where `wait` collects when the output is finished afterwards.
pub fn collection_path(output: &Path) -> PathBuf {
    with_suffix(output, ".collecting")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Before collecting: when a finished output exists but no collection does (a `wait` that
/// completed before), its lines and the error file's become the collection again, so the
/// collection resumes complete instead of starting over. An output of another job is
/// refused and left as it is.
pub fn prepare(job_id: &str, output: &Path, finish: &Finish) -> anyhow::Result<()> {
    let collecting = collection_path(output);
    if collecting.exists() || !output.exists() {
        return Ok(());
    }
    collect::check_new_output(output, Some(job_id), finish.format)?;
    std::fs::rename(output, &collecting)?;
    if let Some(errors) = finish.errors.filter(|e| e.exists()) {
        let mut into = std::fs::OpenOptions::new().append(true).open(&collecting)?;
        std::io::copy(&mut std::fs::File::open(errors)?, &mut into)?;
        into.sync_all()?;
        std::fs::remove_file(errors)?;
    }
    Ok(())
}

/// Writes the complete collection at [`collection_path`] into `output` (and the error
/// file), ordered and split as asked, then removes the collection.
pub fn finish(output: &Path, finish: &Finish) -> anyhow::Result<()> {
    finish_with(output, finish, RUN_BYTES)
}

fn finish_with(output: &Path, finish: &Finish, run_bytes: usize) -> anyhow::Result<()> {
    let collecting = collection_path(output);
    let mut sink = Split::create(output, finish.errors, finish.format)?;
    if finish.ordered {
        let runs = write_runs(&collecting, output, run_bytes)?;
        let merged = merge(&runs, &mut sink);
        for run in &runs {
            let _ = std::fs::remove_file(run);
        }
        merged?;
    } else {
        for line in BufReader::with_capacity(READ_BUFFER, std::fs::File::open(&collecting)?).split(b'\n') {
            sink.write(&line?)?;
        }
    }
    sink.commit(output, finish.errors)?;
    std::fs::remove_file(&collecting)?;
    Ok(())
}

/// The index of an output line (its `id` is `batch_req_<job>_<index>`).
fn line_index(line: &[u8]) -> anyhow::Result<u64> {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
    }
    let id: Id = serde_json::from_slice(line).map_err(|e| anyhow::anyhow!("not an output line: {e}"))?;
    id.id
        .rsplit_once('_')
        .and_then(|(_, n)| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("output line id {:?} has no index", id.id))
}

/// Sorts the collection into run files of at most `run_bytes` of text each.
fn write_runs(collecting: &Path, output: &Path, run_bytes: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut runs = Vec::new();
    let mut run: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut bytes = 0;
    let flush = |run: &mut Vec<(u64, Vec<u8>)>, runs: &mut Vec<PathBuf>| -> anyhow::Result<()> {
        run.sort_unstable_by_key(|(index, _)| *index);
        let path = with_suffix(output, &format!(".run{}", runs.len()));
        let mut out = BufWriter::with_capacity(READ_BUFFER, std::fs::File::create(&path)?);
        for (_, line) in run.drain(..) {
            out.write_all(&line)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        runs.push(path);
        Ok(())
    };
    for line in BufReader::with_capacity(READ_BUFFER, std::fs::File::open(collecting)?).split(b'\n') {
        let line = line?;
        bytes += line.len() + 1;
        run.push((line_index(&line)?, line));
        if bytes >= run_bytes {
            flush(&mut run, &mut runs)?;
            bytes = 0;
        }
    }
    if !run.is_empty() || runs.is_empty() {
        flush(&mut run, &mut runs)?;
    }
    Ok(runs)
}

/// Merges sorted runs into `sink` by index.
fn merge(runs: &[PathBuf], sink: &mut Split) -> anyhow::Result<()> {
    let mut readers = Vec::with_capacity(runs.len());
    for run in runs {
        readers.push(BufReader::with_capacity(READ_BUFFER, std::fs::File::open(run)?).split(b'\n'));
    }
    // The heap holds each run's next line: (index, run), smallest index first.
    let mut heads: Vec<Option<Vec<u8>>> = vec![None; runs.len()];
    let mut heap = BinaryHeap::new();
    for (r, reader) in readers.iter_mut().enumerate() {
        if let Some(line) = reader.next().transpose()? {
            heap.push(Reverse((line_index(&line)?, r)));
            heads[r] = Some(line);
        }
    }
    while let Some(Reverse((_, r))) = heap.pop() {
        let line = heads[r].take().expect("a run in the heap has a head");
        sink.write(&line)?;
        if let Some(next) = readers[r].next().transpose()? {
            heap.push(Reverse((line_index(&next)?, r)));
            heads[r] = Some(next);
        }
    }
    Ok(())
}

/// The output file and, with `--errors`, the error file, written as temporary files and
/// renamed into place once complete.
struct Split {
    out: BufWriter<std::fs::File>,
    errors: Option<BufWriter<std::fs::File>>,
    format: OutputFormat,
}

impl Split {
    fn create(output: &Path, errors: Option<&Path>, format: OutputFormat) -> anyhow::Result<Split> {
        let open = |p: &Path| -> anyhow::Result<BufWriter<std::fs::File>> {
            Ok(BufWriter::with_capacity(READ_BUFFER, std::fs::File::create(with_suffix(p, ".tmp"))?))
        };
        Ok(Split { out: open(output)?, errors: errors.map(open).transpose()?, format })
    }

    fn write(&mut self, line: &[u8]) -> anyhow::Result<()> {
        let to = match &mut self.errors {
            Some(errors) if !succeeded(line, self.format)? => errors,
            _ => &mut self.out,
        };
        to.write_all(line)?;
        to.write_all(b"\n")?;
        Ok(())
    }

    /// Makes both files durable, then renames them into place.
    fn commit(self, output: &Path, errors: Option<&Path>) -> anyhow::Result<()> {
        let pairs = [(Some(self.out), Some(output)), (self.errors, errors)];
        for (writer, path) in pairs {
            if let (Some(writer), Some(path)) = (writer, path) {
                writer.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                std::fs::rename(with_suffix(path, ".tmp"), path)?;
            }
        }
        Ok(())
    }
}

/// Whether an output line is a success, read as `wait` reads lines back.
fn succeeded(line: &[u8], format: OutputFormat) -> anyhow::Result<bool> {
    let v: serde_json::Value = serde_json::from_slice(line)?;
    Ok(format.status_of(&v) == Some(ItemStatus::Succeeded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(index: u64, ok: bool) -> String {
        let (response, error) = if ok {
            (r#"{"status_code":200,"request_id":"r","body":{}}"#, "null")
        } else {
            ("null", r#"{"code":"timeout","message":"m"}"#)
        };
        format!(r#"{{"id":"batch_req_job_a_{index}","custom_id":"c{index}","response":{response},"error":{error}}}"#)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fleet-finish-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// 1,000 lines in a shuffled order (a fixed permutation), every 7th failed.
    fn shuffled(dir: &Path) -> PathBuf {
        let out = dir.join("out.jsonl");
        let text: String = (0..1000u64).map(|i| (i * 389) % 1000).map(|i| line(i, i % 7 != 0) + "\n").collect();
        std::fs::write(collection_path(&out), text).unwrap();
        out
    }

    #[test]
    fn ordered_output_merges_many_runs_into_input_order() {
        let dir = scratch("ordered");
        let out = shuffled(&dir);
        // Runs of ~2 KiB: dozens of them, so the merge really merges.
        finish_with(&out, &Finish { ordered: true, errors: None, format: OutputFormat::Openai }, 2048).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let want: String = (0..1000u64).map(|i| line(i, i % 7 != 0) + "\n").collect();
        assert_eq!(text, want);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("out.jsonl")], "runs and collection removed");
    }

    #[test]
    fn the_error_file_takes_every_line_that_did_not_succeed() {
        let dir = scratch("errors");
        let out = shuffled(&dir);
        let errors = dir.join("errors.jsonl");
        let finish = Finish { ordered: true, errors: Some(&errors), format: OutputFormat::Openai };
        finish_with(&out, &finish, 4096).unwrap();
        let ok = std::fs::read_to_string(&out).unwrap();
        let failed = std::fs::read_to_string(&errors).unwrap();
        assert_eq!(ok, (0..1000u64).filter(|i| i % 7 != 0).map(|i| line(i, true) + "\n").collect::<String>());
        assert_eq!(failed, (0..1000u64).filter(|i| i % 7 == 0).map(|i| line(i, false) + "\n").collect::<String>());
        // Run again: the two files become the collection, and come out the same.
        prepare("job_a", &out, &finish).unwrap();
        assert!(!errors.exists() && !out.exists());
        finish_with(&out, &finish, 4096).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), ok);
        assert_eq!(std::fs::read_to_string(&errors).unwrap(), failed);
    }

    #[test]
    fn an_output_of_another_job_is_left_alone() {
        let dir = scratch("other");
        let out = dir.join("out.jsonl");
        std::fs::write(&out, line(0, true) + "\n").unwrap();
        assert!(prepare("job_b", &out, &Finish { ordered: true, errors: None, format: OutputFormat::Openai }).is_err());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), line(0, true) + "\n");
        assert!(!collection_path(&out).exists());
    }

    #[test]
    fn a_line_without_an_index_is_an_error_not_a_guess() {
        let dir = scratch("bad");
        let out = dir.join("out.jsonl");
        std::fs::write(collection_path(&out), line(1, true) + "\n{\"id\":\"nope\"}\n").unwrap();
        let err = finish_with(&out, &Finish { ordered: true, errors: None, format: OutputFormat::Openai }, 1 << 20)
            .unwrap_err();
        assert!(err.to_string().contains("no index"), "{err}");
        assert!(collection_path(&out).exists(), "the collection is kept");
    }
}
