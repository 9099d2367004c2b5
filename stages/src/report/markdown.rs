//! A Markdown summary of `wdro eval`, ready for a pull-request comment: the gates first (what a
//! reviewer needs), then every metric with the stage and key it came from, then one provenance
//! line (checkpoint digest, run, config digest, wdro version, cache hits).

use std::fmt::Write;

use super::evaluation::EvalReport;
use crate::gates::fmt_num;

/// `|` and newlines would break a table cell.
pub fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// The first 12 hex digits of a key or digest (after an optional `blake3:`), as code.
pub fn short(k: Option<&str>) -> String {
    match k {
        Some(k) => {
            let (pre, hex) = k.split_once(':').map(|(p, h)| (format!("{p}:"), h)).unwrap_or((String::new(), k));
            format!("`{pre}{}`", &hex[..hex.len().min(12)])
        }
        None => "-".into(),
    }
}

fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}

/// Renders the evaluation report as Markdown.
pub fn to_markdown(r: &EvalReport) -> String {
    let mut m = String::new();
    let verdict = if let Some(e) = &r.error {
        format!("evaluation failed: {}", cell(e))
    } else if r.gates.is_empty() {
        "no gates".to_string()
    } else if r.gates_failed == 0 {
        format!("all {} gates passed", r.gates.len())
    } else {
        format!("{} of {} gates failed", r.gates_failed, r.gates.len())
    };
    let _ = writeln!(m, "### wdro eval: {} ({}): {verdict}\n", cell(&r.model), cell(&r.model_source));
    if !r.gates.is_empty() {
        m.push_str("| gate | value | result |\n|---|---:|---|\n");
        for g in &r.gates {
            let _ = writeln!(
                m,
                "| `{}` | {} | {} |",
                cell(&g.gate),
                g.value.map(fmt_num).unwrap_or_else(|| "missing".into()),
                if g.passed { "pass" } else { "**FAIL**" }
            );
        }
        m.push('\n');
    }
    if !r.metrics.is_empty() {
        m.push_str("| metric | value | stage | key |\n|---|---:|---|---|\n");
        for x in &r.metrics {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} |",
                cell(&x.name),
                num(x.value),
                cell(&x.provenance.stage),
                short(x.provenance.stage_key.as_deref())
            );
        }
        m.push('\n');
    }
    let hits = r.stages.iter().filter(|s| s.outcome == "hit").count();
    let computed = r.stages.iter().filter(|s| s.outcome == "computed").count();
    let _ = writeln!(
        m,
        "<sub>checkpoint {} · run `{}` · config {} · wdro {} · {} stages: {hits} cache hit, {computed} computed</sub>",
        short(r.checkpoint_digest.as_deref()),
        cell(&r.run_id),
        short(Some(&r.config_digest)),
        cell(&r.wdro_version),
        r.stages.len()
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::evaluation::tests::report;

    #[test]
    fn gates_then_metrics_then_provenance() {
        let md = to_markdown(&report());
        assert!(md.starts_with("### wdro eval: pretrained (file:ckpt.safetensors): 1 of 3 gates failed\n"), "{md}");
        assert!(md.contains("| `w2_linf_acc@delta=8/255 >= 0.45` | 0.41 | **FAIL** |"), "{md}");
        assert!(md.contains("| `clean_acc >= 0.8` | 0.83 | pass |"), "{md}");
        assert!(
            md.contains("| w2_linf_acc@delta=8/255 | 0.4100 | attack.pretrained.w-pgd.w2.8_255 | `000000000000` |"),
            "{md}"
        );
        assert!(md.contains("checkpoint `blake3:abababababab`"), "{md}");
        assert!(md.contains("wdro 0.1.0"), "{md}");
        // Every table row has the same number of cells as its header.
        for block in md.split("\n\n").filter(|b| b.starts_with('|')) {
            let n = block.lines().next().unwrap().matches(" | ").count();
            assert!(block.lines().all(|l| l.matches(" | ").count() == n || l.starts_with("|---")), "{block}");
        }
    }

    #[test]
    fn cells_escape_pipes() {
        assert_eq!(cell("a|b\nc"), "a\\|b c");
        assert_eq!(short(Some("blake3:0123456789abcdef")), "`blake3:0123456789ab`");
        assert_eq!(short(None), "-");
    }
}
