//! The accept loop every in-process test server shares: HTTP/1.1 on a
//! listener, each request's body read whole before the handler sees it.

use std::{convert::Infallible, future::Future, time::Duration};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, Response, body::Body, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};

/// Serves `listener` with `handler` on the current runtime until the
/// returned task is aborted or the runtime stops. A failed `accept` (out of
/// descriptors, say) pauses briefly instead of spinning.
pub fn serve<H, Fut, B>(listener: TcpListener, handler: H) -> JoinHandle<()>
where
    H: Fn(Request<Bytes>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|collected| collected.to_bytes())
                            .unwrap_or_default();
                        Ok::<_, Infallible>(handler(Request::from_parts(parts, body)).await)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
