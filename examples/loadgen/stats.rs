//! Latency samples and their percentiles (nearest rank), in milliseconds;
//! and the few errors a report keeps as examples.

use std::time::Duration;

use serde_json::json;

#[derive(Default, Clone, Debug)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p`-th percentile (0 < p ≤ 100), nearest rank; `None` if empty.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.0.is_empty() {
            return None;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        Some(sorted[rank.clamp(1, sorted.len()) - 1])
    }

    /// n, min, p50, p90, p99, max and mean, in ms.
    pub fn summary(&self) -> serde_json::Value {
        if self.0.is_empty() {
            return json!({ "n": 0 });
        }
        let ms = |d: Option<Duration>| d.map(|d| round3(d.as_secs_f64() * 1e3));
        let total: Duration = self.0.iter().sum();
        json!({
            "n": self.0.len(),
            "min_ms": ms(self.0.iter().min().copied()),
            "p50_ms": ms(self.percentile(50.0)),
            "p90_ms": ms(self.percentile(90.0)),
            "p99_ms": ms(self.percentile(99.0)),
            "max_ms": ms(self.0.iter().max().copied()),
            "mean_ms": round3(total.as_secs_f64() * 1e3 / self.0.len() as f64),
        })
    }
}

/// Three decimals are plenty for milliseconds and keep the JSON readable.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// How many errors a report keeps as examples; its failure count has them all.
const KEPT_ERRORS: usize = 5;

/// Keeps `e` in `errors` unless `KEPT_ERRORS` are kept already.
pub fn keep_error(errors: &mut Vec<String>, e: String) {
    if errors.len() < KEPT_ERRORS {
        errors.push(e);
    }
}
