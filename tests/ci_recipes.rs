//! The CI recipes in examples/ci parse as YAML, use only subcommands and flags the real binary
//! has (checked against its `--help`), restore the cache from the remote, run `wdro eval` with
//! gates whose metrics the demo's evaluation table has, and upload the JUnit file.

use std::collections::BTreeMap;
use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

use crate::report_support::demo_config;
use crate::util::Dir;

fn load(rel: &str) -> Yaml {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"));
    assert_eq!(docs.len(), 1, "{rel}: one YAML document");
    docs.remove(0)
}

/// Shell words of a script, with `&&`, `||`, `;`, `|` and redirections as separate words;
/// quotes removed, backslash-newline joined.
fn shell_words(script: &str) -> Vec<String> {
    let s = script.replace("\\\n", " ");
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut has = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                has = true;
                for d in chars.by_ref() {
                    if d == '\'' {
                        break;
                    }
                    cur.push(d);
                }
            }
            '"' => {
                has = true;
                while let Some(d) = chars.next() {
                    match d {
                        '"' => break,
                        '\\' => cur.extend(chars.next()),
                        d => cur.push(d),
                    }
                }
            }
            c if c.is_whitespace() => {
                if has {
                    words.push(std::mem::take(&mut cur));
                    has = false;
                }
                if c == '\n' {
                    words.push(";".into());
                }
            }
            '&' | '|' | ';' | '>' => {
                if has {
                    words.push(std::mem::take(&mut cur));
                    has = false;
                }
                let mut op = c.to_string();
                if chars.peek() == Some(&c) {
                    op.push(chars.next().unwrap());
                }
                words.push(op);
            }
            c => {
                has = true;
                cur.push(c);
            }
        }
    }
    if has {
        words.push(cur);
    }
    words
}

/// Every `wdro …` invocation in a script: the words after the program name.
fn wdro_calls(script: &str) -> Vec<Vec<String>> {
    let words = shell_words(script);
    let mut calls = Vec::new();
    for seg in words.split(|w| matches!(w.as_str(), "&&" | "||" | ";" | "|" | ">" | ">>")) {
        if let Some(first) = seg.first() {
            if first == "wdro" || first.ends_with("/wdro") {
                calls.push(seg[1..].to_vec());
            }
        }
    }
    calls
}

/// `$NAME` and `${NAME}` from the recipe's variables.
fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${{{k}}}"), v).replace(&format!("${k}"), v);
    }
    out
}

/// Flags (`--name` → takes a value) and subcommands listed by `wdro <path> --help`.
struct Help {
    flags: BTreeMap<String, bool>,
    commands: Vec<String>,
}

fn help(d: &Dir, path: &[String]) -> Help {
    let out = d.wdro().args(path).args(["--help"]).ok();
    let mut flags = BTreeMap::new();
    let mut commands = Vec::new();
    let mut in_commands = false;
    for line in out.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if line.ends_with(':') && !line.starts_with(' ') {
            in_commands = false;
        }
        let t = line.trim_start();
        if in_commands && line.starts_with("  ") {
            if let Some(c) = t.split_whitespace().next() {
                commands.push(c.to_string());
            }
        }
        for w in t.split(", ") {
            if let Some(rest) = w.strip_prefix("--") {
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                let takes_value = rest[name.len()..].trim_start().starts_with('<');
                flags.insert(name, takes_value);
            } else if let Some(rest) = w.strip_prefix('-').filter(|r| !r.is_empty() && !r.starts_with('-')) {
                let short: String = rest.chars().take(1).collect();
                let takes_value = rest[1..].trim_start().starts_with('<');
                flags.insert(format!("short:{short}"), takes_value);
            }
        }
    }
    Help { flags, commands }
}

/// Checks one invocation against the binary's help; returns (subcommand path, flags with values).
fn check_call(d: &Dir, args: &[String], recipe: &str) -> (Vec<String>, Vec<(String, Option<String>)>) {
    let mut path: Vec<String> = Vec::new();
    let mut flags = Vec::new();
    let mut h = help(d, &path);
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if let Some(name) = a.strip_prefix("--") {
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (name.to_string(), None),
            };
            let takes = *h.flags.get(&name).unwrap_or_else(|| {
                panic!(
                    "{recipe}: `wdro {}` has no flag --{name} (see `wdro {} --help`)",
                    path.join(" "),
                    path.join(" ")
                )
            });
            let value = if takes && inline.is_none() {
                i += 1;
                Some(args.get(i).unwrap_or_else(|| panic!("{recipe}: --{name} needs a value")).clone())
            } else {
                inline
            };
            flags.push((name, value));
        } else if let Some(s) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let key = format!("short:{}", &s[..1]);
            let takes =
                *h.flags.get(&key).unwrap_or_else(|| panic!("{recipe}: `wdro {}` has no flag {a}", path.join(" ")));
            if takes && s.len() == 1 {
                i += 1;
            }
        } else if h.commands.contains(a) {
            path.push(a.clone());
            h = help(d, &path);
        } else {
            // A positional argument (`report diff A B`, `pull STAGE`), never a misspelt command.
            assert!(h.commands.is_empty(), "{recipe}: `wdro {}` has no subcommand {a:?}", path.join(" "));
        }
        i += 1;
    }
    assert!(!path.is_empty(), "{recipe}: a wdro call without a subcommand: {args:?}");
    (path, flags)
}

fn str_of(y: &Yaml) -> Option<String> {
    y.as_str().map(str::to_string)
}

fn vars_of(y: &Yaml) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    if let Yaml::Hash(h) = y {
        for (k, x) in h {
            if let (Some(k), Some(x)) = (k.as_str(), x.as_str()) {
                v.insert(k.to_string(), x.to_string());
            }
        }
    }
    v
}

/// What every recipe must do, given its `wdro` invocations and the paths it uploads.
fn check_recipe(d: &Dir, recipe: &str, scripts: &[String], vars: &BTreeMap<String, String>, uploaded: &[String]) {
    let mut calls = Vec::new();
    for s in scripts {
        for c in wdro_calls(s) {
            calls.push(check_call(d, &c, recipe));
        }
    }
    let find = |cmd: &str| calls.iter().find(|(p, _)| p.first().map(String::as_str) == Some(cmd));
    let (_, pull) = find("pull").unwrap_or_else(|| panic!("{recipe}: no `wdro pull` restoring the cache"));
    assert!(pull.iter().any(|(f, _)| f == "remote"), "{recipe}: `wdro pull` without --remote");
    let (_, eval) = find("eval").unwrap_or_else(|| panic!("{recipe}: no `wdro eval`"));
    let gates: Vec<String> = eval.iter().filter(|(f, _)| f == "gate").filter_map(|(_, v)| v.clone()).collect();
    assert!(gates.len() >= 2, "{recipe}: gates {gates:?}");
    for g in &gates {
        wdro_stages::gates::Gate::parse(g).unwrap_or_else(|e| panic!("{recipe}: {e}"));
    }
    let junit = eval.iter().find(|(f, _)| f == "junit").and_then(|(_, v)| v.clone()).expect("--junit FILE");
    assert!(
        uploaded.iter().any(|u| u == &junit || junit.starts_with(u.trim_end_matches('/'))),
        "{recipe}: the JUnit file {junit} is not uploaded ({uploaded:?})"
    );

    // Replay the eval (without the remote, reports and model file) against the demo config in
    // an empty directory: the gates name metrics the table has, so the only complaint is
    // --frozen (exit 6), never a usage error (exit 2).
    let replay = Dir::new();
    let mut args: Vec<String> =
        vec!["--config".into(), demo_config().to_str().unwrap().into(), "eval".into(), "--frozen".into()];
    for (f, v) in eval {
        if ["junit", "report-json", "markdown", "remote", "config"].contains(&f.as_str()) {
            continue;
        }
        args.push(format!("--{f}"));
        if let Some(v) = v {
            args.push(expand(v, vars));
        }
    }
    let (_, err) = replay.wdro().args(&args).code(6);
    assert!(err.contains("--frozen"), "{recipe}: {err}");
}

#[test]
fn github_actions_workflow() {
    let d = Dir::new();
    let y = load("examples/ci/github-actions.yml");
    assert!(y["name"].as_str().is_some());
    // `on:` is a string key in YAML 1.2 (a boolean only in YAML 1.1 readers).
    let on = y.as_hash().unwrap().iter().find(|(k, _)| k.as_str() == Some("on") || *k == &Yaml::Boolean(true));
    assert!(on.is_some_and(|(_, v)| v.as_hash().is_some()), "a trigger");
    let vars = vars_of(&y["env"]);
    let jobs = y["jobs"].as_hash().expect("jobs");
    assert_eq!(jobs.len(), 1);
    let job = jobs.values().next().unwrap();
    assert!(job["runs-on"].as_str().is_some());
    let steps = job["steps"].as_vec().expect("steps");
    let scripts: Vec<String> = steps.iter().filter_map(|s| str_of(&s["run"])).collect();
    let mut uploaded = Vec::new();
    for s in steps {
        if s["uses"].as_str().is_some_and(|u| u.starts_with("actions/upload-artifact@")) {
            let p = s["with"]["path"].as_str().expect("upload path");
            uploaded.extend(p.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()));
            assert_eq!(s["if"].as_str(), Some("always()"), "upload the JUnit file also when a gate fails");
        }
        assert!(s["run"].as_str().is_some() || s["uses"].as_str().is_some(), "a step runs or uses something");
    }
    check_recipe(&d, "github-actions.yml", &scripts, &vars, &uploaded);
}

#[test]
fn gitlab_ci_job() {
    let d = Dir::new();
    let y = load("examples/ci/.gitlab-ci.yml");
    let vars = vars_of(&y["variables"]);
    let stages: Vec<&str> = y["stages"].as_vec().expect("stages").iter().filter_map(Yaml::as_str).collect();
    let job = &y["robustness"];
    assert!(stages.contains(&job["stage"].as_str().expect("job stage")));
    let mut scripts = Vec::new();
    for key in ["before_script", "script", "after_script"] {
        if let Some(v) = job[key].as_vec() {
            scripts.extend(v.iter().filter_map(str_of));
        }
    }
    let junit = job["artifacts"]["reports"]["junit"].as_str().expect("artifacts:reports:junit").to_string();
    assert_eq!(job["artifacts"]["when"].as_str(), Some("always"), "keep the report when a gate fails");
    check_recipe(&d, ".gitlab-ci.yml", &scripts, &vars, &[junit]);
}

#[test]
fn shell_words_and_calls() {
    let w = shell_words("a 'b c' \"d \\\"e\\\"\" && f\\\n g >> out; h|i");
    assert_eq!(w, ["a", "b c", "d \"e\"", "&&", "f", "g", ">>", "out", ";", "h", "|", "i"]);
    let calls = wdro_calls("scripts/setup.sh && target/release/wdro --set a=b eval --gate 'x >= 1'\ncat x");
    assert_eq!(calls, [vec!["--set", "a=b", "eval", "--gate", "x >= 1"]]);
}
