//! Statistics and formatting: medians, percentiles, wake-up latencies and
//! rates, and how figures are printed and rounded into the JSON.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The median of the finite values (NaN when there are none).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// (p50, p99, max) of latencies in ms.
fn latency_stats(mut ms: Vec<f64>) -> [f64; 3] {
    ms.sort_by(f64::total_cmp);
    [
        percentile(&ms, 0.50),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN),
    ]
}

/// Events per second.
pub fn rate(events: u64, d: Duration) -> f64 {
    events as f64 / d.as_secs_f64().max(1e-9)
}

/// A number with thousands separators, or `n/a`.
fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 {
        out.insert(0, '-');
    }
    out
}

/// Events per second for the table.
pub fn ev_s(x: f64) -> String {
    format!("{} ev/s", thousands(x))
}

/// `x` rounded for the JSON (null when not finite).
pub fn round(x: f64, decimals: i32) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    let f = 10f64.powi(decimals);
    json!((x * f).round() / f)
}

/// ✓ or ✗ for a target.
pub fn mark(ok: bool) -> &'static str {
    if ok {
        "✓"
    } else {
        "✗"
    }
}

/// p50 / p99 / max for the table.
pub fn fmt_latency(l: &[f64; 3]) -> String {
    format!("p50 {:.2} / p99 {:.2} / max {:.1} ms", l[0], l[1], l[2])
}

/// Median of each of p50, p99 and max over repetitions.
pub fn median_stats(stats: &[[f64; 3]]) -> [f64; 3] {
    [0, 1, 2].map(|i| median(&stats.iter().map(|s| s[i]).collect::<Vec<_>>()))
}

/// Latencies in ms from each append's return to its receipt (clamped at 0:
/// a handler can start before the writer's task sees the reply).
pub fn latencies(sent: &[(i64, Instant)], got: &HashMap<i64, Instant>, label: &str) -> [f64; 3] {
    let mut early = 0;
    let ms: Vec<f64> = sent
        .iter()
        .map(|(p, at)| {
            let t = got[p];
            if t < *at {
                early += 1;
                0.0
            } else {
                (t - *at).as_secs_f64() * 1000.0
            }
        })
        .collect();
    if early > 0 {
        eprintln!(
            "           ({label}: {early} of {} handled before the append call returned; counted as 0 ms)",
            sent.len()
        );
    }
    latency_stats(ms)
}
