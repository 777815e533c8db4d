//! Range checks of settings: each names the setting's path inside its
//! stage, the range it must lie in and the value it got. NaN fails every
//! check (every comparison with it is false).

use std::fmt::Display;

/// A setting out of its range: `field` is its path inside the stage
/// (`optimizer.lr`), so the pipeline can name it with the stage and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SettingError {
    pub field: String,
    pub message: String,
}

impl SettingError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Fails with "FIELD: must be EXPECTED, got VALUE" unless `ok`.
pub fn require(
    field: &str,
    ok: bool,
    expected: &str,
    value: impl Display,
) -> Result<(), SettingError> {
    if ok {
        Ok(())
    } else {
        Err(SettingError::new(
            field,
            format!("must be {expected}, got {value}"),
        ))
    }
}

/// A number as a message shows it: very large or small ones in scientific
/// notation (`1e300`, not its 301 digits).
pub fn shown(value: f64) -> String {
    let a = value.abs();
    if a.is_finite() && a != 0.0 && !(1e-6..1e12).contains(&a) {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}

/// A finite number above 0.
pub fn positive(field: &str, value: f64) -> Result<(), SettingError> {
    require(field, value.is_finite() && value > 0.0, "> 0", shown(value))
}

/// A finite number at or above 0.
pub fn non_negative(field: &str, value: f64) -> Result<(), SettingError> {
    require(
        field,
        value.is_finite() && value >= 0.0,
        ">= 0",
        shown(value),
    )
}

/// Says so when gradient clipping is off (`max_grad_norm: 0`), so that
/// it never is without a word.
pub fn note_clipping_off(field: &str, max_grad_norm: f64) {
    if max_grad_norm == 0.0 {
        tracing::warn!("{field} is 0: gradients are not clipped");
    }
}

/// A number in `[lo, hi]`.
pub fn within(field: &str, value: f64, lo: f64, hi: f64) -> Result<(), SettingError> {
    require(
        field,
        (lo..=hi).contains(&value),
        &format!("in [{lo}, {hi}]"),
        value,
    )
}

/// A count of at least `min`.
pub fn at_least(field: &str, value: i64, min: i64) -> Result<(), SettingError> {
    require(field, value >= min, &format!("at least {min}"), value)
}

/// A supervised stage's held-out share and longest example.
pub fn example_split(eval_fraction: f64, max_len: usize) -> Result<(), SettingError> {
    let ok = (0.0..1.0).contains(&eval_fraction);
    require("eval_fraction", ok, "in [0, 1)", eval_fraction)?;
    at_least("max_len", max_len as i64, 2)
}

/// A count in `[min, max]`: the bound keeps arithmetic on it (steps,
/// buffers) from overflowing or asking for more memory than exists.
pub fn count(field: &str, value: u64, min: u64, max: u64) -> Result<(), SettingError> {
    require(
        field,
        (min..=max).contains(&value),
        &format!("in [{min}, {max}]"),
        value,
    )
}

/// `prefix.field`, or `field` alone when `prefix` is empty.
pub fn path(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}
