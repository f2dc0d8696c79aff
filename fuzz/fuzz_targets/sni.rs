//! SNI as the legacy acceptor sees it: host-name validation, then `sni_allow` matching, on an
//! arbitrary pattern and name. Never a panic; a name that passes validation holds only letters,
//! digits, hyphens and dots; a name never matches a pattern it does not end with (case aside).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsbridge::text::is_host_name;
use tlsbridge::tls::legacy::name_matches;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (pattern, name) = text.split_once('\n').unwrap_or((&text, ""));
    if is_host_name(name) {
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
            "{name:?}"
        );
    }
    if name_matches(pattern, name) {
        let suffix = pattern.trim_start_matches('*').to_ascii_lowercase();
        assert!(
            name.to_ascii_lowercase().ends_with(&suffix),
            "{pattern:?} {name:?}"
        );
    }
});
