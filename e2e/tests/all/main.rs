//! The end-to-end tests: one module per area, all in one test binary (as ripgrep keeps its
//! integration tests), so the workspace is linked once for them, not once per file. Each
//! test runs the workspace's binaries against the real RabbitMQ, Pushgateway and
//! Prometheus on a namespace of its own (see the `e2e` and `harness` crates), so tests of
//! different modules run side by side; the few that need a broker or a Pushgateway to
//! themselves start private ones. One area: `cargo test -p e2e --test all <module>::`.

mod announcements;
mod api;
mod api_modes;
mod batch_chunks;
mod batch_mode;
mod batch_users;
mod broker_restart;
mod chaos;
mod end_to_end;
mod failover;
mod fairness;
mod first_day;
mod flex;
mod gateways;
mod gemini;
mod grouped_results;
mod hostile;
mod inputs;
mod key_pools;
mod money;
mod nothing_lost;
mod observability;
mod principals;
mod resume_submit;
mod secrets;
mod silent_node;
mod teams;
mod tokens;
mod usage;
mod webhooks;
