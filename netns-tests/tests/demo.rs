//! `scripts/demo.sh`, the README's one-command demo, run the way a user runs it: it must bring up
//! its three-node mesh, show every node's status and peers, ping through the mesh, and leave
//! nothing behind.

use std::path::Path;
use std::process::Command;

use netns_tests::{binary, require_root, run};

/// The demo's own bound on the mesh coming up is 30 s; the whole run gets this many seconds
/// before timeout(1) sends SIGTERM, which the script answers by cleaning up.
const LIMIT_SECS: u64 = 120;

#[test]
fn the_demo_script_brings_up_a_mesh_and_pings_through_it() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
    // The binaries the other tests run (the target directory, or OPENSPAN_TEST_BIN_DIR), so the
    // script does not build them itself.
    let agent = binary("kubespan-agent");
    let bin_dir = agent.parent().expect("binary directory");
    let output = Command::new("timeout")
        .args(["-s", "TERM", "-k", "10", &format!("{LIMIT_SECS}s"), "bash"])
        .arg(&script)
        .env("OPENSPAN_DEMO_BIN_DIR", bin_dir)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let all = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(
        output.status.success(),
        "demo.sh failed ({}):\n{all}",
        output.status
    );
    for n in 1..=3 {
        for command in ["status", "peers", "health"] {
            assert!(
                stdout.contains(&format!("node-{n}: kubespanctl {command}")),
                "no `kubespanctl {command}` of node-{n}:\n{all}"
            );
        }
        assert!(
            stdout.contains(&format!("Node:        node-{n} (")),
            "no status of node-{n}:\n{all}"
        );
    }
    assert_eq!(
        stdout
            .matches("Peers:       2 (up 2, down 0, unknown 0)")
            .count(),
        3,
        "not every node has its two peers up:\n{all}"
    );
    assert_eq!(
        stdout.matches("Health:      ok").count(),
        3,
        "not every node is healthy:\n{all}"
    );
    assert!(
        stdout.contains(" 0% packet loss"),
        "no lossless ping through the mesh:\n{all}"
    );
    // It cleaned up after itself: none of its namespaces (named in its first step) is left.
    let switch = stdout
        .split("creating namespace ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the demo named no namespace:\n{all}"));
    let prefix = switch.trim_end_matches("-sw");
    let namespaces = run("ip", &["netns", "list"])?;
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    let leftovers: Vec<&str> = namespaces
        .lines()
        .filter(|l| l.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the demo left namespaces behind: {leftovers:?}"
    );
    Ok(())
}
