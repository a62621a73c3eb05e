//! Resource quantities (`100m`, `1.5`, `128Mi`, `1e3`) as integers.
//!
//! The scheduler compares requests with allocatable thousands of times per
//! pod, so quantities are parsed once into milli-units (CPU) or whole
//! units (bytes, pods) and compared as integers, as upstream's
//! `resource.Quantity.MilliValue()`/`Value()` do.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The quantity in thousandths, rounded up (`0.1` and `100m` are 100;
/// `1Ki` is 1,024,000). `None` if it is not a quantity.
pub fn milli(quantity: &Quantity) -> Option<i64> {
    parse_milli(&quantity.0)
}

/// The quantity in whole units, rounded up (`100m` is 1).
pub fn value(quantity: &Quantity) -> Option<i64> {
    milli(quantity).map(|m| m.div_euclid(1000) + i64::from(m.rem_euclid(1000) != 0))
}

fn parse_milli(text: &str) -> Option<i64> {
    let text = text.trim();
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    if number.is_empty() || number == "." {
        return None;
    }
    // value = mantissa * 10^exp10 * 2^exp2, with the mantissa an integer.
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if fraction.contains('.') {
        return None;
    }
    let digits: String = [whole, fraction].concat();
    let mantissa: i128 = digits.parse().ok()?;
    let mut exp10 = -i32::try_from(fraction.len()).ok()?;
    let exp2 = match suffix {
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        "Ti" => 40,
        "Pi" => 50,
        "Ei" => 60,
        _ => {
            exp10 += decimal_exponent(suffix)?;
            0
        }
    };
    // Thousandths: three more powers of ten.
    exp10 += 3;
    let scaled = mantissa.checked_mul(1i128.checked_shl(exp2)?)?;
    let milli = if exp10 >= 0 {
        scaled.checked_mul(10i128.checked_pow(u32::try_from(exp10).ok()?)?)?
    } else {
        let divisor = 10i128.checked_pow(exp10.unsigned_abs())?;
        scaled / divisor + i128::from(scaled % divisor != 0)
    };
    let milli = if negative { -milli } else { milli };
    i64::try_from(milli).ok()
}

/// The power of ten of a decimal SI suffix or an `e`/`E` exponent.
fn decimal_exponent(suffix: &str) -> Option<i32> {
    Some(match suffix {
        "" => 0,
        "n" => -9,
        "u" => -6,
        "m" => -3,
        "k" => 3,
        "M" => 6,
        "G" => 9,
        "T" => 12,
        "P" => 15,
        "E" => 18,
        _ => {
            let exponent = suffix
                .strip_prefix('e')
                .or_else(|| suffix.strip_prefix('E'))?;
            exponent.parse().ok()?
        }
    })
}

/// A CPU quantity for messages and status: `250m`, or `2` when whole.
pub fn format_milli_cpu(milli: i64) -> String {
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> Quantity {
        Quantity(text.to_owned())
    }

    #[test]
    fn cpu_forms() {
        assert_eq!(milli(&q("100m")), Some(100));
        assert_eq!(milli(&q("0.1")), Some(100));
        assert_eq!(milli(&q("2")), Some(2000));
        assert_eq!(milli(&q("1.5")), Some(1500));
        assert_eq!(milli(&q("250u")), Some(1), "rounded up");
        assert_eq!(milli(&q("1e3")), Some(1_000_000));
        assert_eq!(value(&q("100m")), Some(1));
    }

    #[test]
    fn memory_forms() {
        assert_eq!(value(&q("128Mi")), Some(128 << 20));
        assert_eq!(value(&q("1Gi")), Some(1 << 30));
        assert_eq!(value(&q("1G")), Some(1_000_000_000));
        assert_eq!(value(&q("1.5Gi")), Some(3 << 29));
        assert_eq!(value(&q("512k")), Some(512_000));
        assert_eq!(value(&q("110")), Some(110));
    }

    #[test]
    fn malformed_quantities_are_none() {
        for bad in ["", "m", "1.2.3", "12x", "Mi", "1e", "--1"] {
            assert_eq!(milli(&q(bad)), None, "{bad}");
        }
        assert_eq!(milli(&q("99999999999Ei")), None, "overflow");
    }

    #[test]
    fn cpu_formatting() {
        assert_eq!(format_milli_cpu(2000), "2");
        assert_eq!(format_milli_cpu(250), "250m");
    }
}
