//! Byte layouts of the embedded store's records (redb values).
//!
//! Fixed little-endian fields and u32 length prefixes: the records are read
//! on every get and replayed by every catching-up watch, so they avoid a
//! self-describing format. Every decode checks lengths and reports
//! [`StoreError::Corrupt`] instead of panicking.

use super::{Event, EventKind, KeyValue, Revision, StoreError};

/// A live key's record: create revision, mod revision, value.
pub(super) fn encode_record(
    create_revision: Revision,
    mod_revision: Revision,
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    out.extend_from_slice(value);
    out
}

pub(super) fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    let mut reader = Reader { bytes, at: key };
    let create_revision = reader.i64()?;
    let mod_revision = reader.i64()?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: reader.bytes.to_vec(),
        create_revision,
        mod_revision,
    })
}

/// One revision's events, as the history log stores them.
pub(super) fn encode_events(events: &[Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for event in events {
        out.push(match event.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        put_bytes(&mut out, event.kv.key.as_bytes());
        if event.kind == EventKind::Put {
            put_bytes(&mut out, &event.kv.value);
        }
        match &event.prev {
            None => out.push(0),
            Some(prev) => {
                out.push(1);
                out.extend_from_slice(&prev.create_revision.to_le_bytes());
                out.extend_from_slice(&prev.mod_revision.to_le_bytes());
                put_bytes(&mut out, &prev.value);
            }
        }
    }
    out
}

pub(super) fn decode_events(revision: Revision, bytes: &[u8]) -> Result<Vec<Event>, StoreError> {
    let at = format!("history revision {revision}");
    let mut reader = Reader { bytes, at: &at };
    let mut events = Vec::new();
    while !reader.bytes.is_empty() {
        let kind = match reader.u8()? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            _ => return Err(reader.corrupt("unknown event kind")),
        };
        let key = reader.string()?;
        let value = match kind {
            EventKind::Put => reader.chunk()?.to_vec(),
            EventKind::Delete => Vec::new(),
        };
        let prev = match reader.u8()? {
            0 => None,
            1 => {
                let create_revision = reader.i64()?;
                let mod_revision = reader.i64()?;
                Some(KeyValue {
                    key: key.clone(),
                    value: reader.chunk()?.to_vec(),
                    create_revision,
                    mod_revision,
                })
            }
            _ => return Err(reader.corrupt("bad previous-value flag")),
        };
        events.push(Event::at(kind, key, value, revision, prev));
    }
    Ok(events)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys and values are bounded far below 4 GiB by the API server's
    // request size limit (3 MiB, as kube-apiserver's).
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: &'a str,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, reason: &'static str) -> StoreError {
        StoreError::Corrupt {
            at: self.at.to_owned(),
            reason,
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], StoreError> {
        if self.bytes.len() < len {
            return Err(self.corrupt("record is truncated"));
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, StoreError> {
        let bytes = self.take(8)?;
        let mut array = [0; 8];
        array.copy_from_slice(bytes);
        Ok(i64::from_le_bytes(array))
    }

    fn chunk(&mut self) -> Result<&'a [u8], StoreError> {
        let bytes = self.take(4)?;
        let mut array = [0; 4];
        array.copy_from_slice(bytes);
        let len = usize::try_from(u32::from_le_bytes(array))
            .map_err(|_| self.corrupt("length overflows"))?;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let bytes = self.chunk()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.corrupt("key is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], create: Revision, modified: Revision) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: value.to_vec(),
            create_revision: create,
            mod_revision: modified,
        }
    }

    #[test]
    fn records_round_trip() {
        let bytes = encode_record(3, 9, b"payload");
        assert_eq!(
            decode_record("/k", &bytes).unwrap(),
            kv("/k", b"payload", 3, 9)
        );
    }

    #[test]
    fn events_round_trip_with_and_without_previous_values() {
        let events = vec![
            Event {
                kind: EventKind::Put,
                kv: kv("/a", b"new", 4, 12),
                prev: Some(kv("/a", b"old", 4, 7)),
            },
            Event {
                kind: EventKind::Put,
                kv: kv("/b", b"first", 12, 12),
                prev: None,
            },
            Event {
                kind: EventKind::Delete,
                kv: kv("/c", b"", 2, 12),
                prev: Some(kv("/c", b"gone", 2, 5)),
            },
        ];
        assert_eq!(decode_events(12, &encode_events(&events)).unwrap(), events);
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let bytes = encode_events(&[Event {
            kind: EventKind::Put,
            kv: kv("/a", b"value", 1, 1),
            prev: None,
        }]);
        for len in 0..bytes.len() {
            if len == 0 {
                continue;
            }
            assert!(
                matches!(
                    decode_events(1, &bytes[..len]),
                    Err(StoreError::Corrupt { .. })
                ),
                "prefix of {len} bytes decoded"
            );
        }
        assert!(decode_record("/k", &[1, 2, 3]).is_err());
    }
}
