//! A decoder for the pgoutput plugin's messages (protocol version 1), as far as the
//! outbox needs them: relations, and inserts, updates and deletes on the outbox table.
//! Begin and Commit are decoded by the replication client itself.
//!
//! Layout: PostgreSQL documentation, "Logical Replication Message Formats".

use std::collections::HashMap;

/// A column value in pgoutput's text format.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch (updates only).
    Unchanged,
    Text(Vec<u8>),
}

/// A table as pgoutput described it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
    /// Type OIDs, one per column.
    pub types: Vec<u32>,
}

impl Relation {
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// OID of `bytea`, whose text form is hex (`\x0a0b`).
pub const BYTEA_OID: u32 = 17;

/// A row change of one relation.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Insert {
        relation: u32,
        values: Vec<Value>,
    },
    /// The new row of an update.
    Update {
        relation: u32,
        values: Vec<Value>,
    },
    Delete {
        relation: u32,
    },
    Truncate,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

/// Decodes pgoutput messages, remembering the relations they refer to.
#[derive(Debug, Default)]
pub struct Decoder {
    relations: HashMap<u32, Relation>,
}

impl Decoder {
    pub fn relation(&self, id: u32) -> Option<&Relation> {
        self.relations.get(&id)
    }

    /// Decodes one message. Relation messages update the decoder and yield `None`, as do
    /// messages the outbox has no use for (types, origins).
    pub fn decode(&mut self, message: &[u8]) -> Result<Option<Change>, DecodeError> {
        let mut r = Reader::new(message);
        match r.u8()? {
            b'R' => {
                let id = r.u32()?;
                let schema = r.cstr()?;
                let name = r.cstr()?;
                let _replica_identity = r.u8()?;
                let ncols = r.i16()?;
                let mut columns = Vec::with_capacity(ncols.max(0) as usize);
                let mut types = Vec::with_capacity(ncols.max(0) as usize);
                for _ in 0..ncols {
                    let _flags = r.u8()?;
                    columns.push(r.cstr()?);
                    types.push(r.u32()?);
                    let _typmod = r.u32()?;
                }
                self.relations.insert(
                    id,
                    Relation {
                        id,
                        schema,
                        name,
                        columns,
                        types,
                    },
                );
                Ok(None)
            }
            b'I' => {
                let relation = r.u32()?;
                r.expect(b'N')?;
                Ok(Some(Change::Insert {
                    relation,
                    values: r.tuple()?,
                }))
            }
            b'U' => {
                let relation = r.u32()?;
                let mut tag = r.u8()?;
                if tag == b'K' || tag == b'O' {
                    r.tuple()?;
                    tag = r.u8()?;
                }
                if tag != b'N' {
                    return Err(DecodeError(format!(
                        "update without a new tuple (tag {tag})"
                    )));
                }
                Ok(Some(Change::Update {
                    relation,
                    values: r.tuple()?,
                }))
            }
            b'D' => Ok(Some(Change::Delete { relation: r.u32()? })),
            b'T' => Ok(Some(Change::Truncate)),
            // Begin/Commit (decoded by the client), Type, Origin, logical messages.
            _ => Ok(None),
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| DecodeError(format!("truncated at byte {}", self.at)))?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn expect(&mut self, tag: u8) -> Result<(), DecodeError> {
        let got = self.u8()?;
        if got != tag {
            return Err(DecodeError(format!(
                "expected tag {:?}, got {:?}",
                tag as char, got as char
            )));
        }
        Ok(())
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.at..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError("unterminated string".into()))?;
        let text = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.at += len + 1;
        Ok(text)
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let ncols = self.i16()?;
        let mut values = Vec::with_capacity(ncols.max(0) as usize);
        for _ in 0..ncols {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' | b'b' => {
                    let len = self.u32()? as usize;
                    Value::Text(self.take(len)?.to_vec())
                }
                other => {
                    return Err(DecodeError(format!(
                        "unknown column tag {:?}",
                        other as char
                    )))
                }
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput messages the way the server encodes them.
    pub(crate) fn relation_message(id: u32, schema: &str, name: &str, columns: &[&str]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(id.to_be_bytes());
        for s in [schema, name] {
            m.extend(s.as_bytes());
            m.push(0);
        }
        m.push(b'd');
        m.extend((columns.len() as i16).to_be_bytes());
        for c in columns {
            m.push(0);
            m.extend(c.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    pub(crate) fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut m = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => m.push(b'n'),
                Some(text) => {
                    m.push(b't');
                    m.extend((text.len() as u32).to_be_bytes());
                    m.extend(text.as_bytes());
                }
            }
        }
        m
    }

    pub(crate) fn insert_message(id: u32, values: &[Option<&str>]) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(id.to_be_bytes());
        m.push(b'N');
        m.extend(tuple(values));
        m
    }

    #[test]
    fn decodes_relations_and_inserts() {
        let mut decoder = Decoder::default();
        let rel = relation_message(16384, "public", "outbox", &["id", "payload"]);
        assert_eq!(decoder.decode(&rel).unwrap(), None);
        assert_eq!(decoder.relation(16384).unwrap().columns, ["id", "payload"]);
        let change = decoder
            .decode(&insert_message(16384, &[Some("x"), None]))
            .unwrap();
        assert_eq!(
            change,
            Some(Change::Insert {
                relation: 16384,
                values: vec![Value::Text(b"x".to_vec()), Value::Null]
            })
        );
    }

    #[test]
    fn decodes_updates_with_an_old_key_and_deletes() {
        let mut decoder = Decoder::default();
        let mut update = vec![b'U'];
        update.extend(7u32.to_be_bytes());
        update.push(b'K');
        update.extend(tuple(&[Some("old")]));
        update.push(b'N');
        update.extend(tuple(&[Some("new")]));
        assert_eq!(
            decoder.decode(&update).unwrap(),
            Some(Change::Update {
                relation: 7,
                values: vec![Value::Text(b"new".to_vec())]
            })
        );
        let mut delete = vec![b'D'];
        delete.extend(7u32.to_be_bytes());
        delete.push(b'K');
        delete.extend(tuple(&[Some("old")]));
        assert_eq!(
            decoder.decode(&delete).unwrap(),
            Some(Change::Delete { relation: 7 })
        );
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let mut decoder = Decoder::default();
        let full = insert_message(1, &[Some("abcdef")]);
        for cut in 1..full.len() {
            assert!(decoder.decode(&full[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decoder.decode(b"R\0\0").is_err());
    }
}
