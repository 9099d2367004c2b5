//! Reports from cached results, for people and for CI. Torch-free: everything here reads stage
//! records, run records and the small JSON outputs of in-process stages.
//!
//! * [`runs`] resolves `latest`, `latest~1`, pin names and run-id prefixes to run records and
//!   loads what a run used (its stage records, evaluation tables, fine-tuning log).
//! * [`evaluation`] is the result of `wdro eval`: every metric with its provenance (the stage
//!   that computed it, that stage's key, the checkpoint digest and the wdro version), the gate
//!   outcomes and one line per stage. [`junit`] and [`markdown`] render it for CI.
//! * [`diff`] compares two runs metric by metric and names the stages whose keys differ.
//! * [`figures`] turns evaluation tables and fine-tuning logs into the series of the paper's
//!   figures 7.1–7.4 (plus accuracy against δ), [`plot`] draws them as SVG with `plotters`, and
//!   [`html`] puts tables and figures into one self-contained page.

pub mod diff;
pub mod evaluation;
pub mod figures;
pub mod html;
pub mod junit;
pub mod markdown;
pub mod plot;
pub mod runs;

use std::path::PathBuf;

/// A report problem, one line naming the thing and the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A run reference that names no run (usage error).
    #[error("run {spec:?}: {msg}")]
    Run { spec: String, msg: String },
    /// Nothing to report on (usage error).
    #[error("{0}")]
    Nothing(String),
    #[error(transparent)]
    Cache(#[from] wdro_cache::CacheError),
    #[error("cannot write {path}: {source}; check that the directory exists and is writable")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Escapes text for XML/HTML element content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 forbids most control characters even escaped.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Sort key for metric names: clean first, then pointwise, the attack grid by name with δ in
/// numeric order, other accuracies, then Υ.
pub fn metric_order(n: &str) -> (u8, String, u64) {
    let rank = if n == "clean_acc" {
        0
    } else if n == "pointwise_acc" {
        1
    } else if n.contains("_acc@") {
        2
    } else if n.ends_with("_acc") {
        3
    } else if n == "upsilon" {
        4
    } else {
        5
    };
    let (base, delta) = match n.split_once("@delta=") {
        Some((b, d)) => (b.to_string(), crate::params::Delta::parse(d).map(|d| d.0).unwrap_or(0.0)),
        None => (n.to_string(), 0.0),
    };
    (rank, base, (delta * 1e12) as u64)
}

/// Writes a file, mapping the error to [`ReportError::Write`].
pub fn write_file(path: &std::path::Path, bytes: impl AsRef<[u8]>) -> Result<(), ReportError> {
    std::fs::write(path, bytes).map_err(|source| ReportError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_control_characters() {
        assert_eq!(xml_escape("a<b & \"c\" 'd'>"), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;");
        assert_eq!(xml_escape("x\u{1}y\n"), "x\u{fffd}y\n");
    }

    #[test]
    fn metrics_sort_clean_pointwise_grid_upsilon() {
        let mut v = vec![
            "upsilon_test_redlr_q2",
            "upsilon",
            "w2_linf_acc@delta=16/255",
            "w2_linf_acc@delta=4/255",
            "pointwise_acc",
            "clean_acc",
        ];
        v.sort_by_key(|n| metric_order(n));
        assert_eq!(
            v,
            [
                "clean_acc",
                "pointwise_acc",
                "w2_linf_acc@delta=4/255",
                "w2_linf_acc@delta=16/255",
                "upsilon",
                "upsilon_test_redlr_q2"
            ]
        );
    }
}
