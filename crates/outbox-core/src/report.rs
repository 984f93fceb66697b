//! How our error types show themselves through `Debug`.

use std::fmt;

/// Writes `error`'s message and then each of its causes, as `anyhow` does. Our public
/// error types use it for `Debug`, because that is what a `main` returning
/// `Result<(), Box<dyn Error>>` prints: the message and its fix, not a struct dump.
pub fn write_error_chain(
    error: &(dyn std::error::Error + 'static),
    f: &mut fmt::Formatter<'_>,
) -> fmt::Result {
    write!(f, "{error}")?;
    let mut source = error.source();
    if source.is_some() {
        write!(f, "\n\nCaused by:")?;
    }
    while let Some(cause) = source {
        write!(f, "\n    {cause}")?;
        source = cause.source();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer; do this")]
    struct Outer(#[source] std::io::Error);

    struct Shown<'a>(&'a (dyn std::error::Error + 'static));

    impl fmt::Debug for Shown<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write_error_chain(self.0, f)
        }
    }

    #[test]
    fn message_then_each_cause() {
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(
            format!("{:?}", Shown(&err)),
            "outer; do this\n\nCaused by:\n    inner"
        );
        let alone = std::io::Error::other("alone");
        assert_eq!(format!("{:?}", Shown(&alone)), "alone");
    }
}
