//! Which provider a batch runs on, decided from the configuration, the batch's endpoint,
//! its `metadata.provider` and the models its file's lines name. Pure, so every branch is
//! tested here.
//!
//! The order of the checks is the contract:
//! 1. `metadata.provider` names a provider: that one, if it is configured and its kind
//!    serves the endpoint (else 400).
//! 2. Exactly one configured provider serves the endpoint: that one, whatever the models.
//! 3. Several do: each model of the file (in the order of its first line) must match the
//!    `models` globs of exactly one of them, and all models the same one. A model that
//!    matches none, or two, or a second provider, is refused naming its first line.

use std::collections::BTreeMap;

use fleet::config::ProviderConfig;
use fleet::endpoint::Endpoint;

use super::error::ApiError;

/// Distinct models kept per file: enough for any real file, and a file record stays small.
pub(crate) const MAX_MODELS: usize = 256;

/// The models a file's lines name, each with the first line (1-based) that names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Models {
    /// Distinct models in order of first appearance, at most [`MAX_MODELS`].
    pub seen: Vec<(String, u64)>,
    /// More than [`MAX_MODELS`] distinct models: the file cannot be routed by model.
    pub overflow: bool,
}

impl Models {
    /// Notes the `model` of the request on `line` (a body without one is routed like the
    /// rest of the file).
    pub(crate) fn note(&mut self, body: &str, line: u64) {
        #[derive(serde::Deserialize)]
        struct ModelOnly {
            model: Option<String>,
        }
        let Ok(ModelOnly { model: Some(model) }) = serde_json::from_str::<ModelOnly>(body) else { return };
        if self.seen.iter().any(|(m, _)| *m == model) {
            return;
        }
        if self.seen.len() >= MAX_MODELS {
            self.overflow = true;
        } else {
            self.seen.push((model, line));
        }
    }
}

/// Whether `text` matches the glob `pattern` (`*` any run of characters, `?` one).
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point (the last `*`): linear in practice and
    // never exponential, whatever a configured pattern looks like.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The provider a batch of `endpoint` runs on (see the module's header for the order).
pub(crate) fn choose_provider(
    providers: &BTreeMap<String, ProviderConfig>,
    endpoint: &str,
    named: Option<&str>,
    models: &Models,
) -> Result<String, ApiError> {
    let serves = |p: &ProviderConfig| Endpoint::for_kind(endpoint, p.kind).is_some();
    if let Some(name) = named {
        return match providers.get(name) {
            Some(p) if serves(p) => Ok(name.to_string()),
            Some(_) => {
                Err(ApiError::invalid(format!("provider {name:?} does not serve {endpoint}.")).param("metadata"))
            }
            None => Err(ApiError::invalid(format!("no provider {name:?} is configured.")).param("metadata")),
        };
    }
    let serving: Vec<(&String, &ProviderConfig)> = providers.iter().filter(|(_, p)| serves(p)).collect();
    match serving.as_slice() {
        [] => return Err(ApiError::invalid(format!("no configured provider serves {endpoint}.")).param("endpoint")),
        [(one, _)] => return Ok((*one).clone()),
        _ => {}
    }
    let names = || serving.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
    let refuse = |m: String| Err(ApiError::invalid(m).param("input_file_id"));
    if models.overflow {
        return refuse(format!(
            "the file names more than {MAX_MODELS} models; several providers serve {endpoint} ({}): \
             name one in metadata.provider.",
            names()
        ));
    }
    let mut chosen: Option<(&String, &str, u64)> = None;
    for (model, line) in &models.seen {
        let matching: Vec<&String> =
            serving.iter().filter(|(_, p)| p.models.iter().any(|g| glob_match(g, model))).map(|(n, _)| *n).collect();
        let provider = match matching.as_slice() {
            [one] => *one,
            [] => {
                return refuse(format!(
                    "line {line}: model {model:?} matches no provider's models among those serving \
                     {endpoint} ({}); add it to providers.<name>.models or name one in metadata.provider.",
                    names()
                ))
            }
            several => {
                let several: Vec<&str> = several.iter().map(|s| s.as_str()).collect();
                return refuse(format!(
                    "line {line}: model {model:?} matches the models of several providers ({}): name one \
                     in metadata.provider.",
                    several.join(", ")
                ));
            }
        };
        match chosen {
            None => chosen = Some((provider, model, *line)),
            Some((first, first_model, first_line)) if first != provider => {
                return refuse(format!(
                    "line {line}: model {model:?} routes to provider {provider:?}, but line {first_line} \
                     (model {first_model:?}) routes to {first:?}: a batch runs on one provider; split the file."
                ))
            }
            Some(_) => {}
        }
    }
    match chosen {
        Some((provider, _, _)) => Ok(provider.clone()),
        None => refuse(format!(
            "no line names a model and several providers serve {endpoint} ({}): name one in metadata.provider.",
            names()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::config::ProviderKind;

    #[test]
    fn globs_match_runs_and_single_characters() {
        assert!(glob_match("gpt-*", "gpt-4o-mini"));
        assert!(glob_match("*", ""));
        assert!(glob_match("o?-mini", "o3-mini"));
        assert!(glob_match("*mini*", "gpt-4o-mini-2024"));
        assert!(glob_match("claude-*-sonnet-*", "claude-3-5-sonnet-latest"));
        assert!(!glob_match("gpt-*", "o3-mini"));
        assert!(!glob_match("o?-mini", "o10-mini"));
        assert!(!glob_match("gpt", "gpt-4"));
        assert!(glob_match("a*a*a*a*b", &format!("{}b", "a".repeat(50))));
        assert!(!glob_match("a*a*a*a*b", &"a".repeat(50)));
    }

    #[test]
    fn models_are_noted_once_with_their_first_line_and_capped() {
        let mut m = Models::default();
        m.note(r#"{"model":"a","messages":[]}"#, 1);
        m.note(r#"{"model":"b"}"#, 2);
        m.note(r#"{"model":"a"}"#, 3);
        m.note(r#"{"messages":[]}"#, 4);
        assert_eq!(m.seen, vec![("a".to_string(), 1), ("b".to_string(), 2)]);
        for i in 0..MAX_MODELS as u64 {
            m.note(&format!(r#"{{"model":"m{i}"}}"#), 10 + i);
        }
        assert!(m.overflow && m.seen.len() == MAX_MODELS);
    }

    fn providers(list: &[(&str, ProviderKind, &[&str])]) -> BTreeMap<String, ProviderConfig> {
        list.iter()
            .map(|(name, kind, globs)| {
                let p = ProviderConfig {
                    models: globs.iter().map(|g| g.to_string()).collect(),
                    ..ProviderConfig::new(*kind, "http://h")
                };
                (name.to_string(), p)
            })
            .collect()
    }

    fn models(list: &[(&str, u64)]) -> Models {
        Models { seen: list.iter().map(|(m, l)| (m.to_string(), *l)).collect(), overflow: false }
    }

    const CHAT: &str = "/v1/chat/completions";

    fn message(r: Result<String, ApiError>) -> String {
        r.expect_err("refused").message
    }

    #[test]
    fn a_named_provider_wins_if_it_serves_the_endpoint() {
        let ps = providers(&[("a", ProviderKind::Openai, &[]), ("c", ProviderKind::Anthropic, &[])]);
        let m = models(&[("gpt-4o", 1)]);
        assert_eq!(choose_provider(&ps, CHAT, Some("a"), &m).unwrap(), "a");
        assert!(message(choose_provider(&ps, CHAT, Some("c"), &m)).contains("does not serve"));
        assert!(message(choose_provider(&ps, CHAT, Some("zz"), &m)).contains("no provider \"zz\""));
    }

    #[test]
    fn the_only_provider_of_the_endpoint_takes_every_model() {
        let ps = providers(&[("a", ProviderKind::Openai, &["gpt-*"]), ("c", ProviderKind::Anthropic, &[])]);
        assert_eq!(choose_provider(&ps, CHAT, None, &models(&[("llama", 1)])).unwrap(), "a");
        assert!(message(choose_provider(&ps, "/v1/nothing", None, &models(&[]))).contains("no configured provider"));
    }

    #[test]
    fn several_providers_route_by_model_globs() {
        let ps = providers(&[
            ("oai", ProviderKind::Openai, &["gpt-*", "o?-*"]),
            ("vllm", ProviderKind::Openai, &["llama-*", "qwen*"]),
            ("both", ProviderKind::Openai, &[]),
        ]);
        let ok = models(&[("gpt-4o", 1), ("o3-mini", 7)]);
        assert_eq!(choose_provider(&ps, CHAT, None, &ok).unwrap(), "oai");
        assert_eq!(choose_provider(&ps, CHAT, None, &models(&[("qwen2", 1)])).unwrap(), "vllm");

        let split = models(&[("gpt-4o", 1), ("gpt-4o-mini", 2), ("llama-3", 3)]);
        let msg = message(choose_provider(&ps, CHAT, None, &split));
        assert!(msg.starts_with("line 3: model \"llama-3\" routes to provider \"vllm\""), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");

        let unknown = message(choose_provider(&ps, CHAT, None, &models(&[("gpt-4o", 1), ("mistral", 5)])));
        assert!(unknown.starts_with("line 5: model \"mistral\" matches no provider"), "{unknown}");

        let none = message(choose_provider(&ps, CHAT, None, &models(&[])));
        assert!(none.contains("no line names a model"), "{none}");
        let over = Models { overflow: true, ..ok };
        assert!(message(choose_provider(&ps, CHAT, None, &over)).contains("more than 256 models"));
    }

    #[test]
    fn a_model_two_providers_claim_is_refused() {
        let ps = providers(&[("a", ProviderKind::Openai, &["gpt-*"]), ("b", ProviderKind::Openai, &["*-mini"])]);
        let msg = message(choose_provider(&ps, CHAT, None, &models(&[("gpt-4o-mini", 2)])));
        assert!(
            msg.starts_with("line 2: model \"gpt-4o-mini\" matches the models of several providers (a, b)"),
            "{msg}"
        );
    }
}
