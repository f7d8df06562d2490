//! Byte sizes for flags: a plain number of bytes or one with a binary (`KiB`, `MiB`, `GiB`,
//! `TiB`) or decimal (`KB`, `MB`, `GB`, `TB`) suffix.

/// Parses `1073741824`, `512MiB`, `1GiB`, `10MB` or `0`.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let invalid =
        || format!("invalid size {text:?}: use a number of bytes, optionally with KiB, MiB or GiB");
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(invalid());
    }
    let number: u64 = s[..digits].parse().map_err(|_| invalid())?;
    let multiplier: u64 = match s[digits..].trim_start() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size {text:?}: larger than {} bytes", u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        for (text, bytes) in [
            ("0", 0),
            ("1", 1),
            ("1024B", 1024),
            ("1GiB", 1 << 30),
            ("512 MiB", 512 << 20),
            ("10MB", 10_000_000),
            ("16TiB", 16 << 40),
        ] {
            assert_eq!(parse_byte_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "GiB",
            "-1",
            "1.5GiB",
            "1 gib",
            "1GiBs",
            "99999999999999999999",
        ] {
            assert!(parse_byte_size(bad).is_err(), "{bad:?} was accepted");
        }
        let overflow = parse_byte_size("17179869184GiB").unwrap_err();
        assert!(overflow.contains("larger than"), "{overflow}");
    }
}
