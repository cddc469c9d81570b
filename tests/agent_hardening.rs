//! What a hostile local user or a careless operator can do to the agent through its socket:
//! header blocks that never end, idle and slow connections, connections held to lock others
//! out, a second agent on the same socket. Real sockets; the real binary where processes matter.

// These tests make raw system calls (setuid in a child, raw socket options) to act as other
// users and hostile clients would.
#![allow(unsafe_code)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tessera::agent::BuildOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const SETTINGS: u8 = 0x4;

fn frame(frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([frame_type, flags]);
    out.extend(stream_id.to_be_bytes());
    out.extend(payload);
    out
}

/// The preface, empty SETTINGS and a HEADERS frame that leaves its header block open.
fn open_header_block() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, 0, 1, &[0x83]));
    out
}

/// Reads until the agent closes the connection; panics if it has not within `limit`.
async fn wait_closed(stream: &mut UnixStream, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: still open after {limit:?}");
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("{what}: still open after {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_continuation_frames_close_the_connection() {
    let agent = start_agent(&entry("/w", &[&my_uid_selector()], "5m", "")).await;
    let mut stream = UnixStream::connect(agent.socket()).await.unwrap();
    stream.write_all(&open_header_block()).await.unwrap();
    // 200,000 empty frames (1.8 MB): the agent used to read and keep every one of them.
    let batch: Vec<u8> = (0..1000)
        .flat_map(|_| frame(CONTINUATION, 0, 1, &[]))
        .collect();
    let mut refused = false;
    for _ in 0..200 {
        if stream.write_all(&batch).await.is_err() {
            refused = true;
            break;
        }
    }
    if !refused {
        wait_closed(&mut stream, Duration::from_secs(30), "endless header block").await;
    }
    // Others are served as before.
    let out = Command::new(TESSERA)
        .args(["svid", "fetch", "--socket", &agent.uri()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn idle_and_slow_connections_are_closed_but_streams_are_kept() {
    let entries = entry("/w", &[&my_uid_selector()], "5m", "");
    let agent = start_agent_with(
        &entries,
        "[connections]\nidle_timeout = \"1s\"\nheader_timeout = \"1s\"\n",
        BuildOptions::default(),
    )
    .await;

    // Connected, and nothing sent.
    let mut idle = UnixStream::connect(agent.socket()).await.unwrap();
    wait_closed(&mut idle, Duration::from_secs(30), "idle connection").await;

    // A header block begun and never finished.
    let mut slow = UnixStream::connect(agent.socket()).await.unwrap();
    slow.write_all(&open_header_block()).await.unwrap();
    wait_closed(
        &mut slow,
        Duration::from_secs(30),
        "unfinished header block",
    )
    .await;

    // A connection with its stream open is not idle, however long nothing changes.
    let mut watching = UnixStream::connect(agent.socket()).await.unwrap();
    let mut call = PREFACE.to_vec();
    call.extend(frame(SETTINGS, 0, 0, &[]));
    call.extend(fetch_x509svid_request());
    watching.write_all(&call).await.unwrap();
    let answer = response_of_stream_1(&mut watching).await;
    assert!(contains(&answer.data, "spiffe://example.org/w"));
    // An idle connection opened after it is closed: the idle rule has had its chance at the
    // watching one too.
    let mut idle = UnixStream::connect(agent.socket()).await.unwrap();
    wait_closed(&mut idle, Duration::from_secs(30), "idle connection").await;
    watching
        .write_all(&frame(0x6, 0, 0, b"stillhere"[..8].as_ref()))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&seen, "stillher") {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no PING answer");
        match tokio::time::timeout(left, watching.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                panic!("a connection with an open stream was closed as idle")
            }
            Ok(Ok(n)) => seen.extend(&buf[..n]),
            Err(_) => panic!("no PING answer"),
        }
    }
}

/// The unprivileged holders' uids, and one that comes after them.
const UID_HOLDER_A: u32 = 2201;
const UID_HOLDER_B: u32 = 2202;
const UID_LATE: u32 = 2203;

/// A child process running as `uid` that opens `count` connections to `socket` and holds
/// them until killed. Forked rather than run from a binary, so that only raw system calls run
/// between fork and the end of the child.
struct Holder(libc::pid_t);

impl Holder {
    fn start(uid: u32, socket: &Path, count: usize) -> Self {
        let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        address.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let path = std::os::unix::ffi::OsStrExt::as_bytes(socket.as_os_str());
        assert!(path.len() < address.sun_path.len());
        for (slot, byte) in address.sun_path.iter_mut().zip(path) {
            *slot = *byte as libc::c_char;
        }
        let mut ready = [0i32; 2];
        // SAFETY: a pipe into a valid two-element array.
        assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes raw system calls, then exits or pauses until killed.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            unsafe {
                if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                    libc::_exit(3);
                }
                for _ in 0..count {
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    libc::connect(
                        fd,
                        (&address as *const libc::sockaddr_un).cast(),
                        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                    );
                }
                libc::write(ready[1], b"r".as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
        }
        let mut byte = 0u8;
        // SAFETY: reads one byte into a valid buffer; the write end is closed first so a child
        // that died reads as end of file.
        unsafe {
            libc::close(ready[1]);
            assert_eq!(
                libc::read(ready[0], (&mut byte as *mut u8).cast(), 1),
                1,
                "holder {uid} failed"
            );
            libc::close(ready[0]);
        }
        Self(pid)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // SAFETY: signals and reaps the child this value owns.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

/// Runs the agent binary with a descriptor limit low enough that its connection limit is a
/// few dozen; returns once it has told systemd it is ready.
fn agent_with_few_descriptors(dir: &Path, entries: &str, extra: &str) -> Child {
    use std::os::unix::process::CommandExt;
    let config = dir.join("agent.toml");
    std::fs::write(&config, config_text(dir, entries, extra)).unwrap();
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut command = Command::new(TESSERA);
    command
        .args(["agent", "run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 300,
                rlim_max: 300,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    child
}

#[test]
fn users_holding_connections_cannot_lock_out_root_or_other_users() {
    if !require_root("users_holding_connections_cannot_lock_out_root_or_other_users") {
        return;
    }
    let dir = world_dir();
    let entries = [
        entry("/root", &["unix:uid:0"], "5m", ""),
        entry("/late", &[&format!("unix:uid:{UID_LATE}")], "5m", ""),
    ]
    .concat();
    let mut agent = agent_with_few_descriptors(
        dir.path(),
        &entries,
        "[connections]\nidle_timeout = \"1h\"\n",
    );
    let socket = dir.path().join("agent.sock");
    let uri = format!("unix://{}", socket.display());
    // Each tries to hold more than the whole limit (22 connections at 300 descriptors).
    let _a = Holder::start(UID_HOLDER_A, &socket, 30);
    let _b = Holder::start(UID_HOLDER_B, &socket, 30);

    let late_client = dir.path().join("late-client");
    std::fs::copy(TESSERA, &late_client).unwrap();
    std::fs::set_permissions(
        &late_client,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for (uid, program, expected) in [
        (0, Path::new(TESSERA), "spiffe://example.org/root"),
        (UID_LATE, late_client.as_path(), "spiffe://example.org/late"),
    ] {
        let out = run_as(uid, program, &["svid", "fetch", "--socket", &uri]);
        assert!(
            out.status.success(),
            "uid {uid} was locked out: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(expected));
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[test]
fn a_second_agent_never_takes_over_a_live_socket() {
    let dir = world_dir();
    let entries = entry("/w", &[&my_uid_selector()], "5m", "");
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, config_text(dir.path(), &entries, "")).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut first = Command::new(TESSERA)
        .args(["agent", "run", "--config"])
        .arg(&config_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");

    let mut second = Command::new(TESSERA)
        .args(["agent", "run", "--config"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            second.kill().unwrap();
            first.kill().unwrap();
            panic!("the second agent took the socket over instead of exiting");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("another agent or server is serving this socket"),
        "{stderr}"
    );
    // The first agent still serves on its socket.
    let uri = format!("unix://{}", dir.path().join("agent.sock").display());
    let out = Command::new(TESSERA)
        .args(["svid", "fetch", "--socket", &uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn agent_check_refuses_a_socket_path_longer_than_the_system_allows() {
    let dir = world_dir();
    let config_path = dir.path().join("agent.toml");
    let long = format!("/run/{}/agent.sock", "d".repeat(100));
    let text = config_text(dir.path(), &entry("/w", &["unix:uid:1000"], "5m", ""), "")
        .replace(&dir.path().join("agent.sock").display().to_string(), &long);
    std::fs::write(&config_path, text).unwrap();
    let out = Command::new(TESSERA)
        .args(["agent", "check", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("socket_path") && stderr.contains("at most 107 bytes"),
        "{stderr}"
    );
}

/// HPACK "literal header field without indexing, new name", no Huffman (short strings only).
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    out.push(name.len() as u8);
    out.extend(name.as_bytes());
    out.push(value.len() as u8);
    out.extend(value.as_bytes());
}

/// A FetchX509SVID call on stream 1, after the preface and SETTINGS.
fn fetch_x509svid_request() -> Vec<u8> {
    fetch_x509svid_on(1)
}

/// A FetchX509SVID call on stream `id`.
fn fetch_x509svid_on(id: u32) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ] {
        literal(&mut block, name, value);
    }
    let mut out = frame(HEADERS, 0x4, id, &block);
    // An empty X509SVIDRequest: not compressed, zero length.
    out.extend(frame(0x0, 0x1, id, &[0, 0, 0, 0, 0]));
    out
}

/// What came back on stream 1: its header fields (decoded) and its DATA payloads.
#[derive(Default)]
struct Answer {
    fields: Vec<(String, String)>,
    data: Vec<u8>,
}

/// Reads frames until stream 1 ends or sends a message.
async fn response_of_stream_1(stream: &mut UnixStream) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut decoder = loona_hpack::Decoder::new();
    let mut answer = Answer::default();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        while bytes.len() >= 9 {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            if bytes.len() < 9 + len {
                break;
            }
            let (kind, flags) = (bytes[3], bytes[4]);
            let id = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
            let payload: Vec<u8> = bytes[9..9 + len].to_vec();
            bytes.drain(..9 + len);
            if kind == HEADERS {
                // The server sends neither padding nor priority.
                for (name, value) in decoder.decode(&payload).unwrap() {
                    if id == 1 {
                        answer.fields.push((
                            String::from_utf8_lossy(&name).into_owned(),
                            String::from_utf8_lossy(&value).into_owned(),
                        ));
                    }
                }
            }
            if id == 1 && kind == 0x0 {
                answer.data.extend(&payload);
            }
            if id == 1 && (flags & 0x1 != 0 || kind == 0x3 || answer.data.len() > 5) {
                return answer;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no answer on stream 1");
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return answer,
            Ok(Ok(n)) => bytes.extend(&buf[..n]),
            Err(_) => panic!("no answer on stream 1"),
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_refused_once_its_process_runs_another_program() {
    let dir = world_dir();
    let target = dir.path().join("target-program");
    std::fs::copy("/bin/sleep", &target).unwrap();
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let entries = entry(
        "/target",
        &[&format!("unix:path:{}", target.display())],
        "5m",
        "",
    );
    let agent = start_agent(&entries).await;

    // The socket is made here and connected by a child process: the agent sees the child as
    // its peer, while this process keeps the same connection.
    // SAFETY: a plain socket call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = std::os::unix::ffi::OsStrExt::as_bytes(agent.socket().as_os_str()).to_vec();
    for (slot, byte) in address.sun_path.iter_mut().zip(&path) {
        *slot = *byte as libc::c_char;
    }
    let program = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
    let arg = std::ffi::CString::new("60").unwrap();
    let argv = [program.as_ptr(), arg.as_ptr(), std::ptr::null()];
    let mut pipe = [0i32; 2];
    // SAFETY: a pipe into a valid array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let (go_read, go_write) = (pipe[0], pipe[1]);
    // SAFETY: the child makes raw system calls only: connect, wait for a byte, exec.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        unsafe {
            libc::close(go_write);
            let connected = libc::connect(
                fd,
                (&address as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            if connected != 0 {
                libc::_exit(3);
            }
            let mut byte = 0u8;
            libc::read(go_read, (&mut byte as *mut u8).cast(), 1);
            libc::execv(program.as_ptr(), argv.as_ptr());
            libc::_exit(4);
        }
    }
    // SAFETY: closes this process's copy of the read end.
    unsafe { libc::close(go_read) };
    // SAFETY: `fd` is this process's and open; it now owns it.
    let std_stream =
        unsafe { <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // Wait for the child's connect, then for the agent to accept it (its SETTINGS arrive).
    let deadline = Instant::now() + Duration::from_secs(30);
    while std_stream.peer_addr().is_err() {
        assert!(Instant::now() < deadline, "the child did not connect");
        std::thread::sleep(Duration::from_millis(10));
    }
    std_stream.set_nonblocking(true).unwrap();
    let mut stream = UnixStream::from_std(std_stream).unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&hello).await.unwrap();
    let mut first = [0u8; 9];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(first[3], SETTINGS, "the agent answers with its SETTINGS");
    let settings_len = u32::from_be_bytes([0, first[0], first[1], first[2]]) as usize;
    let mut settings = vec![0u8; settings_len];
    stream.read_exact(&mut settings).await.unwrap();

    // Now the connecting process runs another program, one that has an identity.
    // SAFETY: writes one byte to the child's pipe.
    unsafe {
        libc::write(go_write, b"g".as_ptr().cast(), 1);
        libc::close(go_write);
    }
    let exe = format!("/proc/{pid}/exe");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_link(&exe).ok().as_deref() != Some(target.as_path()) {
        assert!(Instant::now() < deadline, "the child did not exec");
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut call = frame(SETTINGS, 0x1, 0, &[]);
    call.extend(fetch_x509svid_request());
    stream.write_all(&call).await.unwrap();
    let answer = response_of_stream_1(&mut stream).await;
    // SAFETY: ends and reaps the child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    assert!(
        !contains(&answer.data, "spiffe://example.org/target"),
        "the connection obtained the identity of a program that did not make it"
    );
    let field = |name: &str| {
        answer
            .fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        field("grpc-status").as_deref(),
        Some("14"),
        "refused as unattested (Unavailable): {:?}",
        answer.fields
    );
    assert_eq!(
        field("grpc-message").as_deref(),
        Some("workload%20attestation%20failed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_client_never_reads_hold_one_message_and_end() {
    const STREAMS: u32 = 150;
    let agent = start_agent(&entry("/w", &[&my_uid_selector()], "2s", "")).await;
    let mut stream = UnixStream::connect(agent.socket()).await.unwrap();
    // The largest windows a client may grant: flow control never holds the agent back, only
    // the client's not reading does.
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    hello.extend(frame(0x8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    for i in 0..STREAMS {
        hello.extend(fetch_x509svid_on(2 * i + 1));
    }
    stream.write_all(&hello).await.unwrap();

    // Rotations every second or so, none of them read. Renewal stops once no stream leases the
    // SVID any more: wait for that, which happens only if the agent ends the unread streams.
    let audit = agent.dir.path().join("state").join("audit.jsonl");
    let issued = || {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .matches("svid_issued")
            .count()
    };
    // The rotation task drops an SVID no stream leases at its renewal time, and only a
    // cached SVID is ever renewed: an empty cache after issuance means renewal has stopped.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = issued();
        if now >= 1 && agent.handle.cache.cached_svids() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still renewing after {now} issuances: unread streams were kept"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every stream has ended (grpc-status 8), each after a bounded number of messages.
    let mut decoder = loona_hpack::Decoder::new();
    let mut messages = std::collections::HashMap::<u32, usize>::new();
    let mut ended = std::collections::HashMap::<u32, String>::new();
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(60);
    while ended.len() < STREAMS as usize {
        while bytes.len() >= 9 {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            if bytes.len() < 9 + len {
                break;
            }
            let (kind, flags) = (bytes[3], bytes[4]);
            let id = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
            let payload = bytes[9..9 + len].to_vec();
            bytes.drain(..9 + len);
            match kind {
                0x0 if len > 0 => *messages.entry(id).or_default() += 1,
                0x1 => {
                    for (name, value) in decoder.decode(&payload).unwrap() {
                        if name == b"grpc-status" && flags & 0x1 != 0 {
                            ended.insert(id, String::from_utf8_lossy(&value).into_owned());
                        }
                    }
                }
                _ => {}
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{} of {STREAMS} streams ended; the agent kept the rest for a client that never read",
            ended.len()
        );
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => panic!("the connection closed"),
            Ok(Ok(n)) => bytes.extend(&buf[..n]),
            Err(_) => {}
        }
    }
    assert!(ended.values().all(|status| status == "8"), "{ended:?}");
    // A message may span DATA frames: this bounds frames, which bounds messages.
    let most = messages.values().max().copied().unwrap_or(0);
    assert!(most <= 40, "a stream sent {most} DATA frames");
}
