//! The device credentials table (`oauth.users_file`): device user -> argon2 password hash (a
//! PHC string) and the mailbox it logs in as upstream. A readable TOML file:
//!
//! ```toml
//! [users.scanner1]
//! hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! mailbox = "scanner@contoso.com"
//! ```
//!
//! Written whole (atomically, mode 0600) by `tlsbridge passwd`. Checking a password costs the
//! same whether or not the user exists, so the answer does not tell which users do.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::Result;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::config::{valid_mailbox, ConfigError};
use crate::secret::Secret;

/// The users file holds password hashes: readable by the owner only.
pub const FILE_MODE: u32 = 0o600;

/// Longest device user name stored.
pub const MAX_USER: usize = crate::protocol::sasl::MAX_USER;

/// Password checks running at once. Each argon2 check holds a core and about 19 MiB for tens
/// of milliseconds; a burst of logins waits its turn instead of exhausting memory.
pub const MAX_CONCURRENT_VERIFICATIONS: usize = 4;

/// Random bytes of each hash's salt.
const SALT_LEN: usize = 16;

const HEADER: &str = "# tlsbridge device users: device user -> argon2 password hash and the \
mailbox it uses upstream.\n# Written by `tlsbridge passwd USER --mailbox ADDRESS`; keep it mode \
0600.\n\n";

/// One device user's entry. Debug leaves the hash out: it can be attacked offline.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    hash: String,
    pub mailbox: String,
}

impl fmt::Debug for UserEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserEntry")
            .field("hash", &crate::secret::MASK)
            .field("mailbox", &self.mailbox)
            .finish()
    }
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: BTreeMap<String, UserEntry>,
}

/// The table, as loaded and validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    users: BTreeMap<String, UserEntry>,
}

/// A loaded table and, when the file is readable or writable by group or others, its mode
/// (for a warning at start: the hashes can be attacked offline).
#[derive(Debug)]
pub struct Loaded {
    pub credentials: Credentials,
    pub loose_mode: Option<u32>,
}

impl Credentials {
    /// Loads and validates `path`; a missing file is an error.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigError(format!(
                "oauth.users_file: cannot read {}: {err}",
                path.display()
            ))
        })?;
        let credentials = Credentials::parse(&path.display().to_string(), &text)?;
        Ok(Loaded {
            credentials,
            loose_mode: loose_mode(path),
        })
    }

    /// Like [`Credentials::load`], but a missing file is an empty table (the first `passwd`).
    pub fn load_or_empty(path: &Path) -> Result<Loaded, ConfigError> {
        match std::fs::symlink_metadata(path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Loaded {
                credentials: Credentials::default(),
                loose_mode: None,
            }),
            _ => Credentials::load(path),
        }
    }

    /// Parses the TOML text; errors name `origin` and the user, never a hash.
    pub fn parse(origin: &str, text: &str) -> Result<Credentials, ConfigError> {
        let file: UsersFile = toml::from_str(text).map_err(|err| {
            // toml's message quotes the offending line, which may hold a hash: keep only
            // where it is and what was expected.
            let at = err
                .span()
                .map(|span| format!(" at byte {}", span.start))
                .unwrap_or_default();
            ConfigError(format!(
                "{origin}: not a valid users file{at}: {}",
                err.message()
            ))
        })?;
        for (user, entry) in &file.users {
            let bad = |reason: &str| {
                ConfigError(format!(
                    "{origin}: users.{:?}: {reason}",
                    crate::text::printable(user)
                ))
            };
            if !valid_user(user) {
                return Err(bad("not a usable user name"));
            }
            if !valid_mailbox(&entry.mailbox) {
                return Err(bad("mailbox is not an address"));
            }
            let hash = PasswordHash::new(&entry.hash)
                .map_err(|_| bad("hash is not a PHC string (write it with tlsbridge passwd)"))?;
            if !hash.algorithm.as_str().starts_with("argon2") {
                return Err(bad("hash is not argon2"));
            }
            argon2::Params::try_from(&hash)
                .map_err(|_| bad("hash has unusable argon2 parameters"))?;
        }
        Ok(Credentials { users: file.users })
    }

    /// The file's text: a header comment and one table per user.
    pub fn to_toml(&self) -> Result<String> {
        let file = UsersFile {
            users: self.users.clone(),
        };
        Ok(format!("{HEADER}{}", toml::to_string(&file)?))
    }

    /// Writes the table to `path` atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic(path, self.to_toml()?.as_bytes(), FILE_MODE)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The device users, sorted.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// The mailbox `user` maps to.
    pub fn mailbox(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(|entry| entry.mailbox.as_str())
    }

    /// The mailbox, when `password` is `user`'s. Costs one argon2 check whether or not the
    /// user exists. CPU-heavy: from async code use [`Verifier::verify`].
    pub fn verify(&self, user: &str, password: &Secret) -> Option<String> {
        let argon2 = Argon2::default();
        let Some(entry) = self.users.get(user) else {
            if let Ok(dummy) = PasswordHash::new(dummy_hash()) {
                let _ = argon2.verify_password(password.expose().as_bytes(), &dummy);
            }
            return None;
        };
        let hash = PasswordHash::new(&entry.hash).ok()?;
        argon2
            .verify_password(password.expose().as_bytes(), &hash)
            .ok()
            .map(|()| entry.mailbox.clone())
    }

    /// Adds `user` or changes its password, and its mailbox when given. A new user needs one.
    pub fn set(
        &mut self,
        user: &str,
        password: &Secret,
        mailbox: Option<&str>,
    ) -> Result<(), ConfigError> {
        if !valid_user(user) {
            return Err(ConfigError(format!(
                "{:?} is not a usable user name (1 to {MAX_USER} printable characters)",
                crate::text::printable(user)
            )));
        }
        if password.is_empty() {
            return Err(ConfigError("the password is empty".into()));
        }
        let mailbox = match (mailbox, self.users.get(user)) {
            (Some(mailbox), _) => mailbox.to_string(),
            (None, Some(entry)) => entry.mailbox.clone(),
            (None, None) => {
                return Err(ConfigError(format!(
                    "{user:?} is a new user: give its mailbox with --mailbox"
                )))
            }
        };
        if !valid_mailbox(&mailbox) {
            return Err(ConfigError(format!(
                "{:?} is not a mailbox address",
                crate::text::printable(&mailbox)
            )));
        }
        let hash = hash_password(password).map_err(|err| ConfigError(err.to_string()))?;
        self.users
            .insert(user.to_string(), UserEntry { hash, mailbox });
        Ok(())
    }

    /// Removes `user`; false when it was not there.
    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }
}

/// An argon2id PHC string for `password` with the crate's default (OWASP) parameters and a
/// random salt.
pub fn hash_password(password: &Secret) -> Result<String> {
    let mut salt = [0u8; SALT_LEN];
    openssl::rand::rand_bytes(&mut salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(|err| anyhow::anyhow!("salt: {err}"))?;
    let hash = Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map_err(|err| anyhow::anyhow!("cannot hash the password: {err}"))?;
    Ok(hash.to_string())
}

/// A hash of a random password with the default parameters: unknown users are checked against
/// it so that they cost what a known user costs.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut random = [0u8; 16];
        let _ = openssl::rand::rand_bytes(&mut random);
        let password = Secret::new(
            random
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        );
        hash_password(&password).unwrap_or_default()
    })
}

/// A user name as a device sends it and a log line shows it: printable, no spaces at the ends.
fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= MAX_USER
        && user.trim() == user
        && !user.chars().any(char::is_control)
}

/// The file's mode when group or others may access it.
fn loose_mode(path: &Path) -> Option<u32> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// The table shared by all sessions, with a bound on password checks running at once. The
/// table can be swapped on reload; checks in flight finish against the one they started with.
#[derive(Debug)]
pub struct Verifier {
    table: RwLock<Arc<Credentials>>,
    permits: Arc<Semaphore>,
}

impl Verifier {
    pub fn new(credentials: Credentials) -> Verifier {
        Verifier {
            table: RwLock::new(Arc::new(credentials)),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_VERIFICATIONS)),
        }
    }

    /// Replaces the table (after a reload).
    pub fn replace(&self, credentials: Credentials) {
        let new = Arc::new(credentials);
        match self.table.write() {
            Ok(mut table) => *table = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    pub fn credentials(&self) -> Arc<Credentials> {
        match self.table.read() {
            Ok(table) => table.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The mailbox when `password` is `user`'s; the check runs on a blocking thread.
    pub async fn verify(&self, user: &str, password: Secret) -> Option<String> {
        let _permit = self.permits.acquire().await.ok()?;
        let table = self.credentials();
        let user = user.to_string();
        tokio::task::spawn_blocking(move || table.verify(&user, &password))
            .await
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn table(users: &[(&str, &str, &str)]) -> Credentials {
        let mut table = Credentials::default();
        for (user, password, mailbox) in users {
            table
                .set(user, &Secret::new(*password), Some(mailbox))
                .unwrap();
        }
        table
    }

    #[test]
    fn set_save_load_verify_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets/users");
        let creds = table(&[("scanner1", "pa55word", "scanner@contoso.com")]);
        creds.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("[users.scanner1]"), "{text}");
        assert!(text.contains("$argon2id$"), "{text}");
        assert!(!text.contains("pa55word"));

        let loaded = Credentials::load(&path).unwrap();
        assert_eq!(loaded.loose_mode, None);
        assert_eq!(loaded.credentials, creds);
        let creds = loaded.credentials;
        assert_eq!(
            creds
                .verify("scanner1", &Secret::new("pa55word"))
                .as_deref(),
            Some("scanner@contoso.com")
        );
        assert_eq!(creds.verify("scanner1", &Secret::new("wrong")), None);
        assert_eq!(creds.verify("nobody", &Secret::new("pa55word")), None);
        assert!(!format!("{creds:?}").contains("argon2"), "{creds:?}");
    }

    #[test]
    fn change_keeps_the_mailbox_and_delete_removes() {
        let mut creds = table(&[("printer", "one", "printer@contoso.com")]);
        creds.set("printer", &Secret::new("two"), None).unwrap();
        assert_eq!(creds.mailbox("printer"), Some("printer@contoso.com"));
        assert!(creds.verify("printer", &Secret::new("two")).is_some());
        assert!(creds.verify("printer", &Secret::new("one")).is_none());
        assert!(creds.set("new", &Secret::new("x"), None).is_err());
        assert!(creds
            .set("bad\nname", &Secret::new("x"), Some("a@b"))
            .is_err());
        assert!(creds.set("u", &Secret::new("x"), Some("nomail")).is_err());
        assert!(creds.remove("printer"));
        assert!(!creds.remove("printer"));
        assert!(creds.is_empty());
    }

    #[test]
    fn a_loose_mode_is_reported_and_a_missing_file_is_empty_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        assert!(Credentials::load(&path).is_err());
        assert!(Credentials::load_or_empty(&path)
            .unwrap()
            .credentials
            .is_empty());
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(Credentials::load(&path).unwrap().loose_mode, Some(0o644));
    }

    #[test]
    fn bad_files_name_the_user_but_never_quote_a_hash() {
        let hash = hash_password(&Secret::new("pw")).unwrap();
        for (text, needle) in [
            (
                format!("[users.a]\nhash = \"{hash}\"\nmailbox = \"nomail\"\n"),
                "users.\"a\"",
            ),
            (
                "[users.a]\nhash = \"plain-text\"\nmailbox = \"a@b\"\n".to_string(),
                "PHC",
            ),
            (
                format!("[users.a]\nhash = \"{hash}\"\nmailbox = \"a@b\"\nextra = 1\n"),
                "not a valid users file",
            ),
            (
                format!("[users.a]\nhash = \"{hash}"),
                "not a valid users file",
            ),
        ] {
            let err = Credentials::parse("users", &text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
            assert!(!err.contains(&hash), "{err}");
            assert!(!err.contains("plain-text"), "{err}");
        }
    }

    #[test]
    fn an_unknown_user_costs_what_a_known_one_costs() {
        let creds = table(&[("scanner1", "pa55word", "scanner@contoso.com")]);
        let _ = dummy_hash();
        let time = |user: &str| {
            let start = Instant::now();
            for _ in 0..3 {
                assert!(creds.verify(user, &Secret::new("wrong")).is_none());
            }
            start.elapsed()
        };
        let (known, unknown) = (time("scanner1"), time("nobody"));
        // The same argon2 work either way; a lookup-only path would be ~1000x faster. The
        // bound is loose because other work shares the CPU.
        assert!(
            unknown * 10 > known,
            "known {known:?} vs unknown {unknown:?}"
        );
    }

    #[tokio::test]
    async fn the_async_verifier_checks_on_blocking_threads() {
        let verifier = Arc::new(Verifier::new(table(&[(
            "scanner1",
            "pa55word",
            "scanner@contoso.com",
        )])));
        let checks = (0..6).map(|i| {
            let verifier = verifier.clone();
            tokio::spawn(async move {
                let password = if i % 2 == 0 { "pa55word" } else { "nope" };
                verifier.verify("scanner1", Secret::new(password)).await
            })
        });
        let mut accepted = 0;
        for check in checks {
            accepted += usize::from(check.await.unwrap().is_some());
        }
        assert_eq!(accepted, 3);
        verifier.replace(Credentials::default());
        assert!(verifier
            .verify("scanner1", Secret::new("pa55word"))
            .await
            .is_none());
    }
}
