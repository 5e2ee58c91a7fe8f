//! Property tests of input validation: no line panics it, and every line it accepts is one
//! the fleet can send (a known endpoint of the provider's kind, no streaming, bounded ids).

use fleet::config::ProviderKind;
use fleet::endpoint::Endpoint;
use fleet::wire::MAX_CUSTOM_ID_BYTES;
use producer::validate::{check_line, Rules};
use proptest::prelude::*;
use serde_json::{json, Value};

fn rules(kind: ProviderKind) -> Rules {
    Rules { kind, max_body_bytes: 4096 }
}

fn kind() -> impl Strategy<Value = ProviderKind> {
    prop_oneof![Just(ProviderKind::Openai), Just(ProviderKind::Anthropic), Just(ProviderKind::Gemini)]
}

/// Urls near the real ones: real paths, path tricks, other hosts.
fn url() -> impl Strategy<Value = String> {
    let real = prop::sample::select(Endpoint::ALL.map(Endpoint::path).to_vec()).prop_map(str::to_string);
    let tricks = prop::sample::select(vec!["@evil.example", "/..", "//evil.example", "?x=1", "#f", "/", "%2e%2e", " "]);
    prop_oneof![
        real.clone(),
        (real.clone(), tricks.clone()).prop_map(|(r, t)| format!("{r}{t}")),
        (tricks, real).prop_map(|(t, r)| format!("{t}{r}")),
        ".{0,40}",
    ]
}

fn accepted_lines_are_sendable(raw: &[u8], kind: ProviderKind) -> Result<(), TestCaseError> {
    if let Ok(line) = check_line(raw, &rules(kind)) {
        prop_assert!(Endpoint::for_kind(&line.url, kind).is_some(), "accepted url {:?}", line.url);
        prop_assert!(!fleet::wire::asks_to_stream(&line.body));
        prop_assert!(!line.custom_id.is_empty() && line.custom_id.len() <= MAX_CUSTOM_ID_BYTES);
        prop_assert!(line.method.eq_ignore_ascii_case("POST"));
        let body = line.body.get();
        prop_assert!(body.starts_with('{') && body.len() <= 4096, "accepted body {}", body);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_validation(raw in prop::collection::vec(any::<u8>(), 0..600), kind in kind()) {
        accepted_lines_are_sendable(&raw, kind)?;
    }

    #[test]
    fn lines_with_hostile_fields_are_refused_or_sendable(
        kind in kind(), url in url(), custom in ".{0,600}", method in prop::sample::select(vec!["POST", "post", "GET", ""]),
        stream in prop::option::of(any::<bool>()), pad in 0usize..5000,
    ) {
        let mut body = json!({"model": "m", "pad": "x".repeat(pad)});
        if let Some(s) = stream {
            body["stream"] = Value::Bool(s);
        }
        let line = json!({"custom_id": custom, "method": method, "url": url, "body": body});
        accepted_lines_are_sendable(line.to_string().as_bytes(), kind)?;
    }

    #[test]
    fn a_valid_line_is_accepted(kind in kind(), custom in "[a-zA-Z0-9_-]{1,100}", content in ".{0,200}") {
        let url = Endpoint::paths_of(kind)[0];
        let line = json!({"custom_id": custom, "method": "POST", "url": url,
                          "body": {"model": "m", "messages": [{"role": "user", "content": content}]}});
        prop_assert!(check_line(line.to_string().as_bytes(), &rules(kind)).is_ok());
    }
}
