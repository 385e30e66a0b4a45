//! The registry routes: a push or pull runs on its own thread and streams
//! NDJSON lines (progress as it goes, then the result or the error), like
//! `execStream`, so that a client sees a long transfer move.

use forkd_api::convert;
use forkd_api::types::{PullRequest, PushRequest, TransferEvent};
use forkd_api::ApiError;
use forkd_ops::{OpError, Operations, TransferProgress};

use crate::ops::{Daemon, Reply};

/// At most one progress line per this many milliseconds (the last always goes).
const PROGRESS_EVERY_MS: u128 = 200;

fn line(ev: &TransferEvent) -> Vec<u8> {
    let mut l = serde_json::to_vec(ev).expect("events serialise");
    l.push(b'\n');
    l
}

impl Daemon {
    pub(crate) fn push_stream(&self, tag: &str, req: PushRequest) -> Result<Reply, ApiError> {
        forkd_ops::validate_tag(tag).map_err(OpError::from)?;
        let req = convert::push_from_wire(tag, req);
        self.transfer_stream("push", move |ops, progress| {
            ops.push(&req, progress)
                .map(|o| convert::pushed_to_wire(&o))
        })
    }

    pub(crate) fn pull_stream(&self, req: PullRequest) -> Result<Reply, ApiError> {
        let req = convert::pull_from_wire(req);
        self.transfer_stream("pull", move |ops, progress| {
            ops.pull(&req, progress)
                .map(|o| convert::pulled_to_wire(&o))
        })
    }

    fn transfer_stream(
        &self,
        name: &str,
        run: impl FnOnce(
                &dyn Operations,
                forkd_ops::OnTransfer<'_>,
            ) -> Result<forkd_api::types::TransferResult, OpError>
            + Send
            + 'static,
    ) -> Result<Reply, ApiError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        let fleet = self.fleet.clone();
        std::thread::Builder::new()
            .name(format!("{name}-stream"))
            .spawn(move || {
                let last = std::sync::Mutex::new(std::time::Instant::now());
                let progress = |p: &TransferProgress| {
                    let mut at = last.lock().unwrap_or_else(|p| p.into_inner());
                    if at.elapsed().as_millis() < PROGRESS_EVERY_MS {
                        return;
                    }
                    *at = std::time::Instant::now();
                    // A client that went away stops receiving; the transfer
                    // goes on to its end (a pull publishes, a push tags).
                    let _ = tx.blocking_send(line(&convert::progress_to_wire(p)));
                };
                let ops: &dyn Operations = &*fleet;
                let end = match run(ops, &progress) {
                    Ok(result) => TransferEvent {
                        file: None,
                        counts: None,
                        result: Some(result),
                        error: None,
                    },
                    Err(e) => convert::transfer_error_to_wire(&e),
                };
                let _ = tx.blocking_send(line(&end));
            })
            .map_err(|e| ApiError::Internal(format!("starting the {name} stream: {e}")))?;
        Ok(Reply::Stream(rx))
    }
}
