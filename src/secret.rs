//! A value that must never reach a log line, an error, `check` output or the admin endpoint: a
//! client secret, an access token, a device password. Debug and Display print a mask, so a
//! `{:?}` of any struct holding one stays safe; the value itself is only reachable through
//! [`Secret::expose`], which makes every use easy to find. The memory is wiped on drop.

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

/// What Debug and Display print instead of the value.
pub const MASK: &str = "***";

/// A secret string; cheap to clone (shared), wiped when the last clone is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<Zeroizing<String>>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(Arc::new(Zeroizing::new(value.into())))
    }

    /// The value itself: only for the wire (a form field, an AUTH line) or a hash check.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret::new(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({MASK})")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_mask_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), MASK);
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{:?}", Some(&secret)).contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2");
    }
}
