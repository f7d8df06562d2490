//! Durations in Go's syntax (`300ms`, `1.5h`, `1h30m`), as the reference server's flags take them.

use std::time::Duration;

/// Parses a non-negative Go duration such as `10m`, `1h30m`, `1.5s` or `0`.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?}: use Go syntax such as 30s, 10m or 1h30m");
    let s = text.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(invalid());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_syntax() {
        let ok = [
            ("0", 0.0),
            ("1s", 1.0),
            ("10m", 600.0),
            ("1h30m", 5400.0),
            ("1.5h", 5400.0),
            ("300ms", 0.3),
            ("2m3.5s", 123.5),
            ("1us", 1e-6),
            ("+5s", 5.0),
        ];
        for (text, seconds) in ok {
            let parsed = parse_go_duration(text).unwrap();
            assert!(
                (parsed.as_secs_f64() - seconds).abs() < 1e-9,
                "{text} -> {parsed:?}"
            );
        }
        for bad in ["", "10", "1d", "-1s", "m", "1.2.3s", "1h 30m"] {
            assert!(
                parse_go_duration(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
