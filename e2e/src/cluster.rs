//! A private 3-node RabbitMQ cluster on this machine (`fleet-c1..3@localhost`), owned by
//! one [`Cluster`]: it prepares the nodes' state, starts and joins them, does every node
//! fault of the cluster runs (stop, kill, start, pause, a rolling restart's step), answers
//! what they need to know (a quorum queue's leader, the busiest node, disk and CPU) and
//! stops the nodes when it is dropped.
//!
//! The machine's own RabbitMQ (rabbit@<host>, 127.0.0.1:5672) is never touched: the nodes
//! have their own names, AMQP ports (5681-5683), distribution ports (25681-25683), config,
//! plugins file (none), data and logs under `.run/cluster`, and their own Erlang cookie (a
//! private HOME, `.run/cluster/home`, whose `.erlang.cookie` the nodes and the CLI share).
//! Only epmd (port 4369) is shared, as every Erlang node on a machine shares it.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Where the RabbitMQ package puts its scripts.
const RMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
/// The nodes' short names; node `i` (1..3) is `NODES[i - 1]@localhost`.
const NODES: [&str; 3] = ["fleet-c1", "fleet-c2", "fleet-c3"];
/// Node `i` listens for AMQP on `AMQP_PORT_BASE + i`.
const AMQP_PORT_BASE: u16 = 5680;
/// Node `i`'s Erlang distribution port is `DIST_PORT_BASE + i`.
const DIST_PORT_BASE: u16 = 25680;

/// The private cluster. Once [`Cluster::up`] was called, dropping it stops the nodes (by
/// the PIDs in their PID files, checked against each process's environment), so a run
/// that ends, fails or panics leaves none running.
#[derive(Debug)]
pub struct Cluster {
    /// `.run/cluster` of the workspace.
    dir: PathBuf,
    /// Clock ticks per second of `/proc/<pid>/stat`'s CPU times.
    clk_tck: u64,
    /// Whether [`Cluster::up`] was called: only then does drop stop nodes.
    owns_nodes: AtomicBool,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster::new()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owns_nodes.load(Ordering::Relaxed) {
            self.down();
        }
    }
}

impl Cluster {
    /// The cluster whose state is in the workspace's `.run/cluster`; nothing starts yet.
    pub fn new() -> Cluster {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf();
        let clk_tck = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100);
        Cluster { dir: root.join(".run/cluster"), clk_tck, owns_nodes: AtomicBool::new(false) }
    }

    /// The nodes' AMQP URLs, node 1 first.
    pub fn urls(&self) -> Vec<String> {
        (1..=3).map(|i| format!("amqp://guest:guest@127.0.0.1:{}/%2f", AMQP_PORT_BASE + i)).collect()
    }

    /// Starts the three nodes and joins 2 and 3 to 1 (on a fresh state, or when they are
    /// not clustered); fails unless all three run in the cluster. From here on, dropping
    /// the cluster stops its nodes, also when this fails half-way.
    pub fn up(&self) -> Result<(), String> {
        self.owns_nodes.store(true, Ordering::Relaxed);
        self.prepare().map_err(|e| format!("cannot prepare {}: {e}", self.dir.display()))?;
        let fresh = !self.dir.join(format!("c2/mnesia/{}", node_name(2))).is_dir();
        let started: Vec<Result<(), String>> = std::thread::scope(|s| {
            let starts: Vec<_> = (1..=3).map(|i| s.spawn(move || self.start(i))).collect();
            starts.into_iter().map(|t| t.join().unwrap_or_else(|_| Err("start panicked".into()))).collect()
        });
        started.into_iter().collect::<Result<Vec<()>, String>>()?;
        let clustered =
            self.ctl_output(1, &["cluster_status", "--formatter", "json"]).is_ok_and(|s| s.contains(&node_name(3)));
        if fresh || !clustered {
            let join_log = self.dir.join("join.log");
            for i in 2..=3 {
                // The CLI prints harmless errors while a node leaves and rejoins: keep them
                // in a log unless a step fails.
                let leader = node_name(1);
                for step in [&["stop_app"][..], &["reset"], &["join_cluster", &leader], &["start_app"]] {
                    let log = append(&join_log).map_err(|e| format!("{}: {e}", join_log.display()))?;
                    let ok = self
                        .rmq("rabbitmqctl", i)
                        .args(step)
                        .stdout(log.try_clone().map_err(|e| e.to_string())?)
                        .stderr(log)
                        .status()
                        .is_ok_and(|s| s.success());
                    if !ok {
                        return Err(format!("joining {} failed; see {}", NODES[i - 1], join_log.display()));
                    }
                }
            }
        }
        let status = self.ctl_output(1, &["cluster_status", "--formatter", "json"])?;
        let running = serde_json::from_str::<Value>(&status)
            .ok()
            .and_then(|v| v["running_nodes"].as_array().map(Vec::len))
            .unwrap_or(0);
        if running != 3 {
            return Err(format!("only {running} of 3 nodes run in the cluster"));
        }
        log(&format!("3 nodes up and clustered: {}", self.urls().join(",")));
        Ok(())
    }

    /// Stops the nodes of `.run/cluster` that run (a paused one is resumed first, so it
    /// can stop); dropping the cluster then stops nothing more.
    pub fn down(&self) {
        self.owns_nodes.store(false, Ordering::Relaxed);
        for i in 1..=3 {
            if let Some(pid) = self.pid(i) {
                signal(pid, "CONT");
            }
        }
        std::thread::scope(|s| {
            for i in 1..=3 {
                s.spawn(move || self.stop(i));
            }
        });
        log("nodes stopped");
    }

    /// The node leading quorum queue `queue` (vhost /), e.g. `fleet-c2@localhost`; `None`
    /// if no such queue exists.
    pub fn leader(&self, queue: &str) -> Result<Option<String>, String> {
        let i = self.any_live()?;
        let list = self.ctl_output(i, &["list_queues", "name", "leader", "--formatter", "json"])?;
        let rows: Value = serde_json::from_str(&list).map_err(|e| format!("list_queues: {e}"))?;
        Ok(rows
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == queue)
            .and_then(|r| r["leader"].as_str().map(String::from)))
    }

    /// Graceful stop of `node` (`rabbitmqctl stop`, SIGTERM if that fails), waiting up to
    /// 20 s for its VM to exit, then SIGKILL. A node not running is left as it is.
    pub fn stop_node(&self, node: &str) -> Result<(), String> {
        self.stop(index(node)?);
        Ok(())
    }

    /// SIGKILL of `node`'s Erlang VM (a crash); returns once it is gone.
    pub fn kill_node(&self, node: &str) -> Result<(), String> {
        let i = index(node)?;
        if let Some(pid) = self.pid(i) {
            signal(pid, "KILL");
            while alive(pid) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Starts `node` again (if it is not running) and waits until it runs; it rejoins the
    /// cluster.
    pub fn start_node(&self, node: &str) -> Result<(), String> {
        self.start(index(node)?)
    }

    /// SIGSTOP of `node`'s VM, SIGCONT after `secs`: a silent node (its connections stay
    /// open, nothing answers).
    pub fn pause_node(&self, node: &str, secs: Duration) -> Result<(), String> {
        let i = index(node)?;
        let pid = self.pid(i).ok_or_else(|| format!("{} is not running", NODES[i - 1]))?;
        signal(pid, "STOP");
        std::thread::sleep(secs);
        signal(pid, "CONT");
        Ok(())
    }

    /// One step of a rolling restart: waits until no quorum queue would lose its quorum
    /// without `node` (`rabbitmq-upgrade await_online_quorum_plus_one`), stops it, starts
    /// it, waits until its members of `queues` caught up; returns the seconds of each step
    /// (`waited_s=.. down_s=.. catchup_s=..`).
    ///
    /// Caught up: the node's member of each queue is a follower (or leader) again and has
    /// committed at least what the leader had committed when the node came back, so it
    /// holds everything it missed while down.
    pub fn roll_node(&self, node: &str, queues: &[String]) -> Result<String, String> {
        let i = index(node)?;
        let name = node_name(i);
        let t0 = Instant::now();
        let ok = self
            .rmq("rabbitmq-upgrade", i)
            .args(["await_online_quorum_plus_one", "-t", "600"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("await_online_quorum_plus_one on {name} did not succeed within 600 s"));
        }
        let waited = t0.elapsed().as_secs_f64();
        self.stop(i);
        let t1 = Instant::now();
        self.start(i)?;
        let down = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        for q in queues {
            let mut target = None;
            for _ in 0..600 {
                let Ok((raft, mine, leader)) = self.quorum_member(i, q) else {
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                };
                let target = *target.get_or_insert(leader);
                if (raft == "follower" || raft == "leader") && mine >= target {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            if target.is_none() {
                return Err(format!("no quorum status of {q} from {name}"));
            }
        }
        let caught = t2.elapsed().as_secs_f64();
        Ok(format!("waited_s={waited:.1} down_s={down:.1} catchup_s={caught:.1}"))
    }

    /// The node with the most client connections (where a fault hurts the clients most).
    pub fn busiest(&self) -> Result<String, String> {
        let i = self.any_live()?;
        // One line per connection of the cluster: the AMQP port it came in on, i.e. its node.
        let ports = self.ctl_output(i, &["list_connections", "port", "--no-table-headers"])?;
        let mut count: HashMap<u16, usize> = HashMap::new();
        for port in ports.lines().filter_map(|l| l.trim().parse().ok()) {
            *count.entry(port).or_default() += 1;
        }
        let (port, _) = count.into_iter().max_by_key(|&(port, n)| (n, port)).ok_or("no client connections")?;
        match port.checked_sub(AMQP_PORT_BASE + 1).map(usize::from) {
            Some(k) if k < NODES.len() => Ok(node_name(k + 1)),
            _ => Err(format!("a client connection on port {port}, not one of the cluster's")),
        }
    }

    /// Bytes each live node's VM wrote to disk since it started (`/proc/<pid>/io`) and its
    /// CPU milliseconds (user + system, `/proc/<pid>/stat`), by `(node, pid)`.
    pub fn disk(&self) -> HashMap<(String, u32), [u64; 2]> {
        let mut out = HashMap::new();
        for i in 1..=3 {
            let Some(pid) = self.pid(i) else { continue };
            let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) else { continue };
            let Some(bytes) =
                io.lines().find_map(|l| l.strip_prefix("write_bytes:")).and_then(|b| b.trim().parse().ok())
            else {
                continue;
            };
            // utime and stime: fields 14 and 15, i.e. the 12th and 13th after the ")" that
            // ends the command name.
            let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
                let rest = &s[s.rfind(") ")? + 2..];
                let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|f| f.parse().ok()).collect();
                (f.len() == 2).then(|| f[0] + f[1])
            });
            let Some(ticks) = ticks else { continue };
            out.insert((node_name(i), pid), [bytes, ticks * 1000 / self.clk_tck]);
        }
        out
    }

    /// The state directories, the config of each node, and the cookie (made once).
    fn prepare(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let home = self.dir.join("home");
        std::fs::create_dir_all(&home)?;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))?;
        let cookie = home.join(".erlang.cookie");
        if std::fs::metadata(&cookie).map_or(true, |m| m.len() == 0) {
            // One cookie for the three nodes and the CLI; random, readable by us only.
            let value = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&cookie)?
                .write_all(value.as_bytes())?;
        }
        std::fs::write(self.dir.join("rabbitmq-env.conf"), "")?;
        std::fs::write(self.dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(self.dir.join("advanced.config"), "[].\n")?;
        for i in 1..=3 {
            let d = self.node_dir(i);
            std::fs::create_dir_all(d.join("log"))?;
            std::fs::create_dir_all(d.join("mnesia"))?;
            let port = AMQP_PORT_BASE + i as u16;
            std::fs::write(
                d.join("rabbitmq.conf"),
                format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = true\n"),
            )?;
        }
        Ok(())
    }

    /// `.run/cluster/c<i>`.
    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("c{i}"))
    }

    /// `.run/cluster/c<i>/rabbitmq.pid`.
    fn pid_file(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("rabbitmq.pid")
    }

    /// The environment of node `i`, for the server.
    fn node_env(&self, i: usize) -> Vec<(&'static str, String)> {
        let d = self.node_dir(i);
        let path = |p: PathBuf| p.display().to_string();
        vec![
            ("HOME", path(self.dir.join("home"))),
            ("RABBITMQ_NODENAME", node_name(i)),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", (AMQP_PORT_BASE + i as u16).to_string()),
            ("RABBITMQ_DIST_PORT", (DIST_PORT_BASE + i as u16).to_string()),
            ("RABBITMQ_CONF_ENV_FILE", path(self.dir.join("rabbitmq-env.conf"))),
            ("RABBITMQ_CONFIG_FILE", path(d.join("rabbitmq.conf"))),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", path(self.dir.join("advanced.config"))),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path(self.dir.join("enabled_plugins"))),
            ("RABBITMQ_MNESIA_BASE", path(d.join("mnesia"))),
            ("RABBITMQ_LOG_BASE", path(d.join("log"))),
            ("RABBITMQ_PID_FILE", path(self.pid_file(i))),
        ]
    }

    /// A RabbitMQ CLI tool (`rabbitmqctl`, `rabbitmq-queues`, ...) run quietly against
    /// node `i` with the private cookie.
    fn rmq(&self, tool: &str, i: usize) -> Command {
        let mut cmd = Command::new(Path::new(RMQ_BIN).join(tool));
        cmd.env("HOME", self.dir.join("home"))
            .env("PATH", tool_path())
            .args(["-q", "-n", &node_name(i)])
            .stdin(Stdio::null());
        cmd
    }

    /// `rabbitmqctl ARGS` against node `i`: its stdout, or why it failed.
    fn ctl_output(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = self
            .rmq("rabbitmqctl", i)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        if !out.status.success() {
            return Err(format!("rabbitmqctl -n {} {args:?} failed", node_name(i)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Node `i`'s Erlang VM PID, if it runs (checked against the process's environment,
    /// where the node name is, so a recycled PID is never taken for ours).
    fn pid(&self, i: usize) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_file(i)).ok()?.trim().parse().ok()?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let want = format!("RABBITMQ_NODENAME={}", node_name(i));
        environ.split(|b| *b == 0).any(|var| var == want.as_bytes()).then_some(pid)
    }

    /// Starts node `i` unless it runs, and waits (up to 180 s) until it does.
    fn start(&self, i: usize) -> Result<(), String> {
        if self.pid(i).is_some() {
            return Ok(());
        }
        let port = AMQP_PORT_BASE + i as u16;
        if TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2)).is_ok() {
            return Err(format!("port {port} is taken by something else"));
        }
        let out_path = self.node_dir(i).join("server.out");
        let out = append(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
        // `setsid -f`: the server runs in a session of its own (a Ctrl-C of the run does
        // not reach it) and is nobody's child here, as a daemon.
        let spawned = Command::new("setsid")
            .arg("-f")
            .arg(Path::new(RMQ_BIN).join("rabbitmq-server"))
            .envs(self.node_env(i))
            .env("PATH", tool_path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .status();
        if !spawned.is_ok_and(|s| s.success()) {
            return Err(format!("cannot start {}: setsid failed", NODES[i - 1]));
        }
        let pid_file = self.pid_file(i).display().to_string();
        let ok = self
            .rmq("rabbitmqctl", i)
            .args(["wait", &pid_file, "--timeout", "180"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let d = self.node_dir(i);
            return Err(format!(
                "{} did not start; see {} and {}",
                NODES[i - 1],
                d.join("server.out").display(),
                d.join("log").display()
            ));
        }
        Ok(())
    }

    /// Graceful stop of node `i` (see [`Cluster::stop_node`]).
    fn stop(&self, i: usize) {
        let Some(pid) = self.pid(i) else { return };
        let pid_file = self.pid_file(i).display().to_string();
        let stopped = self
            .rmq("rabbitmqctl", i)
            .args(["stop", &pid_file])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            signal(pid, "TERM");
        }
        for _ in 0..100 {
            if !alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        signal(pid, "KILL");
    }

    /// A live node to ask: one whose `rabbitmqctl status` answers within 10 s (a bound: a
    /// paused node's CLI call would wait for minutes).
    fn any_live(&self) -> Result<usize, String> {
        for i in 1..=3 {
            if self.pid(i).is_none() {
                continue;
            }
            let Ok(mut child) =
                self.rmq("rabbitmqctl", i).arg("status").stdout(Stdio::null()).stderr(Stdio::null()).spawn()
            else {
                continue;
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            let ok = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status.success(),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break false;
                    }
                }
            };
            if ok {
                return Ok(i);
            }
        }
        Err("no node of the cluster is running".into())
    }

    /// (raft state, commit index of node `i`'s member, the leader's commit index) of
    /// quorum queue `queue`, as a live node sees it.
    fn quorum_member(&self, i: usize, queue: &str) -> Result<(String, u64, u64), String> {
        let j = self.any_live()?;
        let out = self
            .rmq("rabbitmq-queues", j)
            .args(["quorum_status", queue, "--formatter", "json"])
            .stderr(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("quorum_status {queue} failed"));
        }
        let rows: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let rows = rows.as_array().ok_or("quorum_status: not a list")?;
        let node = node_name(i);
        let me = rows.iter().find(|r| r["Node Name"] == node.as_str()).ok_or("no member on the node")?;
        let lead = rows.iter().find(|r| r["Raft State"] == "leader").ok_or("no leader")?;
        let commit = |r: &Value| -> Result<u64, String> {
            let c = &r["Commit Index"];
            c.as_u64().or_else(|| c.as_str()?.parse().ok()).ok_or_else(|| format!("commit index {c}"))
        };
        Ok((me["Raft State"].as_str().unwrap_or_default().to_string(), commit(me)?, commit(lead)?))
    }
}

/// `fleet-c<i>@localhost`.
fn node_name(i: usize) -> String {
    format!("{}@localhost", NODES[i - 1])
}

/// The index (1..3) of a node named with or without `@localhost`.
fn index(node: &str) -> Result<usize, String> {
    let short = node.split('@').next().unwrap_or_default();
    NODES
        .iter()
        .position(|n| *n == short)
        .map(|k| k + 1)
        .ok_or_else(|| format!("unknown node {node} (one of {})", NODES.join(" ")))
}

/// PATH with the sbin directories, where RabbitMQ's scripts look for their tools.
fn tool_path() -> String {
    format!("{}:/usr/local/sbin:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default())
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `kill -SIG pid`, ignoring a process already gone.
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([format!("-{sig}"), pid.to_string()]).stderr(Stdio::null()).status();
}

/// A file opened for appending (created if missing).
fn append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

/// A line on stderr, as the run's other progress lines.
fn log(msg: &str) {
    eprintln!("cluster: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_named_with_or_without_the_host() {
        assert_eq!(index("fleet-c2@localhost"), Ok(2));
        assert_eq!(index("fleet-c3"), Ok(3));
        assert!(index("rabbit@localhost").is_err());
        assert_eq!(node_name(1), "fleet-c1@localhost");
    }

    #[test]
    fn urls_are_the_private_ports() {
        let urls = Cluster::new().urls();
        assert_eq!(urls[0], "amqp://guest:guest@127.0.0.1:5681/%2f");
        assert_eq!(urls[2], "amqp://guest:guest@127.0.0.1:5683/%2f");
    }
}
