//! `tlsbridge passwd USER --mailbox ADDRESS [--users-file FILE] [--delete]`: adds a device user
//! to the credentials table, changes its password (and mailbox), or removes it. The password
//! comes from a no-echo prompt (asked twice) when stdin is a terminal, else from one line of
//! stdin; never from the command line, where `ps` and shell history would keep it.

use std::io::{BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::{Config, ConfigError};
use crate::credentials::Credentials;
use crate::protocol::sasl::MAX_PASSWORD;
use crate::secret::Secret;

/// The command's arguments, as the CLI parses them.
#[derive(Debug, Clone, Default)]
pub struct PasswdArgs {
    pub user: String,
    /// Required for a new user; for an existing one, changes its mailbox.
    pub mailbox: Option<String>,
    /// Default: `oauth.users_file`.
    pub users_file: Option<PathBuf>,
    pub delete: bool,
}

/// Where the password comes from.
pub trait PasswordInput {
    /// True when a person types at a prompt: the password is then asked twice.
    fn interactive(&self) -> bool;
    /// One password without its line ending; `None` at the end of the input.
    fn read(&mut self, prompt: &str) -> std::io::Result<Option<Secret>>;
}

/// The terminal: a no-echo prompt.
pub struct Terminal;

impl PasswordInput for Terminal {
    fn interactive(&self) -> bool {
        true
    }

    fn read(&mut self, prompt: &str) -> std::io::Result<Option<Secret>> {
        rpassword::prompt_password(prompt).map(|line| Some(Secret::new(line)))
    }
}

/// Lines of a reader (stdin in a pipe, or a test's bytes): the first line is the password.
pub struct Lines<R>(pub R);

impl<R: BufRead> PasswordInput for Lines<R> {
    fn interactive(&self) -> bool {
        false
    }

    fn read(&mut self, _prompt: &str) -> std::io::Result<Option<Secret>> {
        let mut line = zeroize::Zeroizing::new(String::new());
        // Bounded: one byte past the limit (plus CRLF) is enough to tell it is too long.
        let n = (&mut self.0)
            .take(MAX_PASSWORD as u64 + 3)
            .read_line(&mut line)?;
        if n == 0 {
            return Ok(None);
        }
        let password = line
            .strip_suffix('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .unwrap_or(&line);
        Ok(Some(Secret::new(password)))
    }
}

/// The input the process has: a prompt when stdin is a terminal, else stdin's first line.
pub fn stdin_input() -> Box<dyn PasswordInput> {
    if std::io::stdin().is_terminal() {
        Box::new(Terminal)
    } else {
        Box::new(Lines(std::io::stdin().lock()))
    }
}

/// Runs the command; returns what to print. Mistakes of usage are [`ConfigError`]s (exit 2).
pub fn passwd(config: &Config, args: &PasswdArgs, input: &mut dyn PasswordInput) -> Result<String> {
    let path = args
        .users_file
        .clone()
        .unwrap_or_else(|| config.oauth.users_file.clone());
    let loaded = Credentials::load_or_empty(&path)?;
    let mut table = loaded.credentials;
    let mut out = String::new();
    if let Some(mode) = loaded.loose_mode {
        out.push_str(&format!(
            "warning: {} was mode {mode:04o}; it is written back as 0600\n",
            path.display()
        ));
    }
    if args.delete {
        if args.mailbox.is_some() {
            return Err(ConfigError("--delete takes no --mailbox".into()).into());
        }
        if !table.remove(&args.user) {
            return Err(ConfigError(format!(
                "no user {:?} in {}",
                crate::text::printable(&args.user),
                path.display()
            ))
            .into());
        }
        save(&table, &path)?;
        out.push_str(&format!(
            "deleted {} from {}",
            crate::text::printable(&args.user),
            path.display()
        ));
        return Ok(out);
    }
    let existed = table.mailbox(&args.user).is_some();
    if !existed && args.mailbox.is_none() {
        return Err(ConfigError(format!(
            "{:?} is a new user: give its mailbox with --mailbox ADDRESS",
            crate::text::printable(&args.user)
        ))
        .into());
    }
    let password = read_password(input, &args.user)?;
    table.set(&args.user, &password, args.mailbox.as_deref())?;
    save(&table, &path)?;
    let mailbox = table.mailbox(&args.user).unwrap_or_default();
    out.push_str(&format!(
        "{} {} (mailbox {mailbox}) in {}",
        if existed { "changed" } else { "added" },
        crate::text::printable(&args.user),
        path.display()
    ));
    Ok(out)
}

fn read_password(input: &mut dyn PasswordInput, user: &str) -> Result<Secret> {
    let prompt = format!("password for {}: ", crate::text::printable(user));
    let password = input
        .read(&prompt)
        .context("cannot read the password")?
        .ok_or_else(|| ConfigError("no password given on stdin".into()))?;
    if password.is_empty() {
        return Err(ConfigError("the password is empty".into()).into());
    }
    if password.expose().len() > MAX_PASSWORD {
        return Err(
            ConfigError(format!("the password is longer than {MAX_PASSWORD} bytes")).into(),
        );
    }
    if input.interactive() {
        let again = input
            .read("again: ")
            .context("cannot read the password")?
            .unwrap_or_else(|| Secret::new(""));
        if again != password {
            return Err(ConfigError("the passwords do not match".into()).into());
        }
    }
    Ok(password)
}

fn save(table: &Credentials, path: &Path) -> Result<()> {
    table
        .save(path)
        .with_context(|| format!("oauth.users_file: cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::os::unix::fs::PermissionsExt;

    /// A person at a prompt typing the given answers.
    struct Typed(VecDeque<&'static str>);

    impl PasswordInput for Typed {
        fn interactive(&self) -> bool {
            true
        }

        fn read(&mut self, _prompt: &str) -> std::io::Result<Option<Secret>> {
            Ok(self.0.pop_front().map(Secret::new))
        }
    }

    fn setup() -> (tempfile::TempDir, Config, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::load_from(None, Vec::new()).unwrap();
        let path = dir.path().join("secrets/users");
        config.oauth.users_file = path.clone();
        (dir, config, path)
    }

    fn args(user: &str, mailbox: Option<&str>) -> PasswdArgs {
        PasswdArgs {
            user: user.into(),
            mailbox: mailbox.map(Into::into),
            ..Default::default()
        }
    }

    fn verify(path: &Path, user: &str, password: &str) -> Option<String> {
        Credentials::load(path)
            .unwrap()
            .credentials
            .verify(user, &Secret::new(password))
    }

    #[test]
    fn adds_from_stdin_changes_at_a_prompt_and_deletes() {
        let (_dir, config, path) = setup();
        let add = args("scanner1", Some("scanner@contoso.com"));
        let out = passwd(&config, &add, &mut Lines(&b"first pw\r\nignored\n"[..])).unwrap();
        assert!(
            out.starts_with("added scanner1 (mailbox scanner@contoso.com)"),
            "{out}"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            verify(&path, "scanner1", "first pw").as_deref(),
            Some("scanner@contoso.com")
        );

        let change = args("scanner1", None);
        let out = passwd(&config, &change, &mut Typed(["second", "second"].into())).unwrap();
        assert!(
            out.starts_with("changed scanner1 (mailbox scanner@contoso.com)"),
            "{out}"
        );
        assert!(verify(&path, "scanner1", "second").is_some());
        assert!(verify(&path, "scanner1", "first pw").is_none());

        let delete = PasswdArgs {
            delete: true,
            ..args("scanner1", None)
        };
        let out = passwd(&config, &delete, &mut Typed(VecDeque::new())).unwrap();
        assert!(out.starts_with("deleted scanner1"), "{out}");
        assert!(Credentials::load(&path).unwrap().credentials.is_empty());
        assert!(passwd(&config, &delete, &mut Typed(VecDeque::new())).is_err());
    }

    #[test]
    fn refuses_mismatches_empty_input_and_new_users_without_a_mailbox() {
        let (_dir, config, path) = setup();
        let add = args("printer", Some("printer@contoso.com"));
        let cases: [(&PasswdArgs, Box<dyn PasswordInput>, &str); 5] = [
            (&add, Box::new(Typed(["one", "two"].into())), "do not match"),
            (&add, Box::new(Lines(&b""[..])), "no password"),
            (&add, Box::new(Lines(&b"\n"[..])), "empty"),
            (
                &args("printer", None),
                Box::new(Lines(&b"pw\n"[..])),
                "--mailbox",
            ),
            (
                &args("printer", Some("not-an-address")),
                Box::new(Lines(&b"pw\n"[..])),
                "not a mailbox",
            ),
        ];
        for (args, mut input, needle) in cases {
            let err = passwd(&config, args, input.as_mut()).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{err:#}");
            assert_eq!(crate::cli::exit_code(&err), crate::cli::EXIT_USAGE);
        }
        assert!(!path.exists(), "nothing is written on error");
        let long = format!("{}\n", "p".repeat(MAX_PASSWORD + 1));
        let err = passwd(&config, &add, &mut Lines(long.as_bytes())).unwrap_err();
        assert!(err.to_string().contains("longer"), "{err}");
    }

    #[test]
    fn the_users_file_argument_wins_and_a_loose_mode_is_reported_and_fixed() {
        let (dir, config, default_path) = setup();
        let path = dir.path().join("other-users");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let add = PasswdArgs {
            users_file: Some(path.clone()),
            ..args("scanner2", Some("scan2@contoso.com"))
        };
        let out = passwd(&config, &add, &mut Lines(&b"pw\n"[..])).unwrap();
        assert!(out.contains("mode 0644"), "{out}");
        assert!(!out.contains("pw\n"), "{out}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!default_path.exists());
    }
}
