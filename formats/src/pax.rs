//! PAX extended header records (POSIX.1-2001 `pax` format).
//!
//! Records are `<length> <key>=<value>\n` and are walked by their length
//! prefix, never split at newlines: values may hold any byte (a file
//! capability xattr can hold 0x0a, which the `tar` crate 0.4 mangles).

/// `SCHILY.xattr.<name>`: an extended attribute, the name after the prefix.
pub const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// One record: key and value, as bytes.
pub type Record = (Vec<u8>, Vec<u8>);

/// A malformed record: where it starts in the header's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedRecord {
    pub offset: usize,
}

impl std::fmt::Display for MalformedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a malformed PAX record at byte {} of the header",
            self.offset
        )
    }
}

impl std::error::Error for MalformedRecord {}

/// Appends one record, `LEN KEY=VALUE\n`, to `out` (LEN counts itself).
pub fn write_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// The records of one extended header's data, in order. Trailing NUL
/// padding ends the walk.
pub fn parse_records(data: &[u8]) -> Result<Vec<Record>, MalformedRecord> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < data.len() && data[at] != 0 {
        let rest = &data[at..];
        let record = (|| {
            let space = rest.iter().position(|&b| b == b' ')?;
            let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
            if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
                return None;
            }
            let record = &rest[space + 1..len - 1];
            let eq = record.iter().position(|&b| b == b'=')?;
            Some((len, record[..eq].to_vec(), record[eq + 1..].to_vec()))
        })();
        let (len, key, value) = record.ok_or(MalformedRecord { offset: at })?;
        records.push((key, value));
        at += len;
    }
    Ok(records)
}

/// A PAX time, `[-]SECONDS[.FRACTION]`, as (seconds, nanoseconds) with the
/// nanoseconds in 0..1e9 (so -1.25 is (-2, 750000000)); digits past
/// nanoseconds are dropped.
pub fn parse_time(value: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(value).ok()?;
    let (negative, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = int.parse().ok()?;
    let digits = &frac[..frac.len().min(9)];
    let nanos: u32 = format!("{digits:0<9}").parse().ok()?;
    Some(match (negative, nanos) {
        (false, _) => (secs, nanos),
        (true, 0) => (-secs, 0),
        (true, _) => (-secs - 1, 1_000_000_000 - nanos),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_record(&mut out, key.as_bytes(), value);
        out
    }

    #[test]
    fn record_lengths_count_themselves() {
        for vlen in [0usize, 1, 5, 89, 90, 91, 95, 96, 990, 995, 996, 9990] {
            let out = record("path", &vec![b'a'; vlen]);
            let space = out.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&out[..space]).unwrap().parse().unwrap();
            assert_eq!(len, out.len(), "value length {vlen}");
            assert_eq!(parse_records(&out).unwrap()[0].1.len(), vlen);
        }
    }

    #[test]
    fn records_are_walked_by_length() {
        let mut data = [
            record("SCHILY.xattr.security.capability", b"\x01\n\x02"),
            record("path", b"a b=c"),
        ]
        .concat();
        data.extend_from_slice(&[0; 20]);
        let records = parse_records(&data).unwrap();
        assert_eq!(
            records,
            vec![
                (
                    b"SCHILY.xattr.security.capability".to_vec(),
                    b"\x01\n\x02".to_vec()
                ),
                (b"path".to_vec(), b"a b=c".to_vec()),
            ]
        );
        assert_eq!(parse_records(b"").unwrap(), vec![]);
    }

    #[test]
    fn malformed_records_are_refused_with_their_offset() {
        let good = record("path", b"p");
        for bad in [&b"99 a=b\n"[..], b"x a=b\n", b"6 ab\n\n", b"5 a=b"] {
            let data = [good.clone(), bad.to_vec()].concat();
            let err = parse_records(&data).unwrap_err();
            assert_eq!(err.offset, good.len(), "{bad:?}");
        }
    }

    #[test]
    fn times_keep_nanoseconds_and_floor_negative_ones() {
        assert_eq!(parse_time(b"12"), Some((12, 0)));
        assert_eq!(parse_time(b"12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_time(b"-12"), Some((-12, 0)));
        assert_eq!(parse_time(b"-12.5"), Some((-13, 500_000_000)));
        assert_eq!(parse_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(
            parse_time(b"1600000000.123456789123"),
            Some((1_600_000_000, 123_456_789))
        );
        for bad in [&b"x"[..], b"1.2x", b"", b"-", b"1e3"] {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
    }
}
