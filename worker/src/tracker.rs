//! The job tracker role (see issue "Observability that tells the truth"): not built yet.

use fleet::push::Pushgateway;
use fleet::Config;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Starts the tracker candidate loop, if enabled.
pub fn spawn_candidate(
    _cfg: &Config,
    _worker_id: &str,
    _pg: Option<Pushgateway>,
    _shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    None
}
