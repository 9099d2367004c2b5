//! `wdro config show`.

use anyhow::Result;
use clap::Subcommand;

use crate::context::load_config;
use crate::Global;

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the resolved config (file + --set overrides + defaults) as TOML, or JSON with --json.
    Show,
    /// Check the config and the pipeline it implies; exit 2 with the problem if invalid.
    Check,
}

pub fn dispatch(g: &Global, c: &ConfigCmd) -> Result<i32> {
    let (path, cfg) = load_config(g)?;
    match c {
        ConfigCmd::Show => {
            if g.json {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
            } else {
                println!(
                    "# resolved from {}{}",
                    path.display(),
                    if g.sets.is_empty() { String::new() } else { format!(" with --set {}", g.sets.join(" --set ")) }
                );
                print!("{}", cfg.to_toml());
            }
        }
        ConfigCmd::Check => {
            let p = crate::context::build_pipeline(&cfg)?;
            eprintln!("{}: ok ({} stages)", path.display(), p.len());
        }
    }
    Ok(0)
}
