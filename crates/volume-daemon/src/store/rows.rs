//! Reading and writing column values: UTC timestamps as fixed-width text, UUIDs and JSON as text, integers
//! as BIGINT. Every unreadable value becomes a `Corrupt` error naming the table, row and column.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::error::StoreError;

/// A timestamp as stored: RFC 3339 in UTC with microseconds, fixed width so that text order is time order.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Now, as stored.
pub fn now() -> String {
    ts(Utc::now())
}

pub fn opt_ts(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(ts)
}

/// An unsigned number as a BIGINT column value.
pub fn int(what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        StoreError::conflict(format!(
            "{what} {v} is too large to store (the limit is {})",
            i64::MAX
        ))
    })
}

/// Reads the columns of one row; errors name `table` and the row's key.
pub struct Reader<'r> {
    row: &'r AnyRow,
    table: &'static str,
    key: String,
    /// Where a joined table's columns are: their names in select order and the index of the first.
    layout: Option<(&'r [&'r str], usize)>,
}

impl<'r> Reader<'r> {
    pub fn new(row: &'r AnyRow, table: &'static str, key_col: &str) -> Self {
        let key = row
            .try_get::<Option<String>, _>(key_col)
            .ok()
            .flatten()
            .unwrap_or_else(|| "?".into());
        Self {
            row,
            table,
            key,
            layout: None,
        }
    }

    /// A reader of the columns of `table` that a join selected as `names`, in that order, from index `first`
    /// on (read by position: no name lookups).
    pub fn at(
        row: &'r AnyRow,
        table: &'static str,
        key_col: &str,
        names: &'r [&'r str],
        first: usize,
    ) -> Self {
        let mut r = Self {
            row,
            table,
            key: String::new(),
            layout: Some((names, first)),
        };
        r.key = r
            .opt_text(key_col)
            .ok()
            .flatten()
            .unwrap_or_else(|| "?".into());
        r
    }

    /// Whether the row has this table's part (a left join leaves its key NULL when not).
    pub fn present(&self) -> bool {
        self.key != "?"
    }

    fn get<T>(&self, col: &str) -> Result<T, StoreError>
    where
        T: for<'a> sqlx::Decode<'a, sqlx::Any> + sqlx::Type<sqlx::Any>,
    {
        match self.layout {
            None => self.row.try_get::<T, _>(col),
            Some((names, first)) => match names.iter().position(|n| *n == col) {
                Some(i) => self.row.try_get::<T, _>(first + i),
                None => return Err(self.corrupt(col, "not selected")),
            },
        }
        .map_err(|e| self.corrupt(col, e))
    }

    fn corrupt(&self, col: &str, detail: impl std::fmt::Display) -> StoreError {
        StoreError::corrupt(
            format!("{} row {} column {col}", self.table, self.key),
            detail.to_string(),
        )
    }

    /// Text; MariaDB reports TEXT columns as blobs, which are read as UTF-8.
    pub fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        match self.get::<Option<String>>(col) {
            Ok(v) => Ok(v),
            Err(first) => match self.get::<Option<Vec<u8>>>(col) {
                Ok(None) => Ok(None),
                Ok(Some(bytes)) => String::from_utf8(bytes)
                    .map(Some)
                    .map_err(|e| self.corrupt(col, e)),
                Err(_) => Err(first),
            },
        }
    }

    pub fn text(&self, col: &str) -> Result<String, StoreError> {
        self.opt_text(col)?
            .ok_or_else(|| self.corrupt(col, "unexpected NULL"))
    }

    pub fn opt_i64(&self, col: &str) -> Result<Option<i64>, StoreError> {
        self.get::<Option<i64>>(col)
    }

    pub fn i64(&self, col: &str) -> Result<i64, StoreError> {
        self.opt_i64(col)?
            .ok_or_else(|| self.corrupt(col, "unexpected NULL"))
    }

    pub fn opt_u64(&self, col: &str) -> Result<Option<u64>, StoreError> {
        self.opt_i64(col)?
            .map(|v| u64::try_from(v).map_err(|_| self.corrupt(col, format!("negative value {v}"))))
            .transpose()
    }

    pub fn u64(&self, col: &str) -> Result<u64, StoreError> {
        self.opt_u64(col)?
            .ok_or_else(|| self.corrupt(col, "unexpected NULL"))
    }

    pub fn opt_u32(&self, col: &str) -> Result<Option<u32>, StoreError> {
        self.opt_i64(col)?
            .map(|v| {
                u32::try_from(v).map_err(|_| self.corrupt(col, format!("value {v} out of range")))
            })
            .transpose()
    }

    pub fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>, StoreError> {
        self.opt_text(col)?
            .map(|s| Uuid::parse_str(&s).map_err(|e| self.corrupt(col, e)))
            .transpose()
    }

    pub fn uuid(&self, col: &str) -> Result<Uuid, StoreError> {
        self.opt_uuid(col)?
            .ok_or_else(|| self.corrupt(col, "unexpected NULL"))
    }

    pub fn opt_ts(&self, col: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.opt_text(col)?
            .map(|s| {
                DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| self.corrupt(col, e))
            })
            .transpose()
    }

    pub fn ts(&self, col: &str) -> Result<DateTime<Utc>, StoreError> {
        self.opt_ts(col)?
            .ok_or_else(|| self.corrupt(col, "unexpected NULL"))
    }

    pub fn opt_json(&self, col: &str) -> Result<Option<Value>, StoreError> {
        self.opt_text(col)?
            .map(|s| serde_json::from_str(&s).map_err(|e| self.corrupt(col, e)))
            .transpose()
    }

    /// A JSON text column read as `T`.
    pub fn opt_json_as<T: serde::de::DeserializeOwned>(
        &self,
        col: &str,
    ) -> Result<Option<T>, StoreError> {
        self.opt_text(col)?
            .map(|s| serde_json::from_str(&s).map_err(|e| self.corrupt(col, e)))
            .transpose()
    }

    pub fn json(&self, col: &str) -> Result<Value, StoreError> {
        self.opt_json(col)?
            .ok_or_else(|| self.corrupt(col, "unexpected NULL"))
    }

    /// A text column holding one of a fixed set of names.
    pub fn parsed<T>(
        &self,
        col: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, StoreError> {
        let s = self.text(col)?;
        parse(&s).ok_or_else(|| self.corrupt(col, format!("unknown value {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamps_are_fixed_width_utc_micros() {
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(ts(t), "2026-01-02T03:04:05.000000Z");
        let later = t + chrono::Duration::nanoseconds(1_500);
        assert_eq!(ts(later), "2026-01-02T03:04:05.000001Z");
        assert!(ts(t) < ts(later));
    }

    #[test]
    fn large_numbers_are_refused() {
        assert_eq!(int("size", 5).unwrap(), 5);
        assert!(int("size", u64::MAX).is_err());
    }
}
