//! The migration dashboard in a real browser: TLS 1.0, TLS 1.1 and plaintext devices go through
//! real sessions, then headless Chromium renders `/` (JavaScript is not needed, and the page's
//! policy forbids it). The rendered page must show the counts, one row per device, one bar for
//! the one day with traffic, and a device-chosen `<script>` name as text that never ran. The
//! screenshot is kept in the target directory (docs/dashboard.png is a copy of it).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use crate::support::ca::Pki;
use crate::support::device::{Legacy, Mail, SmtpClient};
use crate::support::proxy::{Proxy, Route, Settings};
use crate::support::upstream::{FakeUpstream, SmtpBehaviour};

/// An EHLO name a hostile device could choose: it must show as text and never run.
const HOSTILE_NAME: &str = "<script>document.title='pwned'</script>";

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A connection from `source` (a loopback address of its own, so each device is its own
/// inventory entry).
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    let source: IpAddr = source.parse().expect("source address");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind the source address");
    tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect")
}

async fn starttls_device(proxy: &Proxy, source: &str, ehlo: &str, legacy: Legacy) {
    let tcp = connect_from(source, proxy.addr("smtp")).await;
    let mut plain = SmtpClient::new(tcp);
    plain.greeting().await.expect("greeting");
    plain
        .expect(&format!("EHLO {ehlo}"), 250)
        .await
        .expect("EHLO");
    plain.expect("STARTTLS", 220).await.expect("STARTTLS");
    let mut tls = plain
        .start_tls(legacy, &proxy.verify())
        .await
        .expect("TLS through the proxy");
    tls.send_mail(&Mail::sample()).await.expect("mail");
    tls.read_to_close().await.expect("close");
}

async fn plain_device(proxy: &Proxy, source: &str) {
    let tcp = connect_from(source, proxy.addr("plain")).await;
    let mut plain = SmtpClient::new(tcp);
    plain.greeting().await.expect("greeting");
    plain.send_mail(&Mail::sample()).await.expect("mail");
    plain.read_to_close().await.expect("close");
}

/// Runs headless Chromium on `url` with `args`; returns its standard output. It blocks, so the
/// test runs on a multi-threaded runtime where the proxy keeps serving meanwhile.
fn browse(chromium: &Path, profile: &Path, url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_renders_the_devices_counts_and_chart_and_runs_no_device_text() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing and CI is set"
        );
        eprintln!("skipped: chromium is not installed");
        return;
    };
    crate::support::init_logging();
    let pki = Pki::new().expect("test PKI");
    let mut upstream = FakeUpstream::smtp(SmtpBehaviour::Normal, &pki.localhost)
        .await
        .expect("fake upstream");
    let settings = Settings::new(
        &pki,
        vec![
            Route::smtp("smtp", "starttls", upstream.port()),
            Route::smtp("plain", "plain", upstream.port()),
        ],
    );
    let proxy = Proxy::start_with(&settings).await.expect("start the proxy");
    starttls_device(&proxy, "127.0.0.2", "MX-3070", Legacy::Tls10).await;
    upstream.next_session().await.expect("upstream session");
    starttls_device(&proxy, "127.0.0.3", HOSTILE_NAME, Legacy::Tls11).await;
    upstream.next_session().await.expect("upstream session");
    plain_device(&proxy, "127.0.0.4").await;
    upstream.next_session().await.expect("upstream session");

    let url = format!("http://{}/", proxy.admin());
    let profile = tempfile::tempdir().expect("browser profile");
    // The inventory is written as each device leg is established; wait for all three.
    let mut dom = String::new();
    for _ in 0..50 {
        dom = browse(&chromium, profile.path(), &url, &["--dump-dom"]);
        if dom.contains("id=\"seen-24h\"><div class=\"n\">3<") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        dom.contains("id=\"seen-24h\"><div class=\"n\">3<"),
        "three devices seen in the last 24 h:\n{dom}"
    );
    for text in [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "MX-3070",
        "TLS 1.0",
        "TLS 1.1",
        "plain",
    ] {
        assert!(dom.contains(text), "{text} on the page:\n{dom}");
    }
    let devices = dom
        .split("<table id=\"devices\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .expect("the device table");
    assert_eq!(devices.matches("<tr").count() - 1, 3, "{devices}");
    assert_eq!(
        dom.matches("<g class=\"day\"").count(),
        1,
        "one bar for the one day with traffic"
    );
    // The device's text is shown escaped, and nothing it carried ran.
    assert!(
        dom.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;"),
        "the hostile name as text:\n{dom}"
    );
    assert!(!dom.contains("<title>pwned"), "a script ran:\n{dom}");
    assert!(!dom.contains("<script>document.title"), "{dom}");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &chromium,
        profile.path(),
        &url,
        &[
            "--window-size=1280,1900",
            "--hide-scrollbars",
            &format!("--screenshot={}", shot.display()),
        ],
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("screenshot: {}", shot.display());
    drop(upstream);
}
