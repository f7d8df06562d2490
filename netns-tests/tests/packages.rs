//! `scripts/package-deb.sh`, run on the debug binaries the other tests use: its packages must
//! carry the right control fields and conffiles, install with dpkg into a scratch root (never
//! the host's dpkg database) with every file at its path and mode, give working binaries, valid
//! man pages and completions that know the subcommands, never enable or start a unit, and keep
//! their conffiles on removal until purged.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use netns_tests::binary;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const PACKAGES: [&str; 4] = [
    "openspan-discovery-server",
    "openspan-agent",
    "openspan-relay",
    "openspan-wireguard",
];
/// kubespanctl's subcommands, each with its own man page.
const KUBESPANCTL_PAGES: [&str; 11] = [
    "status",
    "members",
    "peers",
    "identity",
    "watch",
    "leave",
    "gen",
    "gen-secrets",
    "gen-config",
    "gen-relay-verifier",
    "completion",
];

/// Runs a command; fails saying what to install when the tool is missing.
fn run(command: &mut Command) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    match command.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{program} is missing: install it (scripts/deps.sh installs what the tests need)"
        ),
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// Runs a command that must succeed; returns its stdout.
fn ok(command: &mut Command) -> String {
    let shown = format!("{command:?}");
    let output = run(command);
    assert!(
        output.status.success(),
        "{shown} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn require_tools() {
    for (tool, package) in [
        ("dpkg", "dpkg"),
        ("dpkg-deb", "dpkg"),
        ("groff", "groff-base"),
        ("gzip", "gzip"),
        ("bash", "bash"),
        ("strip", "binutils"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "the package test needs {tool}: apt-get install {package} (scripts/deps.sh does)"
        );
    }
}

/// The scratch root dpkg installs into, with its own (empty) database.
fn scratch_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    let admin = root.join("var/lib/dpkg");
    for sub in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(sub)).unwrap();
    }
    std::fs::write(admin.join("status"), "").unwrap();
    std::fs::write(admin.join("available"), "").unwrap();
    root
}

/// dpkg on the scratch root. Maintainer scripts run outside a chroot (the root has no shell),
/// with DPKG_ROOT set; the root has no libc6 package, hence --force-depends. `path` comes first
/// in PATH: it holds a fake systemctl that logs its calls.
fn dpkg(root: &Path, path: &Path) -> Command {
    let mut command = Command::new("dpkg");
    command
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends"])
        .env(
            "PATH",
            format!(
                "{}:{}",
                path.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    command
}

fn status(root: &Path, package: &str) -> String {
    let output = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", package]));
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Status: "))
        .unwrap_or("not installed")
        .to_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Renders a gzipped page with groff (UTF-8 input through preconv, all warnings on, plain text
/// out: no bold or underline); only line layout warnings are tolerated. Returns the text.
fn render_man(page: &Path) -> String {
    let script = format!(
        "gzip -dc '{}' | groff -k -man -Tutf8 -ww -P -cbou",
        page.display()
    );
    let output = run(Command::new("sh").args(["-c", &script]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} does not render: {stderr}",
        page.display()
    );
    let problems: Vec<_> = stderr
        .lines()
        .filter(|l| !l.contains("cannot adjust line") && !l.contains("cannot break line"))
        .collect();
    assert!(
        problems.is_empty(),
        "groff warns about {}: {problems:?}",
        page.display()
    );
    // -Tutf8 typesets `\-` as a minus sign and hyphens as U+2010; compare with ASCII.
    String::from_utf8_lossy(&output.stdout).replace(['\u{2212}', '\u{2010}'], "-")
}

fn check_man(root: &Path, name: &str, section: &str, expect: &str) {
    let page = root.join(format!("usr/share/man/man{section}/{name}.{section}.gz"));
    assert_eq!(mode(&page), 0o644, "{}", page.display());
    let source = ok(Command::new("gzip").arg("-dc").arg(&page));
    assert!(
        source.contains(&format!(".TH {name} {section} ")),
        "{} has no .TH {name} {section} header:\n{source}",
        page.display()
    );
    let text = render_man(&page);
    assert!(
        text.contains("NAME") && text.contains("SYNOPSIS"),
        "{}:\n{text}",
        page.display()
    );
    assert!(
        text.contains(expect),
        "{} does not mention {expect:?}:\n{text}",
        page.display()
    );
}

#[test]
fn debian_packages_install_into_a_scratch_root_and_purge_cleanly() {
    let uid = ok(Command::new("id").arg("-u"));
    if uid.trim() != "0" && std::env::var("OPENSPAN_SKIP_ROOT_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: the package test needs root (OPENSPAN_SKIP_ROOT_TESTS=1 is set)");
        return;
    }
    assert_eq!(
        uid.trim(),
        "0",
        "the package test installs packages with dpkg (files owned by root): run it as root, \
         or set OPENSPAN_SKIP_ROOT_TESTS=1 to skip it explicitly"
    );
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("debs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/package-deb.sh");
    // The binaries the other tests run (cargo build --workspace --bins, or
    // OPENSPAN_TEST_BIN_DIR): the script must not build (least of all a release build).
    let agent = binary("kubespan-agent");
    let bin_dir = agent.parent().unwrap();
    let listed = ok(Command::new("bash")
        .arg(&script)
        .args(["--profile", "debug", "--bin-dir"])
        .arg(bin_dir)
        .arg("--out")
        .arg(&out));
    let arch = ok(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_owned();
    let debs: Vec<PathBuf> = PACKAGES
        .iter()
        .map(|p| out.join(format!("{p}_{VERSION}_{arch}.deb")))
        .collect();
    for deb in &debs {
        assert!(
            listed.contains(&deb.display().to_string()),
            "package-deb.sh did not build {}:\n{listed}",
            deb.display()
        );
    }

    // Control fields and conffiles.
    for (package, deb) in PACKAGES.iter().zip(&debs) {
        let info = ok(Command::new("dpkg-deb").arg("--info").arg(deb));
        for field in [
            format!("Package: {package}\n"),
            format!("Version: {VERSION}\n"),
            format!("Architecture: {arch}\n"),
        ] {
            assert!(info.contains(&field), "{package}: no {field:?}:\n{info}");
        }
        for field in ["Maintainer: ", "Installed-Size: ", "Description: "] {
            assert!(info.contains(field), "{package}: no {field}:\n{info}");
        }
        let depends = ok(Command::new("dpkg-deb")
            .args(["--field"])
            .arg(deb)
            .arg("Depends"));
        assert!(
            depends.starts_with("libc6 (>= "),
            "{package}: Depends {depends:?}"
        );
        let conffiles = run(Command::new("dpkg-deb")
            .args(["--info"])
            .arg(deb)
            .arg("conffiles"));
        let conffiles = String::from_utf8_lossy(&conffiles.stdout);
        let expected = match *package {
            "openspan-discovery-server" => "/etc/default/discovery-server\n",
            "openspan-agent" => "/etc/default/kubespan-agent\n",
            "openspan-relay" => "/etc/default/openspan-relay\n",
            _ => "",
        };
        assert_eq!(conffiles, expected, "{package}: conffiles");
    }
    let recommends = ok(Command::new("dpkg-deb")
        .arg("--field")
        .arg(&debs[1])
        .arg("Recommends"));
    for needed in ["nftables", "iproute2", "wireguard-tools"] {
        assert!(
            recommends.contains(needed),
            "openspan-agent Recommends {recommends:?}"
        );
    }

    // Install into the scratch root, with a systemctl that logs what it is asked.
    let root = scratch_root(dir.path());
    let fake_bin = dir.path().join("bin");
    std::fs::create_dir_all(&fake_bin).unwrap();
    let systemctl_log = dir.path().join("systemctl.log");
    std::fs::write(
        fake_bin.join("systemctl"),
        format!("#!/bin/sh\necho \"$@\" >> '{}'\n", systemctl_log.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        fake_bin.join("systemctl"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    ok(dpkg(&root, &fake_bin).arg("-i").args(&debs));
    for package in PACKAGES {
        assert_eq!(status(&root, package), "install ok installed", "{package}");
        // The host's database never learnt about them.
        assert_ne!(
            status(Path::new("/"), package),
            "install ok installed",
            "{package} is installed on the host"
        );
    }
    assert!(
        !systemctl_log.exists(),
        "maintainer scripts called systemctl while installing into another root: {:?}",
        std::fs::read_to_string(&systemctl_log)
    );
    // Outside DPKG_ROOT, postinst only reloads units, and only when systemd runs the host.
    for package in [
        "openspan-agent",
        "openspan-discovery-server",
        "openspan-relay",
    ] {
        let postinst = root.join(format!("var/lib/dpkg/info/{package}.postinst"));
        ok(Command::new("sh")
            .arg(&postinst)
            .arg("configure")
            .env_remove("DPKG_ROOT")
            .env("PATH", format!("{}:/usr/bin:/bin", fake_bin.display())));
    }
    let calls = std::fs::read_to_string(&systemctl_log).unwrap_or_default();
    if Path::new("/run/systemd/system").is_dir() {
        assert_eq!(calls.matches("daemon-reload").count(), 3, "{calls}");
    } else {
        assert_eq!(calls, "", "systemctl called without systemd running");
    }
    for word in ["enable", "start", "restart"] {
        assert!(
            !calls.split_whitespace().any(|w| w == word),
            "postinst ran systemctl {word}: {calls}"
        );
    }

    // Files at their paths, with their modes.
    let executables = [
        ("discovery-server", "discovery-server"),
        ("kubespan-agent", "kubespan-agent"),
        ("kubespanctl", "kubespanctl"),
        ("openspan-relay", "openspan-relay"),
        ("openspan-wireguard", "openspan-wireguard"),
    ];
    for (file, name) in executables {
        let path = root.join("usr/bin").join(file);
        assert_eq!(mode(&path), 0o755, "{}", path.display());
        let version = ok(Command::new(&path).arg("--version"));
        assert_eq!(
            version.trim(),
            format!("{name} {VERSION}"),
            "{file} --version"
        );
    }
    let files = [
        "usr/lib/systemd/system/discovery-server.service",
        "usr/lib/systemd/system/discovery-server-replica.service",
        "usr/lib/systemd/system/kubespan-agent.service",
        "usr/lib/systemd/system/openspan-relay.service",
        "etc/default/discovery-server",
        "etc/default/kubespan-agent",
        "etc/default/openspan-relay",
        "usr/share/doc/openspan-agent/examples/config.yaml",
        "usr/share/doc/openspan-relay/examples/clusters",
        "usr/share/bash-completion/completions/kubespanctl",
        "usr/share/zsh/vendor-completions/_kubespanctl",
        "usr/share/fish/vendor_completions.d/kubespanctl.fish",
    ];
    for file in files {
        assert_eq!(mode(&root.join(file)), 0o644, "{file}");
    }
    for package in PACKAGES {
        let copyright = root.join(format!("usr/share/doc/{package}/copyright"));
        assert_eq!(mode(&copyright), 0o644, "{}", copyright.display());
        let text = std::fs::read_to_string(&copyright).unwrap();
        assert!(text.contains("License: Apache-2.0"), "{text}");
    }
    // Nothing the packages installed is writable by anyone but root, or owned by anyone else.
    let listing = ok(Command::new("find")
        .arg(root.join("usr"))
        .arg(root.join("etc"))
        .args([
            "(", "-perm", "/022", "-o", "!", "-user", "root", ")", "-print",
        ]));
    assert_eq!(listing, "", "files writable by others or not owned by root");

    // Units run the packaged binaries and read their defaults file.
    for (unit, bin, default) in [
        (
            "discovery-server.service",
            "discovery-server",
            "discovery-server",
        ),
        (
            "discovery-server-replica.service",
            "discovery-server",
            "discovery-server",
        ),
        ("kubespan-agent.service", "kubespan-agent", "kubespan-agent"),
        ("openspan-relay.service", "openspan-relay", "openspan-relay"),
    ] {
        let text = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(unit)).unwrap();
        assert!(
            text.contains(&format!("ExecStart=/usr/bin/{bin} ")),
            "{unit}:\n{text}"
        );
        assert!(
            text.contains(&format!("EnvironmentFile=-/etc/default/{default}\n")),
            "{unit}:\n{text}"
        );
        assert!(!text.contains("/usr/local/"), "{unit}:\n{text}");
    }

    // The example configuration carries no usable secret: the agent refuses it.
    let example = root.join("usr/share/doc/openspan-agent/examples/config.yaml");
    let refused = run(Command::new(root.join("usr/bin/kubespan-agent"))
        .arg("--config")
        .arg(&example));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("clusterSecret"),
        "the agent accepted the example configuration ({}): {stderr}",
        refused.status
    );

    // Man pages: valid roff, one per binary and per kubespanctl subcommand.
    check_man(&root, "discovery-server", "8", "--snapshot-path");
    check_man(&root, "kubespan-agent", "8", "--config");
    check_man(&root, "openspan-relay", "8", "--clusters-file");
    check_man(&root, "openspan-wireguard", "8", "INTERFACE");
    check_man(&root, "kubespanctl", "1", "kubespanctl-status(1)");
    for sub in KUBESPANCTL_PAGES {
        check_man(&root, &format!("kubespanctl-{sub}"), "1", "--socket");
    }
    check_man(&root, "kubespanctl-gen-config", "1", "--output-file");

    // Completions know the subcommands; bash's completes a prefix.
    let completions = root.join("usr/share");
    let bash = std::fs::read_to_string(completions.join("bash-completion/completions/kubespanctl"))
        .unwrap();
    let zsh =
        std::fs::read_to_string(completions.join("zsh/vendor-completions/_kubespanctl")).unwrap();
    let fish =
        std::fs::read_to_string(completions.join("fish/vendor_completions.d/kubespanctl.fish"))
            .unwrap();
    assert!(zsh.starts_with("#compdef kubespanctl"), "{zsh}");
    assert!(fish.contains("complete -c kubespanctl"), "{fish}");
    for sub in [
        "status",
        "members",
        "peers",
        "identity",
        "watch",
        "leave",
        "gen",
        "relay-verifier",
        "completion",
    ] {
        for (shell, text) in [("bash", &bash), ("zsh", &zsh), ("fish", &fish)] {
            assert!(text.contains(sub), "the {shell} completion lacks {sub}");
        }
    }
    let completed = ok(Command::new("bash").arg("-c").arg(format!(
        "source '{}'; COMP_WORDS=(kubespanctl gen re); COMP_CWORD=2; \
         _kubespanctl kubespanctl re gen; echo \"${{COMPREPLY[@]}}\"",
        completions
            .join("bash-completion/completions/kubespanctl")
            .display()
    )));
    assert_eq!(
        completed.trim(),
        "relay-verifier",
        "bash completion of `kubespanctl gen re`"
    );

    // Removal keeps the conffiles (with the administrator's edits); purge deletes them.
    let defaults = root.join("etc/default/kubespan-agent");
    let mut edited = std::fs::read_to_string(&defaults).unwrap();
    edited.push_str("KUBESPAN_DEBUG=true\n");
    std::fs::write(&defaults, &edited).unwrap();
    ok(dpkg(&root, &fake_bin).args(["-r", "openspan-agent"]));
    assert_eq!(status(&root, "openspan-agent"), "deinstall ok config-files");
    assert!(!root.join("usr/bin/kubespan-agent").exists());
    assert!(!root.join("usr/bin/kubespanctl").exists());
    assert!(
        !root
            .join("usr/lib/systemd/system/kubespan-agent.service")
            .exists()
    );
    assert_eq!(
        std::fs::read_to_string(&defaults).unwrap(),
        edited,
        "removal changed the edited conffile"
    );
    // The agent's state (its WireGuard private key) survives removal, not purge.
    let state = root.join("var/lib/kubespan");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("kubespan-identity.yaml"), "privateKey: x\n").unwrap();
    ok(dpkg(&root, &fake_bin).args(["-P", "openspan-agent"]));
    assert!(!defaults.exists(), "purge left {}", defaults.display());
    assert!(
        !state.exists(),
        "purge left the agent's keys in {}",
        state.display()
    );
    ok(dpkg(&root, &fake_bin).args([
        "-P",
        "openspan-discovery-server",
        "openspan-relay",
        "openspan-wireguard",
    ]));
    for package in PACKAGES {
        assert_eq!(status(&root, package), "not installed", "{package}");
    }
    let left = ok(Command::new("find").arg(&root).args([
        "-path",
        &format!("{}/var", root.display()),
        "-prune",
        "-o",
        "-type",
        "f",
        "-print",
    ]));
    assert_eq!(left, "", "files left after purging every package");
}
