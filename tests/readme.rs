//! The README's commands are the ones CI runs.

fn readme_commands() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut in_block = false;
    let mut cmds = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block && line.starts_with("scripts/setup.sh") {
            cmds.push(line.trim().to_string());
        }
    }
    cmds
}

#[test]
fn readme_has_exactly_two_commands_and_ci_runs_the_test_one_verbatim() {
    let cmds = readme_commands();
    assert_eq!(cmds.len(), 2, "README should show exactly two setup commands, found {cmds:?}");
    assert!(cmds[0].contains("wdro run") || cmds[0].contains("-- run"), "first command runs the pipeline: {}", cmds[0]);
    assert!(cmds[1].contains("cargo test"), "second command runs the tests: {}", cmds[1]);
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == cmds[1]),
        ".ci/run must contain the README test command verbatim: {}",
        cmds[1]
    );
}
