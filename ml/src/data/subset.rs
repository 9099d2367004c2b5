//! Seeded (stratified) subsets, e.g. the fixed 10 % of the training set used to estimate Υ
//! (spec §2.6: `fraction = 0.1, seed = 0`) or a validation hold-out (spec §8.5).
//!
//! The draw uses its own portable RNG, not torch's, so that a subset is the same on every
//! platform, libtorch version and device, and can be re-derived from this documentation:
//!
//! * RNG: SplitMix64 (Steele, Lea & Flood 2014): `state += 0x9E3779B97F4A7C15; z = state;
//!   z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
//!   return z ^ (z >> 31)` (wrapping arithmetic), initial state = `seed`.
//! * Uniform integer in `0..m`: Lemire's multiply-shift with rejection (unbiased).
//! * For each class c = 0, 1, …, K−1 in turn (one RNG stream for all classes): take that
//!   class's indices in file order, shuffle them with Fisher–Yates from the back
//!   (`for i in (1..n).rev() { j = uniform(0..=i); swap(i, j) }`) and keep the first
//!   `round(fraction · n)` (half away from zero).
//! * `selected` is the union sorted in file order; `rest` is the complement in file order.
//!
//! Without stratification the whole set is one "class".

use tch::Tensor;

use super::{Bundle, DataError};

/// SplitMix64, see the module docs.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..m` (m ≥ 1), unbiased (Lemire 2019).
    pub fn below(&mut self, m: u64) -> u64 {
        assert!(m >= 1, "below(0)");
        let threshold = m.wrapping_neg() % m;
        loop {
            let x = self.next_u64();
            let wide = (x as u128) * (m as u128);
            if (wide as u64) >= threshold {
                return (wide >> 64) as u64;
            }
        }
    }

    /// In-place Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Selected and rest indices (each ascending) for `labels` (values in `0..num_classes`).
pub fn split_indices(
    labels: &[i64],
    num_classes: usize,
    fraction: f64,
    seed: u64,
    stratified: bool,
) -> (Vec<i64>, Vec<i64>) {
    assert!((0.0..=1.0).contains(&fraction), "fraction must be in [0, 1]");
    let groups: Vec<Vec<i64>> = if stratified {
        let mut g = vec![Vec::new(); num_classes];
        for (i, &l) in labels.iter().enumerate() {
            g[l as usize].push(i as i64);
        }
        g
    } else {
        vec![(0..labels.len() as i64).collect()]
    };
    let mut rng = SplitMix64::new(seed);
    let mut chosen = vec![false; labels.len()];
    for mut g in groups {
        let k = (fraction * g.len() as f64).round() as usize;
        rng.shuffle(&mut g);
        for &i in &g[..k] {
            chosen[i as usize] = true;
        }
    }
    let (mut sel, mut rest) = (Vec::new(), Vec::new());
    for (i, c) in chosen.into_iter().enumerate() {
        if c {
            sel.push(i as i64)
        } else {
            rest.push(i as i64)
        }
    }
    (sel, rest)
}

/// Splits a bundle into (selected, rest) as described in the module docs.
pub fn split(b: &Bundle, fraction: f64, seed: u64, stratified: bool) -> Result<(Bundle, Bundle), DataError> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(DataError::invalid(
            std::path::Path::new("<subset>"),
            None,
            format!("fraction {fraction} must be in [0, 1]"),
        ));
    }
    let labels = Vec::<i64>::try_from(&b.labels).expect("bundle labels are i64");
    let (sel, rest) = split_indices(&labels, b.num_classes(), fraction, seed, stratified);
    Ok((b.select(&Tensor::from_slice(&sel)), b.select(&Tensor::from_slice(&rest))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs for seed 0 (the widely published SplitMix64 test vector).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn stratified_counts_disjoint_complete_deterministic() {
        // 3 classes with 50, 31 and 5 members, interleaved.
        let labels: Vec<i64> = (0..86)
            .map(|i| {
                if i < 50 {
                    i % 2
                } else if i < 81 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let per_class = |idx: &[i64]| {
            let mut c = [0; 3];
            for &i in idx {
                c[labels[i as usize] as usize] += 1;
            }
            c
        };
        let all = per_class(&(0..86).collect::<Vec<_>>());
        let (sel, rest) = split_indices(&labels, 3, 0.1, 0, true);
        let want: Vec<i64> = all.iter().map(|&n| (0.1 * n as f64).round() as i64).collect();
        assert_eq!(per_class(&sel).to_vec(), want);
        assert!(sel.windows(2).all(|w| w[0] < w[1]) && rest.windows(2).all(|w| w[0] < w[1]));
        let mut union: Vec<i64> = sel.iter().chain(&rest).copied().collect();
        union.sort();
        assert_eq!(union, (0..86).collect::<Vec<_>>());
        assert_eq!(split_indices(&labels, 3, 0.1, 0, true), (sel.clone(), rest));
        assert_ne!(split_indices(&labels, 3, 0.1, 1, true).0, sel);
        let (s, _) = split_indices(&labels, 3, 0.5, 7, false);
        assert_eq!(s.len(), 43);
    }

    #[test]
    fn below_is_in_range() {
        let mut r = SplitMix64::new(42);
        for m in [1u64, 2, 3, 7, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(r.below(m) < m);
            }
        }
    }
}
