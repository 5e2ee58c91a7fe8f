//! Key pools (issue 13, point 3; issue 21, point 1): a provider with several API keys
//! spreads its calls over them; a key the provider rejects as a key (401
//! `invalid_api_key`) leaves the rotation, counted by `batch_api_key_rejections_total` and
//! named by its variable in the log (never by its value), while the other keys finish the
//! job. With every key rejected, items fail clearly. A request the key may not make (403
//! `model_not_found`) fails only its line; a rejected key comes back after `key_retry_s`
//! once a probe finds it good.

use std::time::Duration;

use e2e::*;

/// A pool of three keys; a rejected key is not probed again within a test.
const POOL: &str =
    "[providers.mock]\napi_key_envs = [\"POOL_KEY_A\", \"POOL_KEY_B\", \"POOL_KEY_C\"]\nkey_retry_s = 3600\n";

#[test]
fn a_pool_with_a_rejected_key_completes_the_job_on_the_others() {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let (good_a, bad_b, good_c) = (format!("sk-good-a-{tag}"), format!("sk-bad-b-{tag}"), format!("sk-good-c-{tag}"));
    let mock = Mock::start(&["--valid-keys", &format!("{good_a},{good_c}"), "--latency-ms", "5"]);
    let fleet = Fleet::new("keypool", &mock.url, POOL);
    let env = [("POOL_KEY_A", good_a.as_str()), ("POOL_KEY_B", bad_b.as_str()), ("POOL_KEY_C", good_c.as_str())];
    let _w = fleet.worker("kp1", &[env[0], env[1], env[2], ("RUST_LOG", "debug")]);

    let job = fleet.submit_requests(300);
    let output = fleet.dir.join("out.jsonl");
    let out = fleet.wait(&job, &output, 120);
    assert!(out.status.success(), "wait: {}", String::from_utf8_lossy(&out.stderr));
    let lines = read_output(&output);
    let by_status = assert_exactly_once(&lines, 300);
    assert_eq!(by_status.get(&200), Some(&300), "every item succeeded on the good keys: {by_status:?}");

    // The bad key was rejected (as often as it was in use when the first 401 came back)...
    let unauthorized = mock.stats()["unauthorized"].as_u64().unwrap();
    assert!((1..=64).contains(&unauthorized), "{}", mock.stats());
    let log = fleet.worker_log("kp1");
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains("POOL_KEY_B") && l.contains("leaves the rotation")),
        "a WARN line names the variable:\n{log}"
    );
    eventually(Duration::from_secs(20), "the rejection is pushed", || {
        pushgateway_metrics().lines().any(|l| {
            l.starts_with("batch_api_key_rejections_total{")
                && l.contains(&fleet.ns)
                && l.contains("key_env=\"POOL_KEY_B\"")
                && l.ends_with(" 1")
        })
    });
    eventually(Duration::from_secs(20), "two keys left in rotation", || {
        pushgateway_metrics()
            .lines()
            .any(|l| l.starts_with("batch_api_keys_active{") && l.contains(&fleet.ns) && l.ends_with(" 2"))
    });

    // No key's value anywhere: worker log (at debug), output file, producer output.
    let results = std::fs::read_to_string(&output).unwrap();
    let producer_out = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    for key in [&good_a, &bad_b, &good_c] {
        for (what, text) in [("worker log", &log), ("results", &results), ("producer output", &producer_out)] {
            assert!(!text.contains(key.as_str()), "a key leaked into the {what}");
        }
    }
    assert!(!pushgateway_metrics().contains(tag), "a key leaked into a metric");

    // ... and left the rotation: a second job makes no call with it.
    let job2 = fleet.submit_requests(100);
    assert_eq!(error_codes(&fleet.collect(&job2)).get(&None), Some(&100));
    assert_eq!(mock.stats()["unauthorized"].as_u64(), Some(unauthorized), "the rejected key was used again");
    fleet.cleanup(&[&job, &job2]);
}

/// Issue 21, point 15: a worker whose keys are all rejected is no black hole: it stops
/// taking the provider's items (they stay for a worker whose keys work), says so at WARN
/// with the variables' names and in `batch_provider_paused`.
#[test]
fn a_worker_whose_keys_are_all_rejected_leaves_the_items_to_a_good_one() {
    let good = "sk-only-good-key";
    let mock = Mock::start(&["--valid-keys", good, "--latency-ms", "5"]);
    let fleet = Fleet::new("keypool_dead", &mock.url, POOL);
    let _bad = fleet.worker("kpd-bad", &[("POOL_KEY_A", "sk-x1"), ("POOL_KEY_B", "sk-x2"), ("POOL_KEY_C", "sk-x3")]);
    let _good = fleet.worker("kpd-good", &[("POOL_KEY_A", good), ("POOL_KEY_B", good), ("POOL_KEY_C", good)]);
    let job = fleet.submit_requests(1000);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 1000);
    assert_eq!(by_status.get(&200), Some(&1000), "every item succeeded on the good worker: {by_status:?}");
    let log = fleet.worker_log("kpd-bad");
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("every API key of the provider was rejected")
            && l.contains("POOL_KEY_A, POOL_KEY_B, POOL_KEY_C")),
        "a WARN line names the variables:\n{log}"
    );
    eventually(Duration::from_secs(20), "the bad worker reports itself paused", || {
        pushgateway_metrics().lines().any(|l| {
            l.starts_with("batch_provider_paused{")
                && l.contains(&fleet.ns)
                && l.contains("kpd-bad")
                && l.ends_with(" 1")
        })
    });
    fleet.cleanup(&[&job]);
}

/// With every worker's keys rejected, the items wait on the queue (nothing is failed for
/// the fleet's fault); once the provider accepts a key again, a probe finds it and the job
/// completes.
#[test]
fn items_wait_while_every_key_is_rejected_and_run_once_one_is_good_again() {
    let key = "sk-fixed-later";
    let mock = Mock::start(&["--valid-keys", "sk-nobody-has-this"]);
    let fleet = Fleet::new("keypool_wait", &mock.url, &POOL.replace("key_retry_s = 3600", "key_retry_s = 2"));
    let _w = fleet.worker("kpw1", &[("POOL_KEY_A", key), ("POOL_KEY_B", "sk-x2"), ("POOL_KEY_C", "sk-x3")]);
    let job = fleet.submit_requests(40);
    eventually(Duration::from_secs(30), "every key rejected", || fleet.worker_log("kpw1").contains("every API key"));
    std::thread::sleep(Duration::from_secs(1));
    let status = fleet.try_status(&job).expect("status");
    assert_eq!(status["status"], "in_progress", "nothing failed for the fleet's fault: {status}");
    mock.set_valid_keys(&[key]);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 40);
    assert_eq!(by_status.get(&200), Some(&40), "{by_status:?}");
    fleet.cleanup(&[&job]);
}

/// The pushed `batch_api_keys_active` of the fleet's provider equals `n`.
fn keys_active_is(fleet: &Fleet, n: u32) -> bool {
    let want = format!(" {n}");
    pushgateway_metrics()
        .lines()
        .any(|l| l.starts_with("batch_api_keys_active{") && l.contains(&fleet.ns) && l.ends_with(&want))
}

#[test]
fn a_model_the_key_may_not_use_fails_its_line_and_no_key() {
    let (a, b, c) = ("sk-model-a", "sk-model-b", "sk-model-c");
    let mock = Mock::start(&["--valid-keys", &format!("{a},{b},{c}"), "--forbidden-models", "gpt-not-yours"]);
    let fleet = Fleet::new("keymodel", &mock.url, POOL);
    let _w = fleet.worker("km1", &[("POOL_KEY_A", a), ("POOL_KEY_B", b), ("POOL_KEY_C", c)]);

    // 200 lines; line 5 (custom id req-4) asks for a model no key of the pool may use.
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 200);
    let text = std::fs::read_to_string(&input).unwrap();
    let edited: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| if i == 4 { l.replace("\"mock-model\"", "\"gpt-not-yours\"") } else { l.to_string() })
        .collect();
    std::fs::write(&input, edited.join("\n") + "\n").unwrap();
    let (job, _) = fleet.submit(&input);
    let lines = fleet.collect(&job);
    let by_status = assert_exactly_once(&lines, 200);
    assert_eq!((by_status.get(&200), by_status.get(&403)), (Some(&199), Some(&1)), "{by_status:?}");
    let refused = lines.iter().find(|l| l["custom_id"] == "req-4").unwrap();
    assert_eq!(refused["response"]["body"]["error"]["code"], "model_not_found", "{refused}");
    assert!(mock.status_count(403) <= 2, "the line was called at most twice: {}", mock.stats());

    // Every key is still in the rotation: the next job runs on all three.
    let job2 = fleet.submit_requests(100);
    assert_eq!(error_codes(&fleet.collect(&job2)).get(&None), Some(&100));
    eventually(Duration::from_secs(20), "three keys in rotation", || keys_active_is(&fleet, 3));
    let log = fleet.worker_log("km1");
    assert!(!log.contains("leaves the rotation"), "no key left the rotation:\n{log}");
    assert_eq!(mock.stats()["unauthorized"].as_u64(), Some(0));
    fleet.cleanup(&[&job, &job2]);
}

#[test]
fn a_rejected_key_comes_back_once_a_probe_finds_it_good() {
    let (a, b, c) = ("sk-back-a", "sk-back-b", "sk-back-c");
    let mock = Mock::start(&["--valid-keys", &format!("{a},{c}")]);
    let pool = POOL.replace("key_retry_s = 3600", "key_retry_s = 2");
    let fleet = Fleet::new("keyback", &mock.url, &pool);
    let _w = fleet.worker("kb1", &[("POOL_KEY_A", a), ("POOL_KEY_B", b), ("POOL_KEY_C", c)]);
    let job = fleet.submit_requests(100);
    assert_eq!(error_codes(&fleet.collect(&job)).get(&None), Some(&100));
    eventually(Duration::from_secs(20), "the bad key left", || keys_active_is(&fleet, 2));

    // The key is fixed at the provider; after its wait, a probe brings it back.
    mock.set_valid_keys(&[a, b, c]);
    std::thread::sleep(Duration::from_secs(3));
    let job2 = fleet.submit_requests(100);
    assert_eq!(error_codes(&fleet.collect(&job2)).get(&None), Some(&100));
    eventually(Duration::from_secs(20), "three keys in rotation again", || keys_active_is(&fleet, 3));
    assert!(mock.stats()["models_listed"].as_u64().unwrap() >= 1, "a key-only probe: {}", mock.stats());
    let log = fleet.worker_log("kb1");
    assert!(
        log.lines().any(|l| l.contains("POOL_KEY_B") && l.contains("back in the rotation")),
        "an INFO line names the variable:\n{log}"
    );
    fleet.cleanup(&[&job, &job2]);
}

/// A provider batch belongs to the key's project that created it (the mock's
/// `--key-projects`: another key asking for it gets 404): the chunk records the key's
/// variable and every poll and fetch uses that key. When the key leaves the rotation meanwhile
/// (a 401 on an online call), the chunk waits for it instead of asking with another key,
/// which would not find the batch and fail its items; once the key is good again the batch
/// is fetched and every item succeeds.
#[test]
fn a_provider_batch_is_polled_with_the_key_that_created_it() {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let (key_a, key_b) = (format!("sk-proj-a-{tag}"), format!("sk-proj-b-{tag}"));
    let both = [key_a.as_str(), key_b.as_str()];
    let mock = Mock::start(&["--key-projects", "--valid-keys", &both.join(","), "--batch-complete-ms", "6000"]);
    let config = "[providers.mock]\nbatch = true\nbatch_poll_interval_s = 1\n\
                  api_key_envs = [\"PROJ_KEY_A\", \"PROJ_KEY_B\"]\nkey_retry_s = 2\n";
    let fleet = Fleet::new("keyproj", &mock.url, config);
    let _w = fleet.worker("kj1", &[("PROJ_KEY_A", key_a.as_str()), ("PROJ_KEY_B", key_b.as_str())]);

    let input = fleet.dir.join("batch.jsonl");
    write_requests(&input, 20);
    let batch_job = harness::submit(&fleet.config, &input, MOCK, &["--mode", "batch"]).expect("submit").job_id;
    eventually(Duration::from_secs(60), "the chunk's provider batch created", || {
        mock.stats()["batches"]["openai_created"].as_object().is_some_and(|m| !m.is_empty())
    });

    // Key A is revoked: the next online call retires it, and key B answers the online job.
    mock.set_valid_keys(&[key_b.as_str()]);
    let online = fleet.submit_requests(10);
    let by_status = assert_exactly_once(&fleet.collect(&online), 10);
    assert_eq!(by_status.get(&200), Some(&10), "the online job runs on key B: {by_status:?}");
    // Polls go on (every second) while key A is out; none may ask with key B.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(mock.stats()["other_project"], 0, "a poll asked for the batch with another key: {}", mock.stats());

    // Key A good again: probed back into the rotation, and the batch's results fetched.
    mock.set_valid_keys(&both);
    let lines = fleet.collect(&batch_job);
    let by_status = assert_exactly_once(&lines, 20);
    assert_eq!(by_status.get(&200), Some(&20), "every item of the batch succeeded: {by_status:?}");
    let stats = mock.stats();
    assert_eq!(stats["other_project"], 0, "{stats}");
    assert!(stats["unauthorized"].as_u64().unwrap() >= 1, "key A was refused while revoked: {stats}");
    let log = fleet.worker_log("kj1");
    assert!(log.contains("out of rotation") || log.contains("refused the chunk's key"), "the chunk waited for its key");
    fleet.cleanup(&[&batch_job, &online]);
}
