//! Socket sweeps: many connections' reads woken together, once per tick, instead of one
//! wake-up per arriving packet.
//!
//! Why: a device streams a 60 ms audio frame 16 times a second. With one readiness wake-up
//! per frame (glommio's sockets on io_uring), a shard holding a hundred devices wakes, parks
//! and re-arms its reactor some 1,700 times a second for frames that need ~35 µs of work each;
//! on this kind of machine the wake-ups cost more than the work. A [`Sweep`] keeps the
//! shard's device sockets in one edge-triggered epoll set and looks at it once per `period`
//! (`epoll_wait` with a zero timeout, from a glommio timer): every connection whose socket
//! became readable or writable since the last sweep is woken in the same executor pass, and
//! reads what queued in its socket buffer in one `recv`. The kernel's socket buffer is the
//! queue, so a sweep adds at most one period of latency and holds nothing of its own.
//!
//! A [`SweptStream`] is the connection's side: nonblocking `recv`/`send` on its descriptor
//! (futures-io `AsyncRead`/`AsyncWrite`), parking its task in the sweep only when the kernel
//! says "would block". Writes go out at once; only a full send buffer waits for a sweep.
//!
//! After waking a sweep's connections the sweep task yields once, so it runs again after all
//! of them (one executor task queue is FIFO), then counts the sweep as *processed*
//! ([`Sweep::processed_since`]): a per-tick batcher (the VAD flusher) can wait for that and
//! send one batch holding everything the sweep's readers produced.
//!
//! Shard-local (`Rc`, `RefCell`): one sweep per shard, driven by its [`Sweep::run`] task. An
//! idle sweep (no stream registered) does not tick.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncWrite};

/// Events fetched per `epoll_wait` call (a sweep calls again while the buffer comes back full).
const EVENTS_PER_CALL: usize = 256;

/// A shard's set of swept sockets. Cloning shares the set.
#[derive(Clone)]
pub struct Sweep {
    inner: Rc<Inner>,
}

struct Inner {
    epoll: OwnedFd,
    period: Duration,
    slots: RefCell<Slots>,
    /// The sweep task, parked while no stream is registered.
    idle: RefCell<Option<Waker>>,
    /// Sweeps whose woken tasks have all run once.
    processed: Cell<u64>,
    /// Between a sweep's `epoll_wait` and the point its woken tasks have all run.
    in_progress: Cell<bool>,
    processed_waiters: RefCell<Vec<Waker>>,
    stats: Cell<SweepStats>,
}

#[derive(Default)]
struct Slots {
    entries: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
}

#[derive(Default)]
struct Slot {
    /// Bumped when the slot is freed, so an event for an earlier stream cannot wake a later one.
    generation: u32,
    read: Option<Waker>,
    write: Option<Waker>,
}

/// Counters of one shard's sweep, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Sweeps done (one `epoll_wait` pass each).
    pub sweeps: u64,
    /// Tasks the sweeps woke (a read and a write waiter of one stream count twice).
    pub woken: u64,
    /// Streams registered now.
    pub streams: usize,
}

impl Sweep {
    /// A sweep looking at its sockets every `period` (at least 1 ms).
    pub fn new(period: Duration) -> io::Result<Sweep> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor this function owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Sweep {
            inner: Rc::new(Inner {
                epoll,
                period: period.max(Duration::from_millis(1)),
                slots: RefCell::new(Slots::default()),
                idle: RefCell::new(None),
                processed: Cell::new(0),
                in_progress: Cell::new(false),
                processed_waiters: RefCell::new(Vec::new()),
                stats: Cell::new(SweepStats::default()),
            }),
        })
    }

    /// The sweep's period.
    pub fn period(&self) -> Duration {
        self.inner.period
    }

    /// Whether any stream is registered (an idle sweep does not tick).
    pub fn active(&self) -> bool {
        self.inner.slots.borrow().live > 0
    }

    /// The sweep's counters.
    pub fn stats(&self) -> SweepStats {
        let mut s = self.inner.stats.get();
        s.streams = self.inner.slots.borrow().live;
        s
    }

    /// Takes over a connected socket: sets it nonblocking and adds it to the set.
    pub fn register(&self, fd: OwnedFd) -> io::Result<SweptStream> {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor `fd` owns; results checked.
        unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let (index, generation) = {
            let mut slots = self.inner.slots.borrow_mut();
            let index = match slots.free.pop() {
                Some(i) => i,
                None => {
                    slots.entries.push(Slot::default());
                    u32::try_from(slots.entries.len() - 1)
                        .map_err(|_| io::Error::other("too many swept streams"))?
                }
            };
            slots.live += 1;
            (index, slots.entries[index as usize].generation)
        };
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN
                | libc::EPOLLOUT
                | libc::EPOLLRDHUP
                | libc::EPOLLHUP
                | libc::EPOLLERR
                | libc::EPOLLET) as u32,
            u64: token(index, generation),
        };
        // SAFETY: both descriptors are open; `event` lives across the call.
        let rc = unsafe {
            libc::epoll_ctl(
                self.inner.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                raw,
                &mut event,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            self.inner.free(index);
            return Err(e);
        }
        if let Some(w) = self.inner.idle.borrow_mut().take() {
            w.wake();
        }
        Ok(SweptStream {
            fd,
            index,
            sweep: self.inner.clone(),
        })
    }

    /// Sweeps processed so far (see [`Sweep::processed_since`]).
    pub fn processed_count(&self) -> u64 {
        self.inner.processed.get()
    }

    /// Resolves, with the new count, once a sweep later than the `since`-th has woken its
    /// tasks and they have all run, and no sweep is under way: the point where a tick's reads
    /// have all been handled. A batcher keeps the count it last sent at and waits with it, so
    /// it sends once per sweep, never in the middle of one, and never waits a sweep too many
    /// whichever of it and the sweep runs first. Resolves at once while no stream is
    /// registered (an idle sweep does not tick).
    pub fn processed_since(&self, since: u64) -> impl Future<Output = u64> + '_ {
        poll_fn(move |cx| {
            let inner = &self.inner;
            let done = inner.processed.get();
            if (done > since && !inner.in_progress.get()) || !self.active() {
                return Poll::Ready(done);
            }
            let mut waiters = inner.processed_waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    /// Sweeps every `period` while any stream is registered, until the task is dropped.
    pub async fn run(self) {
        let inner = &self.inner;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_CALL];
        let mut next = Instant::now();
        loop {
            if !self.active() {
                inner.mark_processed();
                poll_fn(|cx| {
                    if self.active() {
                        Poll::Ready(())
                    } else {
                        *inner.idle.borrow_mut() = Some(cx.waker().clone());
                        Poll::Pending
                    }
                })
                .await;
                next = Instant::now();
            }
            // Ticks on a fixed grid; a late tick does not make the next one early.
            let now = Instant::now();
            next = (next + inner.period).max(now);
            glommio::timer::sleep(next - now).await;
            inner.in_progress.set(true);
            inner.sweep_once(&mut events);
            // Run again after the tasks just woken (FIFO in this task queue), then say so.
            futures_lite::future::yield_now().await;
            inner.mark_processed();
        }
    }
}

fn token(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

impl Inner {
    fn sweep_once(&self, events: &mut [libc::epoll_event]) {
        let mut stats = self.stats.get();
        stats.sweeps += 1;
        loop {
            // SAFETY: `events` is a valid buffer of `events.len()` entries; zero timeout.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!(error = %e, "epoll_wait failed; sweeping again next tick");
                break;
            }
            let n = n as usize;
            for ev in &events[..n] {
                let (flags, data) = (ev.events, ev.u64);
                stats.woken += self.dispatch(flags, data);
            }
            if n < events.len() {
                break;
            }
        }
        self.stats.set(stats);
    }

    /// Wakes the waiters an event concerns; how many were woken.
    fn dispatch(&self, flags: u32, data: u64) -> u64 {
        let (index, generation) = ((data & 0xffff_ffff) as u32, (data >> 32) as u32);
        let (read, write) = {
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.entries.get_mut(index as usize) else {
                return 0;
            };
            if slot.generation != generation {
                return 0;
            }
            let broken = (libc::EPOLLHUP | libc::EPOLLERR) as u32;
            let readable = flags & (libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32 | broken) != 0;
            let writable = flags & (libc::EPOLLOUT as u32 | broken) != 0;
            (
                if readable { slot.read.take() } else { None },
                if writable { slot.write.take() } else { None },
            )
        };
        let mut woken = 0;
        for w in [read, write].into_iter().flatten() {
            w.wake();
            woken += 1;
        }
        woken
    }

    fn mark_processed(&self) {
        self.in_progress.set(false);
        self.processed.set(self.processed.get() + 1);
        let waiters = std::mem::take(&mut *self.processed_waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }

    fn park(&self, index: u32, write: bool, waker: &Waker) {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots.entries[index as usize];
        let cell = if write {
            &mut slot.write
        } else {
            &mut slot.read
        };
        match cell {
            Some(w) if w.will_wake(waker) => {}
            _ => *cell = Some(waker.clone()),
        }
    }

    fn free(&self, index: u32) {
        let mut slots = self.slots.borrow_mut();
        let slot = &mut slots.entries[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.read = None;
        slot.write = None;
        slots.free.push(index);
        slots.live -= 1;
    }
}

/// A connected socket read and written without blocking, woken by its shard's [`Sweep`].
pub struct SweptStream {
    fd: OwnedFd,
    index: u32,
    sweep: Rc<Inner>,
}

impl SweptStream {
    /// One nonblocking syscall, retried on EINTR; parks the task in the sweep on EAGAIN.
    fn io(
        &self,
        cx: &mut Context<'_>,
        write: bool,
        mut call: impl FnMut() -> isize,
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = call();
            if n >= 0 {
                return Poll::Ready(Ok(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    self.sweep.park(self.index, write, cx.waker());
                    return Poll::Pending;
                }
                _ => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsRawFd for SweptStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for SweptStream {
    fn drop(&mut self) {
        // Removed explicitly: a duplicate of the descriptor elsewhere would keep it in the set.
        // SAFETY: both descriptors are open; a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.sweep.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                self.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
        self.sweep.free(self.index);
    }
}

impl AsyncRead for SweptStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let fd = self.as_raw_fd();
        self.io(cx, false, || {
            // SAFETY: `buf` is valid for `buf.len()` bytes for the call's duration.
            unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) }
        })
    }
}

impl AsyncWrite for SweptStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let fd = self.as_raw_fd();
        self.io(cx, true, || {
            // SAFETY: `buf` is valid for `buf.len()` bytes; MSG_NOSIGNAL: a reset peer gives
            // EPIPE, not SIGPIPE.
            unsafe {
                libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            }
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here: every write went to the kernel.
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: plain syscall on an open descriptor.
        let rc = unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::NotConnected {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}
