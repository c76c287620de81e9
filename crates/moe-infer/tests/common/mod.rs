//! Helpers shared by the binary's integration tests: run `moe-infer`, read its JSON.

use std::process::{Command, Output};

use serde_json::Value;

/// Runs the `moe-infer` binary built for these tests with `args`.
pub fn moe_infer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe-infer"))
        .args(args)
        .output()
        .expect("binary runs")
}

/// The one JSON object a successful run printed on stdout (fails the test otherwise).
pub fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON object")
}
