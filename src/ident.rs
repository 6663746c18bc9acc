//! SQL identifiers that come from configuration (schema name, NOTIFY
//! channel): validated as plain identifiers and always double-quoted when
//! spliced into SQL. Values never reach SQL any other way; everything else
//! is a bind parameter.

use crate::error::{Error, Result};
use std::fmt;

/// A validated plain SQL identifier: 1–63 ASCII letters, digits or `_`,
/// not starting with a digit. Rendered double-quoted by [`Ident::quoted`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ident(String);

impl Ident {
    /// Validates `name`; `what` names the option in the error message
    /// (e.g. `"schema"`, `"NOTIFY channel"`).
    pub fn new(what: &str, name: &str) -> Result<Ident> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if ok {
            Ok(Ident(name.to_owned()))
        } else {
            Err(Error::config(format!(
                "invalid {what} name {name:?}: use a plain identifier of 1 to 63 ASCII letters, digits \
                 and underscores that does not start with a digit (e.g. \"projectionist\")"
            )))
        }
    }

    /// The identifier as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier double-quoted for SQL (validation guarantees it holds
    /// no quote characters).
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::Ident;

    #[test]
    fn accepts_plain_identifiers() {
        for ok in ["public", "events_2", "_x", "Projectionist"] {
            assert!(Ident::new("schema", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        let long = "a".repeat(64);
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "x\"; DROP TABLE events; --",
            "ünï",
            long.as_str(),
        ] {
            let e = Ident::new("schema", bad).unwrap_err();
            assert!(e.is_config());
            assert!(e.to_string().contains("plain identifier"));
        }
    }
}
