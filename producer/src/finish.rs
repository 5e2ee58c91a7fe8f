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
//!
//! **Local files are the user's.** The output and the error file are replaced only when
//! they are absent or results files of this very job (checked, writing nothing, before
//! anything is moved, and again just before they are replaced); anything else is refused
//! and left as it is. The temporary files (`<OUT>.tmp`, `<ERRORS>.tmp`, `<OUT>.runN`) are
//! [`Temp`]s: created next to their file with `create_new` (`O_EXCL`), so never through a
//! link planted at their predictable names, and removed on every path that does not
//! rename them into place. The final rename replaces whatever is at the path itself: a
//! link there is replaced, its target (checked like the file) is left as it is.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use fleet::wire::ItemStatus;

use crate::collect::{self, Collected, OutputError, ReadBack, WaitRequest};
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
    // Every file is checked before anything moves, and the job must exist: a mistyped job
    // id must not take the user's files apart into a collection.
    let found = check(req.job_id, req.output, finish)?;
    collect::check_job(cfg, req.job_id).await?;
    found.apply()?;
    let collecting = collection_path(req.output);
    let inner = WaitRequest {
        job_id: req.job_id,
        output: &collecting,
        progress: req.progress,
        timeout: req.timeout,
        format: req.format,
    };
    let collected = collect::wait(cfg, &inner).await?;
    self::finish(req.job_id, req.output, finish)?;
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
/// collection resumes complete instead of starting over. An output or error file that is
/// not a results file of `job_id` is refused, and every file left as it is.
pub fn prepare(job_id: &str, output: &Path, finish: &Finish) -> anyhow::Result<()> {
    check(job_id, output, finish)?.apply()
}

/// The output and error files as read back by [`check`], nothing moved yet.
struct Found<'a> {
    output: &'a Path,
    out: ReadBack,
    errors: Option<(&'a Path, ReadBack)>,
}

/// Checks, writing nothing, that the output and the error file are each absent or a
/// results file of `job_id`, and that they are two different files.
fn check<'a>(job_id: &str, output: &'a Path, finish: &Finish<'a>) -> anyhow::Result<Found<'a>> {
    distinct(output, finish.errors)?;
    let out = ReadBack::read(output, Some(job_id), finish.format)?;
    let errors = match finish.errors {
        Some(path) => Some((path, ReadBack::read(path, Some(job_id), finish.format)?)),
        None => None,
    };
    Ok(Found { output, out, errors })
}

impl Found<'_> {
    /// Turns a finished output (and error file) back into the collection, unless a
    /// collection is there already or there is no output.
    fn apply(self) -> anyhow::Result<()> {
        let collecting = collection_path(self.output);
        if collecting.symlink_metadata().is_ok() || !self.out.exists() {
            return Ok(());
        }
        std::fs::rename(self.output, &collecting)?;
        // The checked handle follows the file to its new name. Opening it cuts a torn last
        // line of ours (a plain `wait` interrupted), so the error lines start on their own.
        let (mut into, _, _) = self.out.open(&collecting)?;
        if let Some((errors, back)) = self.errors.filter(|(_, back)| back.exists()) {
            let (mut from, _, _) = back.open(errors)?;
            from.rewind()?;
            std::io::copy(&mut from, &mut into)?;
            into.sync_all()?;
            std::fs::remove_file(errors)?;
        }
        Ok(())
    }
}

/// Refuses an error file that is the output or its collection (by name, relative or not).
fn distinct(output: &Path, errors: Option<&Path>) -> Result<(), OutputError> {
    let Some(errors) = errors else { return Ok(()) };
    let key = |p: &Path| -> Option<(PathBuf, std::ffi::OsString)> {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some((dir.canonicalize().ok()?, p.file_name()?.to_owned()))
    };
    let same = |a: &Path| a == errors || key(a).is_some_and(|k| Some(k) == key(errors));
    if same(output) || same(&collection_path(output)) {
        return Err(OutputError::SameFile { path: errors.display().to_string() });
    }
    Ok(())
}

/// Writes the complete collection at [`collection_path`] into `output` (and the error
/// file), ordered and split as asked, then removes the collection. The output and the
/// error file are replaced only if they are absent or results files of `job_id`.
pub fn finish(job_id: &str, output: &Path, finish: &Finish) -> anyhow::Result<()> {
    finish_with(job_id, output, finish, RUN_BYTES)
}

fn finish_with(job_id: &str, output: &Path, finish: &Finish, run_bytes: usize) -> anyhow::Result<()> {
    // Checked again: a collection may take hours, and a file put at either path meanwhile
    // is the user's until it reads as this job's results.
    check(job_id, output, finish)?;
    let collecting = collection_path(output);
    let mut sink = Split::create(job_id, output, finish.errors, finish.format)?;
    if finish.ordered {
        // The runs are removed when `runs` is dropped, whatever happened.
        let runs = write_runs(&collecting, job_id, output, run_bytes)?;
        merge(&runs, &mut sink)?;
    } else {
        for line in BufReader::with_capacity(READ_BUFFER, std::fs::File::open(&collecting)?).split(b'\n') {
            sink.write(&line?)?;
        }
    }
    sink.commit(output, finish.errors)?;
    std::fs::remove_file(&collecting)?;
    Ok(())
}

/// A temporary file next to the file it stands for: created fresh, never through a link
/// or onto a file that is not ours, and removed when dropped unless renamed into place.
struct Temp {
    path: PathBuf,
    committed: bool,
}

impl Temp {
    /// Creates `path`, first removing a leftover of an interrupted run there: a link (the
    /// link itself, never its target), an empty file, or a file that begins as a line of
    /// `job_id` does. Anything else there is refused.
    fn create(path: PathBuf, job_id: &str) -> anyhow::Result<(Temp, std::fs::File)> {
        if let Ok(meta) = path.symlink_metadata() {
            if !(meta.file_type().is_symlink() || meta.is_file() && leftover_of(&path, job_id)?) {
                return Err(OutputError::InTheWay { path: path.display().to_string() }.into());
            }
            std::fs::remove_file(&path)?;
        }
        // `create_new` is O_EXCL: it fails on anything at the path, a link included, so a
        // link planted after the removal above still writes nothing through it.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| OutputError::Unwritable { path: path.display().to_string(), source })?;
        Ok((Temp { path, committed: false }, file))
    }

    /// Renames the temporary onto `to` (replacing what is at `to` itself, even a link).
    fn commit(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether the regular file at `path` can be a temporary of ours for `job_id`: empty, or
/// beginning as every line of the job begins (a run or a split file, complete or torn).
fn leftover_of(path: &Path, job_id: &str) -> std::io::Result<bool> {
    let start = format!("{{\"id\":\"batch_req_{job_id}_");
    let mut head = Vec::with_capacity(start.len());
    std::fs::File::open(path)?.take(start.len() as u64).read_to_end(&mut head)?;
    Ok(start.as_bytes().starts_with(&head))
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

/// Sorts the collection into run files of at most `run_bytes` of text each (removed when
/// dropped, so an error anywhere leaves none behind).
fn write_runs(collecting: &Path, job_id: &str, output: &Path, run_bytes: usize) -> anyhow::Result<Vec<Temp>> {
    let mut runs = Vec::new();
    let mut run: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut bytes = 0;
    let flush = |run: &mut Vec<(u64, Vec<u8>)>, runs: &mut Vec<Temp>| -> anyhow::Result<()> {
        run.sort_unstable_by_key(|(index, _)| *index);
        let (temp, file) = Temp::create(with_suffix(output, &format!(".run{}", runs.len())), job_id)?;
        runs.push(temp);
        let mut out = BufWriter::with_capacity(READ_BUFFER, file);
        for (_, line) in run.drain(..) {
            out.write_all(&line)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
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
fn merge(runs: &[Temp], sink: &mut Split) -> anyhow::Result<()> {
    let mut readers = Vec::with_capacity(runs.len());
    for run in runs {
        readers.push(BufReader::with_capacity(READ_BUFFER, std::fs::File::open(&run.path)?).split(b'\n'));
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
/// renamed into place once complete (removed instead if anything fails before).
struct Split {
    out: (Temp, BufWriter<std::fs::File>),
    errors: Option<(Temp, BufWriter<std::fs::File>)>,
    format: OutputFormat,
}

impl Split {
    fn create(job_id: &str, output: &Path, errors: Option<&Path>, format: OutputFormat) -> anyhow::Result<Split> {
        let open = |p: &Path| -> anyhow::Result<(Temp, BufWriter<std::fs::File>)> {
            let (temp, file) = Temp::create(with_suffix(p, ".tmp"), job_id)?;
            Ok((temp, BufWriter::with_capacity(READ_BUFFER, file)))
        };
        Ok(Split { out: open(output)?, errors: errors.map(open).transpose()?, format })
    }

    fn write(&mut self, line: &[u8]) -> anyhow::Result<()> {
        let to = match &mut self.errors {
            Some((_, errors)) if !succeeded(line, self.format)? => errors,
            _ => &mut self.out.1,
        };
        to.write_all(line)?;
        to.write_all(b"\n")?;
        Ok(())
    }

    /// Makes both files durable, then renames them into place.
    fn commit(self, output: &Path, errors: Option<&Path>) -> anyhow::Result<()> {
        let mut pairs = vec![(self.out, output)];
        pairs.extend(self.errors.zip(errors));
        // Both durable before either is renamed: a crash leaves the old pair or a new file
        // next to an old one, which a run again replaces (the collection is still there).
        for ((_, writer), _) in &mut pairs {
            writer.flush()?;
            writer.get_ref().sync_all()?;
        }
        for ((temp, writer), path) in pairs {
            drop(writer);
            temp.commit(path)?;
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
        finish_with("job_a", &out, &Finish { ordered: true, errors: None, format: OutputFormat::Openai }, 2048)
            .unwrap();
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
        finish_with("job_a", &out, &finish, 4096).unwrap();
        let ok = std::fs::read_to_string(&out).unwrap();
        let failed = std::fs::read_to_string(&errors).unwrap();
        assert_eq!(ok, (0..1000u64).filter(|i| i % 7 != 0).map(|i| line(i, true) + "\n").collect::<String>());
        assert_eq!(failed, (0..1000u64).filter(|i| i % 7 == 0).map(|i| line(i, false) + "\n").collect::<String>());
        // Run again: the two files become the collection, and come out the same.
        prepare("job_a", &out, &finish).unwrap();
        assert!(!errors.exists() && !out.exists());
        finish_with("job_a", &out, &finish, 4096).unwrap();
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
        let err =
            finish_with("job_a", &out, &Finish { ordered: true, errors: None, format: OutputFormat::Openai }, 1 << 20)
                .unwrap_err();
        assert!(err.to_string().contains("no index"), "{err}");
        assert!(collection_path(&out).exists(), "the collection is kept");
    }

    /// The names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn temporaries_are_gone_after_an_error() {
        let dir = scratch("temp-errors");
        let out = shuffled(&dir);
        let errors = dir.join("errors.jsonl");
        // A bad line last: every run but the last is written by the time it is met.
        let mut text = std::fs::read_to_string(collection_path(&out)).unwrap();
        text.push_str("nope\n");
        std::fs::write(collection_path(&out), &text).unwrap();
        for ordered in [true, false] {
            let finish = Finish { ordered, errors: Some(&errors), format: OutputFormat::Openai };
            assert!(finish_with("job_a", &out, &finish, 2048).is_err(), "ordered {ordered}");
            assert_eq!(listing(&dir), ["out.jsonl.collecting"], "ordered {ordered}: only the collection is left");
            assert_eq!(std::fs::read_to_string(collection_path(&out)).unwrap(), text);
        }
    }

    #[test]
    fn an_error_file_that_is_not_this_jobs_results_is_refused_and_left_unchanged() {
        let other_job = line(0, false).replace("job_a", "job_b") + "\n";
        for (name, precious) in [("no-newline", "notes".to_string()), ("text", "notes\n".into()), ("job_b", other_job)]
        {
            // First run: the collection is complete, no output yet.
            let dir = scratch(&format!("precious-errors-{name}"));
            let out = shuffled(&dir);
            let collection = std::fs::read(collection_path(&out)).unwrap();
            let errors = dir.join("errors.jsonl");
            std::fs::write(&errors, &precious).unwrap();
            let finish = Finish { ordered: true, errors: Some(&errors), format: OutputFormat::Openai };
            let err = prepare("job_a", &out, &finish).unwrap_err();
            assert!(err.to_string().contains(&errors.display().to_string()), "{name}: names the file: {err}");
            let err = finish_with("job_a", &out, &finish, 4096).unwrap_err();
            assert!(err.downcast_ref::<OutputError>().is_some(), "{name}: {err}");
            assert_eq!(std::fs::read_to_string(&errors).unwrap(), precious, "{name}: unchanged");
            assert_eq!(std::fs::read(collection_path(&out)).unwrap(), collection, "{name}: collection kept");
            assert_eq!(listing(&dir), ["errors.jsonl", "out.jsonl.collecting"], "{name}: nothing else written");

            // Run again: a finished output of the job, and the precious file as the errors.
            std::fs::rename(collection_path(&out), &out).unwrap();
            assert!(prepare("job_a", &out, &finish).is_err());
            assert_eq!(std::fs::read_to_string(&errors).unwrap(), precious, "{name}: unchanged on a re-run");
            assert_eq!(std::fs::read(&out).unwrap(), collection, "{name}: the output is not moved");
            assert_eq!(listing(&dir), ["errors.jsonl", "out.jsonl"], "{name}: no collection made");
        }
    }

    #[test]
    fn an_output_put_there_during_the_collection_is_not_replaced() {
        let dir = scratch("late-output");
        let out = shuffled(&dir);
        std::fs::write(&out, "notes").unwrap();
        let finish = Finish { ordered: false, errors: None, format: OutputFormat::Openai };
        let err = finish_with("job_a", &out, &finish, 4096).unwrap_err().to_string();
        assert!(err.contains("unfinished"), "{err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "notes");
        assert_eq!(listing(&dir), ["out.jsonl", "out.jsonl.collecting"]);
    }

    #[test]
    fn the_error_file_cannot_be_the_output_or_its_collection() {
        let dir = scratch("same");
        let out = shuffled(&dir);
        for errors in [out.clone(), dir.join(".").join("out.jsonl"), collection_path(&out)] {
            let finish = Finish { ordered: true, errors: Some(&errors), format: OutputFormat::Openai };
            let err = prepare("job_a", &out, &finish).unwrap_err();
            assert!(matches!(err.downcast_ref::<OutputError>(), Some(OutputError::SameFile { .. })), "{err}");
            assert!(finish_with("job_a", &out, &finish, 4096).is_err());
        }
        assert_eq!(listing(&dir), ["out.jsonl.collecting"]);
    }

    #[test]
    fn a_file_in_the_way_of_a_temporary_is_refused_unless_it_is_a_leftover_of_ours() {
        let dir = scratch("in-the-way");
        let out = shuffled(&dir);
        let tmp = with_suffix(&out, ".tmp");
        std::fs::write(&tmp, "notes").unwrap();
        let finish = Finish { ordered: true, errors: None, format: OutputFormat::Openai };
        let err = finish_with("job_a", &out, &finish, 4096).unwrap_err();
        assert!(matches!(err.downcast_ref::<OutputError>(), Some(OutputError::InTheWay { .. })), "{err}");
        assert_eq!(std::fs::read_to_string(&tmp).unwrap(), "notes", "unchanged");
        assert_eq!(listing(&dir), ["out.jsonl.collecting", "out.jsonl.tmp"], "runs removed, collection kept");
        // A torn run of an interrupted finish is ours: replaced.
        std::fs::remove_file(&tmp).unwrap();
        std::fs::write(with_suffix(&out, ".run1"), &line(3, true)[..20]).unwrap();
        finish_with("job_a", &out, &finish, 4096).unwrap();
        assert_eq!(listing(&dir), ["out.jsonl"]);
    }

    #[cfg(unix)]
    #[test]
    fn a_link_planted_at_a_temporary_name_writes_nothing_through_it() {
        let dir = scratch("tmp-links");
        let out = shuffled(&dir);
        let errors = dir.join("errors.jsonl");
        let mut targets = Vec::new();
        for planted in [with_suffix(&out, ".tmp"), with_suffix(&out, ".run0"), with_suffix(&errors, ".tmp")] {
            let target = with_suffix(&planted, ".precious");
            std::fs::write(&target, "precious\n").unwrap();
            std::os::unix::fs::symlink(&target, &planted).unwrap();
            targets.push(target);
        }
        let finish = Finish { ordered: true, errors: Some(&errors), format: OutputFormat::Openai };
        finish_with("job_a", &out, &finish, 4096).unwrap();
        for target in &targets {
            assert_eq!(std::fs::read_to_string(target).unwrap(), "precious\n", "{}", target.display());
        }
        let want: String = (0..1000u64).filter(|i| i % 7 != 0).map(|i| line(i, true) + "\n").collect();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
        assert!(!std::fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
        assert_eq!(listing(&dir).len(), 2 + targets.len(), "links removed: {:?}", listing(&dir));
    }

    #[cfg(unix)]
    #[test]
    fn a_link_at_the_output_is_replaced_never_written_through() {
        let dir = scratch("out-link");
        let out = shuffled(&dir);
        let finish = Finish { ordered: false, errors: None, format: OutputFormat::Openai };
        // To a file that is not results: refused, before and after the collection.
        let precious = dir.join("precious.txt");
        std::fs::write(&precious, "notes\n").unwrap();
        std::os::unix::fs::symlink(&precious, &out).unwrap();
        assert!(prepare("job_a", &out, &finish).is_err());
        assert!(finish_with("job_a", &out, &finish, 4096).is_err());
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "notes\n");
        // To results of the job (an earlier output): the link is replaced, its target kept.
        let earlier = dir.join("earlier.jsonl");
        std::fs::write(&earlier, line(0, false) + "\n").unwrap();
        std::fs::remove_file(&out).unwrap();
        std::os::unix::fs::symlink(&earlier, &out).unwrap();
        finish_with("job_a", &out, &finish, 4096).unwrap();
        assert_eq!(std::fs::read_to_string(&earlier).unwrap(), line(0, false) + "\n", "target untouched");
        assert!(!std::fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1000);
    }
}
