//! min / median / max of repeated measurements.

use ksmvm::stats::ApproxF64;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// None for no values; NaNs are ignored.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            n,
            min: v[0],
            median,
            max: v[n - 1],
            mean: v.iter().sum::<f64>() / n.approx_f64(),
        })
    }

    pub fn show(s: Option<Self>, digits: usize) -> String {
        match s {
            Some(s) => format!(
                "{:.d$} / {:.d$} / {:.d$}",
                s.min,
                s.median,
                s.max,
                d = digits
            ),
            None => "n/a".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises() {
        let s = Summary::of([3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!(
            (s.n, s.min, s.median, s.max, s.mean),
            (3, 1.0, 2.0, 3.0, 2.0)
        );
        assert_eq!(Summary::of([4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Summary::of([]).is_none());
        assert_eq!(Summary::show(Summary::of([1.0]), 1), "1.0 / 1.0 / 1.0");
        assert_eq!(Summary::show(None, 1), "n/a");
    }
}
