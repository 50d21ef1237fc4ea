//! Paged listings (`GET /volumes`, `/operations`, `/exports`): `?limit=N` and an opaque `?after=` cursor, the
//! next page announced in an RFC 8288 `Link: <…>; rel="next"` header so that bodies keep their shape, and
//! JSON array bodies written compactly while they are sent.

use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::ApiError;
use crate::store::Cursor;

/// The largest page a caller may ask for.
pub const MAX_LIMIT: u32 = 1000;

/// `?limit=`: absent, or a page size from 1 to [`MAX_LIMIT`].
pub fn limit(raw: Option<&str>) -> Result<Option<u32>, ApiError> {
    let bad = || {
        ApiError::bad(
            "limit",
            format!("limit must be a whole number between 1 and {MAX_LIMIT}"),
        )
    };
    match raw {
        None | Some("") => Ok(None),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(Some(n)),
            _ => Err(bad()),
        },
    }
}

/// What a listing's cursors are keyed by, besides the id (a UUID) of the last item of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorKey {
    /// The item's creation time, as the store writes it (volumes, operations).
    Created,
    /// The export's name, which its volume's id gives (exports).
    ExportName,
}

impl CursorKey {
    /// Whether `c` is a cursor this listing can have given out.
    fn admits(self, c: &Cursor) -> bool {
        let Ok(id) = uuid::Uuid::parse_str(&c.id) else {
            return false;
        };
        match self {
            Self::Created => chrono::DateTime::parse_from_rfc3339(&c.key)
                .is_ok_and(|t| crate::store::ts(t.with_timezone(&chrono::Utc)) == c.key),
            Self::ExportName => c.key == volume_api::export_name(id),
        }
    }
}

/// `?after=`: absent, or a cursor from an earlier page's `Link` header of a listing keyed by `key`.
pub fn after(raw: Option<&str>, key: CursorKey) -> Result<Option<Cursor>, ApiError> {
    match raw {
        None | Some("") => Ok(None),
        Some(s) => decode(s).filter(|c| key.admits(c)).map(Some).ok_or_else(|| {
            ApiError::bad(
                "after",
                "after is not a cursor this daemon gave out: follow the Link header of the previous page",
            )
        }),
    }
}

/// A cursor as the opaque token of `?after=`: the hex digits of `key`, a newline and `id`.
pub fn encode(c: &Cursor) -> String {
    let mut out = String::with_capacity((c.key.len() + c.id.len() + 1) * 2);
    for b in c
        .key
        .bytes()
        .chain(std::iter::once(b'\n'))
        .chain(c.id.bytes())
    {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn decode(token: &str) -> Option<Cursor> {
    let t = token.as_bytes();
    if t.len() % 2 != 0 || t.len() > 1024 {
        return None;
    }
    let nibble = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let bytes = t
        .chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let (key, id) = text.split_once('\n')?;
    if key.is_empty() || id.is_empty() || id.contains('\n') {
        return None;
    }
    Some(Cursor {
        key: key.to_string(),
        id: id.to_string(),
    })
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
fn component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)].to_ascii_uppercase()));
            out.push(char::from(HEX[usize::from(b & 0x0f)].to_ascii_uppercase()));
        }
    }
    out
}

/// The `Link` header value naming the next page: `path` with the caller's filters (`params`, unset ones
/// left out), the same `limit`, and `after` set to `next`.
pub fn next_link(
    path: &str,
    params: &[(&str, Option<String>)],
    limit: u32,
    next: &Cursor,
) -> Result<HeaderValue, ApiError> {
    let mut url = format!("{}{path}?", volume_api::API_PREFIX);
    for (k, v) in params {
        if let Some(v) = v {
            url.push_str(&format!("{k}={}&", component(v)));
        }
    }
    url.push_str(&format!("limit={limit}&after={}", encode(next)));
    // Every character is ASCII: the value is always a valid header value.
    HeaderValue::from_str(&format!("<{url}>; rel=\"next\"")).map_err(|_| ApiError::BadRequest {
        field: None,
        message:
            "the next page's address cannot be written as a header; use fewer or plainer filters"
                .into(),
    })
}

/// A JSON array of `items`, sent with the `Link` header of the next page when there is one. The items are
/// converted before anything is sent (a conversion error still answers with its status); the body is then
/// written compactly while it is sent, a chunk of about [`CHUNK`] bytes at a time, each item dropped once
/// written, so that no copy of a large listing's whole body is ever held.
pub fn json_array<T: Serialize + Send + 'static>(
    items: Vec<T>,
    link: Option<HeaderValue>,
) -> Response {
    let chunks = Chunks::new(items);
    let stream = futures::stream::iter(chunks.map(Ok::<_, std::convert::Infallible>));
    let mut resp = (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response();
    if let Some(l) = link {
        resp.headers_mut().insert(header::LINK, l);
    }
    resp
}

/// Bytes of body written per chunk (at least; an item is never split).
const CHUNK: usize = 64 * 1024;

/// The chunks of a JSON array body (memory freed as they are sent goes back to the system: see the
/// daemon's allocator, `alloc.rs`).
struct Chunks<T> {
    items: std::vec::IntoIter<T>,
    started: bool,
    done: bool,
}

impl<T> Chunks<T> {
    fn new(items: Vec<T>) -> Self {
        Self {
            items: items.into_iter(),
            started: false,
            done: false,
        }
    }
}

impl<T: Serialize> Iterator for Chunks<T> {
    type Item = bytes::Bytes;

    fn next(&mut self) -> Option<bytes::Bytes> {
        if self.done {
            return None;
        }
        let mut buf = Vec::with_capacity(CHUNK + CHUNK / 4);
        let mut first = false;
        if !self.started {
            self.started = true;
            first = true;
            buf.push(b'[');
        }
        while buf.len() < CHUNK {
            let Some(item) = self.items.next() else {
                buf.push(b']');
                self.done = true;
                break;
            };
            // The separator goes before every item but the first, whichever chunk either falls in.
            if !first {
                buf.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut buf, &item)
                .expect("invariant: wire types have string keys and always serialize");
        }
        Some(bytes::Bytes::from(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn cursors_round_trip_and_anything_else_is_refused() {
        let c = Cursor {
            key: "2026-01-02T03:04:05.000001Z".into(),
            id: "60338035-92fb-4d27-98d4-b60ad4b38b87".into(),
        };
        let t = encode(&c);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            after(Some(&t), CursorKey::Created).unwrap(),
            Some(c.clone())
        );
        assert_eq!(after(None, CursorKey::Created).unwrap(), None);
        for bad in ["zz", "abc", "6162", &"61".repeat(600)] {
            assert!(after(Some(bad), CursorKey::Created).is_err(), "{bad}");
        }
        // A time cursor is not an export cursor.
        assert!(after(Some(&t), CursorKey::ExportName).is_err());
        let id = uuid::Uuid::parse_str(&c.id).unwrap();
        let e = Cursor {
            key: volume_api::export_name(id),
            id: c.id.clone(),
        };
        assert_eq!(
            after(Some(&encode(&e)), CursorKey::ExportName).unwrap(),
            Some(e)
        );
    }

    #[test]
    fn forged_cursors_are_refused() {
        let good_time = "2026-01-02T03:04:05.000001Z";
        let good_id = "60338035-92fb-4d27-98d4-b60ad4b38b87";
        for (key, id, kind) in [
            ("x' OR 1=1 --", good_id, CursorKey::Created),
            (good_time, "not-a-uuid", CursorKey::Created),
            // Another rendering of a valid time is not one the store wrote.
            ("2026-01-02T03:04:05Z", good_id, CursorKey::Created),
            (
                "2026-01-02T04:04:05.000001+01:00",
                good_id,
                CursorKey::Created,
            ),
            ("migration-vol-x", good_id, CursorKey::ExportName),
            (
                "migration-vol-00000000-0000-0000-0000-000000000000",
                good_id,
                CursorKey::ExportName,
            ),
        ] {
            let t = encode(&Cursor {
                key: key.into(),
                id: id.into(),
            });
            let e = after(Some(&t), kind).expect_err(key);
            assert!(
                matches!(&e, ApiError::BadRequest { field: Some(f), .. } if f == "after"),
                "{e:?}"
            );
        }
    }

    #[test]
    fn array_bodies_in_chunks_are_the_compact_json_of_the_items() {
        let big = "x".repeat(CHUNK / 3);
        for n in [0, 1, 2, 3, 7, 40] {
            let items: Vec<Value> = (0..n).map(|i| json!({"i": i, "pad": big})).collect();
            let want = serde_json::to_vec(&items).unwrap();
            let chunks: Vec<bytes::Bytes> = Chunks::new(items).collect();
            assert_eq!(chunks.concat(), want, "{n} items");
            // Every chunk but the last holds at least CHUNK bytes: the body is not one item per write.
            let short = chunks
                .iter()
                .rev()
                .skip(1)
                .filter(|c| c.len() < CHUNK)
                .count();
            assert_eq!(
                short,
                0,
                "{n} items: {:?}",
                chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn an_item_ending_at_any_byte_near_a_chunk_boundary_keeps_the_body_valid_json() {
        // The first item's length is swept so that the first chunk ends (with or without the comma that
        // follows an item) at every byte around CHUNK.
        for first in CHUNK - 40..CHUNK + 8 {
            // `{"p":"…"}` is 8 bytes around the padding, and `[` comes before it.
            let pad = "x".repeat(first - 9);
            let items = vec![json!({"p": pad}), json!({"p": "y"}), json!({"p": "z"})];
            let want = serde_json::to_vec(&items).unwrap();
            let body = Chunks::new(items).collect::<Vec<_>>().concat();
            assert_eq!(
                String::from_utf8_lossy(&body[first - 2..]),
                String::from_utf8_lossy(&want[first - 2..]),
                "first chunk of {first} bytes"
            );
        }
    }

    proptest::proptest! {
        /// Whatever the items' sizes, the chunks join into exactly the compact JSON of the array: a large
        /// item, then small ones that end at the bytes around the first chunk's end.
        #[test]
        fn any_items_join_into_the_arrays_json(
            big in CHUNK - 300..CHUNK,
            small in proptest::collection::vec(0usize..24, 0..40),
        ) {
            let items: Vec<Value> = std::iter::once(big)
                .chain(small)
                .map(|n| json!({"p": "x".repeat(n)}))
                .collect();
            let want = serde_json::to_vec(&items).unwrap();
            let body = Chunks::new(items)
            .collect::<Vec<_>>()
            .concat();
            proptest::prop_assert_eq!(body, want);
        }
    }

    #[test]
    fn limits_are_one_to_the_maximum() {
        assert_eq!(limit(Some("1")).unwrap(), Some(1));
        assert_eq!(limit(Some("1000")).unwrap(), Some(1000));
        assert_eq!(limit(None).unwrap(), None);
        // Empty counts as left out (docs/api.md), as does an empty cursor.
        assert_eq!(limit(Some("")).unwrap(), None);
        assert!(after(Some(""), CursorKey::Created).unwrap().is_none());
        for bad in ["0", "1001", "-1", "ten", "1.5"] {
            assert!(limit(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_link_keeps_the_filters_and_sets_the_cursor() {
        let c = Cursor {
            key: "k".into(),
            id: "i".into(),
        };
        let l = next_link(
            "/volumes",
            &[("name", Some("a b&c".into())), ("state", None)],
            5,
            &c,
        )
        .unwrap();
        assert_eq!(
            l.to_str().unwrap(),
            format!(
                "</api/v1/volumes?name=a%20b%26c&limit=5&after={}>; rel=\"next\"",
                encode(&c)
            )
        );
    }
}
