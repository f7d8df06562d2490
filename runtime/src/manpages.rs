//! Man pages generated from a binary's own clap definition.
//!
//! Every binary answers a hidden `--generate-man <DIR>` (handled by [`generate_if_asked`] before
//! clap parses anything) and writes its pages there; scripts/package-deb.sh calls it on the very
//! binaries it packages, so the pages always describe those binaries. Chosen over a separate
//! doc-generator binary because that one would need every `Cli` struct moved out of the
//! binaries into library modules, and its pages could drift from a binary built from another
//! commit. Checked before parsing (not a clap argument) so that it works for commands whose
//! definition requires positional arguments or a subcommand, and so that it stays out of
//! `--help` and out of the pages themselves.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The hidden option that [`generate_if_asked`] answers.
pub const GENERATE_MAN_FLAG: &str = "--generate-man";

/// Manual sections: daemons in 8 (system administration), tools in 1 (user commands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// User commands (`kubespanctl`).
    User,
    /// System administration: daemons (`kubespan-agent`, `discovery-server`, …).
    Admin,
}

impl Section {
    fn number(self) -> &'static str {
        match self {
            Section::User => "1",
            Section::Admin => "8",
        }
    }
}

/// When the process was started as `BINARY --generate-man DIR`, writes the pages of `command`
/// into DIR (created if missing) and returns the exit code; otherwise returns `None` and `main`
/// carries on. `command` is only built when asked (`Args::command`).
pub fn generate_if_asked(
    command: impl FnOnce() -> clap::Command,
    section: Section,
) -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_none_or(|arg| arg != GENERATE_MAN_FLAG) {
        return None;
    }
    let [_, dir] = args.as_slice() else {
        eprintln!("Error: usage: {GENERATE_MAN_FLAG} <DIR>");
        return Some(ExitCode::from(2));
    };
    let dir = PathBuf::from(dir);
    Some(match write_pages(command(), section, &dir) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "Error: cannot write the man pages to {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    })
}

/// Writes one page for the command and one per visible subcommand, at any depth, named the
/// way man(1) looks them up: `kubespanctl.1`, `kubespanctl-status.1`, `kubespanctl-gen-config.1`.
/// Returns the files written.
pub fn write_pages(
    command: clap::Command,
    section: Section,
    dir: &Path,
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // No `help` subcommand page: `kubespanctl help X` is `man kubespanctl-X` here.
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let source = format!(
        "openspan {}",
        command.get_version().unwrap_or(env!("CARGO_PKG_VERSION"))
    );
    let mut files = Vec::new();
    write_tree(command, section, &source, dir, &mut files)?;
    Ok(files)
}

fn write_tree(
    command: clap::Command,
    section: Section,
    source: &str,
    dir: &Path,
    files: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_tree(sub.clone(), section, source, dir, files)?;
    }
    let man = clap_mangen::Man::new(command)
        .section(section.number())
        .source(source)
        .manual("openspan");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    let mut file = std::fs::File::create(&path)?;
    file.write_all(&page)?;
    file.flush()?;
    files.push(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> clap::Command {
        clap::Command::new("demo")
            .version("1.2.3")
            .about("A demo")
            .arg(clap::Arg::new("name").required(true))
            .subcommand(
                clap::Command::new("gen")
                    .about("Generate")
                    .subcommand(clap::Command::new("config").about("A config")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn pages_for_every_visible_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pages(demo(), Section::Admin, dir.path()).unwrap();
        let mut names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["demo-gen-config.8", "demo-gen.8", "demo.8"]);
        let page = std::fs::read_to_string(dir.path().join("demo.8")).unwrap();
        assert!(page.contains(".TH demo 8"), "{page}");
        assert!(page.contains("openspan 1.2.3"), "{page}");
        let sub = std::fs::read_to_string(dir.path().join("demo-gen-config.8")).unwrap();
        assert!(sub.contains("A config"), "{sub}");
    }
}
