//! Tolerant field decoders for CloudStack JSON: ids and numbers that arrive as numbers or strings,
//! booleans that arrive as `"true"`/`"false"`, and absent or `null` values.

use serde::de::{Deserialize, Deserializer, Error as _};
use serde_json::Value;

fn value_to_string(v: Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// A string, or a number rendered as a string (old CloudStack versions used numeric ids).
pub(crate) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match value_to_string(Value::deserialize(d)?) {
        Some(s) => Ok(s),
        None => Err(D::Error::custom("expected a string or a number")),
    }
}

/// Like [`string`], with `null` (or an absent field, through `#[serde(default)]`) as `None`.
pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => value_to_string(v)
            .map(Some)
            .ok_or_else(|| D::Error::custom("expected a string or a number")),
    }
}

fn value_to_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A non-negative integer given as a number or a numeric string; `null` is `None`.
pub(crate) fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => value_to_u64(&v)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected a non-negative integer, got {v}"))),
    }
}

/// A non-negative integer given as a number or a numeric string; `null` is 0.
pub(crate) fn u64_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(opt_u64(d)?.unwrap_or(0))
}

/// A 32-bit non-negative integer given as a number or a numeric string; `null` is `None`.
pub(crate) fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match opt_u64(d)? {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| D::Error::custom(format!("integer {n} does not fit in 32 bits"))),
    }
}

/// A signed integer given as a number or a numeric string; `null` is `None`.
pub(crate) fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected an integer, got {n}"))),
        Value::String(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("expected an integer, got {s:?}"))),
        v => Err(D::Error::custom(format!("expected an integer, got {v}"))),
    }
}

/// Parses a boolean given as `true`/`false` or as the strings `"true"`/`"false"` (any case).
pub(crate) fn parse_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// A boolean given as a JSON boolean or a string; `null` is `false`.
pub(crate) fn bool_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(false),
        v => parse_bool(&v).ok_or_else(|| D::Error::custom(format!("expected a boolean, got {v}"))),
    }
}

/// Like [`bool_lenient`], with `null` as `None`.
pub(crate) fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => parse_bool(&v)
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("expected a boolean, got {v}"))),
    }
}
