//! Running host programs (apt-get, dpkg-deb, ldd) with errors that say what failed.

use std::process::{Command, Output};

use crate::error::{LabError, Result};

/// How many trailing lines of a failed command's stderr go into the error.
const STDERR_TAIL_LINES: usize = 8;

/// Runs `command` to completion and returns its output, or an error with its stderr tail
/// when it cannot start or exits unsuccessfully.
pub(crate) fn run(command: &mut Command) -> Result<Output> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().map_err(|source| LabError::Spawn {
        program: program.clone(),
        source,
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(LabError::CommandFailed {
            command: describe(command),
            status: output.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&output.stderr), STDERR_TAIL_LINES),
        })
    }
}

/// Like [`run`] but returns stdout as text.
pub(crate) fn run_stdout(command: &mut Command) -> Result<String> {
    let output = run(command)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The command line as a single string, for messages.
pub(crate) fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// Prints a progress line on stderr; the lab is driven from a terminal or CI log.
pub(crate) fn progress(message: impl std::fmt::Display) {
    eprintln!("pvsched-lab: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn failed_command_reports_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .expect_err("command must fail");
        let text = err.to_string();
        assert!(text.contains("oops"), "{text}");
        assert!(text.contains("sh -c"), "{text}");
    }
}
