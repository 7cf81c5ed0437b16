//! The HTTP listener: accepts connections and serves the API on each with hyper, closing a
//! connection that does not send a request's headers within `server.header_read_timeout` (slowloris),
//! and on shutdown lets in-flight requests finish while refusing new ones.
//!
//! `axum::serve` sets no header read timeout (hyper's needs a timer it does not give), so a client
//! trickling header bytes would hold a connection and its task forever.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

/// Serves `app` on `listener` until `stop` changes, then waits for open connections to finish
/// their requests (upgraded WebSockets are no longer HTTP connections and are not waited for).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // Every connection holds a receiver of `draining` (told to finish) and of `open` (counted):
    // the server is done once the last `open` receiver is dropped.
    let (draining, draining_seen) = watch::channel(false);
    let (open, open_seen) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: the listener stays, the error passes.
                warn!(%error, "accepting an HTTP connection failed");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut draining_seen = draining_seen.clone();
        let open_seen = open_seen.clone();
        tokio::spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let mut told = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(error) = served {
                            debug!(%error, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    changed = draining_seen.changed(), if !told => {
                        told = true;
                        if changed.is_ok() {
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            drop(open_seen);
        });
    }
    drop(listener);
    let _ = draining.send(true);
    drop(open_seen);
    open.closed().await;
}
