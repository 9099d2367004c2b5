//! `wdro models ls`: the model registry.

use anyhow::Result;
use clap::Subcommand;

use crate::Global;

#[derive(Subcommand, Debug)]
pub enum ModelsCmd {
    /// List known models: RobustBench CIFAR-10 names (Linf and L2) and the offline models.
    Ls,
}

pub fn dispatch(g: &Global, c: &ModelsCmd) -> Result<i32> {
    match c {
        ModelsCmd::Ls => {
            let all = wdro_stages::registry::all();
            if g.json {
                println!("{}", serde_json::to_string_pretty(all)?);
                return Ok(0);
            }
            println!("{:<40} {:<6} {:<28} {:>7} {:>7}  checkpoint", "name", "threat", "architecture", "clean%", "AA%");
            for m in all {
                println!(
                    "{:<40} {:<6} {:<28} {:>7} {:>7}  {}",
                    m.name,
                    m.threat_str(),
                    m.arch_str(),
                    m.clean_acc.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into()),
                    m.aa_acc.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into()),
                    m.checkpoint_url().unwrap_or_else(|| "not known (use file:PATH)".into())
                );
            }
        }
    }
    Ok(0)
}
