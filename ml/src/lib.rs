//! `wdro-ml`: everything that runs on libtorch through `tch`. The `wdro` CLI never links this
//! crate; it starts the `wdro-worker` binary for each torch stage that must run.
