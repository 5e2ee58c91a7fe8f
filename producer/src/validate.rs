//! Validation of an input file (OpenAI Batch lines, or Anthropic Message Batches requests
//! for an Anthropic-kind provider: see [`crate::input`]), streaming, before anything is
//! published.
//!
//! Every line is checked (JSON, fields, method, url, body size, duplicate `custom_id`), and
//! every problem is reported with its line number, so a user fixes the file in one go.
//! Memory stays bounded: `custom_id`s are remembered as 64-bit hashes, and a hash match is
//! confirmed by comparing the real strings in a second, targeted pass (so a hash collision
//! can never refuse a valid file).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::BufRead;
use std::path::Path;

use fleet::config::ProviderKind;
use fleet::endpoint::Endpoint;
use fleet::wire::{BatchInputLine, MAX_CUSTOM_ID_BYTES};

use crate::input::{self, Format, ParseError};
use xxhash_rust::xxh3::xxh3_64;

/// At most this many problems are listed; the rest are counted.
const MAX_REPORTED: usize = 50;

/// One problem in the input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong with it, for the user.
    pub message: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Why a file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The input file.
        path: String,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The file holds no request: a job needs at least one.
    #[error("{path} contains no requests")]
    Empty {
        /// The input file.
        path: String,
    },
    /// Some lines are not valid requests.
    #[error("{path} has {count} invalid line(s):\n{}", render(.errors, *.count))]
    Lines {
        /// The input file.
        path: String,
        /// The first problems found, at most `MAX_REPORTED`.
        errors: Vec<LineError>,
        /// Invalid lines in all, listed or not.
        count: usize,
    },
}

fn render(errors: &[LineError], count: usize) -> String {
    let mut s: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
    if count > errors.len() {
        s.push(format!("  ... and {} more", count - errors.len()));
    }
    s.join("\n")
}

/// Rules a file is checked against.
pub struct Rules {
    /// The kind of the job's provider: decides the endpoints and line formats allowed.
    pub kind: ProviderKind,
    /// Largest request body accepted (`producer.max_body_bytes`).
    pub max_body_bytes: usize,
}

/// Checks one line; `Ok` carries the parsed line.
pub fn check_line(raw: &[u8], rules: &Rules) -> Result<BatchInputLine, String> {
    let (line, format) = input::parse_line(raw).map_err(|e| match e {
        ParseError::Shape(message) => message,
        ParseError::Json(e) if e.classify() == serde_json::error::Category::Data => strip_position(&e),
        ParseError::Json(_) if std::str::from_utf8(raw).is_err() => {
            "not UTF-8 text (is this a binary file?)".to_string()
        }
        ParseError::Json(e) => format!("malformed JSON: {}", strip_position(&e)),
    })?;
    if format == Format::AnthropicBatch && rules.kind != ProviderKind::Anthropic {
        return Err(format!(
            "an Anthropic Message Batches request (custom_id + params) needs a provider of kind anthropic, not {}",
            rules.kind.name()
        ));
    }
    if line.custom_id.is_empty() {
        return Err("custom_id is empty".into());
    }
    if line.custom_id.len() > MAX_CUSTOM_ID_BYTES {
        return Err(format!("custom_id is {} bytes long (at most {MAX_CUSTOM_ID_BYTES})", line.custom_id.len()));
    }
    if !line.method.eq_ignore_ascii_case("POST") {
        return Err(format!("method {:?} is not supported (only POST)", line.method));
    }
    if Endpoint::for_kind(&line.url, rules.kind).is_none() {
        let urls = Endpoint::paths_of(rules.kind).join(", ");
        return Err(format!("url {:?} is not supported by this provider (supported: {urls})", line.url));
    }
    let body = line.body.get();
    if !body.starts_with('{') {
        return Err("body must be a JSON object".into());
    }
    if body.len() > rules.max_body_bytes {
        return Err(format!("body is {} bytes, over the limit of {} bytes", body.len(), rules.max_body_bytes));
    }
    if fleet::wire::asks_to_stream(&line.body) {
        return Err("body asks for \"stream\": true, which a batch cannot use (remove it)".into());
    }
    // A Gemini provider gets the line translated: one that cannot be is refused here, with
    // the reason (what maps and what does not: docs/providers.md#gemini).
    if rules.kind == ProviderKind::Gemini {
        if let Some(endpoint) = Endpoint::from_path(&line.url) {
            fleet::gemini::translate_request(endpoint, body).map_err(|e| format!("for Gemini: {e}"))?;
        }
    }
    Ok(line)
}

/// serde_json appends "at line 1 column 7" (of the line itself); our line number is better.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Reads non-blank lines of a file with their 1-based line numbers.
pub fn for_each_line(path: &Path, mut f: impl FnMut(u64, &[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(4096);
    let mut line_no = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        line_no += 1;
        let trimmed = buf.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        f(line_no, trimmed)?;
    }
}

/// Validates the whole file; returns the number of requests.
pub fn validate_file(path: &Path, rules: &Rules) -> Result<u64, ValidationError> {
    let io_err = |source| ValidationError::Io { path: path.display().to_string(), source };
    let mut errors = Vec::new();
    let mut count = 0usize;
    let mut requests = 0u64;
    let mut seen: HashMap<u64, u64> = HashMap::new();
    // (line, earlier line) pairs whose custom_id hashes match.
    let mut candidates: Vec<(u64, u64)> = Vec::new();
    for_each_line(path, |line_no, raw| {
        requests += 1;
        match check_line(raw, rules) {
            Ok(line) => {
                if let Some(first) = seen.insert(xxh3_64(line.custom_id.as_bytes()), line_no) {
                    seen.insert(xxh3_64(line.custom_id.as_bytes()), first);
                    candidates.push((line_no, first));
                }
            }
            Err(message) => {
                count += 1;
                if errors.len() < MAX_REPORTED {
                    errors.push(LineError { line: line_no, message });
                }
            }
        }
        Ok(())
    })
    .map_err(io_err)?;
    if !candidates.is_empty() {
        for e in confirm_duplicates(path, &candidates).map_err(io_err)? {
            count += 1;
            if errors.len() < MAX_REPORTED {
                errors.push(e);
            }
        }
        errors.sort_by_key(|e| e.line);
    }
    if count > 0 {
        return Err(ValidationError::Lines { path: path.display().to_string(), errors, count });
    }
    if requests == 0 {
        return Err(ValidationError::Empty { path: path.display().to_string() });
    }
    Ok(requests)
}

/// Reads the custom_ids of the candidate lines and reports the real duplicates.
fn confirm_duplicates(path: &Path, candidates: &[(u64, u64)]) -> std::io::Result<Vec<LineError>> {
    let wanted: HashSet<u64> = candidates.iter().flat_map(|(a, b)| [*a, *b]).collect();
    let mut ids: HashMap<u64, String> = HashMap::new();
    for_each_line(path, |line_no, raw| {
        if wanted.contains(&line_no) {
            if let Ok((line, _)) = input::parse_line(raw) {
                ids.insert(line_no, line.custom_id);
            }
        }
        Ok(())
    })?;
    Ok(candidates
        .iter()
        .filter(|(a, b)| ids.get(a) == ids.get(b))
        .map(|(line, first)| LineError {
            line: *line,
            message: format!("duplicate custom_id {:?} (first seen on line {first})", ids[line]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules { kind: ProviderKind::Openai, max_body_bytes: 100 }
    }

    fn write(name: &str, content: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("validate-{}-{name}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        p
    }

    const OK: &str =
        r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#;

    #[test]
    fn each_kind_of_bad_line_is_named() {
        let cases = [
            ("{not json", "malformed JSON"),
            (r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#, "missing field `custom_id`"),
            (r#"{"custom_id":"a","method":"GET","url":"/v1/chat/completions","body":{}}"#, "only POST"),
            (r#"{"custom_id":"a","method":"POST","url":"/v1/images","body":{}}"#, "not supported"),
            (r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":[1]}"#, "JSON object"),
            (r#"{"custom_id":"a","method":"POST","url":"/v1/../admin","body":{}}"#, "not supported"),
            (r#"{"custom_id":"a","method":"POST","url":"/v1/messages","body":{}}"#, "not supported"),
            (r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"stream":true}}"#, "stream"),
        ];
        for (line, want) in cases {
            let err = check_line(line.as_bytes(), &rules()).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
        let big = format!(
            r#"{{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{{"input":"{}"}}}}"#,
            "x".repeat(200)
        );
        assert!(check_line(big.as_bytes(), &rules()).unwrap_err().contains("over the limit"));
    }

    #[test]
    fn anthropic_batch_requests_are_read_for_anthropic_providers_only() {
        let line = br#"{"custom_id":"r1","params":{"model":"c","max_tokens":5,"messages":[]}}"#;
        let anthropic = Rules { kind: ProviderKind::Anthropic, max_body_bytes: 100 };
        let read = check_line(line, &anthropic).unwrap();
        assert_eq!(
            (read.url.as_str(), read.body.get()),
            ("/v1/messages", r#"{"model":"c","max_tokens":5,"messages":[]}"#)
        );
        assert!(check_line(line, &rules()).unwrap_err().contains("needs a provider of kind anthropic"));
        for (bad, want) in [
            (r#"{"custom_id":"r","params":[1]}"#, "JSON object"),
            (r#"{"custom_id":"r","params":{"stream":true}}"#, "stream"),
            (r#"{"params":{}}"#, "missing field `custom_id`"),
            (r#"{"custom_id":"r","params":{},"body":{}}"#, "keep one format"),
        ] {
            let err = check_line(bad.as_bytes(), &anthropic).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn responses_and_moderations_lines_are_accepted_for_openai_providers() {
        for url in ["/v1/responses", "/v1/moderations"] {
            let line = format!(r#"{{"custom_id":"a","method":"POST","url":"{url}","body":{{"input":"x"}}}}"#);
            assert_eq!(check_line(line.as_bytes(), &rules()).unwrap().url, url);
            let anthropic = Rules { kind: ProviderKind::Anthropic, max_body_bytes: 100 };
            assert!(check_line(line.as_bytes(), &anthropic).unwrap_err().contains("not supported"));
        }
    }

    #[test]
    fn gemini_lines_are_refused_when_they_cannot_be_translated() {
        let gemini = Rules { kind: ProviderKind::Gemini, max_body_bytes: 1000 };
        let line =
            |body: &str| format!(r#"{{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{body}}}"#);
        let ok = line(r#"{"model":"gemini-2.0-flash","messages":[{"role":"user","content":"hi"}]}"#);
        assert!(check_line(ok.as_bytes(), &gemini).is_ok());
        let tools = line(r#"{"model":"gemini-2.0-flash","messages":[{"role":"user","content":"hi"}],"tools":[]}"#);
        let err = check_line(tools.as_bytes(), &gemini).unwrap_err();
        assert!(err.contains("for Gemini") && err.contains("\"tools\""), "{err}");
        let completions = r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#;
        assert!(check_line(completions.as_bytes(), &gemini).unwrap_err().contains("not supported"));
        let anthropic = br#"{"custom_id":"r1","params":{"model":"c","max_tokens":5,"messages":[]}}"#;
        assert!(check_line(anthropic, &gemini).unwrap_err().contains("not gemini"));
        let p = write("gemini", format!("{ok}\n{}\n", tools.replace("\"a\"", "\"b\"")).as_bytes());
        let e = validate_file(&p, &gemini).unwrap_err().to_string();
        assert!(e.contains("line 2: for Gemini"), "{e}");
    }

    #[test]
    fn duplicates_across_both_formats_are_reported() {
        let anthropic = Rules { kind: ProviderKind::Anthropic, max_body_bytes: 100 };
        let openai_form = r#"{"custom_id":"a","method":"POST","url":"/v1/messages","body":{"max_tokens":1}}"#;
        let p = write("dup-formats", format!("{openai_form}\n{{\"custom_id\":\"a\",\"params\":{{}}}}\n").as_bytes());
        match validate_file(&p, &anthropic).unwrap_err() {
            ValidationError::Lines { errors, .. } => {
                assert_eq!(
                    errors,
                    vec![LineError { line: 2, message: "duplicate custom_id \"a\" (first seen on line 1)".into() }]
                );
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn duplicates_are_reported_with_both_lines() {
        let p = write("dup", format!("{OK}\n\n{}\n{OK}\n", OK.replace("\"a\"", "\"b\"")).as_bytes());
        match validate_file(&p, &rules()).unwrap_err() {
            ValidationError::Lines { errors, .. } => {
                assert_eq!(
                    errors,
                    vec![LineError { line: 4, message: "duplicate custom_id \"a\" (first seen on line 1)".into() }]
                );
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn empty_and_binary_files_are_refused() {
        let p = write("empty", b"\n  \n");
        assert!(matches!(validate_file(&p, &rules()), Err(ValidationError::Empty { .. })));
        let p = write("bin", &[0xff, 0xfe, 0x00, 0x12, b'\n']);
        let e = validate_file(&p, &rules()).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn valid_file_counts_requests() {
        let p = write("ok", format!("{OK}\n{}\n", OK.replace("\"a\"", "\"b\"")).as_bytes());
        assert_eq!(validate_file(&p, &rules()).unwrap(), 2);
    }
}
