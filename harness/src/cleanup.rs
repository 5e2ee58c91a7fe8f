//! The clean-up of a namespace: what a test or a benchmark run left on the services.
//! RabbitMQ 3.x counts each classic queue against its file-handle limit (runs that left
//! their queues behind once exhausted it), and a Pushgateway keeps every group forever,
//! which Prometheus then scrapes forever.

use std::process::Command;

use anyhow::Context as _;

/// Set (to anything) to keep the queues of a failed (panicking) test for a look.
pub const KEEP_QUEUES_ENV: &str = "FLEET_TEST_KEEP_QUEUES";

/// Queue and exchange names.
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// Queue names.
    pub queues: Vec<String>,
    /// Exchange names.
    pub exchanges: Vec<String>,
}

impl Names {
    /// The queues and exchanges of the default vhost whose name starts with `ns.`, as
    /// `rabbitmqctl` lists them (none when it cannot be run, e.g. the broker is elsewhere).
    pub fn listed(ns: &str) -> Names {
        Names { queues: listed("list_queues", ns), exchanges: listed("list_exchanges", ns) }
    }

    /// These names and `other`'s, each once.
    pub fn and(mut self, other: Names) -> Names {
        for (into, from) in [(&mut self.queues, other.queues), (&mut self.exchanges, other.exchanges)] {
            for name in from {
                if !into.contains(&name) {
                    into.push(name);
                }
            }
        }
        self
    }
}

fn listed(list: &str, ns: &str) -> Vec<String> {
    let Ok(out) = Command::new("rabbitmqctl").args([list, "-q", "--no-table-headers", "name"]).output() else {
        return Vec::new();
    };
    let prefix = format!("{ns}.");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(&prefix))
        .map(String::from)
        .collect()
}

/// Deletes the Pushgateway groups labelled `namespace = ns`; returns how many there were.
pub fn delete_push_groups(pushgateway_url: &str, ns: &str) -> anyhow::Result<usize> {
    let Some(pg) = fleet::push::Pushgateway::at(pushgateway_url) else { return Ok(0) };
    crate::runtime()?.block_on(pg.delete_namespace(ns)).context("deleting Pushgateway groups")
}

/// Deletes everything namespace `ns` left: its Pushgateway groups, then the queues and
/// exchanges `rabbitmqctl` lists for it together with the `known` ones (missing ones are
/// fine), over the first of `amqp_urls` that connects. When the caller is panicking (a
/// failed test) and [`KEEP_QUEUES_ENV`] is set, the queues and exchanges stay.
pub fn delete_namespace(ns: &str, amqp_urls: &[String], pushgateway_url: &str, known: Names) -> anyhow::Result<()> {
    let groups = delete_push_groups(pushgateway_url, ns);
    if std::thread::panicking() && std::env::var_os(KEEP_QUEUES_ENV).is_some() {
        return groups.map(drop);
    }
    let names = known.and(Names::listed(ns));
    if !names.queues.is_empty() || !names.exchanges.is_empty() {
        crate::runtime()?.block_on(delete_names(amqp_urls, &names)).with_context(|| format!("deleting {ns}"))?;
    }
    groups.map(drop)
}

async fn delete_names(amqp_urls: &[String], names: &Names) -> anyhow::Result<()> {
    let mut conn = None;
    for url in amqp_urls {
        if let Ok(c) = fleet::amqp::connect(url, "harness cleanup").await {
            conn = Some(c);
            break;
        }
    }
    let conn = conn.context("no broker reachable")?;
    // A refused delete (e.g. an exclusive queue another connection still holds) closes the
    // channel: note it, go on with a new channel, report the first one at the end.
    let mut first_error = None;
    let mut ch = conn.create_channel().await?;
    let deletes = names.queues.iter().map(|q| (true, q)).chain(names.exchanges.iter().map(|x| (false, x)));
    for (is_queue, name) in deletes {
        let res = if is_queue {
            ch.queue_delete(name.as_str().into(), Default::default()).await.map(drop)
        } else {
            ch.exchange_delete(name.as_str().into(), Default::default()).await
        };
        if let Err(e) = res {
            first_error.get_or_insert(anyhow::Error::new(e).context(format!("deleting {name}")));
            ch = conn.create_channel().await?;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    first_error.map_or(Ok(()), Err)
}
