//! The socket under a device's WebSocket: glommio's `TcpStream` (io_uring, woken per arrival)
//! or, with `server.socket_sweep_ms` set, a [`SweptStream`] woken by the shard's
//! [`Sweep`](shards::Sweep) once per sweep. The handshake always runs on glommio's stream; the
//! socket moves to the sweep after the 101 answer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use shards::{Sweep, SweptStream};

/// A device's connected socket.
pub enum DeviceStream {
    /// Read and written through glommio's reactor.
    Uring(TcpStream),
    /// Read and written with nonblocking syscalls, woken by the shard's sweep.
    Swept(SweptStream),
}

impl DeviceStream {
    /// `stream` as the shard serves devices: moved into `sweep` when there is one (its own
    /// descriptor is closed; the socket lives on in the sweep's duplicate), else as it is.
    pub fn new(stream: TcpStream, sweep: Option<&Sweep>) -> io::Result<DeviceStream> {
        let Some(sweep) = sweep else {
            return Ok(DeviceStream::Uring(stream));
        };
        let fd = duplicate(&stream)?;
        drop(stream);
        Ok(DeviceStream::Swept(sweep.register(fd)?))
    }
}

/// A second descriptor of `stream`'s socket (glommio's stream cannot give its own away): the
/// socket outlives `stream` in it, for a hand-off to another shard or the move into a sweep.
pub fn duplicate(stream: &TcpStream) -> io::Result<OwnedFd> {
    // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }.try_clone_to_owned()
}

impl AsyncRead for DeviceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            DeviceStream::Uring(s) => Pin::new(s).poll_read(cx, buf),
            DeviceStream::Swept(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DeviceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            DeviceStream::Uring(s) => Pin::new(s).poll_write(cx, buf),
            DeviceStream::Swept(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DeviceStream::Uring(s) => Pin::new(s).poll_flush(cx),
            DeviceStream::Swept(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DeviceStream::Uring(s) => Pin::new(s).poll_close(cx),
            DeviceStream::Swept(s) => Pin::new(s).poll_close(cx),
        }
    }
}
