use std::fmt;

/// A schema-qualified table name. Always rendered quoted, so any legal name works and no
/// name can inject SQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableRef {
    /// The schema, unquoted (such as `public`).
    pub schema: String,
    /// The table name within the schema, unquoted (such as `outbox`).
    pub name: String,
}

/// A schema or table name PostgreSQL would not accept as an identifier, from
/// [`TableRef::new`].
#[derive(thiserror::Error, PartialEq)]
pub enum TableRefError {
    /// The name is the empty string: configure a real schema or table name.
    #[error("the {what} name is empty; set it to a table or schema name such as \"outbox\"")]
    Empty {
        /// Which name it is: `"schema"` or `"table"`.
        what: &'static str,
    },
    /// The name is over 63 bytes, the most PostgreSQL keeps of an identifier: choose a
    /// shorter one.
    #[error(
        "the {what} name {name:?} is longer than PostgreSQL's 63-byte limit; choose a shorter name"
    )]
    TooLong {
        /// Which name it is: `"schema"` or `"table"`.
        what: &'static str,
        /// The name as given.
        name: String,
    },
    /// The name contains a NUL character, which no PostgreSQL identifier can hold.
    #[error("the {what} name {name:?} contains a NUL character; choose another name")]
    Nul {
        /// Which name it is: `"schema"` or `"table"`.
        what: &'static str,
        /// The name as given.
        name: String,
    },
}

impl TableRef {
    /// The table `name` in `schema`, both taken as they are (unquoted, case kept).
    ///
    /// # Errors
    /// [`TableRefError`] when either name is empty, longer than 63 bytes or contains a
    /// NUL character.
    ///
    /// # Example
    /// ```rust
    /// use outbox_core::TableRef;
    ///
    /// let table = TableRef::new("billing", "outbox")?;
    /// assert_eq!(table.qualified(), r#""billing"."outbox""#);
    /// assert!(TableRef::new("billing", "").is_err());
    /// # Ok::<(), outbox_core::TableRefError>(())
    /// ```
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Result<Self, TableRefError> {
        let table = TableRef {
            schema: schema.into(),
            name: name.into(),
        };
        check_ident("schema", &table.schema)?;
        check_ident("table", &table.name)?;
        Ok(table)
    }

    /// `"schema"."name"`, ready to paste into SQL.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// A quoted identifier derived from the table name, for its indexes, triggers and
    /// functions, so two outbox tables in one schema never collide.
    pub fn derived(&self, suffix: &str) -> String {
        quote_ident(&self.derived_name(suffix))
    }

    /// The unquoted form of [`TableRef::derived`], truncated to PostgreSQL's limit.
    pub fn derived_name(&self, suffix: &str) -> String {
        let mut name = format!("{}_{}", self.name, suffix);
        while name.len() > 63 {
            name.pop();
        }
        name
    }

    /// `"schema"."derived"` for objects that live in the table's schema.
    pub fn derived_qualified(&self, suffix: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), self.derived(suffix))
    }

    /// The LISTEN/NOTIFY channel on which inserts into this table are announced.
    pub fn notify_channel(&self) -> String {
        let mut name = format!("outbox:{}.{}", self.schema, self.name);
        while name.len() > 63 {
            name.pop();
        }
        name
    }
}

impl Default for TableRef {
    fn default() -> Self {
        TableRef {
            schema: "public".into(),
            name: "outbox".into(),
        }
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

fn check_ident(what: &'static str, name: &str) -> Result<(), TableRefError> {
    if name.is_empty() {
        return Err(TableRefError::Empty { what });
    }
    if name.len() > 63 {
        return Err(TableRefError::TooLong {
            what,
            name: name.into(),
        });
    }
    if name.contains('\0') {
        return Err(TableRefError::Nul {
            what,
            name: name.into(),
        });
    }
    Ok(())
}

/// Quotes a PostgreSQL identifier: `a"b` becomes `"a""b"`.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The message and its causes, for `main() -> Result<(), Box<dyn Error>>`.
impl std::fmt::Debug for TableRefError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::write_error_chain(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_names_so_they_cannot_inject_sql() {
        let table = TableRef::new("my schema", "out\"box").unwrap();
        assert_eq!(table.qualified(), r#""my schema"."out""box""#);
    }

    #[test]
    fn rejects_empty_and_overlong_names() {
        assert_eq!(
            TableRef::new("", "outbox").unwrap_err(),
            TableRefError::Empty { what: "schema" }
        );
        let long = "x".repeat(64);
        assert!(matches!(
            TableRef::new("public", long).unwrap_err(),
            TableRefError::TooLong { what: "table", .. }
        ));
    }

    #[test]
    fn derived_names_fit_the_identifier_limit() {
        let table = TableRef::new("public", "x".repeat(63)).unwrap();
        assert_eq!(table.derived_name("pending_idx").len(), 63);
        assert!(table.notify_channel().len() <= 63);
    }
}
