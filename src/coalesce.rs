//! One write per burst of HTTP/2 answers, not one per answer.
//!
//! h2 flushes its transport before it queues a DATA frame behind one it did
//! not copy (any frame over 256 bytes), and the connection task runs after
//! each stream that answers, so every AdmissionReview answer cost its own
//! TLS record and `writev`, even with thirty answers due at once: under
//! load those flushes were 29% of the server's CPU. Here the
//! connection writes into a buffer and its flushes are deferred; when the
//! connection's task has had its turn, [`Coalesced`] yields once, so that
//! the stream tasks already queued (other handlers finishing) add their
//! answers, then sends the whole buffer as one TLS write. A write that
//! would take it past [`HIGH_WATER`] bytes sends it first. Nothing waits
//! for data that is
//! not already on its way: a lone answer leaves after one trip through the
//! runtime's queue.
//!
//! A backlog is answered in parts. A turn stops reading after
//! [`READ_BUDGET`] bytes, and a turn that leaves [`SEND_AT`] bytes to send sends them
//! without the yield. Read whole, a backlog of 32 reviews was answered in
//! one write after all 32 handlers ran; the peer then had nothing to send
//! until that write, and the server waited for its next requests 14-16%
//! of the time. In parts, the peer's next requests arrive while the server
//! answers the rest, and it did not wait (h2load, HTTP/2: 0.8% idle).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A write that would take the buffer past this many bytes first sends
/// what is buffered: a connection holds at most this much (or one larger
/// write) in memory, and a peer that stops reading pushes back on the
/// writer. 64 answers of 1 KB fit.
pub const HIGH_WATER: usize = 64 * 1024;
/// A connection's turn stops reading once it has read this many bytes (the
/// read that crosses it completes; then it yields, and reads on at its next
/// turn), so that a backlog of requests is answered in parts rather than
/// all read first: 16 reviews of 4 KB.
pub const READ_BUDGET: usize = 64 * 1024;
/// A turn that leaves at least this much to send sends it at once instead
/// of waiting for the queued tasks' answers (7 answers of 1.3 KB).
pub const SEND_AT: usize = 8 * 1024;
/// A buffer that grew past this is freed once sent, so an idle connection
/// keeps at most this much (16 MiB for 1 024 idle HTTP/2 connections).
const RETAINED_CAPACITY: usize = 16 * 1024;

struct Shared<T> {
    io: T,
    /// Bytes read in the connection's current turn, against [`READ_BUDGET`].
    read_this_turn: usize,
    pending: Vec<u8>,
    /// How much of `pending` the transport has taken.
    sent: usize,
    /// A failed send, reported to the connection at its next read or write.
    failed: Option<io::ErrorKind>,
}

impl<T> Shared<T> {
    fn fail(&mut self, error: io::Error) -> Poll<io::Result<()>> {
        self.failed = Some(error.kind());
        self.pending = Vec::new();
        self.sent = 0;
        Poll::Ready(Err(error))
    }

    fn check(&self) -> io::Result<()> {
        match self.failed {
            Some(kind) => Err(kind.into()),
            None => Ok(()),
        }
    }
}

impl<T: AsyncWrite + Unpin> Shared<T> {
    /// Sends everything buffered, then flushes the transport.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        while self.sent < self.pending.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.pending[self.sent..]) {
                Poll::Ready(Ok(0)) => return self.fail(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(written)) => self.sent += written,
                Poll::Ready(Err(error)) => return self.fail(error),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.pending.capacity() > RETAINED_CAPACITY {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
        self.sent = 0;
        match ready!(Pin::new(&mut self.io).poll_flush(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(error) => self.fail(error),
        }
    }
}

/// The transport as the HTTP/2 connection sees it: reads go through (at
/// most [`READ_BUDGET`] bytes per turn), writes are buffered, flushes are
/// left to [`Coalesced`].
pub struct CoalescingIo<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

pin_project_lite::pin_project! {
    /// Drives a connection future and sends what it wrote after each of
    /// its polls.
    pub struct Coalesced<F: Future, T> {
        #[pin]
        connection: F,
        shared: Arc<Mutex<Shared<T>>>,
        // The connection's result, held while its last bytes are sent.
        finished: Option<F::Output>,
        deferred: bool,
        last_send_within: Duration,
        // Started when the connection finishes with bytes still to send.
        last_send_limit: Option<Pin<Box<Sleep>>>,
    }
}

/// Splits a transport into the side a connection writes to and the driver
/// that sends what it wrote: build the connection on the first, run it
/// through [`Driver::run`].
pub fn split<T>(io: T) -> (CoalescingIo<T>, Driver<T>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        read_this_turn: 0,
        pending: Vec::new(),
        sent: 0,
        failed: None,
    }));
    (
        CoalescingIo {
            shared: shared.clone(),
        },
        Driver { shared },
    )
}

/// The sending half of [`split`].
pub struct Driver<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

impl<T> Driver<T> {
    /// Wraps the future that serves the connection built on the other half.
    /// Once it has finished, what it left to send gets `last_send_within`
    /// to leave, then is dropped with the transport.
    pub fn run<F: Future>(self, connection: F, last_send_within: Duration) -> Coalesced<F, T> {
        Coalesced {
            connection,
            shared: self.shared,
            finished: None,
            deferred: false,
            last_send_within,
            last_send_limit: None,
        }
    }
}

fn lock<T>(shared: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    // Only this connection's task touches the lock, and nothing in it can
    // panic while held; a poisoned lock still holds consistent buffers.
    crate::unwind::lock(shared)
}

impl<F, T> Future for Coalesced<F, T>
where
    F: Future,
    T: AsyncWrite + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.finished.is_none()
            && let Poll::Ready(output) = this.connection.poll(cx)
        {
            *this.finished = Some(output);
        }
        let mut shared = lock(this.shared);
        // The turn is over: the next one may read a full budget.
        shared.read_this_turn = 0;
        let buffered = shared.pending.len() - shared.sent;
        if this.finished.is_none() && !*this.deferred && buffered > 0 && buffered < SEND_AT {
            // Let the tasks already queued (other streams' handlers) run
            // first: a self-wake puts this task behind them.
            *this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        *this.deferred = false;
        let failed_before = shared.failed.is_some();
        let sent = shared.poll_send(cx);
        drop(shared);
        match (this.finished.take(), sent) {
            (Some(output), Poll::Ready(_)) => Poll::Ready(output),
            (Some(output), Poll::Pending) => {
                // Bounded: a peer that stopped reading would otherwise hold
                // this task, the transport and the connection's slot past
                // the connection's own limits (its finish grace, its idle
                // close, h2's ping timeout) until the kernel gave up.
                let within = *this.last_send_within;
                let limit = this
                    .last_send_limit
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(within)));
                if limit.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(output);
                }
                *this.finished = Some(output);
                Poll::Pending
            }
            (None, Poll::Ready(Err(_))) if !failed_before => {
                // The connection learns of the failure at its next read or
                // write; poll it again (once) so that happens now.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            (finished, _) => {
                *this.finished = finished;
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        shared.check()?;
        if shared.read_this_turn >= READ_BUDGET {
            // The rest is read at the connection's next turn, after the
            // tasks already queued (the handlers of what it read).
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut shared.io).poll_read(cx, buf))?;
        shared.read_this_turn += buf.filled().len() - before;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    /// Makes room for `incoming` more bytes: at once if the buffer stays
    /// within [`HIGH_WATER`] (or is empty), else after sending it.
    fn poll_room(
        shared: &mut Shared<T>,
        cx: &mut Context<'_>,
        incoming: usize,
    ) -> Poll<io::Result<()>> {
        shared.check()?;
        let buffered = shared.pending.len() - shared.sent;
        if buffered > 0 && buffered + incoming > HIGH_WATER {
            ready!(shared.poll_send(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.shared);
        let incoming = bufs.iter().map(|buf| buf.len()).sum();
        ready!(Self::poll_room(&mut shared, cx, incoming))?;
        let mut written = 0;
        for buf in bufs {
            shared.pending.extend_from_slice(buf);
            written += buf.len();
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Deferred: [`Coalesced`] sends and flushes once the connection's
    /// poll is over.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.shared).check()?;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.shared);
        ready!(shared.poll_send(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Ample: these tests' peers read, or are unblocked, well within it.
    const LAST_SEND: Duration = Duration::from_secs(60);

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Write(Vec<u8>),
        Flush,
        Shutdown,
    }

    /// A transport that records what reaches it; it can refuse writes for
    /// a while (a peer not reading) or fail them (a peer gone). Its reads
    /// return what the peer sent (`readable`), then wait forever (a failed
    /// send fails them in `CoalescingIo`).
    #[derive(Default)]
    struct Wire {
        events: Vec<Event>,
        /// Bytes the peer has sent, read 4 KiB at a time.
        readable: usize,
        blocked: bool,
        broken: bool,
        writer: Option<Waker>,
    }

    #[derive(Clone, Default)]
    struct MockIo(Arc<Mutex<Wire>>);

    impl MockIo {
        fn events(&self) -> Vec<Event> {
            self.0.lock().expect("wire").events.clone()
        }

        fn written(&self) -> Vec<u8> {
            self.events()
                .into_iter()
                .filter_map(|event| match event {
                    Event::Write(bytes) => Some(bytes),
                    _ => None,
                })
                .flatten()
                .collect()
        }

        fn writes(&self) -> usize {
            self.events()
                .iter()
                .filter(|event| matches!(event, Event::Write(_)))
                .count()
        }

        fn unblock(&self) {
            let mut wire = self.0.lock().expect("wire");
            wire.blocked = false;
            if let Some(waker) = wire.writer.take() {
                waker.wake();
            }
        }
    }

    impl AsyncWrite for MockIo {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut wire = self.0.lock().expect("wire");
            if wire.broken {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if wire.blocked {
                wire.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            wire.events.push(Event::Write(buf.to_vec()));
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.lock().expect("wire").events.push(Event::Flush);
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.lock().expect("wire").events.push(Event::Shutdown);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for MockIo {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut wire = self.0.lock().expect("wire");
            let chunk = wire.readable.min(4096).min(buf.remaining());
            if chunk == 0 {
                return Poll::Pending;
            }
            wire.readable -= chunk;
            buf.put_slice(&vec![b'r'; chunk]);
            Poll::Ready(Ok(()))
        }
    }

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Wakes {
        fn waker() -> (Arc<Self>, Waker) {
            let wakes = Arc::new(Self::default());
            (wakes.clone(), Waker::from(wakes))
        }

        fn count(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Polls `check` until it holds, for at most a few seconds.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test]
    async fn frames_written_in_one_turn_leave_as_one_write() {
        let wire = MockIo::default();
        let (mut io, driver) = split(wire.clone());
        let (next, mut go) = tokio::sync::mpsc::unbounded_channel::<&'static [u8]>();
        let connection = async move {
            for frame in [&b"headers "[..], b"data ", b"headers2 ", b"data2"] {
                io.write_all(frame).await?;
                io.flush().await?;
            }
            // Later answers, each alone.
            while let Some(frame) = go.recv().await {
                io.write_all(frame).await?;
                io.flush().await?;
            }
            io::Result::Ok(())
        };
        let served = tokio::spawn(driver.run(connection, LAST_SEND));

        eventually("the first burst is sent", || wire.writes() == 1).await;
        assert_eq!(
            wire.events(),
            [
                Event::Write(b"headers data headers2 data2".to_vec()),
                Event::Flush
            ]
        );

        next.send(b"lone answer").expect("connection running");
        eventually("a lone answer is sent", || wire.writes() == 2).await;
        assert_eq!(wire.written(), b"headers data headers2 data2lone answer");

        drop(next);
        served.await.expect("joined").expect("served");
        assert_eq!(wire.events().last(), Some(&Event::Flush));
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_pushes_back_and_loses_nothing() {
        let wire = MockIo::default();
        wire.0.lock().expect("wire").blocked = true;
        let (mut io, driver) = split(wire.clone());
        let buffer = io.shared.clone();
        let chunk: Vec<u8> = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
        let chunks = 8; // twice HIGH_WATER
        let expected: Vec<u8> = chunk.repeat(chunks);
        let accepted = Arc::new(Mutex::new(0usize));
        let counted = accepted.clone();
        let connection = async move {
            for _ in 0..chunks {
                io.write_all(&chunk).await?;
                *counted.lock().expect("count") += chunk.len();
            }
            io.shutdown().await
        };
        let served = tokio::spawn(driver.run(connection, LAST_SEND));

        // Blocked: the writer stops before the buffer would pass HIGH_WATER.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let taken = *accepted.lock().expect("count");
        assert_eq!(taken, HIGH_WATER, "accepted while the peer read nothing");
        let capacity = lock(&buffer).pending.capacity();
        assert!(capacity <= HIGH_WATER, "buffer capacity {capacity}");
        assert!(!served.is_finished());
        assert_eq!(wire.writes(), 0);

        wire.unblock();
        served.await.expect("joined").expect("served");
        assert_eq!(wire.written(), expected);
        let events = wire.events();
        let last_write = events.iter().rposition(|e| matches!(e, Event::Write(_)));
        let shutdown = events.iter().position(|e| *e == Event::Shutdown);
        assert!(last_write < shutdown, "{:?}", (last_write, shutdown));
    }

    /// A connection that writes its last answer and finishes, to a peer
    /// that reads nothing until unblocked.
    fn last_answer_to_a_blocked_peer(
        last_send_within: Duration,
    ) -> (
        MockIo,
        Coalesced<impl Future<Output = io::Result<()>>, MockIo>,
    ) {
        let wire = MockIo::default();
        wire.0.lock().expect("wire").blocked = true;
        let (mut io, driver) = split(wire.clone());
        let connection = async move {
            io.write_all(b"last answer").await?;
            io.flush().await
        };
        (wire, driver.run(connection, last_send_within))
    }

    #[tokio::test]
    async fn what_a_finished_connection_left_gets_a_while_to_leave_not_forever() {
        let (wire, served) = last_answer_to_a_blocked_peer(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let served = tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the peer never reads; the connection still ends");
        served.expect("the connection's own result");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "not before its time to send"
        );
        assert_eq!(wire.writes(), 0);

        // A peer that reads within the time gets everything.
        let (wire, served) = last_answer_to_a_blocked_peer(Duration::from_secs(10));
        let served = tokio::spawn(served);
        tokio::time::sleep(Duration::from_millis(100)).await;
        wire.unblock();
        served.await.expect("joined").expect("served");
        assert_eq!(wire.written(), b"last answer");
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_buffered_first() {
        let wire = MockIo::default();
        let (mut io, driver) = split(wire.clone());
        let connection = async move {
            io.write_all(b"goaway").await?;
            io.shutdown().await
        };
        driver.run(connection, LAST_SEND).await.expect("served");
        assert_eq!(
            wire.events(),
            [
                Event::Write(b"goaway".to_vec()),
                Event::Flush,
                Event::Shutdown,
                Event::Flush
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_send_reaches_the_connection() {
        let wire = MockIo::default();
        wire.0.lock().expect("wire").broken = true;
        let (mut io, driver) = split(wire.clone());
        let connection = async move {
            io.write_all(b"answer").await?;
            io.flush().await?;
            // Like h2: wait for the peer's next frame.
            let mut buf = [0u8; 16];
            io.read(&mut buf).await.map(|_| ())
        };
        let served =
            tokio::time::timeout(Duration::from_secs(5), driver.run(connection, LAST_SEND))
                .await
                .expect("the connection ends");
        assert_eq!(
            served.expect_err("the send failed").kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[test]
    fn a_turn_reads_at_most_the_read_budget() {
        let wire = MockIo::default();
        wire.0.lock().expect("wire").readable = 3 * READ_BUDGET;
        let (mut io, driver) = split(wire.clone());
        let read = Arc::new(Mutex::new(0usize));
        let counted = read.clone();
        let connection = async move {
            let mut buf = [0u8; 4096];
            loop {
                let n = io.read(&mut buf).await?;
                *counted.lock().expect("count") += n;
            }
            #[allow(unreachable_code)]
            io::Result::Ok(())
        };
        let (wakes, waker) = Wakes::waker();
        let mut cx = Context::from_waker(&waker);
        let mut served = std::pin::pin!(driver.run(connection, LAST_SEND));
        for turn in 1..=3 {
            assert!(served.as_mut().poll(&mut cx).is_pending());
            assert_eq!(*read.lock().expect("count"), turn * READ_BUDGET);
            assert_eq!(wakes.count(), turn, "the rest is read at the next turn");
        }
        // All read: the connection waits for the peer, nothing wakes it.
        assert!(served.as_mut().poll(&mut cx).is_pending());
        assert_eq!(*read.lock().expect("count"), 3 * READ_BUDGET);
        assert_eq!(wakes.count(), 3);
    }

    #[test]
    fn a_turn_that_leaves_send_at_bytes_sends_them_at_once() {
        for (size, sent_in_first_turn) in [(SEND_AT - 1, false), (SEND_AT, true)] {
            let wire = MockIo::default();
            let (mut io, driver) = split(wire.clone());
            let connection = async move {
                io.write_all(&vec![b'a'; size]).await?;
                io.flush().await?;
                std::future::pending::<()>().await;
                io::Result::Ok(())
            };
            let (wakes, waker) = Wakes::waker();
            let mut cx = Context::from_waker(&waker);
            let mut served = std::pin::pin!(driver.run(connection, LAST_SEND));
            assert!(served.as_mut().poll(&mut cx).is_pending());
            assert_eq!(wire.writes() == 1, sent_in_first_turn, "{size} bytes");
            // Smaller: deferred one turn (a self-wake), then sent.
            assert_eq!(wakes.count(), usize::from(!sent_in_first_turn));
            assert!(served.as_mut().poll(&mut cx).is_pending());
            assert_eq!(wire.written().len(), size);
        }
    }
}
