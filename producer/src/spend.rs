//! Spend caps that cannot be silent: `submit --max-cost` is refused for a job none of whose
//! lines the provider's price table can price (the cap would never fire), and `retry`
//! carries the original job's cap to the new job unless given another.
//!
//! A line is priced when the model it asks for (`--model`, else its body's `model`) has an
//! entry in `providers.<name>.prices`, by the rule answers are priced with
//! ([`fleet::usage::price_of`]: the exact name, else the name without a trailing date
//! suffix). Providers answer with the model's dated name, which the same entry prices.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use fleet::config::ProviderConfig;
use fleet::wire::TrackerRequest;

use crate::validate::{self, Rules};

/// Distinct unpriced model names remembered for the message (a file may name many).
const MAX_NAMED: usize = 5;

/// `--max-cost` was given for a job whose lines the price table cannot price.
#[derive(Debug, thiserror::Error)]
#[error(
    "--max-cost {max_cost} cannot be enforced: provider {provider:?} has no price for {}; no line of {file} \
     can be priced, so the cap would never fire. Add a price (`[providers.{provider}.prices.\"<model>\"]`, \
     see docs/configuration.md; a dated answer like \"<model>-2024-07-18\" is priced by the undated entry) \
     or submit without --max-cost",
    names(.unpriced)
)]
pub struct UnpricedCap {
    /// The provider whose price table has no entry for the file's models.
    pub provider: String,
    /// The input file, as given.
    pub file: String,
    /// The `--max-cost` cap that could not be enforced.
    pub max_cost: f64,
    /// Some of the models asked for, with how many lines ask for each.
    pub unpriced: BTreeMap<String, u64>,
}

fn names(models: &BTreeMap<String, u64>) -> String {
    let listed: Vec<String> = models
        .iter()
        .take(MAX_NAMED)
        .map(
            |(m, n)| {
                if m.is_empty() {
                    format!("lines without a model ({n})")
                } else {
                    format!("model {m:?} ({n} lines)")
                }
            },
        )
        .collect();
    let more = models.len().saturating_sub(MAX_NAMED);
    if more > 0 {
        format!("{} and {more} more models", listed.join(", "))
    } else {
        listed.join(", ")
    }
}

/// How the lines of a file stand against a price table.
#[derive(Debug, Default, PartialEq)]
pub struct Pricing {
    /// Lines whose model has a price.
    pub priced_lines: u64,
    /// Unpriced models (at most [`MAX_NAMED`] of them named, the rest counted under the
    /// last) with their line counts.
    pub unpriced: BTreeMap<String, u64>,
    /// Lines whose model has no price.
    pub unpriced_lines: u64,
}

/// The model a request body asks for (`""` when it names none).
fn model_of(body: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Model {
        #[serde(default)]
        model: Option<String>,
    }
    serde_json::from_str::<Model>(body).ok().and_then(|m| m.model).unwrap_or_default()
}

/// Reads the models the lines of `file` ask for (`model` replaces them all) and which of
/// them `provider`'s price table prices. The file was validated: a line that does not
/// parse counts as unpriced.
pub fn pricing(file: &Path, rules: &Rules, provider: &ProviderConfig, model: Option<&str>) -> std::io::Result<Pricing> {
    let mut out = Pricing::default();
    let mut seen: BTreeMap<String, bool> = BTreeMap::new();
    validate::for_each_line(file, |_, raw| {
        let asked = match model {
            Some(m) => m.to_string(),
            None => validate::check_line(raw, rules).map(|l| model_of(l.body.get())).unwrap_or_default(),
        };
        let priced = match seen.get(&asked) {
            Some(p) => *p,
            None => {
                let p = fleet::usage::price_of(&provider.prices, &asked).is_some();
                // Bounded: a file of a million distinct models costs a map of a few entries.
                if p || seen.len() < 1_000 {
                    seen.insert(asked.clone(), p);
                }
                p
            }
        };
        if priced {
            out.priced_lines += 1;
        } else {
            out.unpriced_lines += 1;
            if out.unpriced.len() < MAX_NAMED || out.unpriced.contains_key(&asked) {
                *out.unpriced.entry(asked).or_default() += 1;
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Refuses `--max-cost` when no line of the job can be priced; with some lines unpriced,
/// says on stderr that the cap counts only the priced ones. Nothing to check without a cap.
pub fn check_cap(
    file: &Path,
    rules: &Rules,
    provider_name: &str,
    provider: &ProviderConfig,
    model: Option<&str>,
    max_cost: Option<f64>,
) -> anyhow::Result<()> {
    let Some(max_cost) = max_cost else { return Ok(()) };
    let p = pricing(file, rules, provider, model)?;
    if p.priced_lines == 0 {
        return Err(UnpricedCap {
            provider: provider_name.to_string(),
            file: file.display().to_string(),
            max_cost,
            unpriced: p.unpriced,
        }
        .into());
    }
    if p.unpriced_lines > 0 {
        eprintln!(
            "note: the cap of {max_cost} counts {} of {} lines: provider {provider_name:?} has no price for {}",
            p.priced_lines,
            p.priced_lines + p.unpriced_lines,
            names(&p.unpriced)
        );
    }
    Ok(())
}

/// How long `retry` asks the tracker for the original job's cap.
const CAP_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What a retry keeps of the original job, as the tracker knows it: its spend cap, and
/// whether it ran on the flex tier.
#[derive(Debug, Default)]
pub struct RetryTerms {
    /// The original job's cap (`submit --max-cost`), if it had one.
    pub max_cost: Option<f64>,
    /// The original job ran with `--mode flex`.
    pub flex: bool,
}

/// Asks the tracker for [`RetryTerms`] of `old_job`. When it cannot say, the retry runs
/// without a cap and online, and says so (`retry --max-cost` and `--mode` set them).
pub async fn retry_terms(cfg: &fleet::Config, old_job: &str) -> RetryTerms {
    let req = TrackerRequest::Status { job_id: old_job.to_string() };
    match crate::inspect::ask(cfg, &req, CAP_QUERY_TIMEOUT).await {
        Ok(reply) => reply.jobs.into_iter().next().map_or_else(RetryTerms::default, |j| RetryTerms {
            max_cost: j.usage.and_then(|u| u.max_cost),
            flex: j.mode == Some(fleet::batch::JobMode::Flex),
        }),
        Err(e) => {
            eprintln!(
                "note: the cap and mode of job {old_job} are unknown ({e:#}); the retry runs online without a cap \
                 (--max-cost and --mode set them)"
            );
            RetryTerms::default()
        }
    }
}

/// A cap as given, for people: `0.001`, `12.5`, `3` (never rounded to `0.00`).
pub fn show_cap(cap: f64) -> String {
    format!("{cap}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::usage::Price;
    use std::io::Write;

    fn provider(models: &[&str]) -> ProviderConfig {
        let price = Price {
            input_per_mtok: 1.0,
            output_per_mtok: 1.0,
            cached_input_per_mtok: None,
            batch_factor: 0.5,
            flex_factor: None,
        };
        let mut p = ProviderConfig::new(fleet::config::ProviderKind::Openai, "http://127.0.0.1:1");
        p.prices = models.iter().map(|m| (m.to_string(), price.clone())).collect();
        p
    }

    fn file(name: &str, models: &[&str]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("spend-{}-{name}.jsonl", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        for (i, m) in models.iter().enumerate() {
            writeln!(
                f,
                r#"{{"custom_id":"r{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{m}","messages":[]}}}}"#
            )
            .unwrap();
        }
        path
    }

    fn rules() -> Rules {
        Rules { kind: fleet::config::ProviderKind::Openai, max_body_bytes: 1 << 20 }
    }

    #[test]
    fn a_cap_on_lines_nobody_can_price_is_refused_with_the_models_named() {
        let f = file("unpriced", &["gpt-x", "gpt-x", "other"]);
        let p = provider(&["gpt-4o-mini"]);
        let e = check_cap(&f, &rules(), "openai", &p, None, Some(0.001)).unwrap_err();
        let text = e.to_string();
        assert!(e.downcast_ref::<UnpricedCap>().is_some());
        assert!(text.contains("model \"gpt-x\" (2 lines)") && text.contains("--max-cost 0.001"), "{text}");
        assert!(check_cap(&f, &rules(), "openai", &p, None, None).is_ok(), "no cap, nothing to check");
        assert!(check_cap(&f, &rules(), "openai", &p, Some("gpt-4o-mini"), Some(1.0)).is_ok(), "--model priced");
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn dated_requests_are_priced_and_partly_priced_files_are_accepted() {
        let f = file("dated", &["gpt-4o-mini-2024-07-18", "gpt-4o-mini", "gpt-x"]);
        let p = provider(&["gpt-4o-mini"]);
        let got = pricing(&f, &rules(), &p, None).unwrap();
        assert_eq!((got.priced_lines, got.unpriced_lines), (2, 1));
        assert!(check_cap(&f, &rules(), "openai", &p, None, Some(1.0)).is_ok());
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn caps_are_shown_as_given() {
        assert_eq!(show_cap(0.001), "0.001");
        assert_eq!(show_cap(12.5), "12.5");
        assert_eq!(show_cap(3.0), "3");
    }
}
