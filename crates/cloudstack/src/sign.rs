//! CloudStack request signing: Java-`URLEncoder`-compatible value encoding, the canonical query string
//! and the HMAC-SHA1 signature, exactly as `ApiServer.verifyRequest` checks it.
//!
//! Algorithm (server side): take every parameter except `signature`, sort the names bytewise
//! (case-sensitive), join `name=encode(value)` with `&`, lower-case the whole string, HMAC-SHA1 it with the
//! user's secret key and Base64 the digest (standard alphabet, padded).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Encodes a parameter value the way Java's `URLEncoder.encode(v, "UTF-8")` followed by
/// `replaceAll("\\+", "%20")` does: `A–Z a–z 0–9 . - * _` stay, a space becomes `%20`, every other
/// byte of the UTF-8 form becomes `%XX` with upper-case hex (so `~` is `%7E` and `+` is `%2B`).
pub fn encode_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'*' | b'_' => {
                out.push(char::from(b))
            }
            b' ' => out.push_str("%20"),
            _ => {
                out.push('%');
                out.push(char::from(HEX_UPPER[usize::from(b >> 4)]));
                out.push(char::from(HEX_UPPER[usize::from(b & 0x0f)]));
            }
        }
    }
    out
}

/// Builds the canonical query: parameters sorted bytewise by name (stable for equal names),
/// each as `name=encode_value(value)`, joined by `&`. Names are not encoded and keep their case.
pub fn canonical_query(params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = String::new();
    for (i, (name, value)) in sorted.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(&encode_value(value));
    }
    out
}

fn mac_over(secret: &str, params: &[(String, String)]) -> HmacSha1 {
    let mut mac = HmacSha1::new_from_slice(secret.as_bytes())
        .expect("invariant: HMAC accepts keys of any length");
    mac.update(canonical_query(params).to_lowercase().as_bytes());
    mac
}

/// Formats the `expires` parameter of signature version 3 as CloudStack documents it,
/// `yyyy-MM-dd'T'HH:mm:ssZ` (Java `SimpleDateFormat`, whose `Z` is a numeric offset such as `+0000`):
/// `ApiServer.verifyRequest` parses it with `DateUtil.parseTZDateString`, and releases before 4.x-era
/// ISO-8601 parsing accept only that form.
pub fn format_expires(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%z").to_string()
}

/// Computes the request signature: `Base64(HMAC-SHA1(secret, lower-case(canonical_query(params))))`.
/// `params` must not contain `signature` itself.
pub fn signature(secret: &str, params: &[(String, String)]) -> String {
    BASE64.encode(mac_over(secret, params).finalize().into_bytes())
}

/// Checks `sig` against the signature of `params` (which must not contain `signature`), comparing
/// the digests in constant time. A `sig` that is not valid Base64 never verifies.
pub fn verify(secret: &str, params: &[(String, String)], sig: &str) -> bool {
    let Ok(given) = BASE64.decode(sig.trim()) else {
        return false;
    };
    mac_over(secret, params).verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "TESTSECRET-not-real";

    fn params(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut p = vec![
            ("apiKey".to_owned(), "TESTAPIKEY".to_owned()),
            ("response".to_owned(), "json".to_owned()),
        ];
        p.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        p
    }

    #[test]
    fn encode_value_follows_java_urlencoder() {
        assert_eq!(encode_value("AZaz09.-*_"), "AZaz09.-*_");
        assert_eq!(encode_value("a b"), "a%20b");
        assert_eq!(encode_value("~"), "%7E");
        assert_eq!(encode_value("+/=&?%#:"), "%2B%2F%3D%26%3F%25%23%3A");
        assert_eq!(encode_value("é"), "%C3%A9");
        assert_eq!(encode_value(""), "");
    }

    #[test]
    fn canonical_query_sorts_bytewise_keeping_case() {
        let p = params(&[
            ("command", "listVolumes"),
            ("Zeta", "1"),
            ("name", "vol a*b~c"),
        ]);
        // Upper-case names sort before lower-case ones (byte order).
        assert_eq!(
            canonical_query(&p),
            "Zeta=1&apiKey=TESTAPIKEY&command=listVolumes&name=vol%20a*b%7Ec&response=json"
        );
    }

    #[test]
    fn kat_list_zones() {
        let p = params(&[("command", "listZones")]);
        assert_eq!(signature(SECRET, &p), "7r55ImkXA18rnZkt04jvoDXHte8=");
    }

    #[test]
    fn kat_list_volumes_space_star_tilde() {
        let p = params(&[
            ("command", "listVolumes"),
            ("name", "vol a*b~c"),
            ("virtualmachineid", "7d66b036-270b-4ec8-9a75-99a7f8249446"),
        ]);
        assert_eq!(
            canonical_query(&p),
            "apiKey=TESTAPIKEY&command=listVolumes&name=vol%20a*b%7Ec&response=json\
             &virtualmachineid=7d66b036-270b-4ec8-9a75-99a7f8249446"
        );
        assert_eq!(signature(SECRET, &p), "uRdIKcUtRK0LOPavWrrHJUt4HjI=");
    }

    /// Expected values computed independently (Python hmac/hashlib/base64 with Java URLEncoder rules).
    const KAT_RESERVED: &str = "WCdr968AOXLuWKFdTPKdSt/Du1g=";
    const KAT_NON_ASCII: &str = "iJFDRwXJmZVHjg0+v4aTUVky8F0=";
    const KAT_V3: &str = "nW6BoSeX52m0TfNOq+KSxc4ceG8=";

    #[test]
    fn kat_reserved_characters() {
        let p = params(&[
            ("command", "createVolume"),
            ("name", "a+b/c=d&e f"),
            ("zoneid", "z1"),
        ]);
        assert_eq!(
            canonical_query(&p),
            "apiKey=TESTAPIKEY&command=createVolume&name=a%2Bb%2Fc%3Dd%26e%20f&response=json&zoneid=z1"
        );
        assert_eq!(signature(SECRET, &p), KAT_RESERVED);
    }

    #[test]
    fn kat_non_ascii() {
        let p = params(&[
            ("command", "createVolume"),
            ("name", "Größe-日本語-é"),
            ("zoneid", "z1"),
        ]);
        assert_eq!(
            canonical_query(&p),
            "apiKey=TESTAPIKEY&command=createVolume&name=Gr%C3%B6%C3%9Fe-%E6%97%A5%E6%9C%AC%E8%AA%9E-%C3%A9\
             &response=json&zoneid=z1"
        );
        assert_eq!(signature(SECRET, &p), KAT_NON_ASCII);
    }

    #[test]
    fn kat_signature_version_3() {
        let p = params(&[
            ("command", "listVolumes"),
            ("keyword", "x"),
            ("expires", "2026-08-12T10:00:00Z"),
            ("signatureVersion", "3"),
        ]);
        assert_eq!(signature(SECRET, &p), KAT_V3);
    }

    #[test]
    fn expires_has_a_numeric_utc_offset() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-08-12T10:00:00.750Z")
            .expect("valid date")
            .with_timezone(&chrono::Utc);
        assert_eq!(format_expires(at), "2026-08-12T10:00:00+0000");
    }

    #[test]
    fn verify_accepts_good_and_rejects_bad() {
        let p = params(&[("command", "listZones")]);
        assert!(verify(SECRET, &p, "7r55ImkXA18rnZkt04jvoDXHte8="));
        assert!(!verify(SECRET, &p, "7r55ImkXA18rnZkt04jvoDXHte9="));
        assert!(!verify("other", &p, "7r55ImkXA18rnZkt04jvoDXHte8="));
        assert!(!verify(SECRET, &p, "not base64!"));
        assert!(!verify(SECRET, &p, ""));
        let mut changed = p.clone();
        changed.push(("extra".to_owned(), "1".to_owned()));
        assert!(!verify(SECRET, &changed, "7r55ImkXA18rnZkt04jvoDXHte8="));
    }
}
