//! Bytes exchanged with the broker, counted at the client sockets: every 100 ms `ss -tinp`
//! lists the established TCP connections to the AMQP port with their kernel counters
//! (`bytes_sent`, `bytes_received`) and owning process, and the sampler keeps the newest
//! counters of each connection opened by the processes measured (this bench process for
//! the reference, its descendants — workers, `producer` runs — for a fleet).
//!
//! Why here and not RabbitMQ's own counters: the broker is shared, and its aggregated
//! connection metrics mix in every other client and drop a connection's bytes when it
//! closes. Client sockets are attributed by process. What this misses: the last sample
//! interval (at most 100 ms) of a connection that closes during the run.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the sockets are listed.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Whose connections count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// This process's own (the reference pipeline runs in it).
    OwnProcess,
    /// Processes this one started, and theirs (a fleet's workers and producer runs).
    Children,
}

/// Counters of one connection: `(bytes sent, bytes received)` by the client.
type Counters = (u64, u64);

/// A running sampler; [`Sampler::finish`] returns the bytes both ways since it started.
pub(crate) struct Sampler {
    stop: watch::Sender<bool>,
    task: JoinHandle<u64>,
}

impl Sampler {
    /// Starts sampling the connections to `port` in `scope`. Connections already open count
    /// only their traffic from now on.
    pub(crate) fn start(port: u16, scope: Scope) -> Sampler {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let me = std::process::id();
            let baseline = sample(port, scope, me).await;
            let mut last = baseline.clone();
            loop {
                let done = tokio::select! {
                    _ = stopped.changed() => true,
                    _ = tokio::time::sleep(SAMPLE_EVERY) => false,
                };
                last.extend(sample(port, scope, me).await);
                if done {
                    break;
                }
            }
            last.iter()
                .map(|(conn, (sent, received))| {
                    let (sent0, received0) = baseline.get(conn).copied().unwrap_or((0, 0));
                    sent.saturating_sub(sent0) + received.saturating_sub(received0)
                })
                .sum()
        });
        Sampler { stop, task }
    }

    /// Takes a last sample and returns the bytes sent and received since the start.
    pub(crate) async fn finish(self) -> Option<u64> {
        let _ = self.stop.send(true);
        self.task.await.ok()
    }
}

/// Counters of the connections to `port` in `scope`, by client address (`ip:port`).
async fn sample(port: u16, scope: Scope, me: u32) -> HashMap<String, Counters> {
    let filter = format!("( dport = :{port} )");
    let out = tokio::process::Command::new("ss").args(["-tinpH", "state", "established", &filter]).output().await;
    let Ok(out) = out else { return HashMap::new() };
    parse_ss(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .filter(|(_, pid, _)| match scope {
            Scope::OwnProcess => *pid == me,
            Scope::Children => *pid != me && descends_from(*pid, me),
        })
        .map(|(conn, _, counters)| (conn, counters))
        .collect()
}

/// `(client address, owning pid, counters)` of each socket in `ss -tinpH` output: a line
/// per socket (`recv-q send-q local peer users:(("name",pid=N,fd=M))`), then an indented
/// line of TCP info holding `bytes_sent:` and `bytes_received:`.
fn parse_ss(text: &str) -> Vec<(String, u32, Counters)> {
    let mut sockets = Vec::new();
    let mut current: Option<(String, u32)> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let pid = line.split("pid=").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next());
            current = match (fields.get(2), pid.and_then(|p| p.parse().ok())) {
                (Some(local), Some(pid)) => Some((local.to_string(), pid)),
                _ => None,
            };
        } else if let Some((conn, pid)) = current.take() {
            let counter = |name: &str| {
                line.split_whitespace().find_map(|f| f.strip_prefix(name)).and_then(|v| v.parse::<u64>().ok())
            };
            sockets.push((conn, pid, (counter("bytes_sent:").unwrap_or(0), counter("bytes_received:").unwrap_or(0))));
        }
    }
    sockets
}

/// Whether `pid` is a descendant of `ancestor` (through `/proc/<pid>/stat`'s parent field).
fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..64 {
        let Some(parent) = parent_of(pid) else { return false };
        if parent == ancestor {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        pid = parent;
    }
    false
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_output_is_read_per_socket() {
        let text = "0      0      127.0.0.1:57994 127.0.0.1:5672 users:((\"worker\",pid=12792,fd=3))\n\
                    \t bbr wscale:10,10 rto:204 bytes_sent:8 bytes_acked:9 bytes_received:504 segs_out:4\n\
                    0      0      127.0.0.1:58000 127.0.0.1:5672 users:((\"producer\",pid=77,fd=9))\n\
                    \t cubic bytes_sent:1000 bytes_received:20\n";
        let got = parse_ss(text);
        assert_eq!(
            got,
            vec![("127.0.0.1:57994".to_string(), 12792, (8, 504)), ("127.0.0.1:58000".to_string(), 77, (1000, 20))]
        );
    }

    #[test]
    fn this_process_descends_from_its_parent() {
        let me = std::process::id();
        let parent = parent_of(me).expect("a parent");
        assert!(descends_from(me, parent));
        assert!(!descends_from(parent, me));
    }
}
