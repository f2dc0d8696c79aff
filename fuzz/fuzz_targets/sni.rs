//! SNI matching against `sni_allow` patterns: arbitrary pattern and name, never a panic; a name
//! never matches a pattern it does not end with (case aside).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (pattern, name) = text.split_once('\n').unwrap_or((&text, ""));
    if tlsbridge::tls::legacy::name_matches(pattern, name) {
        let suffix = pattern.trim_start_matches('*').to_ascii_lowercase();
        assert!(name.to_ascii_lowercase().ends_with(&suffix), "{pattern:?} {name:?}");
    }
});
