//! The docs name the configuration keys and the metrics the code has, and only those.
//!
//! The code is the source: the keys are read off the loaded defaults (`Config` is
//! `Serialize`), the metrics off the metric structs of `fleet::metrics`. Checked against
//! them, with no list kept by hand in between:
//! - the configuration table of `docs/configuration.md` lists every key once, and every
//!   `| key | default | meaning |` table of the docs (the README's short one too) gives the
//!   default the code has;
//! - the metrics table of `docs/metrics.md` lists every metric once, with its type, labels
//!   and who pushes it;
//! - every key (`amqp.url`, `FLEET__AMQP__URL`) and every metric any doc mentions exists
//!   (a `batch_*` word is a metric when it ends like one, `_total`, `_seconds`, ..., is
//!   followed by labels `{`, or is a near miss of a metric's name), except under a heading
//!   that says "Not yet built";
//! - every `fleet.toml` the docs write (`cat > fleet.toml <<'EOF'`) loads.
//!
//! Run with `cargo test -p fleet --test docs_in_step`; no broker is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fleet::config::{edit_distance, ProviderConfig, ProviderKind};
use fleet::metrics::{ApiMetrics, TrackerMetrics, WorkerMetrics};
use fleet::usage::Price;
use prometheus::core::Collector;
use prometheus::Registry;
use serde_json::{json, Value};

/// How the docs write the keys of any provider.
const PROVIDER: &str = "providers.<name>.";
/// How the docs write the keys of any model of a provider's price table.
const PRICE: &str = "providers.<name>.prices.\"<model>\".";
/// Sections of the configuration: a mention starting `<section>.` names a key.
/// Who exposes `producer serve`'s metrics: Prometheus scrapes them (scrape job `batch_api`).
const API_SCRAPE_JOB: &str = "batch_api";

const SECTIONS: [&str; 9] =
    ["amqp", "pushgateway", "worker", "retry", "producer", "tracker", "providers", "api", "webhooks"];
/// Endings that make a `batch_*` word a metric (or a histogram's series) in the docs.
const METRIC_SUFFIXES: [&str; 5] = ["_total", "_seconds", "_bucket", "_sum", "_count"];
/// Key-looking mentions that are not keys on purpose: the typo in the example of the
/// unknown-key message.
const DELIBERATE_TYPOS: [&str; 1] = ["worker.max_in_fligt"];

#[test]
fn the_configuration_table_lists_every_key_with_its_default() {
    let code = code_keys();
    let text = read(Path::new("docs/configuration.md"));
    let rows = table(&text, "key");
    assert!(!rows.is_empty(), "docs/configuration.md has a | key | default | meaning | table");
    let mut listed = BTreeSet::new();
    for row in &rows {
        let key = span(&row[0]).unwrap_or_else(|| panic!("a key in backticks, alone: {:?}", row[0]));
        assert!(listed.insert(key.to_string()), "docs/configuration.md lists {key} twice");
    }
    let missing: Vec<_> = code.keys().filter(|k| !listed.contains(*k)).collect();
    let extra: Vec<_> = listed.iter().filter(|k| !code.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/configuration.md and the code disagree:\n  keys the table lacks: {missing:?}\n  keys the code lacks: {extra:?}"
    );
}

#[test]
fn every_key_table_of_the_docs_gives_the_codes_default() {
    let code = code_keys();
    let mut tables = 0;
    for (path, text) in docs() {
        let rows = table(&text, "key");
        tables += usize::from(!rows.is_empty());
        for row in rows {
            let Some(key) = span(&row[0]) else { continue };
            let Some(default) = code.get(key) else {
                panic!("{path}: {key} is not a configuration key");
            };
            let written = row.get(1).and_then(|cell| literal(cell));
            match (default, written) {
                (Some(default), Some(written)) => {
                    assert!(same(default, &written), "{path}: {key} defaults to {default}, the docs say {written}")
                }
                (Some(default), None) => {
                    panic!(
                        "{path}: {key} defaults to {default}; write it first in its default cell, as TOML in backticks"
                    )
                }
                (None, Some(written)) => panic!("{path}: {key} has no default, the docs say {written}"),
                (None, None) => {}
            }
        }
    }
    assert!(tables >= 2, "the README's short table and the full one are both checked ({tables})");
}

#[test]
fn every_key_the_docs_mention_exists() {
    let code = code_keys();
    let known = |path: &str| code.keys().any(|k| k == path || k.starts_with(&format!("{path}.")));
    let mut checked = 0;
    for (doc, text) in docs() {
        for mention in inline_spans(&text).iter().flat_map(|s| key_mentions(s)) {
            if !DELIBERATE_TYPOS.contains(&mention.as_str()) {
                assert!(known(&mention), "{doc} mentions `{mention}`, which is not a configuration key");
                checked += 1;
            }
        }
        for var in env_mentions(&text) {
            assert!(known(&var.1), "{doc} mentions {}, which sets no configuration key ({})", var.0, var.1);
            checked += 1;
        }
    }
    assert!(checked > 100, "the docs' keys were found ({checked})");
}

#[test]
fn the_metrics_table_lists_every_metric_as_the_code_defines_it() {
    let code = code_metrics();
    let text = read(Path::new("docs/metrics.md"));
    let rows = table(&text, "metric");
    assert!(!rows.is_empty(), "docs/metrics.md has a | metric | type | labels | pushed by | table");
    let mut listed = BTreeSet::new();
    for row in &rows {
        let name = span(&row[0]).unwrap_or_else(|| panic!("a metric in backticks, alone: {:?}", row[0]));
        assert!(listed.insert(name.to_string()), "docs/metrics.md lists {name} twice");
        let Some(metric) = code.get(name) else { continue };
        assert_eq!(row[1], metric.kind, "docs/metrics.md: the type of {name}");
        assert_eq!(label_names(&row[2]), metric.labels, "docs/metrics.md: the labels of {name}");
        let pushers = [
            (fleet::push::WORKER_JOB, "worker"),
            (fleet::push::TRACKER_JOB, "tracker"),
            (API_SCRAPE_JOB, "producer serve"),
        ];
        for (who, word) in pushers {
            assert_eq!(
                row[3].contains(word),
                metric.pushed_by.contains(who),
                "docs/metrics.md: whether the {word} pushes {name} ({:?})",
                row[3]
            );
        }
    }
    let missing: Vec<_> = code.keys().filter(|k| !listed.contains(*k)).collect();
    let extra: Vec<_> = listed.iter().filter(|k| !code.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/metrics.md and the code disagree:\n  metrics the table lacks: {missing:?}\n  metrics the code lacks: {extra:?}"
    );
}

#[test]
fn every_metric_the_docs_mention_exists() {
    let metrics = code_metrics();
    let series = |w: &str| {
        ["_bucket", "_sum", "_count"].iter().any(|s| w.strip_suffix(s).is_some_and(|m| metrics.contains_key(m)))
    };
    let mut checked = 0;
    for (doc, text) in docs() {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("batch_") {
            let tail = &rest[at..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let (word, after) = tail.split_at(end);
            let preceded = rest[..at].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            rest = after;
            // `batch_*` words that are not metric-like are other things (a record type, a
            // label value, a key, an id such as `batch_req_<job>_<index>`).
            let metric_like = METRIC_SUFFIXES.iter().any(|s| word.ends_with(s))
                || after.starts_with('{')
                || metrics.keys().any(|m| edit_distance(m, word) <= 2);
            if preceded || !metric_like || word.contains(|c: char| c.is_ascii_digit()) {
                continue;
            }
            let nearest = metrics.keys().min_by_key(|m| edit_distance(m, word)).unwrap();
            assert!(
                metrics.contains_key(word) || series(word),
                "{doc} mentions {word}, which is no metric of the code (nearest: {nearest})"
            );
            checked += 1;
        }
    }
    assert!(checked >= metrics.len(), "the docs' metric names were found ({checked})");
}

#[test]
fn every_config_file_the_docs_write_loads() {
    let dir = std::env::temp_dir().join(format!("docs-in-step-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut loaded = 0;
    for (doc, text) in docs() {
        for (name, body) in heredocs(&text) {
            let file = dir.join(format!("{loaded}-{name}"));
            std::fs::write(&file, body).unwrap();
            fleet::Config::load(Some(&file)).unwrap_or_else(|e| panic!("{doc}: its {name} is refused: {e:#}"));
            loaded += 1;
        }
    }
    assert!(loaded >= 2, "the README's quickstart and real-provider files were loaded ({loaded})");
}

/// Every configuration key, as the docs write it, with its default: `None` when it has
/// none (required, or absent unless set).
fn code_keys() -> BTreeMap<String, Option<Value>> {
    let mut keys = BTreeMap::new();
    let mut config = serde_json::to_value(fleet::Config::load(None).expect("the defaults load")).unwrap();
    // The defaults hold the built-in mock; every provider has the keys of any other.
    config.as_object_mut().unwrap().remove("providers");
    walk(&config, "", &mut keys);

    let mut provider = serde_json::to_value(ProviderConfig::new(ProviderKind::Openai, "http://x")).unwrap();
    provider.as_object_mut().unwrap().remove("prices");
    walk(&provider, PROVIDER, &mut keys);
    for required in ["kind", "base_url"] {
        keys.insert(format!("{PROVIDER}{required}"), None);
    }

    // A price with every field set names them all (a new field fails to compile here);
    // one with only the required ones gives the defaults of the others.
    let full = Price {
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        cached_input_per_mtok: Some(1.0),
        batch_factor: 1.0,
        flex_factor: Some(1.0),
    };
    let mut price_keys = BTreeMap::new();
    walk(&serde_json::to_value(full).unwrap(), PRICE, &mut price_keys);
    let least: Price = serde_json::from_value(json!({"input_per_mtok": 0.0, "output_per_mtok": 0.0})).unwrap();
    let mut price_defaults = BTreeMap::new();
    walk(&serde_json::to_value(least).unwrap(), PRICE, &mut price_defaults);
    for key in price_keys.into_keys() {
        let required = key.ends_with(".input_per_mtok") || key.ends_with(".output_per_mtok");
        let default = if required { None } else { price_defaults.get(&key).cloned().flatten() };
        keys.insert(key, default);
    }
    keys
}

/// The leaves of `value` under `prefix`: a table's keys, joined by dots.
fn walk(value: &Value, prefix: &str, keys: &mut BTreeMap<String, Option<Value>>) {
    let Value::Object(map) = value else { panic!("{prefix}: a table") };
    for (key, v) in map {
        let path = format!("{prefix}{key}");
        match v {
            Value::Object(inner) if !inner.is_empty() => walk(v, &format!("{path}."), keys),
            Value::Null => drop(keys.insert(path, None)),
            _ => drop(keys.insert(path, Some(v.clone()))),
        }
    }
}

/// A metric as the code defines it.
struct Metric {
    kind: &'static str,
    labels: Vec<String>,
    /// The Pushgateway groups that carry it (`batch_worker`, `batch_tracker`).
    pushed_by: BTreeSet<&'static str>,
}

/// The Prometheus type a metric struct's field has.
trait Kind: Collector + Clone + 'static {
    const KIND: &'static str;
}
impl Kind for prometheus::IntCounter {
    const KIND: &'static str = "counter";
}
impl Kind for prometheus::IntCounterVec {
    const KIND: &'static str = "counter";
}
impl Kind for prometheus::CounterVec {
    const KIND: &'static str = "counter";
}
impl Kind for prometheus::IntGauge {
    const KIND: &'static str = "gauge";
}
impl Kind for prometheus::IntGaugeVec {
    const KIND: &'static str = "gauge";
}
impl Kind for prometheus::GaugeVec {
    const KIND: &'static str = "gauge";
}
impl Kind for prometheus::Histogram {
    const KIND: &'static str = "histogram";
}
impl Kind for prometheus::HistogramVec {
    const KIND: &'static str = "histogram";
}

/// Every metric of the worker's and the tracker's registries. The structs are taken apart
/// field by field with no `..`, so a metric added to either fails to compile here until it
/// is added below (a registry only lists the series that have a value, not its metrics).
fn code_metrics() -> BTreeMap<String, Metric> {
    let mut out = BTreeMap::new();
    let worker = WorkerMetrics::new();
    let WorkerMetrics {
        registry,
        items,
        provider_latency,
        retries,
        errors,
        in_flight,
        dead_letters,
        push_failures,
        worker_up,
        concurrency_limit,
        rate_limit,
        poll_cycle,
        key_rejections,
        keys_active,
        provider_paused,
        admission_waits,
        webhook_deliveries,
    } = &worker;
    let by = fleet::push::WORKER_JOB;
    add(&mut out, registry, items, by);
    add(&mut out, registry, provider_latency, by);
    add(&mut out, registry, retries, by);
    add(&mut out, registry, errors, by);
    add(&mut out, registry, in_flight, by);
    add(&mut out, registry, dead_letters, by);
    add(&mut out, registry, push_failures, by);
    add(&mut out, registry, worker_up, by);
    add(&mut out, registry, concurrency_limit, by);
    add(&mut out, registry, rate_limit, by);
    add(&mut out, registry, poll_cycle, by);
    add(&mut out, registry, key_rejections, by);
    add(&mut out, registry, keys_active, by);
    add(&mut out, registry, provider_paused, by);
    add(&mut out, registry, admission_waits, by);
    add(&mut out, registry, webhook_deliveries, by);
    // Registered by workers that serve a provider in batch mode.
    let provider_batches = fleet::metrics::register_provider_batches(registry);
    add(&mut out, registry, &provider_batches, by);

    let tracker = TrackerMetrics::new();
    let TrackerMetrics {
        registry,
        jobs,
        jobs_submitted,
        items,
        job_duration,
        jobs_in_progress,
        queue_backlog,
        usage_tokens,
        usage_cost,
        answers,
        job_cost,
        job_max_cost,
        push_failures,
    } = &tracker;
    let by = fleet::push::TRACKER_JOB;
    add(&mut out, registry, jobs, by);
    add(&mut out, registry, jobs_submitted, by);
    add(&mut out, registry, items, by);
    add(&mut out, registry, job_duration, by);
    add(&mut out, registry, jobs_in_progress, by);
    add(&mut out, registry, queue_backlog, by);
    add(&mut out, registry, usage_tokens, by);
    add(&mut out, registry, usage_cost, by);
    add(&mut out, registry, answers, by);
    add(&mut out, registry, job_cost, by);
    add(&mut out, registry, job_max_cost, by);
    add(&mut out, registry, push_failures, by);

    let api = ApiMetrics::new("ns");
    let ApiMetrics { registry, requests, upload_bytes, batches_open } = &api;
    let by = API_SCRAPE_JOB;
    add(&mut out, registry, requests, by);
    add(&mut out, registry, upload_bytes, by);
    add(&mut out, registry, batches_open, by);

    // What the registries gather (the series that have a value) is among the above.
    let gathered = [worker.registry.gather(), tracker.registry.gather(), api.registry.gather()];
    for family in gathered.iter().flatten() {
        assert!(out.contains_key(family.name()), "{} is registered but not a field", family.name());
    }
    out
}

/// Adds the metric `c` pushed by `by`, after checking that `registry` holds it.
fn add<C: Kind>(out: &mut BTreeMap<String, Metric>, registry: &Registry, c: &C, by: &'static str) {
    let desc = c.desc()[0].clone();
    assert!(
        matches!(registry.register(Box::new(c.clone())), Err(prometheus::Error::AlreadyReg)),
        "{} is registered in its registry",
        desc.fq_name
    );
    let metric = out.entry(desc.fq_name.clone()).or_insert_with(|| Metric {
        kind: C::KIND,
        labels: desc.variable_labels.clone(),
        pushed_by: BTreeSet::new(),
    });
    assert_eq!((metric.kind, &metric.labels), (C::KIND, &desc.variable_labels), "{}: one shape", desc.fq_name);
    metric.pushed_by.insert(by);
}

/// The workspace's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The text of a file of the workspace.
fn read(rel: &Path) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display()))
}

/// The README and every Markdown file of `docs/`, by path.
fn docs() -> Vec<(String, String)> {
    docs_as_written().into_iter().map(|(path, text)| (path, built(&text))).collect()
}

/// `text` without its sections headed "Not yet built" (they name what does not exist yet).
fn built(text: &str) -> String {
    let mut out = String::new();
    let mut skipping: Option<usize> = None;
    let mut fenced = false;
    for line in text.lines() {
        fenced ^= line.trim_start().starts_with("```");
        let level = line.chars().take_while(|&c| c == '#').count();
        if !fenced && level > 0 && line[level..].starts_with(' ') {
            if skipping.is_some_and(|l| level <= l) {
                skipping = None;
            }
            if skipping.is_none() && line.to_lowercase().contains("not yet built") {
                skipping = Some(level);
            }
        }
        if skipping.is_none() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The README and every Markdown file of `docs/` as they are.
fn docs_as_written() -> Vec<(String, String)> {
    let mut paths = vec![PathBuf::from("README.md")];
    let mut in_docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| Path::new("docs").join(p.file_name().unwrap()))
        .collect();
    in_docs.sort();
    paths.extend(in_docs);
    paths.into_iter().map(|p| (p.display().to_string(), read(&p))).collect()
}

/// The body rows of every Markdown table whose first header cell is `first`, as trimmed
/// cells (`\|` is a `|` inside a cell).
fn table(text: &str, first: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if cells(line).first().is_some_and(|c| c == first) && lines.peek().is_some_and(|l| l.starts_with("|--")) {
            lines.next();
            while let Some(row) = lines.next_if(|l| l.starts_with('|')) {
                rows.push(cells(row));
            }
        }
    }
    rows
}

/// The trimmed cells of one table row (none for a line that is not one).
fn cells(line: &str) -> Vec<String> {
    let Some(inner) = line.trim().strip_prefix('|') else { return Vec::new() };
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => out.last_mut().unwrap().push(chars.next().unwrap()),
            '|' => out.push(String::new()),
            _ => out.last_mut().unwrap().push(c),
        }
    }
    out.iter().map(|c| c.trim().to_string()).collect()
}

/// The text of a cell that is one backticked span and nothing else.
fn span(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`').filter(|s| !s.contains('`'))
}

/// The TOML value a default cell starts with (`` `256` ``, `` `"fleet"` ``, `` `[5, 30]` ``),
/// if it starts with one.
fn literal(cell: &str) -> Option<Value> {
    let rest = cell.strip_prefix('`')?;
    let text = &rest[..rest.find('`')?];
    let table: toml::Table = format!("v = {text}").parse().ok()?;
    Some(serde_json::to_value(&table["v"]).unwrap())
}

/// Equal values, numbers compared as numbers (TOML's `0.5` and serde's `0.5`, `256` and `256`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        _ => a == b,
    }
}

/// The label names of a labels cell: its comma-separated words outside parentheses.
fn label_names(cell: &str) -> Vec<String> {
    let mut depth = 0usize;
    let outside: String = cell
        .chars()
        .filter(|&c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect();
    outside.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// The inline code spans of Markdown text, fenced blocks left out.
fn inline_spans(text: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    prose.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// The configuration keys a code span names (`retry.max_attempts × timeout_s` names one),
/// a provider's and a model's name written as the docs' table writes them.
fn key_mentions(span: &str) -> Vec<String> {
    let word = |c: char| c.is_ascii_alphanumeric() || "_.<>\"-".contains(c);
    span.split(|c: char| !word(c))
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| w.split_once('.').is_some_and(|(section, _)| SECTIONS.contains(&section)))
        // File names (`api.md`, `worker.rs`) are not keys.
        .filter(|w| {
            !["md", "rs", "toml", "yaml", "yml", "json", "jsonl", "sh", "py"]
                .iter()
                .any(|x| w.ends_with(&format!(".{x}")))
        })
        .map(normalize)
        .collect()
}

/// `providers.openai.prices."gpt-4.1".x` as `providers.<name>.prices."<model>".x`.
fn normalize(path: &str) -> String {
    let Some(rest) = path.strip_prefix("providers.") else { return path.to_string() };
    let Some((_, rest)) = rest.split_once('.') else { return "providers".to_string() };
    let Some(model) = rest.strip_prefix("prices.") else { return format!("{PROVIDER}{rest}") };
    let after = match model.strip_prefix('"') {
        Some(quoted) => quoted.split_once('"').map_or("", |(_, after)| after),
        None => model.split_once('.').map_or("", |(_, after)| after),
    };
    match after.strip_prefix('.') {
        Some(field) => format!("{PRICE}{field}"),
        None => PRICE.trim_end_matches('.').to_string(),
    }
}

/// The TOML files a text writes with `cat > NAME.toml <<'TAG'`: (name, text).
fn heredocs(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some((name, tag)) = line.trim().strip_prefix("cat > ").and_then(|rest| rest.split_once(" <<")) else {
            continue;
        };
        if !name.ends_with(".toml") {
            continue;
        }
        let tag = tag.trim_matches('\'');
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != tag).collect();
        out.push((name.to_string(), body.join("\n")));
    }
    out
}

/// The `FLEET__SECTION__KEY` variables of a text, with the key each sets.
fn env_mentions(text: &str) -> Vec<(String, String)> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter_map(|w| Some((w, w.strip_prefix("FLEET__").filter(|p| !p.is_empty())?)))
        .map(|(w, path)| (w.to_string(), normalize(&path.split("__").collect::<Vec<_>>().join(".").to_lowercase())))
        .collect()
}
