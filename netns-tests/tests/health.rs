//! `kubespanctl health` on a real mesh: healthy first, then each check made to fail on purpose
//! (firewall table deleted, policy rule deleted, large packets dropped on the underlay, a node
//! with another secret, a peer killed, the discovery service stopped, a discovery service whose
//! clock is two minutes ahead), judged by the exit code and the check's status in `-o json`.

use std::time::Duration;

use netns_tests::{AgentOptions, CLUSTER_SECRET, Lab, binary, require_root, run};
use serde_json::Value;

const UP: Duration = Duration::from_secs(20);

/// `kubespanctl health` on node `n`: its exit code and its JSON report.
fn health(lab: &Lab, n: usize, extra: &[&str]) -> anyhow::Result<(i32, Value)> {
    let node = lab.node(n);
    let socket = node.socket();
    let mut args = vec![
        "--socket",
        socket.to_str().unwrap_or_default(),
        "-o",
        "json",
        "health",
    ];
    args.extend_from_slice(extra);
    let output = run(binary("kubespanctl").to_str().unwrap_or_default(), &args)?;
    let report: Value = serde_json::from_slice(&output.stdout).map_err(|e| {
        anyhow::anyhow!(
            "kubespanctl health printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok((output.status.code().unwrap_or(-1), report))
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

fn status_of(report: &Value, name: &str) -> String {
    check(report, name)["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits until node `n`'s check `name` has `status`; returns the report.
fn wait_for_check(lab: &Lab, n: usize, name: &str, status: &str) -> anyhow::Result<Value> {
    let mut last = Value::Null;
    let waited = lab.wait_for(
        &format!("check {name} to be {status}"),
        UP,
        || match health(lab, n, &["--skip-path-probe"]) {
            Ok((_, report)) => {
                let done = status_of(&report, name) == status;
                last = report;
                done
            }
            Err(_) => false,
        },
    );
    waited.map_err(|e| anyhow::anyhow!("{e}\nlast report: {last:#}"))?;
    Ok(last)
}

#[test]
fn each_health_check_fails_when_its_subject_breaks() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(4)?;
    lab.start_server()?;
    for n in 1..=3 {
        lab.start_agent(n, &AgentOptions::default())?;
    }
    lab.wait_for("three nodes up", UP, || (1..=3).all(|n| lab.all_up(n, 2)))?;

    // Healthy: every check ok (the path probe included), exit 0, also with --strict.
    let (code, report) = health(&lab, 1, &["--strict"])?;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["status"], "ok", "{report:#}");
    for name in [
        "discovery",
        "public-address",
        "decrypt",
        "clock",
        "peers",
        "path-mtu",
        "firewall",
        "routing",
        "listen-port",
    ] {
        assert_eq!(status_of(&report, name), "ok", "{name}: {report:#}");
    }
    assert!(
        check(&report, "path-mtu")["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("1420-byte packets reach 2 of 2 peers"),
        "{report:#}"
    );

    // Underlay dropping large datagrams: small echoes pass, MTU-sized ones do not.
    let node1 = lab.node(1).netns.clone();
    let nft = |script: &str| -> anyhow::Result<()> {
        let out = run("ip", &["netns", "exec", &node1, "nft", script])?;
        anyhow::ensure!(
            out.status.success(),
            "nft {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    nft("add table inet health_test")?;
    nft("add chain inet health_test out { type filter hook output priority 0; }")?;
    nft("add rule inet health_test out udp length > 1000 drop")?;
    let (code, report) = health(&lab, 1, &[])?;
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(status_of(&report, "path-mtu"), "fail", "{report:#}");
    assert_eq!(
        status_of(&report, "peers"),
        "ok",
        "small packets still pass"
    );
    nft("delete table inet health_test")?;
    let (code, report) = health(&lab, 1, &[])?;
    assert_eq!(code, 0, "{report:#}");

    // The firewall table and a policy rule removed behind the agent's back.
    nft("delete table inet openspan_test")?;
    let (code, report) = health(&lab, 1, &["--skip-path-probe"])?;
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(status_of(&report, "firewall"), "fail", "{report:#}");
    assert_eq!(status_of(&report, "path-mtu"), "skipped", "{report:#}");
    let out = run(
        "ip",
        &["-n", &node1, "-6", "rule", "del", "priority", "32500"],
    )?;
    assert!(out.status.success(), "{out:?}");
    let (_, report) = health(&lab, 1, &["--skip-path-probe"])?;
    assert_eq!(status_of(&report, "routing"), "fail", "{report:#}");
    assert!(
        check(&report, "routing")["details"]
            .to_string()
            .contains("IPv6 rule"),
        "{report:#}"
    );

    // A node with the cluster id but another secret: its record does not open (a warning:
    // this node is fine, the other one is not). --strict turns it into exit 3.
    let config = lab.agent_config(4, &AgentOptions::default()).replace(
        CLUSTER_SECRET,
        "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=",
    );
    lab.start_agent_with_config(4, &config)?;
    let report = wait_for_check(&lab, 2, "decrypt", "warn")?;
    assert!(
        check(&report, "decrypt")["summary"]
            .as_str()
            .unwrap_or_default()
            .starts_with("1 member record(s) do not open"),
        "{report:#}"
    );
    let (code, _) = health(&lab, 2, &["--skip-path-probe"])?;
    assert_eq!(code, 0, "a warning alone is healthy");
    let (code, _) = health(&lab, 2, &["--skip-path-probe", "--strict"])?;
    assert_eq!(code, 3, "--strict fails on warnings");

    // A peer gone: down, with its last handshake and the endpoints tried.
    lab.node_mut(3).kill_agent();
    let report = wait_for_check(&lab, 2, "peers", "fail")?;
    let details = check(&report, "peers")["details"].to_string();
    assert!(
        details.contains("node-3: down, last handshake") && details.contains("tried"),
        "{report:#}"
    );

    // The discovery service gone.
    lab.stop_server();
    let report = wait_for_check(&lab, 2, "discovery", "fail")?;
    assert!(
        check(&report, "discovery")["details"]
            .to_string()
            .contains("last error"),
        "{report:#}"
    );
    Ok(())
}

/// The discovery service's clock two minutes ahead (faketime): this node's clock is reported
/// two minutes behind it, a warning (exit 0, 3 with --strict).
#[test]
fn a_clock_two_minutes_off_the_discovery_services_warns() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = Lab::new(1)?;
    lab.start_server_with_clock_offset(120)?;
    lab.start_agent(1, &AgentOptions::default())?;
    let report = wait_for_check(&lab, 1, "clock", "warn")?;
    let summary = check(&report, "clock")["summary"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        summary.contains("s behind the clock of http://"),
        "{report:#}"
    );
    let seconds: u64 = summary
        .split("clock is ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {summary:?}"));
    assert!((115..=125).contains(&seconds), "{summary}");
    assert!(
        check(&report, "clock")["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("synchronise the clock"),
        "{report:#}"
    );
    let (code, _) = health(&lab, 1, &["--skip-path-probe", "--strict"])?;
    assert_eq!(code, 3, "--strict fails on the clock warning");
    Ok(())
}
