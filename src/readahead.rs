//! Large reads under TLS, with no buffer held by an idle connection.
//!
//! rustls asks its transport for 4 KiB at a time, so a 4 KiB
//! AdmissionReview cost one or two `recvfrom` calls, and a burst of them
//! on one HTTP/2 connection as many. [`ReadAhead`] reads up to
//! [`READ_AHEAD`] bytes per call and serves rustls from memory; its buffer
//! is allocated when data arrives and freed once drained when the socket
//! has nothing more, so idle connections hold none, and 1 024 connections
//! caught mid-read hold 16 MiB at most.
//!
//! Measured with h2load over HTTP/2 (one connection, 32 streams), 5 s
//! runs: the server busy 88-94% -> 97-98% of its core, 43-52k -> 49-51k
//! req/s (10 s runs later: 88-95% busy, so not always); likely because
//! the server takes more of a burst per turn, not measured. 16 KiB did as
//! well as 64 KiB. (Dropped once over its memory: 64 KiB allocated per
//! wake, on musl's malloc possibly an mmap each. Now it is 16 KiB, which
//! mimalloc, by its design, serves from per-thread pages.)
//!
//! Since HTTP/2 backlogs are read in parts (`coalesce::READ_BUDGET`), the
//! server is 99% busy either way; the read-ahead still saves CPU per
//! request: h2load, HTTP/2, 5 s runs alternating with it passed through,
//! 56.8k / 59.2k / 56.9k / 59.2k against 56.4k / 54.5k / 55.9k / 52.6k
//! req/s, 0.0168-0.0175 against 0.0176-0.0189 ms per request.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket per call at most (four 4 KiB reviews).
pub const READ_AHEAD: usize = 16 * 1024;

/// A transport whose reads are batched; writes pass through untouched.
pub struct ReadAhead<T> {
    io: T,
    /// Unallocated while idle.
    buf: BytesMut,
    /// Off: reads go straight to `io` once `buf` is drained.
    batching: bool,
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            batching: true,
        }
    }

    /// Stops batching reads. For HTTP/1.1: with it, h2load's rate over 32
    /// connections was ~10% lower (why was not measured; likely the
    /// buffer's allocation per wake, with one request per turn to gain).
    pub fn pass_through(&mut self) {
        self.batching = false;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if !this.batching || out.remaining() >= READ_AHEAD {
                this.buf = BytesMut::new();
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.buf.reserve(READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Err(error));
                }
                Poll::Pending => {
                    // Idle: hold no memory until the peer sends again.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
        let taken = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..taken]);
        this.buf.advance(taken);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn serves_small_reads_from_one_large_read_and_frees_when_idle() {
        let (mut peer, near) = tokio::io::duplex(4 * READ_AHEAD);
        let mut io = ReadAhead::new(near);
        let sent: Vec<u8> = (0..3 * READ_AHEAD / 2).map(|i| (i % 253) as u8).collect();
        peer.write_all(&sent).await.expect("sent");

        // rustls asks for 4 KiB at a time.
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        while received.len() < sent.len() {
            let n = io.read(&mut chunk).await.expect("read");
            assert!(n > 0, "early EOF");
            received.extend_from_slice(&chunk[..n]);
            if received.len() == n {
                // One socket read took a whole READ_AHEAD at once.
                assert!(io.buf.len() >= READ_AHEAD - n, "{}", io.buf.len());
            }
            assert!(io.buf.capacity() <= 2 * READ_AHEAD, "{}", io.buf.capacity());
        }
        assert_eq!(received, sent);

        // Nothing more to read: the next read waits, holding no buffer.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(20), io.read(&mut chunk));
        assert!(waiting.await.is_err(), "read returned without data");
        assert_eq!(io.buf.capacity(), 0);

        // Writes pass straight through; EOF is EOF.
        io.write_all(b"answer").await.expect("write");
        let mut answer = [0u8; 6];
        peer.read_exact(&mut answer).await.expect("answer");
        assert_eq!(&answer, b"answer");
        drop(peer);
        assert_eq!(io.read(&mut chunk).await.expect("EOF"), 0);
    }

    #[tokio::test]
    async fn pass_through_serves_what_is_buffered_then_reads_directly() {
        let (mut peer, near) = tokio::io::duplex(4 * READ_AHEAD);
        let mut io = ReadAhead::new(near);
        peer.write_all(&[7u8; 8192]).await.expect("sent");
        let mut chunk = [0u8; 4096];
        assert_eq!(io.read(&mut chunk).await.expect("read"), 4096);
        assert_eq!(io.buf.len(), 4096, "one batched read took both halves");

        io.pass_through();
        assert_eq!(io.read(&mut chunk).await.expect("read"), 4096);
        assert_eq!(chunk, [7u8; 4096]);
        peer.write_all(&[9u8; 8192]).await.expect("sent");
        assert_eq!(io.read(&mut chunk).await.expect("read"), 4096);
        assert_eq!(chunk, [9u8; 4096]);
        assert_eq!(io.buf.capacity(), 0, "no buffer once passing through");
    }

    #[tokio::test]
    async fn a_large_read_goes_straight_to_the_caller() {
        let (mut peer, near) = tokio::io::duplex(4 * READ_AHEAD);
        let mut io = ReadAhead::new(near);
        peer.write_all(b"direct").await.expect("sent");
        let mut large = vec![0u8; READ_AHEAD];
        let n = io.read(&mut large).await.expect("read");
        assert_eq!(&large[..n], b"direct");
        assert_eq!(io.buf.capacity(), 0);
    }
}
