//! The benchmark's requests: one chat-completion body per index, written as an OpenAI Batch
//! input file for the fleet or wrapped in a [`fleet::wire::Item`] for the reference
//! pipeline, so both carry messages of the same shape and size.

use std::io::Write;
use std::path::Path;

use anyhow::Context as _;
use fleet::wire::Item;
use serde_json::value::RawValue;

/// Endpoint every benchmark request goes to.
pub(crate) const CHAT_URL: &str = "/v1/chat/completions";

/// The provider name the benchmark configures (the items queue's routing key).
pub(crate) const PROVIDER: &str = "mock";

/// The request body of request `i` (the same template as the e2e tests use).
pub(crate) fn body(i: u64) -> String {
    format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"Say something about the number {i}."}}]}}"#
    )
}

/// The `custom_id` of request `i`.
fn custom_id(i: u64) -> String {
    format!("req-{i}")
}

/// Writes `n` requests to `path` as OpenAI Batch input lines.
pub(crate) fn write_requests(path: &Path, n: u64) -> anyhow::Result<()> {
    write_requests_asking(path, n, None)
}

/// [`write_requests`] whose bodies ask for at most `max_tokens` of output, when given.
pub(crate) fn write_requests_asking(path: &Path, n: u64, max_tokens: Option<u64>) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create input file {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    for i in 0..n {
        let mut body = body(i);
        if let Some(max) = max_tokens {
            body = body.replacen('{', &format!(r#"{{"max_tokens":{max},"#), 1);
        }
        writeln!(out, r#"{{"custom_id":"{}","method":"POST","url":"{CHAT_URL}","body":{body}}}"#, custom_id(i))?;
    }
    out.flush()?;
    Ok(())
}

/// Bytes of each line of [`write_padded_requests`] (a long user prompt, as real batch files
/// have).
const PADDED_LINE_BYTES: usize = 1000;

/// Writes requests of about [`PADDED_LINE_BYTES`] each to `path` until it holds at least
/// `bytes` bytes; returns how many lines it wrote.
pub(crate) fn write_padded_requests(path: &Path, bytes: u64) -> anyhow::Result<u64> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create input file {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let (mut written, mut lines) = (0u64, 0u64);
    while written < bytes {
        let head = format!(r#"{{"custom_id":"{}","method":"POST","url":"{CHAT_URL}","body":"#, custom_id(lines));
        let prompt_len = PADDED_LINE_BYTES.saturating_sub(head.len() + 80);
        let body = format!(
            r#"{{"model":"mock-model","messages":[{{"role":"user","content":"{} {lines}"}}]}}"#,
            "lorem ipsum ".repeat(prompt_len / 12)
        );
        let line = format!("{head}{body}}}\n");
        out.write_all(line.as_bytes())?;
        written += line.len() as u64;
        lines += 1;
    }
    out.flush()?;
    Ok(lines)
}

/// Item `i` of `total` of job `job_id`, exactly as `producer submit` would queue it.
pub(crate) fn item(job_id: &str, i: u64, total: u64, submitted_at_ms: u64) -> anyhow::Result<Item> {
    Ok(Item {
        job_id: job_id.to_string(),
        index: i,
        total,
        custom_id: custom_id(i),
        provider: PROVIDER.to_string(),
        url: CHAT_URL.to_string(),
        body: RawValue::from_string(body(i))?,
        attempt: 0,
        submitted_at_ms,
        deadline_ms: None,
        first_delay_ms: None,
        flex: false,
    })
}

/// A job id of the same length as the producer's (`job_` + 16 hex digits).
pub(crate) fn job_id() -> String {
    format!("job_{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_lines_parse_as_batch_lines() {
        let dir = std::env::temp_dir().join(format!("bench-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.jsonl");
        write_requests(&path, 3).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<fleet::wire::BatchInputLine> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].custom_id, "req-2");
        assert_eq!(lines[2].body.get(), body(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
