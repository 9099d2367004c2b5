//! JUnit XML for CI test tabs (GitHub, GitLab, Jenkins): each gate is a test case of the suite
//! `wdro.gates`, each pipeline stage a test case of the suite `wdro.stages`.
//!
//! A failed gate is a `<failure>` whose message names metric, threshold and value; a failed
//! stage is an `<error>`, a stage that never ran is `<skipped>`. Provenance (stage key, checkpoint
//! digest, wdro version) goes into `<properties>` and each case's `<system-out>`, which the CI
//! viewers show next to the case. The format follows the common Ant/Surefire schema that those
//! viewers read: `testsuites` › `testsuite` (`name`, `tests`, `failures`, `errors`, `skipped`,
//! `time`) › `testcase` (`name`, `classname`, `time`).

use std::fmt::Write;

use super::evaluation::EvalReport;
use super::xml_escape as esc;
use crate::gates::fmt_num;

fn secs(ms: u64) -> String {
    format!("{:.3}", ms as f64 / 1000.0)
}

/// Renders the report as JUnit XML.
pub fn to_junit(r: &EvalReport) -> String {
    let mut x = String::new();
    let gate_failures = r.gates.iter().filter(|g| !g.passed).count();
    let stage_errors = r.stages.iter().filter(|s| s.outcome == "failed").count();
    let skipped = r.stages.iter().filter(|s| s.outcome == "not_run").count();
    let total_ms: u64 = r.stages.iter().map(|s| s.duration_ms).sum();
    let tests = r.gates.len() + r.stages.len();
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"wdro eval\" tests=\"{tests}\" failures=\"{gate_failures}\" errors=\"{stage_errors}\" skipped=\"{skipped}\" time=\"{}\">",
        secs(total_ms)
    );

    // Gates.
    let _ = writeln!(
        x,
        "  <testsuite name=\"wdro.gates\" tests=\"{}\" failures=\"{gate_failures}\" errors=\"0\" skipped=\"0\" time=\"0.000\">",
        r.gates.len()
    );
    properties(&mut x, r);
    for g in &r.gates {
        let _ = writeln!(
            x,
            "    <testcase classname=\"wdro.gates.{}\" name=\"{}\" time=\"0.000\">",
            esc(&r.model),
            esc(&g.gate)
        );
        if !g.passed {
            let _ = writeln!(
                x,
                "      <failure type=\"gate\" message=\"{}\">{}</failure>",
                esc(&g.message),
                esc(&g.message)
            );
        }
        let p = &g.provenance;
        let _ = writeln!(
            x,
            "      <system-out>{}</system-out>",
            esc(&format!(
                "metric {} = {}; threshold {} {}; stage {} key {}; table {} key {}; checkpoint {}; wdro {}",
                g.metric,
                g.value.map(fmt_num).unwrap_or_else(|| "missing".into()),
                g.op,
                fmt_num(g.threshold),
                p.stage,
                p.stage_key.as_deref().unwrap_or("-"),
                p.table_stage,
                p.table_key.as_deref().unwrap_or("-"),
                p.checkpoint_digest.as_deref().unwrap_or("-"),
                p.wdro_version
            ))
        );
        x.push_str("    </testcase>\n");
    }
    x.push_str("  </testsuite>\n");

    // Stages.
    let _ = writeln!(
        x,
        "  <testsuite name=\"wdro.stages\" tests=\"{}\" failures=\"0\" errors=\"{stage_errors}\" skipped=\"{skipped}\" time=\"{}\">",
        r.stages.len(),
        secs(total_ms)
    );
    properties(&mut x, r);
    for s in &r.stages {
        let _ = writeln!(
            x,
            "    <testcase classname=\"wdro.stages\" name=\"{}\" time=\"{}\">",
            esc(&s.name),
            secs(s.duration_ms)
        );
        match s.outcome.as_str() {
            "failed" => {
                let m = s.message.as_deref().unwrap_or("stage failed");
                let _ = writeln!(x, "      <error type=\"stage\" message=\"{}\">{}</error>", esc(m), esc(m));
            }
            "not_run" => x.push_str("      <skipped message=\"not run: an earlier stage failed\"/>\n"),
            _ => {}
        }
        let _ = writeln!(
            x,
            "      <system-out>{}</system-out>",
            esc(&format!(
                "{} key {}; wdro {}",
                match s.outcome.as_str() {
                    "hit" => "cache hit",
                    "computed" => "computed",
                    "failed" => "failed",
                    _ => "not run",
                },
                s.key.as_deref().unwrap_or("-"),
                s.wdro_version.as_deref().unwrap_or(&r.wdro_version)
            ))
        );
        x.push_str("    </testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

fn properties(x: &mut String, r: &EvalReport) {
    x.push_str("    <properties>\n");
    let mut prop = |k: &str, v: &str| {
        let _ = writeln!(x, "      <property name=\"{}\" value=\"{}\"/>", esc(k), esc(v));
    };
    prop("wdro_version", &r.wdro_version);
    prop("run_id", &r.run_id);
    prop("config_digest", &r.config_digest);
    prop("model", &r.model);
    prop("model_source", &r.model_source);
    prop("checkpoint_digest", r.checkpoint_digest.as_deref().unwrap_or("-"));
    if let Some(d) = &r.checkpoint_source_digest {
        prop("checkpoint_source_digest", d);
    }
    for (k, v) in &r.seeds {
        prop(&format!("seed:{k}"), &v.to_string());
    }
    x.push_str("    </properties>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::evaluation::tests::report;

    #[test]
    fn gates_and_stages_are_test_cases() {
        let mut r = report();
        r.stages[1].outcome = "failed".into();
        r.stages[1].message = Some("worker died: <oom> & \"killed\"".into());
        r.stages[2].outcome = "not_run".into();
        let xml = to_junit(&r);
        let doc = roxmltree::Document::parse(&xml).expect("well-formed XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "testsuites");
        let suites: Vec<_> = root.children().filter(|n| n.has_tag_name("testsuite")).collect();
        assert_eq!(suites.len(), 2);
        assert_eq!(suites[0].attribute("name"), Some("wdro.gates"));
        assert_eq!(suites[0].attribute("tests"), Some("3"));
        assert_eq!(suites[0].attribute("failures"), Some("1"));
        let cases: Vec<_> = suites[0].children().filter(|n| n.has_tag_name("testcase")).collect();
        assert_eq!(cases[0].attribute("name"), Some("w2_linf_acc@delta=8/255 >= 0.45"));
        let f = cases[0].children().find(|n| n.has_tag_name("failure")).unwrap();
        assert_eq!(f.attribute("message"), Some("gate failed: w2_linf_acc@delta=8/255 is 0.41, required >= 0.45"));
        assert!(cases[1].children().all(|n| !n.has_tag_name("failure")));
        let out = cases[0].children().find(|n| n.has_tag_name("system-out")).unwrap().text().unwrap();
        assert!(out.contains("attack.pretrained.w-pgd.w2.8_255") && out.contains("wdro 0.0.9"), "{out}");
        let stages: Vec<_> = suites[1].children().filter(|n| n.has_tag_name("testcase")).collect();
        assert_eq!(suites[1].attribute("name"), Some("wdro.stages"));
        assert_eq!(stages.len(), r.stages.len());
        let e = stages[1].children().find(|n| n.has_tag_name("error")).unwrap();
        assert_eq!(e.attribute("message"), Some("worker died: <oom> & \"killed\""));
        assert!(stages[2].children().any(|n| n.has_tag_name("skipped")));
        assert_eq!(suites[1].attribute("errors"), Some("1"));
        let props: Vec<_> = suites[0].descendants().filter(|n| n.has_tag_name("property")).collect();
        assert!(props.iter().any(|p| p.attribute("name") == Some("checkpoint_digest")
            && p.attribute("value").unwrap().starts_with("blake3:")));
        assert_eq!(root.attribute("tests"), Some(&*(3 + r.stages.len()).to_string()));
    }
}
