//! Checking a model's final answer to a math problem against the known
//! one, as RL from verifiable rewards does: the answer is the content of
//! the last `\boxed{...}`, else the last number in the text; two answers
//! agree when both read as the same exact number (integers, decimals,
//! `a/b`, `\frac{a}{b}`, `,` between groups of three digits, a sign, `$`
//! dropped; `50%` equals both `50` and `0.5`, as math_verify reads it),
//! else when their text agrees once spaces and `$` are removed.

/// The final answer written in `text`: the last `\boxed{}`'s content, or
/// the last number; `None` if it has neither.
pub fn final_answer(text: &str) -> Option<String> {
    last_boxed(text).or_else(|| last_number(text))
}

/// What two answers agreeing on their final answer share: the exact
/// number (`n/d` in lowest terms, `%` noted) or the text without spaces;
/// `None` when the answer has no final answer. For majority votes.
pub fn final_answer_key(answer: &str) -> Option<String> {
    let given = final_answer(answer)?;
    Some(match Rational::parse(&given) {
        Some((r, percent)) => format!("{}/{}{}", r.num, r.den, if percent { "%" } else { "" }),
        None => squeeze(&given),
    })
}

/// Whether `answer`'s final answer is `reference` (see the module).
pub fn is_correct(answer: &str, reference: &str) -> bool {
    let Some(given) = final_answer(answer) else {
        return false;
    };
    let reference = last_boxed(reference).unwrap_or_else(|| reference.to_owned());
    match (Rational::parse(&given), Rational::parse(&reference)) {
        (Some((a, pa)), Some((b, pb))) => {
            // A percentage matches its number with or without the /100.
            a == b || ((pa || pb) && (a.hundredth() == Some(b) || Some(a) == b.hundredth()))
        }
        _ => squeeze(&given) == squeeze(&reference) && !squeeze(&given).is_empty(),
    }
}

/// The content of the last `\boxed{...}` (or `\fbox{...}`), braces
/// balanced.
fn last_boxed(text: &str) -> Option<String> {
    let start = ["\\boxed{", "\\fbox{"]
        .iter()
        .filter_map(|m| text.rfind(m).map(|i| i + m.len()))
        .max()?;
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].trim().to_owned());
                }
            }
            _ => {}
        }
    }
    None
}

/// The last number in `text` (a sign, digits with `,` separators, a
/// decimal part, or a fraction `a/b`, and a `%` after it).
fn last_number(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut end = bytes.iter().rposition(u8::is_ascii_digit)? + 1;
    let number_byte = |b: u8| b.is_ascii_digit() || b == b'.' || b == b',' || b == b'/';
    let mut start = end;
    while start > 0 && number_byte(bytes[start - 1]) {
        start -= 1;
    }
    // Separators at the edges belong to the sentence ("is 3,", "1/2."),
    // but a leading `.` before a digit is a decimal point (".5").
    while start < end
        && !bytes[start].is_ascii_digit()
        && !(bytes[start] == b'.' && bytes[start + 1].is_ascii_digit())
    {
        start += 1;
    }
    while end > start && !bytes[end - 1].is_ascii_digit() {
        end -= 1;
    }
    let negative = start > 0 && bytes[start - 1] == b'-';
    let percent = bytes.get(end) == Some(&b'%');
    Some(format!(
        "{}{}{}",
        if negative { "-" } else { "" },
        &text[start..end],
        if percent { "%" } else { "" }
    ))
}

/// Without spaces, `$` and a trailing period: for answers that are not
/// numbers.
fn squeeze(s: &str) -> String {
    let s: String = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '$')
        .collect();
    s.trim_end_matches('.').to_owned()
}

/// An exact number `num / den`, in lowest terms, `den > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rational {
    num: i128,
    den: i128,
}

impl Rational {
    fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num.unsigned_abs(), den.unsigned_abs()).max(1) as i128;
        let sign = if den < 0 { -1 } else { 1 };
        Some(Self {
            num: sign * num / g,
            den: sign * den / g,
        })
    }

    /// `-1,234.5`, `3/4`, `\frac{3}{4}`, `\dfrac{-3}{4}`, `$12`, and
    /// whether it carried a `%` (`50%` reads as 50).
    fn parse(text: &str) -> Option<(Self, bool)> {
        let mut s: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '$')
            .collect();
        s = s.trim_end_matches('.').to_owned();
        let percent = s.ends_with('%');
        if percent {
            s = s.trim_end_matches('%').trim_end_matches('\\').to_owned();
        }
        let s = without_thousands_separators(&s)?;
        let value = Self::fraction(&s).or_else(|| Self::decimal(&s))?;
        Some((value, percent))
    }

    /// The number a hundredth of this one.
    fn hundredth(self) -> Option<Self> {
        Self::new(self.num, self.den.checked_mul(100)?)
    }

    fn fraction(s: &str) -> Option<Self> {
        let (sign, s) = match s.strip_prefix('-') {
            Some(rest) => (-1, rest),
            None => (1, s),
        };
        let (a, b) = match ["\\frac{", "\\dfrac{", "\\tfrac{"]
            .iter()
            .find_map(|m| s.strip_prefix(m))
        {
            Some(rest) => {
                let (a, rest) = rest.split_once("}{")?;
                (a, rest.strip_suffix('}')?)
            }
            None => s.split_once('/')?,
        };
        let (a, b) = (Self::decimal(a)?, Self::decimal(b)?);
        if b.num == 0 {
            return None;
        }
        Self::new(sign * a.num.checked_mul(b.den)?, a.den.checked_mul(b.num)?)
    }

    fn decimal(s: &str) -> Option<Self> {
        let (negative, s) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        let all = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && frac.is_empty()) || !all(whole) || !all(frac) || frac.len() > 18 {
            return None;
        }
        let digits = format!("{whole}{frac}");
        let digits = digits.trim_start_matches('0');
        // Too long for an exact i128: not a number we can compare.
        let num: i128 = if digits.is_empty() {
            0
        } else {
            digits.parse().ok()?
        };
        let den = 10i128.checked_pow(frac.len() as u32)?;
        Self::new(if negative { -num } else { num }, den)
    }
}

/// `s` without `,` where each one separates thousands (`1,234,567`); `None`
/// where a comma does anything else (`0,5`, `1, 2`).
fn without_thousands_separators(s: &str) -> Option<String> {
    if !s.contains(',') {
        return Some(s.to_owned());
    }
    let body = s.trim_start_matches('-');
    let whole = body.split(['.', '/']).next().unwrap_or("");
    let groups: Vec<&str> = whole.split(',').collect();
    let digits = |g: &str| g.bytes().all(|b| b.is_ascii_digit());
    let ok = (1..=3).contains(&groups[0].len())
        && groups.iter().all(|g| digits(g))
        && groups[1..].iter().all(|g| g.len() == 3)
        && !body[whole.len()..].contains(',');
    ok.then(|| s.replace(',', ""))
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answers_come_from_the_last_box_or_the_last_number() {
        assert_eq!(
            final_answer("so \\boxed{\\frac{1}{2}} and \\boxed{3}"),
            Some("3".into())
        );
        assert_eq!(
            final_answer("x = \\boxed{\\frac{1}{2}}."),
            Some("\\frac{1}{2}".into())
        );
        assert_eq!(
            final_answer("The total is 1,234 apples."),
            Some("1,234".into())
        );
        assert_eq!(final_answer("7 - 9 = -2."), Some("-2".into()));
        assert_eq!(final_answer("it is 3/4."), Some("3/4".into()));
        assert_eq!(final_answer("no number here"), None);
        assert_eq!(final_answer("\\boxed{unclosed"), None);
    }

    #[test]
    fn answers_agree_as_exact_numbers() {
        for (answer, reference) in [
            ("The answer is 42.", "42"),
            ("\\boxed{0.5}", "1/2"),
            ("\\boxed{\\dfrac{2}{4}}", "0.50"),
            ("= 1,000", "1000"),
            ("-3", "-3.0"),
            ("\\boxed{50\\%}", "0.5"),
            ("The discount is 50%.", "50%"),
            ("\\boxed{50\\%}", "50"),
            ("it is .5", "0.5"),
            ("1,234,567 people", "1234567"),
            ("costs $12", "12"),
            ("\\boxed{x + 1}", "x+1"),
        ] {
            assert!(is_correct(answer, reference), "{answer:?} vs {reference:?}");
        }
        for (answer, reference) in [
            ("The answer is 41.", "42"),
            ("\\boxed{1/3}", "0.33"),
            ("nothing", "0"),
            ("\\boxed{}", ""),
            ("12 then 13", "12"),
            ("1/0", "1"),
            ("\\boxed{1234567890123456789012345678901234567890}", "0"),
            (
                "1234567890123456789012345678901234567890",
                "1234567890123456789012345678901234567891",
            ),
            ("it is .5", "5"),
            ("0,5", "5"),
            ("\\boxed{1, 2}", "12"),
        ] {
            assert!(
                !is_correct(answer, reference),
                "{answer:?} vs {reference:?}"
            );
        }
    }
}
