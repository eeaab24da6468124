//! `pvsched generate` (hidden): the man pages and shell completions, generated from the
//! command line's own definitions so that they never drift from `--help`. The package
//! build (scripts/build-deb) runs it; see docs/install.md.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use clap_complete::Shell;

/// `pvsched generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Write pvsched.1 and one page per subcommand (pvsched-hostd.1, ...) here;
    /// created if missing.
    #[arg(long, value_name = "DIR")]
    pub man: Option<PathBuf>,
    /// Write the bash (pvsched.bash), zsh (_pvsched) and fish (pvsched.fish)
    /// completions here; created if missing.
    #[arg(long, value_name = "DIR")]
    pub completions: Option<PathBuf>,
}

/// The shells completions are written for, each to its generator's file name.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes what `args` asks for, generated from `cli` (the whole command line).
pub fn run(args: GenerateArgs, cli: clap::Command) -> anyhow::Result<()> {
    if args.man.is_none() && args.completions.is_none() {
        bail!("nothing to generate: give --man DIR, --completions DIR or both");
    }
    if let Some(dir) = &args.man {
        for page in write_man_pages(cli.clone(), dir)? {
            println!("{}", page.display());
        }
    }
    if let Some(dir) = &args.completions {
        for script in write_completions(&cli, dir)? {
            println!("{}", script.display());
        }
    }
    Ok(())
}

/// Creates `dir` (and its parents) unless it is a directory already.
fn output_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes the man page of `cli` and of every subcommand that is not hidden, at every
/// depth (`pvsched-sim-run.1`); returns the files written, sorted.
pub fn write_man_pages(cli: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let date = man_page_date(std::env::var_os("SOURCE_DATE_EPOCH"))?;
    // Every page's title line names the program and its version (clap_mangen's default
    // is the subcommand's name alone: subcommands carry no version).
    let source = format!("pvsched {}", env!("CARGO_PKG_VERSION"));
    output_dir(dir)?;
    // Built once from the top, so that each subcommand is named `pvsched-hostd`;
    // `help` is clap's own and needs no page.
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    let mut pages = Vec::new();
    write_man_page_tree(cli, dir, &source, &date, &mut pages)
        .with_context(|| format!("cannot write the man pages in {}", dir.display()))?;
    pages.sort();
    Ok(pages)
}

/// The pages' date, YYYY-MM-DD: that of `SOURCE_DATE_EPOCH` (seconds since the epoch;
/// the package build sets it, so that a rebuild gives the same pages), else today's
/// (UTC). Without a date, clap_mangen leaves the title line's date field out and man
/// shows the version in its place.
fn man_page_date(source_date_epoch: Option<std::ffi::OsString>) -> anyhow::Result<String> {
    let seconds = match source_date_epoch {
        Some(value) => value
            .to_str()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&s| s <= MAX_DATE_SECONDS)
            .with_context(|| {
                format!("SOURCE_DATE_EPOCH {value:?} is not seconds since 1970 before 10000")
            })?,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_secs(),
    };
    let (year, month, day) = civil_from_days(seconds / 86_400);
    Ok(format!("{year:04}-{month:02}-{day:02}"))
}

/// 9999-12-31T23:59:59Z: a four-digit year.
const MAX_DATE_SECONDS: u64 = 253_402_300_799;

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days >= 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March, so that February's leap day ends the year.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Writes the page of `cmd` and of each of its subcommands that is not hidden, adding
/// each file to `pages`.
fn write_man_page_tree(
    cmd: clap::Command,
    dir: &Path,
    source: &str,
    date: &str,
    pages: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_page_tree(sub.clone(), dir, source, date, pages)?;
    }
    let page = clap_mangen::Man::new(cmd)
        .source(source)
        .date(date)
        .manual("pvsched manual")
        .generate_to(dir)?;
    pages.push(page);
    Ok(())
}

/// Writes the completions of every shell in [`SHELLS`]; returns the files written.
pub fn write_completions(cli: &clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    output_dir(dir)?;
    let mut cmd = without_hidden_subcommands(cli);
    SHELLS
        .iter()
        .map(|&shell| {
            clap_complete::generate_to(shell, &mut cmd, "pvsched", dir).with_context(|| {
                format!("cannot write the {shell} completion in {}", dir.display())
            })
        })
        .collect()
}

/// `cli` without its hidden subcommands: clap_complete offers hidden subcommands
/// (`hostd-watchdog`, `generate`), which only the program itself runs; the man pages
/// leave them out already. The completions need only the name, the top-level flags
/// and the subcommands.
fn without_hidden_subcommands(cli: &clap::Command) -> clap::Command {
    clap::Command::new("pvsched")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(cli.is_subcommand_required_set())
        .args(cli.get_arguments().cloned())
        .subcommands(cli.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn cli() -> clap::Command {
        crate::Cli::command()
    }

    fn visible_subcommands() -> Vec<String> {
        cli()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_owned())
            .collect()
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pvsched-generate-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_main_page_names_every_subcommand_and_each_has_its_own_page() {
        let dir = scratch_dir("man");
        let pages = write_man_pages(cli(), &dir).unwrap();
        let mut in_dir: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        in_dir.sort();
        assert_eq!(
            pages, in_dir,
            "the pages returned are not the files written"
        );
        let main = fs::read_to_string(dir.join("pvsched.1")).unwrap();
        let subcommands = visible_subcommands();
        assert!(subcommands.len() >= 8, "{subcommands:?}");
        assert!(subcommands.iter().any(|s| s == "hostd"));
        for sub in &subcommands {
            // roff escapes '-' as '\-' in text.
            let in_roff = sub.replace('-', "\\-");
            assert!(
                main.contains(&format!("pvsched\\-{in_roff}(1)")),
                "pvsched.1 does not name {sub}"
            );
            assert!(
                dir.join(format!("pvsched-{sub}.1")).is_file(),
                "no page for {sub} in {pages:?}"
            );
        }
        for hidden in ["hostd-watchdog", "generate"] {
            assert!(
                !dir.join(format!("pvsched-{hidden}.1")).exists(),
                "{hidden} is internal"
            );
            assert!(
                !main.contains(&hidden.replace('-', "\\-")),
                "pvsched.1 names {hidden}"
            );
        }
        // A subcommand's subcommands get pages too.
        assert!(dir.join("pvsched-sim-run.1").is_file(), "{pages:?}");
        let hostd = fs::read_to_string(dir.join("pvsched-hostd.1")).unwrap();
        assert!(
            hostd.contains("\\-\\-config"),
            "pvsched-hostd.1 lacks --config"
        );
        // Title, section, date, source, manual; the date is today's without
        // SOURCE_DATE_EPOCH (the date's own test checks it).
        let title = hostd.lines().find(|l| l.starts_with(".TH")).unwrap();
        let date = title
            .strip_prefix(".TH pvsched-hostd 1 ")
            .and_then(|rest| {
                rest.strip_suffix(&format!(
                    " \"pvsched {}\" \"pvsched manual\"",
                    env!("CARGO_PKG_VERSION")
                ))
            })
            .unwrap_or_else(|| panic!("pvsched-hostd.1's title line: {title}"));
        assert_eq!(date.len(), "YYYY-MM-DD".len(), "{title}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completions_offer_the_subcommands_but_not_the_internal_ones() {
        let dir = scratch_dir("completions");
        let scripts = write_completions(&cli(), &dir).unwrap();
        let names: Vec<_> = scripts
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["pvsched.bash", "_pvsched", "pvsched.fish"]);
        let bash = fs::read_to_string(dir.join("pvsched.bash")).unwrap();
        for sub in ["hostd", "isolate", "status", "lab"] {
            assert!(bash.contains(sub), "the bash completion lacks {sub}");
        }
        assert!(
            bash.contains("--config"),
            "the bash completion lacks hostd's --config"
        );
        // The top level's words: its flags and subcommands.
        let top_level: Vec<&str> = bash
            .lines()
            .find_map(|l| l.trim().strip_prefix("opts=\"-h -V --help --version "))
            .expect("the bash completion's top-level words")
            .trim_end_matches('"')
            .split(' ')
            .collect();
        assert_eq!(
            top_level,
            [&visible_subcommands()[..], &["help".to_owned()]].concat()
        );
        for script in &scripts {
            let text = fs::read_to_string(script).unwrap();
            // The hidden subcommands' names, and the help text zsh and fish would show.
            for internal in ["hostd-watchdog", "the watchdog process", "the man pages"] {
                assert!(
                    !text.contains(internal),
                    "{} offers {internal}",
                    script.display()
                );
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_date_is_source_date_epochs_and_a_bad_one_is_refused() {
        let date = |v: &str| man_page_date(Some(v.into()));
        assert_eq!(date("0").unwrap(), "1970-01-01");
        // 2000-02-29, a leap day of a century divisible by 400.
        assert_eq!(date("951782400").unwrap(), "2000-02-29");
        assert_eq!(date("1796601600").unwrap(), "2026-12-07");
        assert_eq!(date("253402300799").unwrap(), "9999-12-31");
        for bad in [
            "",
            "-1",
            "1.5",
            "now",
            "253402300800",
            "99999999999999999999",
        ] {
            let err = date(bad).unwrap_err();
            assert!(
                err.to_string().contains("SOURCE_DATE_EPOCH"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn nothing_to_generate_is_an_error_that_writes_nothing() {
        let err = run(
            GenerateArgs {
                man: None,
                completions: None,
            },
            cli(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--man"), "{err}");
    }

    #[test]
    fn an_output_path_that_is_a_file_is_one_error() {
        let file = scratch_dir("file");
        fs::write(&file, "not a directory").unwrap();
        let err = write_man_pages(cli(), &file).unwrap_err();
        assert!(
            format!("{err:#}").contains(file.to_str().unwrap()),
            "{err:#}"
        );
        assert_eq!(fs::read_to_string(&file).unwrap(), "not a directory");
        fs::remove_file(&file).unwrap();
    }
}
