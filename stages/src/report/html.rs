//! `wdro report html`: one self-contained page (inline CSS, inline SVG, no scripts, no external
//! references) with the evaluation tables, optional gate results, the figures and the stages
//! each number came from. It can be mailed, attached to a CI job or opened from disk.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::evaluation::EvalReport;
use super::figures::Figure;
use super::xml_escape as esc;

/// One run on the page.
#[derive(Clone, Debug)]
pub struct HtmlRun {
    pub label: String,
    pub id: String,
    pub config_digest: String,
    /// Model → metrics.
    pub tables: BTreeMap<String, BTreeMap<String, Option<f64>>>,
    /// Model → key of its `eval.M` stage.
    pub table_keys: BTreeMap<String, String>,
    /// (stage, key, computed in this run).
    pub stages: Vec<(String, String, bool)>,
}

/// The whole page.
#[derive(Clone, Debug)]
pub struct Page {
    pub wdro_version: String,
    pub runs: Vec<HtmlRun>,
    pub evals: Vec<EvalReport>,
    /// Figures with their SVG documents.
    pub figures: Vec<(Figure, String)>,
    /// Figures that could not be drawn, with why.
    pub skipped: Vec<String>,
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}\
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{font-size:1.1em}\
table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}code{font-size:.9em}\
.up{color:#1a7f37}.down{color:#cf222e}.fail{color:#cf222e;font-weight:bold}.pass{color:#1a7f37}\
figure{margin:1.5em 0}figcaption{font-size:.9em;color:#555;max-width:800px}svg{max-width:100%;height:auto}\
.meta{color:#666;font-size:.9em}details{margin:.5em 0 1.5em}";

fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "–".into())
}

fn key12(k: &str) -> String {
    esc(&k[..k.len().min(12)])
}

/// Removes an XML declaration and doctype so the SVG can sit inside HTML.
fn inline_svg(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

fn metric_table(h: &mut String, run: &HtmlRun) {
    let models: Vec<&String> = run.tables.keys().collect();
    // Before/after when both are there, else one column per model.
    let mut cols: Vec<&String> = Vec::new();
    for m in ["pretrained", "finetuned"] {
        if let Some(x) = models.iter().find(|x| x.as_str() == m) {
            cols.push(x);
        }
    }
    cols.extend(models.iter().filter(|m| !["pretrained", "finetuned"].contains(&m.as_str())));
    let mut names: Vec<&String> = run.tables.values().flat_map(|t| t.keys()).collect();
    names.sort_by_key(|n| super::metric_order(n));
    names.dedup();
    let change = cols.len() == 2 && cols[0] == "pretrained" && cols[1] == "finetuned";
    h.push_str("<table><tr><th>metric</th>");
    for c in &cols {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    if change {
        h.push_str("<th>change</th>");
    }
    h.push_str("</tr>\n");
    for n in names {
        let vals: Vec<Option<f64>> = cols.iter().map(|c| run.tables[*c].get(n).copied().flatten()).collect();
        let _ = write!(h, "<tr><td><code>{}</code></td>", esc(n));
        for v in &vals {
            let _ = write!(h, "<td class=\"n\">{}</td>", num(*v));
        }
        if change {
            match (vals[0], vals[1]) {
                (Some(a), Some(b)) => {
                    let d = b - a;
                    let class = if d > 5e-5 {
                        "up"
                    } else if d < -5e-5 {
                        "down"
                    } else {
                        ""
                    };
                    let _ = write!(h, "<td class=\"n {class}\">{d:+.4}</td>");
                }
                _ => h.push_str("<td class=\"n\">–</td>"),
            }
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n<p class=\"meta\">");
    for c in &cols {
        if let Some(k) = run.table_keys.get(*c) {
            let _ = write!(h, "<code>eval.{}</code> key <code>{}</code>. ", esc(c), key12(k));
        }
    }
    h.push_str("</p>\n");
}

fn eval_section(h: &mut String, r: &EvalReport) {
    let _ = writeln!(
        h,
        "<h3>wdro eval of <code>{}</code> ({}): {}</h3>",
        esc(&r.model_source),
        esc(&r.model),
        if r.passed { "<span class=\"pass\">passed</span>" } else { "<span class=\"fail\">failed</span>" }
    );
    if !r.gates.is_empty() {
        h.push_str("<table><tr><th>gate</th><th>value</th><th>result</th><th>stage</th><th>key</th></tr>\n");
        for g in &r.gates {
            let _ = writeln!(
                h,
                "<tr><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"{}\">{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
                esc(&g.gate),
                num(g.value),
                if g.passed { "pass" } else { "fail" },
                if g.passed { "pass" } else { "FAIL" },
                esc(&g.provenance.stage),
                key12(g.provenance.stage_key.as_deref().unwrap_or("-"))
            );
        }
        h.push_str("</table>\n");
    }
    let _ = writeln!(
        h,
        "<p class=\"meta\">checkpoint <code>{}</code> · run <code>{}</code> · wdro {}</p>",
        esc(r.checkpoint_digest.as_deref().unwrap_or("-")),
        esc(&r.run_id),
        esc(&r.wdro_version)
    );
}

/// Renders the page.
pub fn to_html(p: &Page) -> String {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n");
    h.push_str(
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n<title>wdro report</title>\n",
    );
    let _ = writeln!(h, "<style>{CSS}</style>\n</head>\n<body>");
    let _ = writeln!(
        h,
        "<h1>wdro report</h1>\n<p class=\"meta\">wdro {} · {} run(s)</p>",
        esc(&p.wdro_version),
        p.runs.len()
    );
    if !p.evals.is_empty() {
        h.push_str("<h2>Gates</h2>\n");
        for r in &p.evals {
            eval_section(&mut h, r);
        }
    }
    for run in &p.runs {
        let _ = writeln!(
            h,
            "<h2>Run {} </h2>\n<p class=\"meta\">id <code>{}</code> · config <code>{}</code></p>",
            esc(&run.label),
            esc(&run.id),
            key12(&run.config_digest)
        );
        if run.tables.is_empty() {
            h.push_str("<p>No evaluation table in this run.</p>\n");
        } else {
            metric_table(&mut h, run);
        }
        let computed = run.stages.iter().filter(|s| s.2).count();
        let _ = writeln!(
            h,
            "<details><summary>{} stages: {} computed in this run, {} from the cache</summary>\n<table><tr><th>stage</th><th>key</th><th></th></tr>",
            run.stages.len(),
            computed,
            run.stages.len() - computed
        );
        for (name, key, c) in &run.stages {
            let _ = writeln!(
                h,
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
                esc(name),
                key12(key),
                if *c { "computed" } else { "cache hit" }
            );
        }
        h.push_str("</table></details>\n");
    }
    if !p.figures.is_empty() || !p.skipped.is_empty() {
        h.push_str("<h2>Figures</h2>\n");
    }
    for (f, svg) in &p.figures {
        let _ = writeln!(
            h,
            "<figure id=\"{}\">\n{}\n<figcaption>{}</figcaption>\n</figure>",
            esc(&f.id),
            inline_svg(svg),
            esc(&f.caption)
        );
    }
    for s in &p.skipped {
        let _ = writeln!(h, "<p class=\"meta\">Not drawn: {}</p>", esc(s));
    }
    h.push_str("</body>\n</html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::evaluation::tests::report;
    use crate::report::figures::{all, tests as data};
    use crate::report::plot::render;

    fn page() -> Page {
        let (figs, skipped) = all(&data::tables(), &data::logs());
        Page {
            wdro_version: "0.1.0".into(),
            runs: vec![HtmlRun {
                label: "latest".into(),
                id: "20261125T220000.000Z-1".into(),
                config_digest: "c".repeat(64),
                tables: data::tables().into_iter().map(|m| (m.label, m.metrics)).collect(),
                table_keys: [("pretrained".to_string(), "a".repeat(64))].into(),
                stages: vec![("eval.pretrained".into(), "a".repeat(64), true)],
            }],
            evals: vec![report()],
            figures: figs
                .into_iter()
                .map(|f| {
                    let s = render(&f).unwrap();
                    (f, s)
                })
                .collect(),
            skipped,
        }
    }

    #[test]
    fn self_contained_page_with_tables_gates_and_figures() {
        let html = to_html(&page());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert_eq!(html.matches("<svg").count(), 5);
        assert!(html.contains("<th>pretrained</th><th>finetuned</th><th>change</th>"), "before/after table");
        assert!(html.contains("w2_linf_acc@delta=8/255 &gt;= 0.45"), "gates escaped");
        assert!(html.contains("FAIL"));
        for forbidden in ["<script", "<link", "src=", "href=\"http", "url(", "@import"] {
            assert!(!html.contains(forbidden), "not self-contained: {forbidden}");
        }
        // The body (without the doctype) is well-formed XML, so every SVG and table is closed.
        let body = html.trim_start_matches("<!DOCTYPE html>\n");
        roxmltree::Document::parse(body).expect("well-formed");
    }
}
