//! The real binary under a low open-file limit: when `accept` fails (EMFILE), the accept loop
//! backs off instead of spinning on the error, and takes connections again once descriptors
//! are free.

use std::time::Duration;

use crate::support::ca::Pki;
use crate::support::ops::Process;
use crate::support::peers;
use crate::support::proxy::{Route, Settings};
use crate::support::upstream::{FakeUpstream, SmtpBehaviour};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The proxy's open-file limit for this test.
const NOFILE: usize = 64;

/// CPU time (user + system, in clock ticks) the process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which is in parentheses and may contain spaces).
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields[i].parse::<u64>().expect("numeric stat field");
    ticks(11) + ticks(12) // utime, stime (fields 14 and 15 of the whole line)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .expect("list /proc/PID/fd")
}

/// True when the proxy's SMTP banner arrives on `tcp` within `limit`.
async fn banner_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, tcp.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0 && buf.starts_with(b"220 ")
    )
}

#[tokio::test]
async fn accept_errors_back_off_and_recover() {
    crate::support::init_logging();
    if !peers::require("prlimit", &["--version"]) {
        return;
    }
    let pki = Pki::new().expect("test PKI");
    let upstream = FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.localhost)
        .await
        .expect("fake upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = Settings::new(&pki, vec![Route::smtp("smtp", "starttls", upstream.port())]);
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let wrapper = ["prlimit".to_string(), limit, "--".to_string()];
    let mut proxy = Process::start_via(dir.path(), &settings, &wrapper)
        .await
        .expect("start the proxy under prlimit");
    let pid = proxy.pid().expect("pid");
    let addr = proxy.addr("smtp");

    // Each session holds the device socket and an upstream socket: this many connections use
    // up every descriptor, and the last ones wait in the listen backlog while accept fails.
    let connections = NOFILE.saturating_sub(open_fds(pid)) + 8;
    let mut held = Vec::new();
    for _ in 0..connections {
        held.push(TcpStream::connect(addr).await.expect("connect (backlog)"));
    }
    let mut greeted = 0;
    for tcp in &mut held {
        if banner_within(tcp, Duration::from_millis(300)).await {
            greeted += 1;
        }
    }
    assert!(
        greeted < held.len(),
        "the descriptor limit was never reached"
    );

    // Out of descriptors with connections pending: a spinning loop would burn a whole core.
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 50,
        "{used} clock ticks of CPU in 2 s while accept fails: the loop spins"
    );

    // Descriptors free up: new connections are served again (the back-off is at most 1 s).
    drop(held);
    let mut fresh = TcpStream::connect(addr).await.expect("connect again");
    assert!(
        banner_within(&mut fresh, Duration::from_secs(10)).await,
        "no banner after descriptors were freed"
    );
    assert!(proxy.running(), "the proxy survived EMFILE");
    drop(fresh);
    proxy.signal("TERM").expect("SIGTERM");
    let status = proxy
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exit");
    assert!(status.success(), "{status}");
}
