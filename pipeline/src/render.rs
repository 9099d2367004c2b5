//! Presentation: drawings of the DAG and the observers that print a run.
//!
//! * [`to_dot`], [`to_mermaid`], [`to_ascii`] (`wdro dag`): Graphviz DOT, mermaid (renders in
//!   GitHub markdown) and a plain-text listing. Given a plan, nodes carry its status: cached
//!   (green), to run (orange) or forced (red); edges are labelled with the consumer's input slot.
//!   They are pure functions of the pipeline and plan, so their output is stable and diffable.
//! * [`JsonObserver`] and [`HumanObserver`] implement [`Observer`]: newline-delimited JSON
//!   events on stdout for tools, and lines, progress bars and a summary on stderr for people.
//!   Bars are drawn only on a terminal: a bar written into a pipe garbles CI logs or hangs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use wdro_cache::{PushSummary, StageKey};

use crate::exec::{Observer, RunReport};
use crate::graph::Pipeline;
use crate::plan::{category_label, Plan, Reason, Status};

/// How a node is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mark {
    /// No plan given.
    Plain,
    Cached,
    ToRun,
    Forced,
}

impl Mark {
    fn of(plan: Option<&Plan>, name: &str) -> Mark {
        match plan.and_then(|p| p.entry(name)).map(|e| &e.status) {
            None => Mark::Plain,
            Some(Status::Cached) => Mark::Cached,
            Some(s) if s.is_forced() => Mark::Forced,
            Some(_) => Mark::ToRun,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Mark::Plain => "",
            Mark::Cached => "cached",
            Mark::ToRun => "to run",
            Mark::Forced => "forced",
        }
    }

    /// Fill, stroke.
    fn colours(self) -> (&'static str, &'static str) {
        match self {
            Mark::Plain => ("#ffffff", "#555555"),
            Mark::Cached => ("#b7e1a1", "#2e7d32"),
            Mark::ToRun => ("#ffcc80", "#ef6c00"),
            Mark::Forced => ("#ef9a9a", "#c62828"),
        }
    }

    fn class(self) -> &'static str {
        match self {
            Mark::Plain => "plain",
            Mark::Cached => "cached",
            Mark::ToRun => "torun",
            Mark::Forced => "forced",
        }
    }

    fn ascii(self) -> &'static str {
        match self {
            Mark::Plain => "[ ]",
            Mark::Cached => "[=]",
            Mark::ToRun => "[+]",
            Mark::Forced => "[!]",
        }
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Graphviz DOT, left to right. `dot -Tsvg` draws it.
pub fn to_dot(pipeline: &Pipeline, plan: Option<&Plan>) -> String {
    let mut s = String::from(
        "digraph wdro {\n  rankdir=LR;\n  node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n",
    );
    for name in pipeline.names() {
        let mark = Mark::of(plan, name);
        let (fill, stroke) = mark.colours();
        let label =
            if mark == Mark::Plain { dot_escape(name) } else { format!("{}\\n{}", dot_escape(name), mark.word()) };
        s.push_str(&format!(
            "  \"{}\" [label=\"{label}\", fillcolor=\"{fill}\", color=\"{stroke}\"];\n",
            dot_escape(name)
        ));
    }
    for (from, to, input) in pipeline.edges() {
        s.push_str(&format!(
            "  \"{}\" -> \"{}\" [label=\"{}\"];\n",
            dot_escape(from),
            dot_escape(to),
            dot_escape(&input.slot)
        ));
    }
    s.push_str("}\n");
    s
}

fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;").replace('|', "#124;")
}

/// A mermaid flowchart. Node ids are positional (`n0`, `n1`, …) because stage names contain
/// dots, which mermaid ids cannot.
pub fn to_mermaid(pipeline: &Pipeline, plan: Option<&Plan>) -> String {
    let names = pipeline.names();
    let id = |name: &str| format!("n{}", names.iter().position(|n| *n == name).expect("edge ends are stages"));
    let mut s = String::from("flowchart LR\n");
    let mut used = BTreeSet::new();
    for (i, name) in names.iter().enumerate() {
        let mark = Mark::of(plan, name);
        used.insert(mark);
        let label = if mark == Mark::Plain {
            mermaid_escape(name)
        } else {
            format!("{}<br/>{}", mermaid_escape(name), mark.word())
        };
        s.push_str(&format!("  n{i}[\"{label}\"]:::{}\n", mark.class()));
    }
    for (from, to, input) in pipeline.edges() {
        s.push_str(&format!("  {} -->|{}| {}\n", id(from), mermaid_escape(&input.slot), id(to)));
    }
    for mark in [Mark::Plain, Mark::Cached, Mark::ToRun, Mark::Forced] {
        if used.contains(&mark) {
            let (fill, stroke) = mark.colours();
            s.push_str(&format!("  classDef {} fill:{fill},stroke:{stroke}\n", mark.class()));
        }
    }
    s
}

/// Plain text for terminals and logs: stages in topological order with a status marker, the
/// reason categories, and one line per input (`slot <- stage.output`).
pub fn to_ascii(pipeline: &Pipeline, plan: Option<&Plan>) -> String {
    let width = pipeline.names().iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let mut s = String::new();
    for stage in pipeline.stages() {
        let name = stage.name();
        let mark = Mark::of(plan, name);
        let mut line = format!("{} {name}", mark.ascii());
        if let Some(e) = plan.and_then(|p| p.entry(name)) {
            let pad = width - name.chars().count();
            line.push_str(&" ".repeat(pad + 2));
            line.push_str(mark.word());
            let cats: Vec<&str> = e
                .status
                .reasons()
                .iter()
                .map(|r| r.category())
                .filter(|&c| !(mark == Mark::Forced && c == "forced"))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(category_label)
                .collect();
            if !cats.is_empty() {
                line.push_str(&format!(" ({})", cats.join(", ")));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
        let mut inputs = pipeline.inputs_of(name).unwrap_or(&[]).to_vec();
        inputs.sort_by(|a, b| a.slot.cmp(&b.slot));
        let slot_w = inputs.iter().map(|i| i.slot.chars().count()).max().unwrap_or(0);
        for i in inputs {
            s.push_str(&format!("      {:slot_w$} <- {}.{}\n", i.slot, i.stage, i.output));
        }
    }
    if plan.is_some() {
        s.push_str("legend: [=] cached  [+] to run  [!] forced\n");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Run events: the observers `wdro run` prints with.
// ---------------------------------------------------------------------------------------------

/// Newline-delimited JSON events (one object per line), for CI and tools; the spirit of
/// cargo's `--message-format=json` and Bazel's build event stream. Human output goes elsewhere.
pub struct JsonObserver {
    out: Mutex<Box<dyn Write + Send>>,
}

impl JsonObserver {
    /// Events on stdout (human output stays on stderr).
    pub fn stdout() -> JsonObserver {
        JsonObserver::with_writer(Box::new(std::io::stdout()))
    }

    pub fn with_writer(out: Box<dyn Write + Send>) -> JsonObserver {
        JsonObserver { out: Mutex::new(out) }
    }

    fn emit(&self, v: serde_json::Value) {
        if let Ok(mut out) = self.out.lock() {
            // A closed pipe (`| head`) must not fail the run.
            let _ = writeln!(out, "{v}").and_then(|_| out.flush());
        }
    }
}

impl Observer for JsonObserver {
    fn planned(&self, plan: &Plan) {
        let stages: Vec<serde_json::Value> =
            plan.entries().iter().map(|e| serde_json::to_value(e).expect("plan entries serialize")).collect();
        self.emit(json!({"event": "plan", "stages": stages}));
    }
    fn stage_started(&self, stage: &str, key: &StageKey, reasons: &[Reason]) {
        self.emit(json!({"event": "stage_started", "stage": stage, "key": key, "reasons": reasons}));
    }
    fn progress(&self, stage: &str, done: u64, total: u64, message: &str) {
        self.emit(json!({"event": "progress", "stage": stage, "done": done, "total": total, "message": message}));
    }
    fn stage_finished(&self, stage: &str, hit: bool, duration: Duration, key: &StageKey) {
        self.emit(json!({
            "event": "stage_finished",
            "stage": stage,
            "hit": hit,
            "cache": if hit { Some("local") } else { None },
            "duration_ms": duration.as_millis() as u64,
            "key": key,
        }));
    }
    fn stage_failed(&self, stage: &str, message: &str) {
        self.emit(json!({"event": "stage_failed", "stage": stage, "error": message}));
    }
    fn stage_waiting(&self, stage: &str, key: &StageKey, holder: &str) {
        self.emit(json!({"event": "stage_waiting", "stage": stage, "key": key, "holder": holder}));
    }
    fn stage_remote_hit(&self, stage: &str, duration: Duration, key: &StageKey, pulled_bytes: u64) {
        self.emit(json!({
            "event": "stage_finished",
            "stage": stage,
            "hit": true,
            "cache": "remote",
            "pulled_bytes": pulled_bytes,
            "duration_ms": duration.as_millis() as u64,
            "key": key,
        }));
    }
    fn remote_pushed(&self, s: &PushSummary) {
        for p in &s.pushed {
            self.emit(json!({
                "event": "remote_push",
                "stage": p.stage_name,
                "key": p.key,
                "blobs": p.blobs_uploaded,
                "bytes": p.bytes_uploaded,
                "manifest": p.manifest,
            }));
        }
        for (stage, error) in &s.failed {
            self.emit(json!({"event": "remote_push_failed", "stage": stage, "error": error}));
        }
    }
    fn summary(&self, r: &RunReport) {
        self.emit(json!({
            "event": "summary",
            "run_id": r.run_id,
            "stages": r.stages.len(),
            "hits": r.hits(),
            "computed": r.computed(),
            "failed": r.failed(),
            "not_run": r.not_run(),
            "remote_hits": r.remote_hits(),
            "remote": r.remote,
            "duration_ms": r.elapsed.as_millis() as u64,
        }));
    }
}

/// When to draw progress bars (`--progress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Progress {
    /// Bars when stderr is a terminal and `TERM` is not `dumb`.
    #[default]
    Auto,
    /// Bars whenever stderr is a terminal, even with `TERM=dumb`. Never into a pipe or file:
    /// a visible bar on a piped stderr is what hangs and garbles CI logs.
    Always,
    /// No bars and no progress lines.
    Never,
}

/// What the terminal allows, decided once from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermPolicy {
    pub bars: bool,
    pub color: bool,
    /// Without bars, print a progress line now and then (CI logs still show life).
    pub progress_lines: bool,
}

impl TermPolicy {
    /// `no_color`: the value of `NO_COLOR` (any non-empty value disables colour, no-color.org).
    pub fn decide(mode: Progress, stderr_is_tty: bool, term: Option<&str>, no_color: Option<&str>) -> TermPolicy {
        let dumb = term == Some("dumb");
        let bars = stderr_is_tty
            && match mode {
                Progress::Auto => !dumb,
                Progress::Always => true,
                Progress::Never => false,
            };
        TermPolicy {
            bars,
            color: stderr_is_tty && !dumb && no_color.is_none_or(str::is_empty),
            progress_lines: !bars && mode != Progress::Never,
        }
    }

    pub fn from_env(mode: Progress) -> TermPolicy {
        let term = std::env::var("TERM").ok();
        let no_color = std::env::var("NO_COLOR").ok();
        TermPolicy::decide(mode, std::io::stderr().is_terminal(), term.as_deref(), no_color.as_deref())
    }
}

/// Without bars, at most one progress line per stage this often.
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(10);

/// Human output on stderr: one line per stage event, progress bars on a terminal, and a
/// Bazel-style summary line.
pub struct HumanObserver {
    out: Mutex<Box<dyn Write + Send>>,
    policy: TermPolicy,
    multi: Option<MultiProgress>,
    bars: Mutex<BTreeMap<String, ProgressBar>>,
    last_line: Mutex<BTreeMap<String, Instant>>,
}

impl HumanObserver {
    /// Writes to stderr; bars and colour as `mode`, the terminal, `NO_COLOR` and `TERM` allow.
    pub fn new(mode: Progress) -> HumanObserver {
        let policy = TermPolicy::from_env(mode);
        let multi = policy.bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        HumanObserver::build(Box::new(std::io::stderr()), policy, multi)
    }

    /// Writes to `out` without bars (tests, log files).
    pub fn with_writer(out: Box<dyn Write + Send>, color: bool) -> HumanObserver {
        HumanObserver::build(out, TermPolicy { bars: false, color, progress_lines: true }, None)
    }

    fn build(out: Box<dyn Write + Send>, policy: TermPolicy, multi: Option<MultiProgress>) -> HumanObserver {
        HumanObserver {
            out: Mutex::new(out),
            policy,
            multi,
            bars: Mutex::new(BTreeMap::new()),
            last_line: Mutex::new(BTreeMap::new()),
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.policy.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    /// Prints above the bars while any are drawn, else straight to the writer (indicatif pads
    /// its lines to the terminal width, which is noise when there is nothing to keep clear of).
    fn line(&self, s: &str) {
        let drawing = self.bars.lock().map(|b| !b.is_empty()).unwrap_or(false);
        if let (Some(m), true) = (&self.multi, drawing) {
            let _ = m.println(s);
        } else if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{s}").and_then(|_| out.flush());
        }
    }

    fn short_key(&self, key: &StageKey) -> String {
        self.paint("2", &format!("[key {}…]", &key.short()[..6]))
    }

    fn drop_bar(&self, stage: &str) {
        if let Ok(mut bars) = self.bars.lock() {
            if let Some(b) = bars.remove(stage) {
                b.finish_and_clear();
                if let Some(m) = &self.multi {
                    m.remove(&b);
                }
            }
        }
    }
}

/// `0.4 s`, `12.3 s`, `2 min 05 s`, `1 h 02 min`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        let s = s as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        let s = s as u64;
        format!("{} h {:02} min", s / 3600, s % 3600 / 60)
    }
}

impl Observer for HumanObserver {
    fn stage_started(&self, stage: &str, _key: &StageKey, reasons: &[Reason]) {
        let why: Vec<String> = reasons.iter().map(|r| r.describe(stage)).collect();
        let why = if why.is_empty() { String::new() } else { format!("  {}", why.join("; ")) };
        self.line(&format!("{} {stage} running…{why}", self.paint("33", "▶")));
        if let Some(m) = &self.multi {
            // A spinner until the stage reports a total, then a bar.
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("  {spinner} {prefix} {elapsed} {msg}")
                    .expect("spinner template is valid"),
            );
            bar.set_prefix(stage.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            if let Ok(mut bars) = self.bars.lock() {
                bars.insert(stage.to_string(), bar);
            }
        }
    }

    fn progress(&self, stage: &str, done: u64, total: u64, message: &str) {
        if let Some(bar) = self.bars.lock().ok().and_then(|b| b.get(stage).cloned()) {
            if total > 0 && bar.length().is_none() {
                bar.set_style(
                    ProgressStyle::with_template("  {spinner} {prefix} {wide_bar} {pos}/{len} {msg} ({eta})")
                        .expect("bar template is valid")
                        .progress_chars("=> "),
                );
            }
            if total > 0 {
                bar.set_length(total);
            }
            bar.set_position(done);
            bar.set_message(message.to_string());
            return;
        }
        if !self.policy.progress_lines {
            return;
        }
        let now = Instant::now();
        let due = match self.last_line.lock() {
            Ok(mut last) => match last.get(stage) {
                Some(t) if now.duration_since(*t) < PROGRESS_LINE_EVERY => false,
                _ => {
                    last.insert(stage.to_string(), now);
                    true
                }
            },
            Err(_) => false,
        };
        if due {
            let msg = if message.is_empty() { String::new() } else { format!("  {message}") };
            self.line(&format!("  {stage}  {done}/{total}{msg}"));
        }
    }

    fn stage_finished(&self, stage: &str, hit: bool, duration: Duration, key: &StageKey) {
        self.drop_bar(stage);
        let tick = self.paint("32", "✓");
        if hit {
            self.line(&format!("{tick} {stage}  cached (local)  {}", self.short_key(key)));
        } else {
            self.line(&format!("{tick} {stage} computed in {}  {}", human_duration(duration), self.short_key(key)));
        }
    }

    fn stage_waiting(&self, stage: &str, key: &StageKey, holder: &str) {
        self.line(&format!(
            "{} {stage} waiting: {} is computing it [key {}]; polling the remote",
            self.paint("33", "…"),
            holder,
            key.short()
        ));
    }

    fn stage_failed(&self, stage: &str, message: &str) {
        self.drop_bar(stage);
        self.line(&format!("{} {stage} failed: {message}", self.paint("31", "✗")));
    }

    fn stage_remote_hit(&self, stage: &str, _duration: Duration, key: &StageKey, pulled_bytes: u64) {
        self.drop_bar(stage);
        let pulled = if pulled_bytes > 0 {
            format!(", pulled {}", wdro_cache::maint::human(pulled_bytes))
        } else {
            String::new()
        };
        self.line(&format!("{} {stage}  cached (remote{pulled})  {}", self.paint("32", "✓"), self.short_key(key)));
    }

    fn remote_pushed(&self, s: &PushSummary) {
        let created = s.pushed.iter().filter(|p| p.manifest == wdro_cache::ManifestPut::Created).count();
        self.line(&format!(
            "{} pushed {created} stage(s) to the remote cache ({} in {} blobs){}",
            self.paint("36", "↑"),
            wdro_cache::maint::human(s.bytes_uploaded()),
            s.blobs_uploaded(),
            if s.failed.is_empty() { String::new() } else { format!("; {} push(es) failed", s.failed.len()) }
        ));
    }

    fn summary(&self, report: &RunReport) {
        let groups = report.reasons_by_category();
        if !groups.is_empty() {
            self.line("Reasons:");
            for (cat, names) in groups {
                self.line(&format!("  {}: {}", category_label(cat), names.join(", ")));
            }
        }
        self.line(&report.summary_line());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::exec::testing::{env, open_store, FakeStage};
    use crate::exec::{execute, ExecOptions, NullObserver};
    use crate::plan::{plan, PlanOptions};

    fn pipeline(lr: f64) -> Pipeline {
        Pipeline::new(vec![
            FakeStage::new("fetch").build(),
            FakeStage::new("train").param("lr", lr).input("data", "fetch", "out").build(),
            FakeStage::new("eval.w2").input("model", "train", "out").input("data", "fetch", "out").build(),
            FakeStage::new("report").input("m", "eval.w2", "out").build(),
        ])
        .unwrap()
    }

    fn planned() -> (Pipeline, Plan) {
        let (_d, store) = open_store();
        execute(&pipeline(0.1), &store, &ExecOptions::new(env(), "t"), &NullObserver).unwrap();
        let p = pipeline(0.2);
        let mut o = PlanOptions::new(env());
        o.force.insert("report".into());
        let plan = plan(&p, &store, &o).unwrap();
        (p, plan)
    }

    #[test]
    fn dot_marks_status_and_labels_edges() {
        let (p, plan) = planned();
        let dot = to_dot(&p, Some(&plan));
        assert!(dot.starts_with("digraph wdro {\n  rankdir=LR;\n"));
        assert!(
            dot.contains("  \"fetch\" [label=\"fetch\\ncached\", fillcolor=\"#b7e1a1\", color=\"#2e7d32\"];\n"),
            "{dot}"
        );
        assert!(dot.contains("  \"train\" [label=\"train\\nto run\", fillcolor=\"#ffcc80\""), "{dot}");
        assert!(dot.contains("  \"report\" [label=\"report\\nforced\", fillcolor=\"#ef9a9a\""), "{dot}");
        assert!(dot.contains("  \"train\" -> \"eval.w2\" [label=\"model\"];\n"), "{dot}");
        assert!(dot.ends_with("}\n"));
        let plain = to_dot(&p, None);
        assert!(plain.contains("  \"fetch\" [label=\"fetch\", fillcolor=\"#ffffff\""));
    }

    #[test]
    fn mermaid_uses_safe_ids_and_classes() {
        let (p, plan) = planned();
        let m = to_mermaid(&p, Some(&plan));
        let expected = "flowchart LR\n  n0[\"fetch<br/>cached\"]:::cached\n  n1[\"train<br/>to run\"]:::torun\n  n2[\"eval.w2<br/>to run\"]:::torun\n  n3[\"report<br/>forced\"]:::forced\n  n0 -->|data| n1\n  n0 -->|data| n2\n  n1 -->|model| n2\n  n2 -->|m| n3\n  classDef cached fill:#b7e1a1,stroke:#2e7d32\n  classDef torun fill:#ffcc80,stroke:#ef6c00\n  classDef forced fill:#ef9a9a,stroke:#c62828\n";
        assert_eq!(m, expected);
    }

    #[test]
    fn ascii_lists_stages_with_markers_and_inputs() {
        let (p, plan) = planned();
        let a = to_ascii(&p, Some(&plan));
        let expected = "\
[=] fetch    cached
[+] train    to run (params changed)
      data <- fetch.out
[+] eval.w2  to run (upstream will run)
      data  <- fetch.out
      model <- train.out
[!] report   forced (upstream will run)
      m <- eval.w2.out
legend: [=] cached  [+] to run  [!] forced
";
        assert_eq!(a, expected);
        assert_eq!(to_ascii(&p, None).lines().next(), Some("[ ] fetch"));
    }

    /// A writer tests can read back.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn opts() -> ExecOptions {
        let mut o = ExecOptions::new(env(), "0.1.0-test");
        o.jobs = 4;
        o
    }

    #[test]
    fn json_events_one_per_line() {
        let (_d, store) = open_store();
        let p = Pipeline::new(vec![FakeStage::new("a").build(), FakeStage::new("b").input("x", "a", "out").build()])
            .unwrap();
        execute(&p, &store, &opts(), &NullObserver).unwrap();
        let p2 = Pipeline::new(vec![
            FakeStage::new("a").build(),
            FakeStage::new("b").input("x", "a", "out").param("k", 2).build(),
        ])
        .unwrap();
        let buf = Buf::default();
        let obs = JsonObserver::with_writer(Box::new(buf.clone()));
        execute(&p2, &store, &opts(), &obs).unwrap();
        let events: Vec<serde_json::Value> = buf.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["plan", "stage_finished", "stage_started", "progress", "stage_finished", "summary"]);
        assert_eq!(events[1]["stage"], "a");
        assert_eq!(events[1]["hit"], true);
        assert_eq!(events[1]["cache"], "local");
        assert_eq!(events[1]["key"].as_str().unwrap().len(), 64);
        assert_eq!(
            events[2]["reasons"][0],
            serde_json::json!({"reason": "param_changed", "field": "k", "old": null, "new": 2})
        );
        assert_eq!(events[4]["hit"], false);
        assert_eq!(events[4]["cache"], serde_json::Value::Null);
        assert_eq!(events[5]["hits"], 1);
        assert_eq!(events[5]["computed"], 1);
        assert_eq!(events[0]["stages"][1]["status"], "to_run");
    }

    #[test]
    fn human_lines_and_summary() {
        let (_d, store) = open_store();
        let p = |v: u32| {
            Pipeline::new(vec![
                FakeStage::new("fetch").build(),
                FakeStage::new("attack.w2").version(v).input("x", "fetch", "out").build(),
                FakeStage::new("bad").fail("no such file data.bin; run `wdro fetch`").build(),
            ])
            .unwrap()
        };
        let good = |v: u32| {
            Pipeline::new(vec![
                FakeStage::new("fetch").build(),
                FakeStage::new("attack.w2").version(v).input("x", "fetch", "out").build(),
            ])
            .unwrap()
        };
        execute(&good(1), &store, &opts(), &NullObserver).unwrap();
        let buf = Buf::default();
        let obs = HumanObserver::with_writer(Box::new(buf.clone()), false);
        let mut o = opts();
        o.jobs = 1;
        let _ = execute(&p(2), &store, &o, &obs).unwrap_err();
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("▶ bad running…  never run: no record for this stage name"), "{text}");
        assert_eq!(lines[1], "  bad  1/2  half way");
        assert_eq!(lines[2], "✗ bad failed: no such file data.bin; run `wdro fetch`");
        assert!(lines[3].starts_with("✓ fetch  cached (local)  [key "), "{text}");
        assert!(lines[3].ends_with("…]"));
        assert_eq!(lines[4], "3 stages: 1 cache hit, 0 executed, 1 failed, 1 not run");
        let buf = Buf::default();
        let obs = HumanObserver::with_writer(Box::new(buf.clone()), false);
        execute(&good(2), &store, &o, &obs).unwrap();
        let text = buf.text();
        assert!(text.contains("▶ attack.w2 running…  version 1 → 2 (the stage's implementation changed)\n"), "{text}");
        let computed = text.lines().find(|l| l.starts_with("✓ attack.w2 computed in ")).expect("a computed line");
        assert!(computed.contains(" s  [key ") && computed.ends_with("…]"), "{computed}");
        assert!(
            text.ends_with("Reasons:\n  code version changed: attack.w2\n2 stages: 1 cache hit, 1 executed\n"),
            "{text}"
        );
    }

    #[test]
    fn terminal_policy() {
        let d = TermPolicy::decide;
        assert_eq!(
            d(Progress::Auto, true, Some("xterm"), None),
            TermPolicy { bars: true, color: true, progress_lines: false }
        );
        // Never into a pipe, whatever the mode.
        assert!(!d(Progress::Always, false, Some("xterm"), None).bars);
        assert!(!d(Progress::Auto, false, Some("xterm"), None).color);
        assert!(d(Progress::Auto, false, None, None).progress_lines);
        assert!(!d(Progress::Never, false, None, None).progress_lines);
        assert!(!d(Progress::Never, true, Some("xterm"), None).bars);
        // TERM=dumb: no colour, no bars unless asked for.
        assert_eq!(
            d(Progress::Auto, true, Some("dumb"), None),
            TermPolicy { bars: false, color: false, progress_lines: true }
        );
        assert!(d(Progress::Always, true, Some("dumb"), None).bars);
        // NO_COLOR: any non-empty value.
        assert!(!d(Progress::Auto, true, Some("xterm"), Some("1")).color);
        assert!(d(Progress::Auto, true, Some("xterm"), Some("")).color);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(12_345)), "12.3 s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2 min 05 s");
        assert_eq!(human_duration(Duration::from_secs(3720)), "1 h 02 min");
    }
}
