//! Secrets stay secret (issue 9, point 6): a run with a password in every configured URL
//! (RabbitMQ, Pushgateway, provider), a numeric-looking Pushgateway password from the
//! environment and an API key, all at `RUST_LOG=debug`: no log line, result, status output
//! or pushed metric contains any of them. And a URL that does not parse is never printed
//! whole.

use std::process::Command;
use std::time::Duration;

use e2e::*;

/// A RabbitMQ user of the shared broker made for one test, deleted when dropped.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    fn create(name: &str, password: &str) -> BrokerUser {
        let ctl = |args: &[&str]| {
            let out = Command::new("rabbitmqctl").args(args).output().expect("run rabbitmqctl");
            assert!(out.status.success(), "rabbitmqctl {}: {}", args[0], String::from_utf8_lossy(&out.stderr));
        };
        ctl(&["add_user", name, password]);
        let user = BrokerUser { name: name.to_string() };
        ctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]);
        user
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_user", &self.name]).output();
    }
}

#[test]
fn no_secret_reaches_a_log_a_result_a_status_or_a_metric() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let amqp_password = format!("amqp-pw-{}", &tag[..12]);
    let pg_url_password = format!("pgurl-pw-{}", &tag[..12]);
    // Numeric-looking, from the environment: must reach the Pushgateway as this text.
    let pg_password: String = format!("0{}", tag.bytes().take(12).map(|b| (b'0' + b % 10) as char).collect::<String>());
    let provider_password = format!("prov-pw-{}", &tag[..12]);
    let api_key = format!("sk-key-{}", &tag[..12]);
    let secrets = [&amqp_password, &pg_url_password, &pg_password, &provider_password, &api_key];

    let user = BrokerUser::create(&format!("fleet-secrets-{}", &tag[..8]), &amqp_password);
    let pg_port = free_port();
    let _pg = start_pushgateway(pg_port);
    let mock = Mock::start(&[]);
    let mock_with_password = mock.url.replace("http://", &format!("http://prov:{provider_password}@"));
    let extra = format!(
        "[amqp]\nurl = \"amqp://{}:{amqp_password}@127.0.0.1:5672/%2f\"\n\
         [pushgateway]\nurl = \"http://pg:{pg_url_password}@127.0.0.1:{pg_port}\"\nusername = \"pg\"\n\
         [providers.mock]\napi_key_env = \"SECRETS_TEST_KEY\"\n",
        user.name
    );
    let fleet = Fleet::new("secrets", &mock_with_password, &extra);
    let env = [
        ("RUST_LOG", "debug"),
        ("SECRETS_TEST_KEY", api_key.as_str()),
        ("FLEET__PUSHGATEWAY__PASSWORD", pg_password.as_str()),
    ];
    let mut worker = fleet.worker("sw1", &env);

    let run = |args: &[&str]| {
        let out = Command::new(bin("producer"))
            .arg("--config")
            .arg(&fleet.config)
            .args(args)
            .envs(env)
            .output()
            .expect("run producer");
        assert!(out.status.success(), "producer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let input = fleet.dir.join("in.jsonl");
    write_requests(&input, 20);
    let submitted = run(&["submit", input.to_str().unwrap(), "--provider", "mock", "--json"]);
    let json_line = submitted.lines().find(|l| l.starts_with('{')).unwrap();
    let job = harness::Submitted::from_json(json_line.as_bytes()).unwrap().job_id;
    let output = fleet.dir.join("out.jsonl");
    let waited = run(&["wait", &job, "--output", output.to_str().unwrap(), "--timeout", "120"]);
    let status = run(&["status", &job, "--json"]);
    let jobs = run(&["jobs"]);
    assert_exactly_once(&read_output(&output), 20);
    // The provider got the key and the worker reached the Pushgateway with the password as
    // given (the Pushgateway here takes any credentials, so its group proves the push).
    eventually(Duration::from_secs(20), "the worker's metrics pushed", || {
        get_json(&format!("http://127.0.0.1:{pg_port}/api/v1/metrics"))["data"]
            .as_array()
            .is_some_and(|groups| groups.iter().any(|g| g["labels"]["instance"] == "sw1"))
    });
    let metrics = pushgateway_metrics_at(&format!("http://127.0.0.1:{pg_port}"));
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(0), "the worker drains and exits");

    let log = fleet.worker_log("sw1");
    assert!(log.lines().count() > 20, "debug logging is on:\n{log}");
    let everything = [
        ("worker log", log),
        ("submit", submitted),
        ("wait", waited),
        ("status", status),
        ("jobs", jobs),
        ("output file", std::fs::read_to_string(&output).unwrap()),
        ("pushgateway", metrics),
    ];
    for (what, text) in &everything {
        for secret in secrets {
            assert!(!text.contains(secret.as_str()), "{what} contains a secret ({secret})");
        }
    }

    // A URL that does not parse: refused with the password redacted.
    let bad = format!("amqp:{}:{amqp_password}@127.0.0.1", user.name);
    let out = Command::new(bin("producer"))
        .arg("--config")
        .arg(&fleet.config)
        .args(["status", &job])
        .env("FLEET__AMQP__URL", &bad)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("not a valid AMQP URL") && !text.contains(&amqp_password), "{text}");
    let mut w = fleet.worker("sw-bad", &[("FLEET__AMQP__URL", &bad), ("RUST_LOG", "debug")]);
    eventually(Duration::from_secs(20), "the worker reports the bad URL", || {
        fleet.worker_log("sw-bad").contains("not a valid AMQP URL")
    });
    w.signal("TERM");
    let _ = w.wait_exit(Duration::from_secs(10));
    assert!(!fleet.worker_log("sw-bad").contains(&amqp_password), "{}", fleet.worker_log("sw-bad"));
    fleet.cleanup(&[&job]);
}
