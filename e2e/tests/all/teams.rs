//! The broker's own authorization is the boundary between teams (issue 9, point 7): two
//! namespaces as two RabbitMQ vhosts with two users, each permitted only on its own vhost.
//! Both teams' jobs complete; team A's producer cannot read B's results, cancel B's job or
//! ask B's status, and says so clearly (exit 1, no panic).

use std::process::{Command, Output};

use e2e::*;

/// Vhosts and users of the shared broker made for one test, deleted when dropped (deleting
/// a vhost deletes every queue in it).
struct Tenants {
    vhosts: Vec<String>,
    users: Vec<String>,
}

fn ctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("run rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Tenants {
    /// A vhost and a user permitted only on it; returns the user's `amqp://` URL.
    fn add(&mut self, name: &str, password: &str) -> String {
        ctl(&["add_vhost", name]);
        self.vhosts.push(name.to_string());
        ctl(&["add_user", name, password]);
        self.users.push(name.to_string());
        ctl(&["set_permissions", "-p", name, name, ".*", ".*", ".*"]);
        format!("amqp://{name}:{password}@127.0.0.1:5672/{name}")
    }
}

impl Drop for Tenants {
    fn drop(&mut self) {
        for v in &self.vhosts {
            let _ = Command::new("rabbitmqctl").args(["delete_vhost", v]).output();
        }
        for u in &self.users {
            let _ = Command::new("rabbitmqctl").args(["delete_user", u]).output();
        }
    }
}

fn producer_as(fleet: &Fleet, url: &str, args: &[&str]) -> Output {
    Command::new(bin("producer"))
        .arg("--config")
        .arg(&fleet.config)
        .arg("--quiet")
        .args(args)
        .env("FLEET__AMQP__URL", url)
        .output()
        .expect("run producer")
}

#[test]
fn two_teams_on_two_vhosts_see_only_their_own_jobs() {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut tenants = Tenants { vhosts: vec![], users: vec![] };
    let url_a = tenants.add(&format!("fleet-team-a-{tag}"), &format!("pw-a-{tag}"));
    let url_b = tenants.add(&format!("fleet-team-b-{tag}"), &format!("pw-b-{tag}"));
    let mock = Mock::start(&["--latency-ms", "20"]);
    // Pushing is off: the Pushgateway is not part of this boundary.
    let fleet_a = Fleet::new("team-a", &mock.url, &format!("[amqp]\nurl = \"{url_a}\"\n[pushgateway]\nurl = \"\"\n"));
    let fleet_b = Fleet::new("team-b", &mock.url, &format!("[amqp]\nurl = \"{url_b}\"\n[pushgateway]\nurl = \"\"\n"));
    let _wa = fleet_a.worker("a1", &[]);
    let _wb = fleet_b.worker("b1", &[]);
    let job_a = fleet_a.submit_requests(30);
    let job_b = fleet_b.submit_requests(40);

    // A's user on B's vhost: refused by the broker, for every command.
    let b_vhost_as_a =
        url_b.replacen(&format!("fleet-team-b-{tag}:pw-b-{tag}"), &format!("fleet-team-a-{tag}:pw-a-{tag}"), 1);
    for args in [
        vec!["status", job_b.as_str()],
        vec!["cancel", job_b.as_str()],
        vec!["wait", job_b.as_str(), "--output", "/dev/null", "--timeout", "5"],
    ] {
        let out = producer_as(&fleet_a, &b_vhost_as_a, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} as A on B's vhost: {err}");
        assert!(err.contains("cannot connect to RabbitMQ") && !err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains(&format!("pw-a-{tag}")), "the password is not shown: {err}");
    }
    // A on its own vhost knows nothing of B's job, and cannot reach its results.
    let out = producer_as(&fleet_a, &url_a, &["status", &job_b]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let out = producer_as(&fleet_a, &url_a, &["wait", &job_b, "--output", "/dev/null", "--timeout", "5"]);
    assert_ne!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // Each side's job completes, untouched by the other.
    assert_exactly_once(&fleet_a.collect(&job_a), 30);
    assert_exactly_once(&fleet_b.collect(&job_b), 40);
    assert_eq!(fleet_b.final_status(&job_b)["status"], "completed");
    assert_eq!(fleet_a.final_status(&job_a)["status"], "completed");
    // Deleting the vhosts (on drop) deletes every queue of both fleets.
}
