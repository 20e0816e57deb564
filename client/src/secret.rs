//! The type cleartext values are returned in.

use secrecy::ExposeSecret;
use std::fmt;
use zeroize::Zeroizing;

/// A cleartext value from the agent: wiped from memory on drop, redacted in `Debug`, no
/// `Display`. Read it with [`ExposeSecret::expose_secret`] (or [`Secret::expose`]) at the point of
/// use, and avoid copying it into plain `String`s.
///
/// ```
/// use nodeseal_client::Secret;
/// use secrecy::ExposeSecret;
/// let s = Secret::from(String::from("hunter2"));
/// assert_eq!(s.expose_secret(), "hunter2");
/// assert_eq!(format!("{s:?}"), "Secret([REDACTED])");
/// ```
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// The cleartext. Same as [`ExposeSecret::expose_secret`], without the trait import.
    ///
    /// ```
    /// let s = nodeseal_client::Secret::from(String::from("v"));
    /// assert_eq!(s.expose(), "v");
    /// ```
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// Unwrap into the zeroizing string, e.g. to hand it on without a copy.
    ///
    /// ```
    /// let s = nodeseal_client::Secret::from(String::from("v"));
    /// let z: zeroize::Zeroizing<String> = s.into_zeroizing();
    /// assert_eq!(z.as_str(), "v");
    /// ```
    pub fn into_zeroizing(self) -> Zeroizing<String> {
        self.0
    }
}

impl ExposeSecret<str> for Secret {
    fn expose_secret(&self) -> &str {
        self.0.as_str()
    }
}

impl From<Zeroizing<String>> for Secret {
    fn from(value: Zeroizing<String>) -> Self {
        Self(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(Zeroizing::new(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::from(String::from("hunter2"));
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{:?}", vec![("A".to_string(), s)]).contains("hunter2"));
    }
}
