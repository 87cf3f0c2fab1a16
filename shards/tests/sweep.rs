//! Socket sweeps over real loopback sockets: bytes arrive intact both ways, one sweep wakes
//! every reader whose data queued and reports itself processed only after they all ran, a full
//! send buffer waits for a sweep without losing a byte, and a dropped stream leaves the set.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::{LocalExecutorBuilder, Placement};
use shards::Sweep;

/// Runs `f` on a fresh glommio executor (small io_uring memory: no root needed).
fn on_executor<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(f)
        .expect("executor starts")
        .join()
        .expect("executor ends")
}

/// A connected pair: the server side as an owned descriptor, the client side as a std stream.
fn pair(listener: &TcpListener) -> (OwnedFd, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (OwnedFd::from(server), client)
}

#[test]
fn a_swept_stream_carries_bytes_both_ways_and_sees_the_end() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (server, mut client) = pair(&listener);
    let peer = std::thread::spawn(move || {
        client.write_all(b"ping from the device").unwrap();
        let mut answer = [0u8; 20];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"pong from the server");
        // Dropping the client ends the stream: the server must read 0 (end of stream).
    });
    let (got, end) = on_executor(move || async move {
        let sweep = Sweep::new(Duration::from_millis(5)).unwrap();
        let runner = glommio::spawn_local(sweep.clone().run());
        let mut stream = sweep.register(server).unwrap();
        let mut got = [0u8; 20];
        stream.read_exact(&mut got).await.unwrap();
        stream.write_all(b"pong from the server").await.unwrap();
        let mut rest = Vec::new();
        let end = stream.read_to_end(&mut rest).await.map(|_| rest.len());
        drop(stream);
        drop(runner);
        (got, end.unwrap())
    });
    peer.join().unwrap();
    assert_eq!(&got, b"ping from the device");
    assert_eq!(
        end, 0,
        "nothing after the device's bytes, then the end of stream"
    );
}

#[test]
fn one_sweep_wakes_every_waiting_reader_and_is_processed_after_they_ran() {
    const READERS: usize = 24;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let pairs: Vec<_> = (0..READERS).map(|_| pair(&listener)).collect();
    let (servers, mut clients): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    let (seen_at_processed, stats) = on_executor(move || async move {
        // A long period, so the first sweep comes well after every reader has parked.
        let sweep = Sweep::new(Duration::from_millis(200)).unwrap();
        let done = Rc::new(RefCell::new(0usize));
        let mut readers = Vec::new();
        for server in servers {
            let mut stream = sweep.register(server).unwrap();
            let done = done.clone();
            readers.push(glommio::spawn_local(async move {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.unwrap();
                *done.borrow_mut() += 1;
                stream
            }));
        }
        // Let every reader try, find nothing and park in the sweep.
        futures_lite::future::yield_now().await;
        glommio::timer::sleep(Duration::from_millis(20)).await;
        assert_eq!(*done.borrow(), 0, "no reader can have data yet");
        let runner = glommio::spawn_local(sweep.clone().run());
        // Data queues in every socket before the first sweep (200 ms away).
        for c in clients.iter_mut() {
            c.write_all(b"x").unwrap();
        }
        let count = sweep.processed_since(0).await;
        assert_eq!(count, 1);
        let seen = *done.borrow();
        let stats = sweep.stats();
        for r in readers {
            drop(r.await);
        }
        drop(runner);
        (seen, stats)
    });
    assert_eq!(
        seen_at_processed, READERS,
        "the first processed sweep comes after every reader it woke has run"
    );
    assert_eq!(stats.sweeps, 1, "one sweep brought all of them: {stats:?}");
    assert_eq!(stats.woken as usize, READERS, "{stats:?}");
    assert_eq!(stats.streams, READERS);
}

#[test]
fn a_full_send_buffer_waits_for_a_sweep_and_loses_nothing() {
    const BYTES: usize = 8 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (server, mut client) = pair(&listener);
    let reader = std::thread::spawn(move || {
        // Start late, so the server's writes fill the socket buffers and must wait.
        std::thread::sleep(Duration::from_millis(300));
        let mut all = Vec::with_capacity(BYTES);
        client.read_to_end(&mut all).unwrap();
        all
    });
    let stats = on_executor(move || async move {
        let sweep = Sweep::new(Duration::from_millis(5)).unwrap();
        let runner = glommio::spawn_local(sweep.clone().run());
        let mut stream = sweep.register(server).unwrap();
        let data: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
        stream.write_all(&data).await.unwrap();
        stream.close().await.unwrap();
        let stats = sweep.stats();
        drop(stream);
        drop(runner);
        stats
    });
    let all = reader.join().unwrap();
    assert_eq!(all.len(), BYTES);
    assert!(all.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    assert!(
        stats.woken > 0,
        "the writer waited for the sweep: {stats:?}"
    );
}

#[test]
fn a_dropped_stream_leaves_the_set_and_an_idle_sweep_lets_waiters_go() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (server, _client) = pair(&listener);
    let (before, after, active) = on_executor(move || async move {
        let sweep = Sweep::new(Duration::from_millis(5)).unwrap();
        let runner = glommio::spawn_local(sweep.clone().run());
        let stream = sweep.register(server).unwrap();
        let before = sweep.stats().streams;
        drop(stream);
        let after = sweep.stats().streams;
        // With no stream left the sweep goes idle; a waiter must not wait forever.
        sweep.processed_since(sweep.processed_count()).await;
        let active = sweep.active();
        drop(runner);
        (before, after, active)
    });
    assert_eq!((before, after, active), (1, 0, false));
}
