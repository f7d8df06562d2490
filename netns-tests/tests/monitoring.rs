//! The monitoring kit in `deploy/monitoring/`: the alert rules pass `promtool check rules` and
//! their unit tests (`promtool test rules`), every alert carries what an operator needs, the
//! Grafana dashboard passes its JSON schema and structural checks, and - the point of it all -
//! every metric an alert or a dashboard query names is one the real binaries export: a discovery
//! server, a relay and two userspace agents in a NAT lab are scraped and compared.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use netns_tests::nat::{Kind, NatLab, ServerOptions, WIREGUARD_PORT};
use netns_tests::{AgentOptions, in_namespace, require_root};

const AGENT_METRICS: &str = "127.0.0.1:9273";
const SERVER_METRICS_PORT: u16 = 2122;
/// Where `NatLab::start_relays` makes the first relay serve its metrics (next to the server).
const RELAY_METRICS_PORT: u16 = 2123;
/// Series Prometheus makes itself for every target; no binary exports them.
const SYNTHETIC: [&str; 1] = ["up"];
/// The prefixes of openspan's metrics: discovery server, agent, relay.
const PREFIXES: [&str; 3] = ["discovery_", "kubespan_", "relay_"];

fn kit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

fn read(name: &str) -> anyhow::Result<String> {
    let path = kit().join(name);
    std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
}

fn promtool(args: &[&str]) -> anyhow::Result<String> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    ensure!(
        found,
        "the monitoring kit's tests need `promtool`, which is not installed (apt-get install --no-install-recommends prometheus, or scripts/deps.sh as root)"
    );
    let output = Command::new("promtool")
        .args(args)
        .current_dir(kit())
        .output()
        .context("run promtool")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    Ok(text)
}

/// One alert of the rules file, as the checks here need it.
#[derive(Debug, Default)]
struct Alert {
    name: String,
    expr: String,
    keys: BTreeMap<String, String>,
}

/// Reads the alerts out of the rules file: each `- alert:` item's `expr` (inline or a folded
/// block) and its other `key: value` lines. promtool checks the YAML itself; this is only for
/// the checks promtool does not make.
fn alerts(rules: &str) -> Vec<Alert> {
    let mut alerts: Vec<Alert> = Vec::new();
    let mut block: Option<(usize, String)> = None;
    for line in rules.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some((min, key)) = &block {
            if indent > *min && !trimmed.is_empty() {
                if let Some(alert) = alerts.last_mut() {
                    let text = if key == "expr" {
                        &mut alert.expr
                    } else {
                        alert.keys.entry(key.clone()).or_default()
                    };
                    if !text.is_empty() {
                        text.push(' ');
                    }
                    text.push_str(trimmed);
                }
                continue;
            }
            block = None;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(name) = trimmed.strip_prefix("- alert: ") {
            alerts.push(Alert {
                name: name.trim().to_owned(),
                ..Alert::default()
            });
            continue;
        }
        let Some(alert) = alerts.last_mut() else {
            continue;
        };
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('>') || value.starts_with('|') {
            // A folded or literal block: its text is on the following, deeper lines.
            block = Some((indent, key.to_owned()));
            if key != "expr" {
                alert.keys.insert(key.to_owned(), String::new());
            }
        } else if key == "expr" {
            alert.expr = value.to_owned();
        } else {
            alert.keys.insert(key.to_owned(), value.to_owned());
        }
    }
    alerts
}

/// GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to dashes.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The metric names a PromQL expression (or a Grafana `label_values(...)` query) uses: the
/// identifiers with openspan's prefixes or the synthetic ones, outside string literals and
/// not Grafana variables (`$relay_job`). Any other identifier used as a selector (followed by
/// `{` or `[`) is returned too, so a typo in a prefix cannot hide.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    let mut previous = ' ';
    while let Some((start, c)) = chars.next() {
        if c == '"' {
            // Skip the string literal (label values, regexes), escapes included.
            let mut escaped = false;
            for (_, c) in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    break;
                }
            }
            previous = '"';
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut end = start + c.len_utf8();
            while let Some(&(i, c)) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                    end = i + c.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            let word = &expr[start..end];
            let next = expr[end..].trim_start().chars().next();
            let is_selector = matches!(next, Some('{' | '['));
            if previous != '$'
                && (PREFIXES.iter().any(|p| word.starts_with(p))
                    || SYNTHETIC.contains(&word)
                    || is_selector)
            {
                names.insert(word.to_owned());
            }
            previous = 'a';
            continue;
        }
        previous = c;
    }
    names
}

/// Metric families of an OpenMetrics scrape by their `# TYPE` lines (so a family without
/// samples yet, e.g. a counter no label set has touched, still counts), plus the sample names.
#[derive(Debug, Default)]
struct Exported {
    families: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

impl Exported {
    fn add(&mut self, scrape: &str) {
        for line in scrape.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = rest.split_once(' ') {
                    self.families.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.starts_with('#') && !line.is_empty() {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                self.samples.insert(name.to_owned());
            }
        }
    }

    /// Whether a query may name `name`: a gauge (or untyped) family by its own name; a counter
    /// only as `<family>_total` (OpenMetrics names the family without the suffix); a histogram
    /// as `_bucket`, `_sum` or `_count`.
    fn has(&self, name: &str) -> bool {
        if self.samples.contains(name) {
            return true;
        }
        let kind_of = |family: &str| self.families.get(family).map(String::as_str);
        if matches!(kind_of(name), Some("gauge" | "unknown")) {
            return true;
        }
        if let Some(family) = name.strip_suffix("_total")
            && kind_of(family) == Some("counter")
        {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|family| kind_of(family) == Some("histogram"))
        })
    }
}

/// Every query of the dashboard: panel targets and template variable queries.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(expr.to_owned());
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query"
            && let Some(query) = variable["query"]["query"].as_str()
        {
            queries.push(query.to_owned());
        }
    }
    queries
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() -> anyhow::Result<()> {
    let checked = promtool(&["check", "rules", "openspan-alerts.yaml"])?;
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "openspan-alerts.test.yaml"])?;
    assert!(tested.contains("SUCCESS"), "{tested}");

    let rules = read("openspan-alerts.yaml")?;
    let unit_tests = read("openspan-alerts.test.yaml")?;
    let readme = std::fs::read_to_string(kit().join("../../README.md"))?;
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let alerts = alerts(&rules);
    assert!(alerts.len() >= 10, "only {} alerts parsed", alerts.len());
    let names: BTreeSet<&str> = alerts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names.len(), alerts.len(), "alert names repeat");
    for alert in &alerts {
        let name = &alert.name;
        assert!(!alert.expr.is_empty(), "{name}: no expr");
        assert!(alert.keys.contains_key("for"), "{name}: no `for:`");
        let severity = alert.keys.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                alert.keys.get(key).is_some_and(|text| text.len() > 20),
                "{name}: no {key}"
            );
        }
        let runbook = alert.keys.get("runbook").map(|r| r.trim_matches('"'));
        let target = runbook.and_then(|r| r.strip_prefix("README.md#"));
        assert!(
            target.is_some_and(|t| anchors.contains(t)),
            "{name}: runbook {runbook:?} is no README section"
        );
        // Each alert is unit-tested: it must fire somewhere in the test file.
        assert!(
            unit_tests.contains(&format!("alertname: {name}\n")),
            "{name} has no promtool unit test"
        );
    }
    Ok(())
}

#[test]
fn the_dashboard_passes_its_schema_and_structural_checks() -> anyhow::Result<()> {
    // Validated by python3-jsonschema, the Debian package scripts/deps.sh installs.
    let program = "import json, sys, jsonschema\n\
        schema = json.load(open(sys.argv[1]))\n\
        jsonschema.Draft202012Validator.check_schema(schema)\n\
        jsonschema.Draft202012Validator(schema).validate(json.load(open(sys.argv[2])))\n\
        print('valid')";
    let output = Command::new("/usr/bin/python3")
        .args([
            "-c",
            program,
            "dashboard.schema.json",
            "grafana-dashboard.json",
        ])
        .current_dir(kit())
        .output()
        .context("run /usr/bin/python3 (apt-get install python3 python3-jsonschema)")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No module named 'jsonschema'") {
        bail!(
            "the dashboard check needs python3-jsonschema (apt-get install --no-install-recommends python3-jsonschema)"
        );
    }
    ensure!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("valid"),
        "grafana-dashboard.json does not pass dashboard.schema.json:\n{stderr}"
    );

    let dashboard: serde_json::Value = serde_json::from_str(&read("grafana-dashboard.json")?)?;
    let panels = dashboard["panels"].as_array().context("no panels")?;
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().context("a panel without id")?;
        assert!(ids.insert(id), "panel id {id} repeats");
        let title = panel["title"].as_str().unwrap_or_default();
        if panel["type"] == "row" {
            continue;
        }
        assert!(titles.insert(title), "panel title {title:?} repeats");
        let targets = panel["targets"].as_array().context("no targets")?;
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: a target without expr");
            assert!(
                ref_ids.insert(target["refId"].as_str().unwrap_or_default()),
                "{title}: refIds repeat"
            );
            assert!(
                !metric_names(expr).is_empty(),
                "{title}: {expr:?} names no metric"
            );
        }
        let (x, w) = (
            panel["gridPos"]["x"].as_u64().unwrap_or(99),
            panel["gridPos"]["w"].as_u64().unwrap_or(99),
        );
        assert!(x + w <= 24, "{title}: off the 24-column grid");
    }
    // What the issue asks the dashboard to show.
    let queries = dashboard_queries(&dashboard).join("\n");
    for metric in [
        "discovery_affiliates",
        "discovery_clusters",
        "discovery_watchers",
        "discovery_rpcs_total",
        "discovery_rate_limited_requests_total",
        "kubespan_peers",
        "kubespan_peer_up",
        "kubespan_peer_last_handshake_age_seconds",
        "kubespan_discovery_connected",
        "kubespan_wireguard_decrypt_failures_total",
        "kubespan_peer_receive_bytes",
        "relay_registrations",
        "relay_bytes_relayed_total",
    ] {
        assert!(
            metric_names(&queries).contains(metric),
            "the dashboard shows no {metric}"
        );
    }
    Ok(())
}

#[test]
fn metric_names_are_found_in_queries() {
    let names = metric_names(
        r#"sum by (instance) (rate(kubespan_relay_transmit_bytes_total{job=~"$agent_job", x="discovery_nope"}[$__rate_interval])) > 0 unless on (instance) up{job="a"} == 0 and typo_metric{a="b"}"#,
    );
    let expected: BTreeSet<String> = ["kubespan_relay_transmit_bytes_total", "up", "typo_metric"]
        .map(String::from)
        .into();
    assert_eq!(names, expected);
    let mut exported = Exported::default();
    exported.add(
        "# TYPE a counter\n# TYPE b gauge\nb 1\n# TYPE c histogram\nc_bucket{le=\"1\"} 0\n# EOF\n",
    );
    assert!(exported.has("a_total") && !exported.has("a"));
    assert!(exported.has("b") && !exported.has("b_total"));
    assert!(exported.has("c_bucket") && exported.has("c_count") && !exported.has("c"));
}

/// `GET /metrics` over HTTP/1.1 from the calling thread's namespace.
fn scrape(address: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .with_context(|| format!("connect to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header end")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{address}: {head}");
    Ok(body.to_owned())
}

fn scrape_in(netns: &str, address: SocketAddr) -> anyhow::Result<String> {
    in_namespace(netns, move || scrape(address))?
}

/// A sample's value: the first line of `name` whose labels contain `labels`.
fn value(scrape: &str, name: &str, labels: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn every_metric_the_kit_names_is_exported_by_the_binaries() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = NatLab::new(&[Kind::Public, Kind::Public])?;
    // The decrypt failure counter is the userspace device's, whatever backend the lab runs.
    lab.backend = "userspace";
    let server_metrics = SocketAddr::new(lab.server_ip.into(), SERVER_METRICS_PORT);
    let relay_metrics = SocketAddr::new(lab.server_ip.into(), RELAY_METRICS_PORT);
    lab.server_metrics_addr = Some(server_metrics.to_string());
    lab.start_server(ServerOptions { stun: false })?;
    let (_relays, relay_yaml) = lab.start_relays(&[])?;
    let options = AgentOptions {
        extra_yaml: format!("{relay_yaml}metricsAddr: {AGENT_METRICS}\n"),
    };
    lab.start_agents(&[(1, options.clone()), (2, options)])?;
    let (a, b) = (lab.node(1).name.clone(), lab.node(2).name.clone());
    lab.wait_for(&format!("{a} and {b} up"), Duration::from_secs(40), || {
        lab.node(1).peer_up(&b) && lab.node(2).peer_up(&a)
    })?;
    let agent: SocketAddr = AGENT_METRICS.parse()?;
    let netns = lab.node(1).netns.clone();

    // Data messages no session can open, to node-1's WireGuard port from its own host: the
    // decrypt failure counter must move by at least as many.
    let scraped = scrape_in(&netns, agent)?;
    let decrypt = "kubespan_wireguard_decrypt_failures_total";
    let before = value(&scraped, decrypt, "").context("no decrypt failure counter")?;
    const FORGED: usize = 25;
    in_namespace(&netns, move || -> anyhow::Result<()> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        for n in 0..FORGED {
            let mut message = vec![4u8, 0, 0, 0];
            message.extend_from_slice(&(0x00ab_cd00u32 + n as u32).to_le_bytes());
            message.extend_from_slice(&[0u8; 8]);
            message.extend_from_slice(&[0x5a; 48]);
            socket.send_to(&message, ("127.0.0.1", WIREGUARD_PORT))?;
        }
        Ok(())
    })??;
    let mut agent_scrape = String::new();
    lab.wait_for(
        "the decrypt failures to show on node-1's /metrics",
        Duration::from_secs(10),
        || {
            agent_scrape = scrape_in(&netns, agent).unwrap_or_default();
            value(&agent_scrape, decrypt, "").is_some_and(|v| v >= before + FORGED as f64)
        },
    )?;
    // The tunnel's state as the alerts see it: the peer up, a fresh handshake, discovery on.
    assert_eq!(
        value(&agent_scrape, "kubespan_peer_up", &format!("peer=\"{b}\"")),
        Some(1.0),
        "{agent_scrape}"
    );
    let age = value(
        &agent_scrape,
        "kubespan_peer_last_handshake_age_seconds",
        &format!("peer=\"{b}\""),
    )
    .context("no handshake age for the peer")?;
    assert!((0.0..300.0).contains(&age), "handshake age {age}");
    assert_eq!(
        value(&agent_scrape, "kubespan_discovery_connected", ""),
        Some(1.0)
    );

    let server_scrape = lab.in_internet(move || scrape(server_metrics))??;
    let relay_scrape = lab.in_internet(move || scrape(relay_metrics))??;
    assert!(
        value(&server_scrape, "discovery_affiliates", "").is_some_and(|v| v >= 2.0),
        "{server_scrape}"
    );
    let mut exported = Exported::default();
    for scrape in [&agent_scrape, &server_scrape, &relay_scrape] {
        exported.add(scrape);
    }

    let mut referenced: BTreeMap<String, String> = BTreeMap::new();
    for alert in alerts(&read("openspan-alerts.yaml")?) {
        for name in metric_names(&alert.expr) {
            referenced.insert(name, format!("alert {}", alert.name));
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(&read("grafana-dashboard.json")?)?;
    for query in dashboard_queries(&dashboard) {
        for name in metric_names(&query) {
            referenced
                .entry(name)
                .or_insert_with(|| format!("dashboard query {query}"));
        }
    }
    assert!(referenced.len() >= 30, "only {} names", referenced.len());
    let missing: Vec<String> = referenced
        .iter()
        .filter(|(name, _)| !SYNTHETIC.contains(&name.as_str()) && !exported.has(name))
        .map(|(name, by)| format!("{name} (used by {by})"))
        .collect();
    assert!(
        missing.is_empty(),
        "not exported by any binary:\n  {}\nexported families: {:?}",
        missing.join("\n  "),
        exported.families.keys().collect::<Vec<_>>()
    );
    Ok(())
}
