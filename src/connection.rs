//! How long a connection lives once its TLS handshake is done: until its
//! peer closes it, until shutdown asks it to finish, or, over HTTP/2, until
//! it has sat idle too long.
//!
//! hyper bounds an idle HTTP/1.1 connection itself (the header read timeout
//! runs while it waits for the next request) but gives HTTP/2 no such
//! bound: it waits for the client's connection preface without a timer, and
//! a client that answers pings keeps an idle connection open forever.
//! Either would let clients that send nothing hold every connection slot.
//!
//! At shutdown, a connection that has had no request yet (opened just
//! before) is given a bounded moment to send its first: hyper's graceful
//! shutdown would close it unread, and the client's review with it.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;

/// The requests of one connection: how many entered the handler and
/// how many left it. Two counters and no timer per request: idleness is
/// checked once per idle period.
#[derive(Debug, Default)]
pub struct Activity {
    entered: AtomicU64,
    left: AtomicU64,
}

impl Activity {
    fn enter(self: &Arc<Self>) -> InHandler {
        self.entered.fetch_add(1, Ordering::SeqCst);
        InHandler(self.clone())
    }

    pub fn had_request(&self) -> bool {
        self.entered.load(Ordering::SeqCst) > 0
    }

    /// `(entered, left)`; `left` read first, so a request counted in
    /// `left` is always counted in `entered` too.
    fn counts(&self) -> (u64, u64) {
        let left = self.left.load(Ordering::SeqCst);
        (self.entered.load(Ordering::SeqCst), left)
    }

    /// Completes at the first check, one every `idle`, that finds no
    /// request in the handler and none entered or left since the check
    /// before: the connection has then been idle for `idle` at least, and
    /// for less than twice that.
    pub async fn idle_for(&self, idle: Duration) {
        let mut before = self.counts();
        loop {
            tokio::time::sleep(idle).await;
            let now = self.counts();
            if now == before && now.0 == now.1 {
                return;
            }
            before = now;
        }
    }
}

/// One request in its handler; counted as left when dropped.
#[derive(Debug)]
struct InHandler(Arc<Activity>);

impl Drop for InHandler {
    fn drop(&mut self) {
        self.0.left.fetch_add(1, Ordering::SeqCst);
    }
}

/// A hyper service that counts each request in `activity` until its
/// handler has produced the answer.
#[derive(Debug, Clone)]
pub struct Counted<S> {
    service: S,
    activity: Arc<Activity>,
}

impl<S> Counted<S> {
    pub fn new(service: S, activity: Arc<Activity>) -> Self {
        Self { service, activity }
    }
}

impl<S> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        CountedFuture {
            in_handler: self.activity.enter(),
            future: self.service.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// A handler's future, with its request counted until it completes or
    /// is dropped.
    #[derive(Debug)]
    pub struct CountedFuture<F> {
        #[pin]
        future: F,
        in_handler: InHandler,
    }
}

impl<F: Future> Future for CountedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().future.poll(cx)
    }
}

/// When a connection is told to finish.
#[derive(Debug)]
pub struct Lifetime<'a> {
    /// The connection's requests, counted by [`Counted`]; `None` for a
    /// connection whose requests are not counted (`/metrics`), which is then
    /// neither closed for idleness nor waited for at a stop.
    pub requests: Option<Requests<'a>>,
    /// How long a connection told to finish may take to close.
    pub finish_grace: Duration,
}

/// What a connection's counted requests decide.
#[derive(Debug, Clone, Copy)]
pub struct Requests<'a> {
    pub activity: &'a Activity,
    /// HTTP/2: closed once it has sat idle this long (see
    /// [`Activity::idle_for`]), or dropped if it had no request within this
    /// long of its start. `None` (HTTP/1.1, which hyper bounds itself): never
    /// for idleness.
    pub idle_close: Option<Duration>,
    /// At a stop, how long a connection that has had no request yet (the
    /// client opened it just before, its first request may be on the way)
    /// gets to send one. hyper's graceful shutdown would close it unread.
    pub first_request_within: Duration,
}

impl Activity {
    /// Completes once a request has entered the handler. Polled (every
    /// 10 ms) rather than notified, so that counting a request stays two
    /// atomic additions: only a stop waits here.
    async fn first_request(&self) {
        while !self.had_request() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Serves `connection` to its end, or until `stopping` completes or the
/// connection sits idle past its bound, then tells it to finish (`finish`:
/// hyper's graceful shutdown, which answers the requests in flight and, over
/// HTTP/2, sends GOAWAY so the client moves to a new connection without
/// losing a request) and gives it `finish_grace` to. A connection told to
/// stop before its first request first waits for that request, at most
/// `first_request_within`. `None` when the connection was dropped
/// unfinished: one that had no request within its bound (an HTTP/2 client
/// silent since its handshake, or one that sent nothing at a stop), or one
/// that overran its grace.
pub async fn serve<C, R>(
    connection: C,
    finish: impl FnOnce(Pin<&mut C>),
    lifetime: Lifetime<'_>,
    stopping: impl Future<Output = ()>,
) -> Option<R>
where
    C: Future<Output = R>,
{
    let mut connection = pin!(connection);
    let idle = async {
        match lifetime.requests {
            Some(Requests {
                activity,
                idle_close: Some(after),
                ..
            }) => activity.idle_for(after).await,
            _ => std::future::pending().await,
        }
    };
    let stopped = tokio::select! {
        served = connection.as_mut() => return Some(served),
        () = stopping => true,
        () = idle => false,
    };
    if let Some(requests) = lifetime.requests
        && !requests.activity.had_request()
    {
        if !stopped {
            return None;
        }
        let first_request = tokio::time::timeout(
            requests.first_request_within,
            requests.activity.first_request(),
        );
        tokio::select! {
            served = connection.as_mut() => return Some(served),
            waited = first_request => waited.ok()?,
        }
    }
    finish(connection.as_mut());
    tokio::time::timeout(lifetime.finish_grace, connection)
        .await
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for hyper's connection: pending until told to finish,
    /// then done at once.
    struct Connection {
        finished: bool,
    }

    impl Future for Connection {
        type Output = &'static str;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<&'static str> {
            if self.finished {
                Poll::Ready("finished")
            } else {
                Poll::Pending
            }
        }
    }

    fn finish(connection: Pin<&mut Connection>) {
        connection.get_mut().finished = true;
    }

    /// A counted connection's bounds: 5 s for a first request at a stop,
    /// 15 s to finish, and closed after `idle_close` idle.
    fn lifetime(activity: &Activity, idle_close: Option<Duration>) -> Lifetime<'_> {
        Lifetime {
            requests: Some(Requests {
                activity,
                idle_close,
                first_request_within: Duration::from_secs(5),
            }),
            finish_grace: Duration::from_secs(15),
        }
    }

    /// Serves a stand-in connection as an HTTP/2 one: closed after 10 s
    /// idle.
    async fn serve_http2(
        activity: &Activity,
        stopping: impl Future<Output = ()>,
    ) -> Option<&'static str> {
        let lifetime = lifetime(activity, Some(Duration::from_secs(10)));
        serve(Connection { finished: false }, finish, lifetime, stopping).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_dropped_after_the_idle_bound() {
        let activity = Activity::default();
        let started = tokio::time::Instant::now();
        let served = serve_http2(&activity, std::future::pending()).await;
        assert_eq!(served, None);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_finished_gracefully_after_its_last_request() {
        let activity = Arc::new(Activity::default());
        let started = tokio::time::Instant::now();
        let requests = {
            let activity = activity.clone();
            async move {
                for _ in 0..3 {
                    let request = activity.enter();
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    drop(request);
                    tokio::time::sleep(Duration::from_secs(9)).await;
                }
            }
        };
        let (served, ()) = tokio::join!(serve_http2(&activity, std::future::pending()), requests);
        assert_eq!(served, Some("finished"));
        // Requests in the handler over 0-4 s, 13-17 s and 26-30 s; checks
        // at 10, 20, 30 and 40 s, the last the first to find nothing new.
        assert_eq!(started.elapsed(), Duration::from_secs(40));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_its_handler_keeps_the_connection_however_long() {
        let activity = Arc::new(Activity::default());
        let request = activity.enter();
        let served = tokio::time::timeout(
            Duration::from_secs(3600),
            serve_http2(&activity, std::future::pending()),
        )
        .await;
        assert!(served.is_err(), "closed with a request in its handler");
        drop(request);
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_finishes_a_connection_that_had_requests_at_once() {
        let used = Arc::new(Activity::default());
        drop(used.enter());
        let started = tokio::time::Instant::now();
        let served = serve_http2(&used, std::future::ready(())).await;
        assert_eq!(served, Some("finished"));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A connection opened just before the stop, its first request on the
    /// way: finished once that request is in, dropped if none comes within
    /// `first_request_within`.
    #[tokio::test(start_paused = true)]
    async fn stopping_waits_for_the_first_request_of_a_new_connection_within_a_bound() {
        let started = tokio::time::Instant::now();
        let silent = Activity::default();
        let served = serve_http2(&silent, std::future::ready(())).await;
        assert_eq!(served, None);
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let started = tokio::time::Instant::now();
        let new = Arc::new(Activity::default());
        let first_request = {
            let new = new.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                new.enter()
            }
        };
        let (served, in_handler) =
            tokio::join!(serve_http2(&new, std::future::ready(())), first_request);
        assert_eq!(served, Some("finished"));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_millis(2100),
            "finished {waited:?} after the stop, not once the request came at 2 s"
        );
        drop(in_handler);
    }

    #[tokio::test(start_paused = true)]
    async fn http1_is_never_closed_for_idleness_and_a_finish_is_bounded() {
        let started = tokio::time::Instant::now();
        let never_done = |_: Pin<&mut Connection>| {};
        let activity = Arc::new(Activity::default());
        drop(activity.enter());
        let http1 = lifetime(&activity, None);
        let served = serve(
            Connection { finished: false },
            never_done,
            http1,
            tokio::time::sleep(Duration::from_secs(100)),
        )
        .await;
        assert_eq!(served, None);
        assert_eq!(started.elapsed(), Duration::from_secs(115));
    }

    #[tokio::test(start_paused = true)]
    async fn http1_without_a_request_at_a_stop_gets_the_same_wait_for_its_first() {
        let activity = Activity::default();
        let http1 = lifetime(&activity, None);
        let started = tokio::time::Instant::now();
        let served = serve(
            Connection { finished: false },
            finish,
            http1,
            std::future::ready(()),
        )
        .await;
        assert_eq!(served, None);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn uncounted_connections_are_finished_at_once_at_a_stop() {
        let metrics = Lifetime {
            requests: None,
            finish_grace: Duration::from_secs(15),
        };
        let started = tokio::time::Instant::now();
        let served = serve(
            Connection { finished: false },
            finish,
            metrics,
            std::future::ready(()),
        )
        .await;
        assert_eq!(served, Some("finished"));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
