//! Tokens per minute counted as providers count them (issue 13, point 4): a request is
//! charged its prompt plus the most output it asks for. With the worker's `tpm` ceiling set
//! to the mock's token limit, the mock's own count refuses (almost) nothing: the worker
//! charges each request at least what the mock does. (Counting the body alone, as before,
//! sent several times the limit here: every request asks for 300 output tokens.)

use std::io::Write;

use e2e::*;

const TPM: u64 = 120_000;
const REQUESTS: usize = 120;
const MAX_TOKENS: u64 = 300;

#[test]
fn the_tpm_ceiling_is_respected_by_the_mocks_own_count() {
    let mock = Mock::start(&["--tpm", &TPM.to_string()]);
    let fleet = Fleet::new("tpm", &mock.url, &format!("[providers.mock]\ntpm = {TPM}\n"));
    let _w = fleet.worker("tpm1", &[]);
    let input = fleet.dir.join("in.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    for i in 0..REQUESTS {
        writeln!(
            f,
            r#"{{"custom_id":"req-{i}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m","max_tokens":{MAX_TOKENS},"messages":[{{"role":"user","content":"count the tokens of request {i}"}}]}}}}"#
        )
        .unwrap();
    }
    drop(f);
    let (job, _) = fleet.submit(&input);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, REQUESTS);
    assert_eq!(by_status.get(&200), Some(&(REQUESTS as u64)), "{by_status:?}");

    let stats = mock.stats();
    let admitted = stats["tokens_admitted"].as_u64().unwrap();
    let refused = stats["tpm_refused"].as_u64().unwrap();
    // Every success was charged the requested output plus its prompt by the mock.
    assert!(admitted >= REQUESTS as u64 * MAX_TOKENS, "{stats}");
    // Paced to the ceiling by the worker's estimate: the mock's count finds at most a stray
    // refusal (arrival jitter on a loaded machine), not the flood of an undercount.
    assert!(refused * 50 <= REQUESTS as u64, "the mock refused {refused} of {REQUESTS} requests: {stats}");
    fleet.cleanup(&[&job]);
}
