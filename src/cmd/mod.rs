//! Subcommand implementations.

pub mod cache;
pub mod config;
pub mod eval;
pub mod models;
pub mod remote;
pub mod report;
pub mod run;
pub mod sweep;
pub mod worker;

use anyhow::Result;

use crate::{Cli, Command};

pub fn dispatch(cli: &Cli) -> Result<i32> {
    let g = &cli.global;
    match &cli.command {
        Command::Run(a) => run::run(g, a),
        Command::Plan(a) => run::plan(g, a),
        Command::Why(a) => run::why(g, a),
        Command::Dag(a) => run::dag(g, a),
        Command::Config(c) => config::dispatch(g, c),
        Command::Cache(c) => cache::dispatch(g, c),
        Command::Models(c) => models::dispatch(g, c),
        Command::Eval(a) => eval::eval(g, a),
        Command::Report(c) => report::dispatch(g, c),
        Command::Push(a) => remote::push(g, a),
        Command::Pull(a) => remote::pull(g, a),
        Command::Remote(c) => remote::dispatch(g, c),
        Command::Worker(a) => worker::worker(g, a),
    }
}
