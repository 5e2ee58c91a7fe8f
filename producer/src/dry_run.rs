//! `producer submit --dry-run`: what a submission would do, and nothing of it. The file is
//! validated as `submit` validates it (a bad line is refused the same way, by number), the
//! mode is resolved as `submit` resolves it, and the file is read once more to count, per
//! endpoint, its lines, the chunks batch mode would cut ([`crate::batch::lay_out`]), and per
//! model the estimated tokens ([`fleet::tokens`]) and cost (the provider's price table,
//! [`fleet::usage::price_of`], at the batch factor in batch mode). No broker is contacted.
//!
//! The cost is an estimate with a stated bias: input tokens are the body's size over 4 (the
//! JSON around the prompt counts too, so it errs high), and output tokens are the most each
//! request asks for (`max_tokens` and the like; a request naming none adds nothing), so for
//! requests that name a maximum it is an upper bound.

use std::collections::BTreeMap;

use fleet::batch::{EndpointGroup, JobMode};
use fleet::config::ProviderConfig;
use fleet::usage::{price_of, Usage};
use serde::Serialize;

use crate::batch::{self, ModeArg};
use crate::submit::{InputError, SubmitRequest};
use crate::validate::{self, Rules};

/// Most distinct models tallied apart; the lines of any further model are tallied under
/// [`OTHER_MODELS`], so a file of a million model names stays a small report.
const MAX_MODELS: usize = 100;
/// Where lines of models beyond [`MAX_MODELS`] are tallied.
const OTHER_MODELS: &str = "(other models)";

/// What a submission would do.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    /// The provider the job would be submitted to.
    pub provider: String,
    /// Requests (valid lines) in the file: the job's items.
    pub total: u64,
    /// The mode the job would run in.
    pub mode: JobMode,
    /// Why `--mode auto` picked it (absent for an explicit mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_reason: Option<String>,
    /// Lines per endpoint, in the order batch mode would publish them.
    pub endpoints: Vec<EndpointPlan>,
    /// Provider batches batch mode would create (0 online).
    pub chunks: usize,
    /// The chunk limits applied: requests, bytes, estimated tokens (`None`: no budget).
    pub limits: (u64, u64, Option<u64>),
    /// Per model: estimated tokens and cost.
    pub models: Vec<ModelPlan>,
    /// The estimated cost of the priced models.
    pub cost: f64,
    /// Lines whose model has no price: they cost nothing in the estimate (nor for a cap).
    pub unpriced_lines: u64,
}

/// One endpoint's part of the job.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointPlan {
    /// The endpoint path of its lines' `url` (`/v1/chat/completions`, ...).
    pub endpoint: String,
    /// Lines of the file that call it.
    pub lines: u64,
    /// Estimated tokens (input estimate plus requested output) of its lines.
    pub tokens: u64,
    /// The chunks batch mode would cut: `[first, end)` positions and size (empty online).
    pub chunks: Vec<ChunkPlan>,
}

/// One chunk batch mode would cut.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkPlan {
    /// Requests in the chunk (its provider batch).
    pub requests: u64,
}

/// One model's tokens and cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelPlan {
    /// The model as the lines name it, or `(other models)` for those past the report's limit.
    pub model: String,
    /// Lines of the file that ask for it.
    pub lines: u64,
    /// Estimated input tokens (body size / 4).
    pub input_tokens: u64,
    /// Output tokens the requests ask for at most.
    pub max_output_tokens: u64,
    /// The price entry that prices it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priced_as: Option<String>,
    /// Estimated cost (0 when unpriced).
    pub cost: f64,
}

/// Validates `req.file` and works out what submitting it would do; publishes nothing.
pub fn dry_run(cfg: &fleet::Config, req: &SubmitRequest<'_>) -> anyhow::Result<DryRun> {
    let provider = cfg.providers.get(req.provider).ok_or_else(|| InputError::UnknownProvider {
        name: req.provider.to_string(),
        known: cfg.providers.keys().cloned().collect::<Vec<_>>().join(", "),
    })?;
    let rules = Rules { kind: provider.kind, max_body_bytes: cfg.producer.max_body_bytes };
    let total = validate::validate_file(req.file, &rules).map_err(InputError::from)?;
    if total > fleet::wire::MAX_JOB_ITEMS {
        return Err(InputError::TooMany { total }.into());
    }
    let deadline_s = batch::seconds_left(req.deadline_ms);
    let mode = crate::submit::checked_mode(req, provider, deadline_s)?;
    let mode_reason = (req.mode == ModeArg::Auto).then(|| batch::auto_reason(req.provider, provider, deadline_s));
    let groups = batch::lay_out(req.file, &rules, provider)?;
    let models = tally_models(req, &rules, provider, mode)?;
    let batch_mode = mode == JobMode::Batch;
    let endpoints: Vec<EndpointPlan> = groups.iter().map(|g| endpoint_plan(g, batch_mode)).collect();
    let chunks = endpoints.iter().map(|e| e.chunks.len()).sum();
    let (requests, bytes) = provider.batch_limits();
    Ok(DryRun {
        provider: req.provider.to_string(),
        total,
        mode,
        mode_reason,
        endpoints,
        chunks,
        limits: (requests, bytes, provider.batch_enqueued_tokens),
        cost: models.iter().map(|m| m.cost).sum(),
        unpriced_lines: models.iter().filter(|m| m.priced_as.is_none()).map(|m| m.lines).sum(),
        models,
    })
}

fn endpoint_plan(g: &EndpointGroup, batch_mode: bool) -> EndpointPlan {
    let chunks =
        if batch_mode { g.chunks.iter().map(|(s, e)| ChunkPlan { requests: e - s }).collect() } else { Vec::new() };
    EndpointPlan { endpoint: g.endpoint.clone(), lines: g.items, tokens: g.tokens, chunks }
}

/// Reads the file once more and sums, per model (`--model` when given), the estimated input
/// tokens and the requested output, then prices them.
fn tally_models(
    req: &SubmitRequest<'_>,
    rules: &Rules,
    provider: &ProviderConfig,
    mode: JobMode,
) -> anyhow::Result<Vec<ModelPlan>> {
    #[derive(serde::Deserialize)]
    struct Model {
        #[serde(default)]
        model: Option<String>,
    }
    let mut models: BTreeMap<String, ModelPlan> = BTreeMap::new();
    validate::for_each_line(req.file, |line_no, raw| {
        let line = validate::check_line(raw, rules)
            .map_err(|e| std::io::Error::other(format!("file changed since it was validated: line {line_no}: {e}")))?;
        let body = line.body.get().as_bytes();
        let named = match req.model {
            Some(m) => m.to_string(),
            None => serde_json::from_slice::<Model>(body).ok().and_then(|m| m.model).unwrap_or_default(),
        };
        let key = if models.len() < MAX_MODELS || models.contains_key(&named) { named } else { OTHER_MODELS.into() };
        let m = models.entry(key.clone()).or_insert_with(|| ModelPlan { model: key, ..ModelPlan::default() });
        m.lines += 1;
        m.input_tokens = m.input_tokens.saturating_add(fleet::tokens::estimate_prompt_tokens(body));
        m.max_output_tokens = m.max_output_tokens.saturating_add(fleet::tokens::requested_output_tokens(body));
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("{}: {e}", req.file.display()))?;
    let mut out: Vec<ModelPlan> = models.into_values().collect();
    for m in &mut out {
        if let Some((name, price)) = price_of(&provider.prices, &m.model) {
            let usage = Usage {
                model: m.model.clone(),
                input_tokens: m.input_tokens,
                output_tokens: m.max_output_tokens,
                batch: mode == JobMode::Batch,
                flex: mode == JobMode::Flex,
                ..Usage::default()
            };
            m.priced_as = Some(name.to_string());
            m.cost = price.cost(&usage);
        }
    }
    Ok(out)
}

impl std::fmt::Display for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.mode {
            JobMode::Online => "online",
            JobMode::Batch => "batch",
            JobMode::Flex => "flex",
        };
        writeln!(f, "dry run: nothing was published")?;
        writeln!(f, "{} requests for provider {}, mode {mode}", self.total, self.provider)?;
        if let Some(why) = &self.mode_reason {
            writeln!(f, "  --mode auto picked {why}")?;
        }
        writeln!(f, "{:<28} {:>10} {:>14} {:>8}", "endpoint", "lines", "est. tokens", "chunks")?;
        for e in &self.endpoints {
            let chunks = if self.mode == JobMode::Batch { e.chunks.len().to_string() } else { "-".into() };
            writeln!(f, "{:<28} {:>10} {:>14} {:>8}", e.endpoint, e.lines, e.tokens, chunks)?;
        }
        if self.mode == JobMode::Batch {
            let (requests, bytes, tokens) = self.limits;
            let budget = tokens.map_or("no enqueued-token budget".to_string(), |t| format!("{t} tokens"));
            let plural = if self.chunks == 1 { "" } else { "s" };
            writeln!(
                f,
                "{} chunk{plural} (provider batches), within {requests} requests, {bytes} bytes, {budget} each",
                self.chunks
            )?;
        }
        writeln!(f, "{:<28} {:>10} {:>14} {:>14} {:>12}", "model", "lines", "input tokens", "max output", "est. cost")?;
        for m in &self.models {
            let cost = if m.priced_as.is_some() { format!("{:.6}", m.cost) } else { "no price".into() };
            let name = if m.model.is_empty() { "(none)" } else { m.model.as_str() };
            writeln!(f, "{name:<28} {:>10} {:>14} {:>14} {cost:>12}", m.lines, m.input_tokens, m.max_output_tokens)?;
        }
        write!(f, "estimated cost: {:.6}", self.cost)?;
        if self.unpriced_lines > 0 {
            write!(f, " (and {} lines of models without a price)", self.unpriced_lines)?;
        }
        writeln!(f)?;
        write!(
            f,
            "(input tokens are estimated from the body's size; output is the most each request asks for, nothing when it names no max_tokens)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mixed_file_is_counted_per_endpoint_chunked_and_priced() {
        let dir = std::env::temp_dir().join(format!("dry-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("in.jsonl");
        let mut text = String::new();
        for i in 0..10 {
            if i % 2 == 0 {
                text.push_str(&format!(
                    r#"{{"custom_id":"c{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"gpt-4o-mini","max_tokens":100,"messages":[]}}}}"#
                ));
            } else {
                text.push_str(&format!(
                    r#"{{"custom_id":"e{i}","method":"POST","url":"/v1/embeddings","body":{{"model":"emb","input":"x"}}}}"#
                ));
            }
            text.push('\n');
        }
        std::fs::write(&file, text).unwrap();
        let config = dir.join("fleet.toml");
        std::fs::write(
            &config,
            "[providers.p]\nkind = \"openai\"\nbase_url = \"http://h\"\nbatch = true\nbatch_max_requests = 3\n\
             [providers.p.prices.\"gpt-4o-mini\"]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n",
        )
        .unwrap();
        let cfg = fleet::Config::load(Some(&config)).unwrap();
        let req = SubmitRequest {
            file: &file,
            provider: "p",
            model: None,
            deadline_ms: None,
            progress: false,
            resume: None,
            mode: ModeArg::Auto,
            fallback_online: false,
            priority: 1,
            max_cost: None,
            webhook_url: None,
        };
        let d = dry_run(&cfg, &req).unwrap();
        assert_eq!(d.mode, JobMode::Batch);
        assert!(d.mode_reason.as_deref().unwrap().contains("no deadline"));
        let per: Vec<(&str, u64, usize)> =
            d.endpoints.iter().map(|e| (e.endpoint.as_str(), e.lines, e.chunks.len())).collect();
        assert_eq!(per, [("/v1/chat/completions", 5, 2), ("/v1/embeddings", 5, 2)]);
        assert_eq!(d.chunks, 4, "5 lines of each endpoint in chunks of at most 3");
        let chat = d.models.iter().find(|m| m.model == "gpt-4o-mini").unwrap();
        assert_eq!(chat.max_output_tokens, 500);
        // Half price in batch mode (the default batch factor).
        let want = (chat.input_tokens as f64 * 1.0 + 500.0 * 2.0) / 1e6 * 0.5;
        assert!((d.cost - want).abs() < 1e-12, "{} vs {want}", d.cost);
        assert_eq!(d.unpriced_lines, 5);
        let shown = d.to_string();
        assert!(shown.contains("4 chunks") && shown.contains("nothing was published"), "{shown}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
