//! `wdro-stages`: the stage catalogue (ids, versions, typed params, inputs, outputs, resources)
//! and config → DAG. Torch-free: torch stages run in `wdro-worker` processes.
