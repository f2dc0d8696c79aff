//! End to end with real outside programs as peers. Devices: swaks, `openssl s_client` and curl,
//! each pinned to TLS 1.0 with `DEFAULT:@SECLEVEL=0`. Upstreams: aiosmtpd and Dovecot, both with
//! TLS 1.2 as their minimum and STARTTLS required, and a local HTTPS server (rustls, TLS 1.2+)
//! behind an SNI-routed `tcp` route; or two of them, on 127.0.0.2 and 127.0.0.3, behind the real
//! binary run by `unshare -m` with a private /etc/hosts that maps each allowed name to one of
//! them. Each test first shows that the upstream refuses the device's TLS 1.0 on its own, so a
//! success through tlsbridge is the proxy's doing.
//!
//! A test whose program is missing prints a notice and passes, unless CI is set: then it fails.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::ca::{Leaf, Pki};
use crate::support::ops::{field, is_audit, Process};
use crate::support::peers::{
    free_ports, is_root, missing, require, run, user_ids, Daemon, Output, PROGRAM_TIMEOUT,
    START_TIMEOUT,
};
use crate::support::proxy::{Proxy, Route, Settings};

/// The aiosmtpd upstream (STARTTLS required, TLS 1.2 minimum).
const SMTP_UPSTREAM_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/smtp_upstream.py");

/// What every OpenSSL-based client here needs to speak TLS 1.0 at all.
const LEGACY_CIPHERS: &str = "DEFAULT:@SECLEVEL=0";

/// A unique marker for one message.
fn marker(what: &str) -> String {
    format!("tlsbridge-{what}-{:016x}", rand::random::<u64>())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// Whether `text` has a line that, trimmed, is exactly `line`.
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

/// curl's verbose line for a TLS 1.0 session (OpenSSL names the version "TLSv1").
const CURL_TLS10: &str = "SSL connection using TLSv1 /";

/// curl pinned to TLS 1.0, verifying the server against `ca`, with `url` resolved to 127.0.0.1.
async fn curl_tls10(ca: &Path, host: &str, port: u16, url: &str, extra: &[&str]) -> Result<Output> {
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    curl_tls10_at(ca, host, loopback, port, url, extra).await
}

/// [`curl_tls10`] with `host:port` resolved to `ip`.
async fn curl_tls10_at(
    ca: &Path,
    host: &str,
    ip: IpAddr,
    port: u16,
    url: &str,
    extra: &[&str],
) -> Result<Output> {
    let mut args = strings(&[
        "--silent",
        "--show-error",
        "--verbose",
        "--tlsv1.0",
        "--tls-max",
        "1.0",
        "--ciphers",
        LEGACY_CIPHERS,
        "--connect-timeout",
        "10",
        "--max-time",
        "30",
        "--cacert",
    ]);
    args.push(path_arg(ca));
    args.push("--resolve".into());
    args.push(format!("{host}:{port}:{ip}"));
    args.extend(strings(extra));
    args.push(url.to_string());
    run("curl", &args, b"", PROGRAM_TIMEOUT).await
}

/// Asserts that a curl run succeeded over TLS 1.0.
fn assert_curl_tls10_ok(out: &Output) -> Result<()> {
    ensure!(out.success(), "curl failed: {out:?}");
    ensure!(
        out.stderr.contains(CURL_TLS10),
        "curl did not report a TLS 1.0 session ({CURL_TLS10:?}): {out:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SMTP: aiosmtpd upstream
// ---------------------------------------------------------------------------------------------

/// aiosmtpd on 127.0.0.1 with the test CA's "localhost" certificate; it saves each message as a
/// file in `outbox`.
struct SmtpUpstream {
    daemon: Daemon,
    port: u16,
    outbox: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmtpUpstream {
    async fn start(leaf: &Leaf) -> Result<SmtpUpstream> {
        let dir = tempfile::tempdir().context("tempdir for aiosmtpd")?;
        let cert = dir.path().join("upstream.crt");
        let key = dir.path().join("upstream.key");
        std::fs::write(&cert, &leaf.chain_pem).context("write the upstream certificate")?;
        std::fs::write(&key, &leaf.key_pem).context("write the upstream key")?;
        let outbox = dir.path().join("outbox");
        std::fs::create_dir(&outbox).context("create the outbox")?;
        let args = vec![
            "-u".to_string(),
            SMTP_UPSTREAM_PY.to_string(),
            "0".to_string(),
            path_arg(&outbox),
            path_arg(&cert),
            path_arg(&key),
        ];
        let mut daemon = Daemon::spawn("python3", &args, &dir.path().join("aiosmtpd.log"))?;
        let line = daemon.wait_for_line("ready ", START_TIMEOUT).await?;
        let port = line["ready ".len()..]
            .trim()
            .parse()
            .with_context(|| format!("port in {line:?}"))?;
        Ok(SmtpUpstream {
            daemon,
            port,
            outbox,
            _dir: dir,
        })
    }

    /// The saved messages.
    fn messages(&self) -> Result<Vec<String>> {
        let mut messages = Vec::new();
        for entry in std::fs::read_dir(&self.outbox).context("read the outbox")? {
            let path = entry?.path();
            if path.extension().is_some_and(|ext| ext == "eml") {
                let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
                messages.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        Ok(messages)
    }

    /// The one saved message whose body (after the header) contains `needle`.
    fn message_with_body(&self, needle: &str) -> Result<String> {
        let found: Vec<String> = self
            .messages()?
            .into_iter()
            .filter(|m| {
                let body = m
                    .split_once("\r\n\r\n")
                    .or_else(|| m.split_once("\n\n"))
                    .map_or("", |(_, body)| body);
                body.contains(needle)
            })
            .collect();
        match found.len() {
            1 => Ok(found.into_iter().next().unwrap_or_default()),
            n => bail!(
                "{n} saved messages have {needle:?} in their body; outbox: {:?}{}",
                self.messages()?,
                self.daemon.log()
            ),
        }
    }
}

fn smtp_peers_available() -> bool {
    require("python3", &["-c", "import aiosmtpd"])
}

/// swaks pinned to TLS 1.0; `mode` is `--tls` (STARTTLS) or `--tlsc` (implicit TLS).
async fn swaks_tls10(port: u16, mode: &str, ca: &Path, body_marker: &str) -> Result<Output> {
    let mut args = strings(&[
        "--server",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--ehlo",
        "legacy-printer.device.test",
        "--from",
        "scanner@example.com",
        "--to",
        "office@example.com",
        "--header",
        &format!("Subject: scan {body_marker}"),
        "--body",
        &format!("Scanned page.\nBODY-{body_marker}\n"),
        mode,
        "--tls-protocol",
        "tlsv1",
        "--tls-cipher",
        LEGACY_CIPHERS,
        "--tls-verify",
        "--tls-ca-path",
    ]);
    args.push(path_arg(ca));
    args.extend(strings(&["--timeout", "20"]));
    run("swaks", &args, b"", PROGRAM_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_tls10_delivers_through_starttls_and_implicit_tls_routes() -> Result<()> {
    crate::support::init_logging();
    if !require("swaks", &["--version"]) || !smtp_peers_available() {
        return Ok(());
    }
    let pki = Pki::new()?;
    let upstream = SmtpUpstream::start(&pki.localhost).await?;
    let proxy = Proxy::start(
        &pki,
        &[
            Route::smtp("smtp", "starttls", upstream.port),
            Route::smtp("smtps", "tls", upstream.port),
        ],
    )
    .await?;

    // On its own, the upstream refuses a TLS 1.0 device.
    let direct = marker("direct");
    let out = swaks_tls10(upstream.port, "--tls", &pki.ca_path, &direct).await?;
    ensure!(
        !out.success(),
        "aiosmtpd accepted TLS 1.0 directly: {out:?}"
    );
    ensure!(
        upstream.messages()?.is_empty(),
        "aiosmtpd saved a message from a TLS 1.0 device: {:?}",
        upstream.messages()?
    );

    for (route, mode) in [("smtp", "--tls"), ("smtps", "--tlsc")] {
        let mark = marker(route);
        let out = swaks_tls10(proxy.addr(route).port(), mode, &proxy.device_ca(), &mark).await?;
        ensure!(out.success(), "swaks {mode} through route {route}: {out:?}");
        ensure!(
            out.stdout.contains("TLS started with cipher TLSv1:"),
            "swaks {mode} through route {route} did not negotiate TLS 1.0: {out:?}"
        );
        let message = upstream
            .message_with_body(&format!("BODY-{mark}"))
            .with_context(|| format!("swaks {mode} through route {route}: {out:?}"))?;
        ensure!(
            message.contains(&format!("Subject: scan {mark}")),
            "the saved message lost its subject: {message}"
        );
    }
    ensure!(upstream.messages()?.len() == 2, "two messages expected");
    upstream.daemon.stop().await;
    proxy.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_starttls_smtp_negotiates_tls10() -> Result<()> {
    crate::support::init_logging();
    if !require("openssl", &["version"]) || !smtp_peers_available() {
        return Ok(());
    }
    let pki = Pki::new()?;
    let upstream = SmtpUpstream::start(&pki.localhost).await?;
    let proxy = Proxy::start(&pki, &[Route::smtp("smtp", "starttls", upstream.port)]).await?;

    let direct = s_client_tls10(upstream.port, "smtp", &pki.ca_path, b"QUIT\n").await?;
    ensure!(
        !s_client_tls10_ok(&direct),
        "aiosmtpd accepted TLS 1.0 directly: {direct:?}"
    );

    let out = s_client_tls10(
        proxy.addr("smtp").port(),
        "smtp",
        &proxy.device_ca(),
        b"EHLO legacy-printer.device.test\nQUIT\n",
    )
    .await?;
    ensure!(
        s_client_tls10_ok(&out),
        "s_client did not complete a TLS 1.0 session: {out:?}"
    );
    ensure!(
        has_line(&out.stdout, "Verify return code: 0 (ok)"),
        "s_client did not verify the proxy's certificate: {out:?}"
    );
    // The session inside TLS reached aiosmtpd: its EHLO answer and its goodbye.
    ensure!(
        out.stdout.contains("250-upstream.localhost") && out.stdout.contains("221"),
        "no SMTP session through the proxy: {out:?}"
    );
    upstream.daemon.stop().await;
    proxy.stop().await
}

/// Whether `s_client` completed a TLS 1.0 handshake: it prints "Protocol  : TLSv1" even after
/// a failed one (with cipher "0000"), so a negotiated cipher must be there too.
fn s_client_tls10_ok(out: &Output) -> bool {
    let cipher = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Cipher    : "))
        .map(str::trim);
    out.success()
        && has_line(&out.stdout, "Protocol  : TLSv1")
        && cipher.is_some_and(|c| !c.is_empty() && c != "0000" && c != "(NONE)")
}

/// `openssl s_client -starttls PROTO -tls1` with `input` as the session (LF becomes CRLF).
async fn s_client_tls10(port: u16, starttls: &str, ca: &Path, input: &[u8]) -> Result<Output> {
    let mut args = strings(&[
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-starttls",
        starttls,
        "-tls1",
        "-cipher",
        LEGACY_CIPHERS,
        "-servername",
        "localhost",
        "-verify_hostname",
        "localhost",
        "-verify_return_error",
        "-crlf",
        "-ign_eof",
        "-nocommands",
        "-CAfile",
    ]);
    args.push(path_arg(ca));
    run("openssl", &args, input, PROGRAM_TIMEOUT).await
}

// ---------------------------------------------------------------------------------------------
// IMAP and POP3: Dovecot upstream
// ---------------------------------------------------------------------------------------------

const MAIL_USER: &str = "scanner";
const MAIL_PASSWORD: &str = "scan-to-mail-1";

/// Dovecot with `ssl = required`, TLS 1.2 minimum, one user whose INBOX holds one message.
struct Dovecot {
    daemon: Daemon,
    imap: u16,
    imaps: u16,
    pop3: u16,
    pop3s: u16,
    _dir: tempfile::TempDir,
}

impl Dovecot {
    async fn start(leaf: &Leaf, message: &str) -> Result<Dovecot> {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().context("tempdir for dovecot")?;
        let base = dir.path();
        // The mail processes run as `nobody`: they must reach the home below the tempdir.
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))
            .context("chmod the dovecot tempdir")?;
        let (uid, gid) = user_ids("nobody")?;
        let home = base.join("home").join(MAIL_USER);
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(home.join("Maildir").join(sub))
                .context("create the maildir")?;
        }
        std::fs::write(
            home.join("Maildir/new/1700000000.M1P1.tlsbridge-test"),
            message.replace('\n', "\r\n"),
        )
        .context("write the message")?;
        for path in [
            base.join("home"),
            home.clone(),
            home.join("Maildir"),
            home.join("Maildir/cur"),
            home.join("Maildir/new"),
            home.join("Maildir/tmp"),
            home.join("Maildir/new/1700000000.M1P1.tlsbridge-test"),
        ] {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        let cert = base.join("dovecot.crt");
        let key = base.join("dovecot.key");
        std::fs::write(&cert, &leaf.chain_pem).context("write the dovecot certificate")?;
        std::fs::write(&key, &leaf.key_pem).context("write the dovecot key")?;
        let [imap, imaps, pop3, pop3s] = free_ports::<4>()?;
        let log = base.join("dovecot.log");
        let config = format!(
            r#"protocols = imap pop3
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {log}
info_log_path = {log}
auth_verbose = yes
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
first_valid_uid = 1
first_valid_gid = 1
passdb {{
  driver = static
  args = password={MAIL_PASSWORD}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%u
}}
mail_location = maildir:~/Maildir
service imap-login {{
  inet_listener imap {{
    port = {imap}
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = {pop3s}
    ssl = yes
  }}
}}
"#,
            base = base.display(),
            log = log.display(),
            cert = cert.display(),
            key = key.display(),
        );
        let config_path = base.join("dovecot.conf");
        std::fs::write(&config_path, config).context("write dovecot.conf")?;
        let args = vec!["-F".to_string(), "-c".to_string(), path_arg(&config_path)];
        let mut daemon = Daemon::spawn("dovecot", &args, &base.join("dovecot.stderr"))?;
        daemon.add_log(&log);
        let addrs: Vec<_> = [imap, imaps, pop3, pop3s]
            .iter()
            .map(|port| (Ipv4Addr::LOCALHOST, *port).into())
            .collect();
        daemon.wait_listening(&addrs, START_TIMEOUT).await?;
        Ok(Dovecot {
            daemon,
            imap,
            imaps,
            pop3,
            pop3s,
            _dir: dir,
        })
    }
}

/// Dovecot with one message, and a proxy with a route of every IMAP/POP3 kind to it.
struct MailSetup {
    marker: String,
    dovecot: Dovecot,
    proxy: Proxy,
    pki: Pki,
}

impl MailSetup {
    /// `None` (after a notice) when curl, openssl or dovecot is missing or we are not root.
    async fn start() -> Result<Option<MailSetup>> {
        crate::support::init_logging();
        if !require("curl", &["--version"])
            || !require("openssl", &["version"])
            || !require("dovecot", &["--version"])
        {
            return Ok(None);
        }
        if !is_root() {
            missing(
                "dovecot",
                "the tests run it as root so it can switch to `nobody`",
            );
            return Ok(None);
        }
        let pki = Pki::new()?;
        let marker = marker("mail");
        let message = format!(
            "From: Office <office@example.com>\nTo: Scanner <scanner@example.com>\n\
             Subject: job {marker}\nMessage-ID: <{marker}@example.com>\n\n\
             Print job body {marker}\n"
        );
        let dovecot = Dovecot::start(&pki.localhost, &message).await?;
        let route = |name: &str, protocol: &str, device: &str, port: u16, upstream: &str| {
            Route::new(
                name,
                protocol,
                device,
                &format!("localhost:{port}"),
                upstream,
            )
        };
        let proxy = Proxy::start(
            &pki,
            &[
                route("imaps", "imap", "tls", dovecot.imaps, "tls"),
                route("imap", "imap", "starttls", dovecot.imap, "starttls"),
                route("imap-to-tls", "imap", "starttls", dovecot.imaps, "tls"),
                route("pop3s", "pop3", "tls", dovecot.pop3s, "tls"),
                route("pop3", "pop3", "starttls", dovecot.pop3, "starttls"),
                route("pop3-to-tls", "pop3", "starttls", dovecot.pop3s, "tls"),
            ],
        )
        .await?;
        Ok(Some(MailSetup {
            marker,
            dovecot,
            proxy,
            pki,
        }))
    }

    fn port(&self, route: &str) -> u16 {
        self.proxy.addr(route).port()
    }

    /// curl through `route` with the mail user's credentials; `scheme` imaps/imap/pop3s/pop3.
    async fn curl(&self, route: &str, scheme: &str, path: &str) -> Result<Output> {
        let port = self.port(route);
        let url = format!("{scheme}://localhost:{port}/{path}");
        let user = format!("{MAIL_USER}:{MAIL_PASSWORD}");
        let mut extra = vec!["--user", user.as_str()];
        if !scheme.ends_with('s') {
            extra.push("--ssl-reqd");
        }
        curl_tls10(&self.proxy.device_ca(), "localhost", port, &url, &extra).await
    }

    /// Lists the mailboxes and fetches the message over IMAP through `route`.
    async fn imap_list_and_fetch(&self, route: &str, scheme: &str) -> Result<()> {
        let list = self.curl(route, scheme, "").await?;
        assert_curl_tls10_ok(&list).with_context(|| self.dovecot.daemon.log())?;
        ensure!(
            list.stdout
                .lines()
                .any(|l| l.starts_with("* LIST") && l.contains("INBOX")),
            "no INBOX in the listing through {route}: {list:?}"
        );
        let fetch = self.curl(route, scheme, "INBOX;UID=1").await?;
        assert_curl_tls10_ok(&fetch).with_context(|| self.dovecot.daemon.log())?;
        ensure!(
            fetch
                .stdout
                .contains(&format!("Print job body {}", self.marker)),
            "the message did not come through {route}: {fetch:?}"
        );
        Ok(())
    }

    /// Lists the messages and retrieves the first over POP3 through `route`.
    async fn pop3_list_and_fetch(&self, route: &str, scheme: &str) -> Result<()> {
        let list = self.curl(route, scheme, "").await?;
        assert_curl_tls10_ok(&list).with_context(|| self.dovecot.daemon.log())?;
        ensure!(
            list.stdout.lines().any(|l| l.starts_with("1 ")),
            "no message 1 in the listing through {route}: {list:?}"
        );
        let fetch = self.curl(route, scheme, "1").await?;
        assert_curl_tls10_ok(&fetch).with_context(|| self.dovecot.daemon.log())?;
        ensure!(
            fetch
                .stdout
                .contains(&format!("Print job body {}", self.marker)),
            "the message did not come through {route}: {fetch:?}"
        );
        Ok(())
    }

    async fn stop(self) -> Result<()> {
        self.dovecot.daemon.stop().await;
        self.proxy.stop().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_imaps_tls10_through_tls_to_tls_route() -> Result<()> {
    let Some(setup) = MailSetup::start().await? else {
        return Ok(());
    };
    // On its own, Dovecot refuses a TLS 1.0 device.
    let port = setup.dovecot.imaps;
    let direct = curl_tls10(
        &setup.pki.ca_path,
        "localhost",
        port,
        &format!("imaps://localhost:{port}/"),
        &["--user", &format!("{MAIL_USER}:{MAIL_PASSWORD}")],
    )
    .await?;
    ensure!(
        direct.code() == Some(35),
        "Dovecot should refuse TLS 1.0 with a handshake failure: {direct:?}"
    );
    setup.imap_list_and_fetch("imaps", "imaps").await?;
    setup.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_imap_starttls_tls10_through_starttls_to_starttls_route() -> Result<()> {
    let Some(setup) = MailSetup::start().await? else {
        return Ok(());
    };
    setup.imap_list_and_fetch("imap", "imap").await?;
    setup.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_imap_starttls_tls10_through_starttls_to_tls_route() -> Result<()> {
    let Some(setup) = MailSetup::start().await? else {
        return Ok(());
    };
    setup.imap_list_and_fetch("imap-to-tls", "imap").await?;
    setup.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_pop3s_tls10_through_tls_to_tls_route() -> Result<()> {
    let Some(setup) = MailSetup::start().await? else {
        return Ok(());
    };
    setup.pop3_list_and_fetch("pop3s", "pop3s").await?;
    setup.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_pop3_starttls_tls10_through_starttls_routes() -> Result<()> {
    let Some(setup) = MailSetup::start().await? else {
        return Ok(());
    };
    setup.pop3_list_and_fetch("pop3", "pop3").await?;
    setup.pop3_list_and_fetch("pop3-to-tls", "pop3").await?;
    setup.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_starttls_imap_and_pop3_negotiate_tls10() -> Result<()> {
    let Some(setup) = MailSetup::start().await? else {
        return Ok(());
    };
    let ca = setup.proxy.device_ca();
    let direct = s_client_tls10(
        setup.dovecot.imap,
        "imap",
        &setup.pki.ca_path,
        b"a LOGOUT\n",
    )
    .await?;
    ensure!(
        !s_client_tls10_ok(&direct),
        "Dovecot accepted TLS 1.0 directly: {direct:?}"
    );
    for (route, proto, input, bye) in [
        ("imap", "imap", &b"a1 CAPABILITY\na2 LOGOUT\n"[..], "a2 OK"),
        (
            "imap-to-tls",
            "imap",
            &b"a1 CAPABILITY\na2 LOGOUT\n"[..],
            "a2 OK",
        ),
        ("pop3", "pop3", &b"CAPA\nQUIT\n"[..], "+OK Logging out"),
        (
            "pop3-to-tls",
            "pop3",
            &b"CAPA\nQUIT\n"[..],
            "+OK Logging out",
        ),
    ] {
        let out = s_client_tls10(setup.port(route), proto, &ca, input).await?;
        ensure!(
            s_client_tls10_ok(&out),
            "s_client through {route} did not complete a TLS 1.0 session: {out:?}"
        );
        ensure!(
            has_line(&out.stdout, "Verify return code: 0 (ok)"),
            "s_client through {route} did not verify the proxy: {out:?}"
        );
        ensure!(
            out.stdout.contains(bye),
            "no session with Dovecot through {route} (expected {bye:?}): {out:?}{}",
            setup.dovecot.daemon.log()
        );
    }
    setup.stop().await
}

// ---------------------------------------------------------------------------------------------
// HTTPS: SNI routing to a local rustls server
// ---------------------------------------------------------------------------------------------

/// A TLS 1.2+ HTTPS server (on 127.0.0.1 unless told otherwise) answering every request with
/// its own address and the SNI it saw.
struct HttpsUpstream {
    port: u16,
    addr: SocketAddr,
    /// The SNI of every completed handshake, in order.
    seen: Arc<Mutex<Vec<String>>>,
    handshakes: Arc<AtomicUsize>,
    /// Accepted TCP connections, handshake or not.
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl HttpsUpstream {
    async fn start(leaf: &Leaf) -> Result<HttpsUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind")?;
        HttpsUpstream::serve(leaf, listener)
    }

    /// Serves on `listener`.
    fn serve(leaf: &Leaf, listener: TcpListener) -> Result<HttpsUpstream> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(leaf.chain.clone(), leaf.key())
            .context("server certificate")?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let addr = listener.local_addr().context("local_addr")?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (s, h, c) = (seen.clone(), handshakes.clone(), connections.clone());
        let task = tokio::spawn(async move {
            // Connection tasks live in the set, so aborting this task ends them too.
            let mut sessions = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                while sessions.try_join_next().is_some() {}
                let (acceptor, seen, handshakes) = (acceptor.clone(), s.clone(), h.clone());
                sessions.spawn(async move {
                    let _ = serve_https(acceptor, tcp, addr, seen, handshakes).await;
                });
            }
        });
        Ok(HttpsUpstream {
            port: addr.port(),
            addr,
            seen,
            handshakes,
            connections,
            task,
        })
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting and ends every connection (bounded wait).
    async fn stop(mut self) {
        self.task.abort();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for HttpsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_https(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    server: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    handshakes: Arc<AtomicUsize>,
) -> Result<()> {
    let wait = Duration::from_secs(10);
    let mut tls = tokio::time::timeout(wait, acceptor.accept(tcp)).await??;
    let (sni, version) = {
        let conn = tls.get_ref().1;
        let sni = conn.server_name().unwrap_or("").to_string();
        (sni, format!("{:?}", conn.protocol_version()))
    };
    if let Ok(mut list) = seen.lock() {
        list.push(sni.clone());
    }
    handshakes.fetch_add(1, Ordering::SeqCst);
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        ensure!(head.len() < 64 * 1024, "request head too long");
        let n = tokio::time::timeout(wait, tls.read(&mut chunk)).await??;
        ensure!(n > 0, "EOF before the end of the request head");
        head.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let host = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("host")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    let body = format!(
        "server={}\nsni={sni}\nhost={host}\nupstream_tls={version}\n",
        server.ip()
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(response.as_bytes()).await?;
    tls.shutdown().await?;
    Ok(())
}

/// Whether the proxy, resolving `name` like any program here, reaches 127.0.0.1.
async fn resolves_to_loopback(name: &str) -> bool {
    match tokio::net::lookup_host((name, 443)).await {
        Ok(mut addrs) => addrs.any(|a| a.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_https_tls10_is_routed_by_sni() -> Result<()> {
    crate::support::init_logging();
    if !require("curl", &["--version"]) {
        return Ok(());
    }
    let pki = Pki::new()?;
    let names = ["localhost", "a.test", "x.b.test"];
    let leaf = pki.ca.leaf(&names)?;
    let upstream = HttpsUpstream::start(&leaf).await?;
    let route = Route::tcp("https", "tls", &format!("sni:{}", upstream.port)).sni_allow(&[
        "localhost",
        "a.test",
        "*.b.test",
    ]);
    let bridge = Proxy::start_with(&Settings::routes_only(&pki, vec![route]).names(&names)).await?;
    let port = bridge.addr("https").port();
    let ca = bridge.device_ca();

    // On its own, the upstream refuses a TLS 1.0 device.
    let url = format!("https://localhost:{}/", upstream.port);
    let direct = curl_tls10(&pki.ca_path, "localhost", upstream.port, &url, &[]).await?;
    ensure!(
        direct.code() == Some(35) && upstream.handshakes() == 0,
        "the HTTPS upstream should refuse TLS 1.0: {direct:?}"
    );

    // Allowed names: the proxy connects to NAME:upstream-port, so only names that resolve to
    // 127.0.0.1 here can reach the upstream. The others must at least pass the SNI check.
    for name in names {
        let before = upstream.handshakes();
        let url = format!("https://{name}:{port}/");
        let out = curl_tls10(&ca, name, port, &url, &[]).await?;
        if resolves_to_loopback(name).await {
            assert_curl_tls10_ok(&out)?;
            ensure!(
                has_line(&out.stdout, &format!("sni={name}"))
                    && has_line(&out.stdout, &format!("host={name}:{port}")),
                "the upstream saw another name than {name}: {out:?}"
            );
            ensure!(
                upstream.handshakes() == before + 1,
                "one upstream connection expected for {name}: {:?}",
                upstream.seen()
            );
        } else {
            eprintln!(
                "NOTE: {name} does not resolve to 127.0.0.1 here, so the proxy cannot reach the \
                 upstream under that name; checking only that sni_allow admits it"
            );
            ensure!(
                out.stderr.contains(CURL_TLS10) && out.code() != Some(35),
                "{name} is in sni_allow, the device handshake should succeed: {out:?}"
            );
            ensure!(
                !out.stdout.contains("sni="),
                "a response for {name} came from somewhere: {out:?}"
            );
        }
    }

    // A name outside sni_allow, and no SNI at all (curl sends none for an IP literal): the
    // handshake is refused and the upstream sees nothing.
    let before = upstream.handshakes();
    for (name, url) in [
        ("c.test", format!("https://c.test:{port}/")),
        ("y.x.b.test", format!("https://y.x.b.test:{port}/")),
        ("127.0.0.1", format!("https://127.0.0.1:{port}/")),
    ] {
        let out = curl_tls10(&ca, name, port, &url, &["--insecure"]).await?;
        ensure!(
            out.code() == Some(35),
            "{url}: a TLS handshake failure expected: {out:?}"
        );
        ensure!(
            !out.stderr.contains(CURL_TLS10),
            "{url}: the handshake should not complete: {out:?}"
        );
    }
    ensure!(
        upstream.handshakes() == before,
        "refused devices reached the upstream: {:?}",
        upstream.seen()
    );
    drop(bridge);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTPS: SNI routing to two upstreams, names from a private hosts file
// ---------------------------------------------------------------------------------------------

/// The hosts file the proxy alone sees (bind-mounted over /etc/hosts in its own mount
/// namespace): each allowed name leads to its own upstream address.
const SNI_HOSTS: &str = "127.0.0.1 localhost\n127.0.0.2 a.test\n127.0.0.3 x.b.test\n";

/// `text` as one single-quoted sh word.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Two listeners with the same port, on 127.0.0.2 and on 127.0.0.3: an `sni:PORT` route
/// connects to NAME:PORT whatever the name, so the upstreams can differ only in address.
async fn same_port_pair() -> Result<(TcpListener, TcpListener)> {
    let second_ip = Ipv4Addr::new(127, 0, 0, 3);
    let mut last = None;
    for _ in 0..5 {
        let first = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0))
            .await
            .context("bind 127.0.0.2:0")?;
        let port = first.local_addr().context("local_addr")?.port();
        match TcpListener::bind((second_ip, port)).await {
            Ok(second) => return Ok((first, second)),
            Err(err) => last = Some(err),
        }
    }
    bail!("no port was free on both 127.0.0.2 and 127.0.0.3 in 5 tries; last error: {last:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_https_tls10_reaches_the_upstream_its_sni_names() -> Result<()> {
    crate::support::init_logging();
    if !require("curl", &["--version"]) || !require("unshare", &["-m", "true"]) {
        return Ok(());
    }
    let dir = tempfile::tempdir().context("tempdir for the proxy")?;
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, SNI_HOSTS).context("write the hosts file")?;
    let mount = format!("mount --bind {} /etc/hosts", sh_quote(&path_arg(&hosts)));
    let probe = format!("{mount} && grep -q x.b.test /etc/hosts");
    if !require("unshare", &["-m", "sh", "-c", &probe]) {
        return Ok(());
    }

    let pki = Pki::new()?;
    let (first, second) = same_port_pair().await?;
    let a = HttpsUpstream::serve(&pki.ca.leaf(&["a.test"])?, first)?;
    let b = HttpsUpstream::serve(&pki.ca.leaf(&["x.b.test"])?, second)?;
    let upstream_port = a.port;

    // On its own, each upstream refuses a TLS 1.0 device.
    for (upstream, name) in [(&a, "a.test"), (&b, "x.b.test")] {
        let url = format!("https://{name}:{upstream_port}/");
        let ip = upstream.addr.ip();
        let direct = curl_tls10_at(&pki.ca_path, name, ip, upstream_port, &url, &[]).await?;
        ensure!(
            direct.code() == Some(35) && upstream.handshakes() == 0,
            "the HTTPS upstream on {ip} should refuse TLS 1.0: {direct:?}"
        );
    }

    let mut settings = Settings::new(
        &pki,
        vec![Route::tcp("https", "tls", &format!("sni:{upstream_port}"))
            .sni_allow(&["a.test", "*.b.test"])],
    );
    settings.admin = String::new();
    settings.names = strings(&["a.test", "x.b.test", "localhost"]);
    let exec = format!("{mount} && exec \"$0\" \"$@\"");
    let wrapper = strings(&["unshare", "-m", "sh", "-c", &exec]);
    let mut proxy = Process::start_via(dir.path(), &settings, &wrapper).await?;
    let port = proxy.addr("https").port();
    let ca = dir.path().join("certs/ca.crt");
    let closed_with = |sni: &str, outcome: &str| {
        let (sni, outcome) = (sni.to_string(), outcome.to_string());
        move |e: &serde_json::Value| {
            is_audit(e, "session_closed")
                && field(e, "sni") == sni
                && field(e, "outcome") == outcome
        }
    };

    // Each allowed name reaches the upstream its name resolves to, and only that one.
    for (name, upstream, other) in [("a.test", &a, &b), ("x.b.test", &b, &a)] {
        let (mine, theirs) = (upstream.connections(), other.connections());
        let url = format!("https://{name}:{port}/");
        let out = curl_tls10(&ca, name, port, &url, &[]).await?;
        assert_curl_tls10_ok(&out).with_context(|| proxy.output())?;
        let server = upstream.addr.ip();
        ensure!(
            has_line(&out.stdout, &format!("server={server}"))
                && has_line(&out.stdout, &format!("sni={name}"))
                && has_line(&out.stdout, &format!("host={name}:{port}")),
            "{name} should be answered by {server} under that name: {out:?}"
        );
        ensure!(
            upstream.connections() == mine + 1 && other.connections() == theirs,
            "{name}: one connection to {server} and none elsewhere expected; {server} saw \
             {:?}, {} saw {:?}",
            upstream.seen(),
            other.addr.ip(),
            other.seen()
        );
        let event = proxy
            .wait_event(
                &format!("session_closed ok for {name}"),
                Duration::from_secs(10),
                closed_with(name, "ok"),
            )
            .await?;
        ensure!(
            field(&event, "device_tls") == "TLSv1"
                && matches!(field(&event, "upstream_tls"), "TLSv1.2" | "TLSv1.3"),
            "{name}: TLS 1.0 in, TLS 1.2+ out expected: {event}"
        );
    }
    ensure!(
        a.seen() == ["a.test"] && b.seen() == ["x.b.test"],
        "upstream handshakes: 127.0.0.2 saw {:?}, 127.0.0.3 saw {:?}",
        a.seen(),
        b.seen()
    );

    // A name outside sni_allow, and no SNI at all (an IP literal): refused with the handshake,
    // and neither upstream sees a connection.
    let before = (a.connections(), b.connections());
    for (sni, host) in [("c.test", "c.test"), ("", "127.0.0.1")] {
        let url = format!("https://{host}:{port}/");
        let out = curl_tls10(&ca, host, port, &url, &["--insecure"]).await?;
        ensure!(
            out.code() == Some(35) && !out.stderr.contains(CURL_TLS10),
            "{url}: a TLS handshake failure expected: {out:?}"
        );
        proxy
            .wait_event(
                &format!("session_closed sni_refused for SNI {sni:?}"),
                Duration::from_secs(10),
                closed_with(sni, "sni_refused"),
            )
            .await?;
    }
    ensure!(
        (a.connections(), b.connections()) == before,
        "refused devices reached an upstream: 127.0.0.2 saw {:?}, 127.0.0.3 saw {:?}",
        a.seen(),
        b.seen()
    );

    proxy.signal("TERM")?;
    let status = proxy.wait_exit(Duration::from_secs(40)).await?;
    ensure!(
        status.success(),
        "tlsbridge ended with {status} after SIGTERM\n{}",
        proxy.output()
    );
    let mut sessions: Vec<(String, String)> = proxy
        .events()
        .iter()
        .filter(|e| is_audit(e, "session_closed"))
        .map(|e| (field(e, "sni").to_string(), field(e, "outcome").to_string()))
        .collect();
    sessions.sort();
    let expected = [
        ("", "sni_refused"),
        ("a.test", "ok"),
        ("c.test", "sni_refused"),
        ("x.b.test", "ok"),
    ];
    ensure!(
        sessions
            .iter()
            .map(|(s, o)| (s.as_str(), o.as_str()))
            .eq(expected),
        "session_closed events (sni, outcome): {sessions:?}, expected {expected:?}"
    );
    a.stop().await;
    b.stop().await;
    Ok(())
}
