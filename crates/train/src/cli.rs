//! Command-line parsing shared by the binaries: clap's parser, with a usage error printed as
//! one line (clap's first paragraph, joined) instead of clap's several.

use clap::Parser;
use clap::error::ErrorKind;

/// The parsed arguments; `--help` and `--version` print and exit as clap does, and a usage
/// error (an unknown flag, a bad value, a missing argument) is one line on stderr, exit code 2.
pub fn parse<A: Parser>() -> A {
    A::try_parse().unwrap_or_else(|error| {
        if matches!(
            error.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            error.exit();
        }
        eprintln!("{} (see --help)", one_line(&error.to_string()));
        std::process::exit(2);
    })
}

/// The first paragraph of clap's message on one line, with its tip (a similar flag) if any.
fn one_line(message: &str) -> String {
    let mut line = message
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(tip) = message
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("tip:"))
    {
        line = format!("{line}; {tip}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser, Debug)]
    struct Demo {
        #[arg(long)]
        config: String,
        #[arg(long, default_value_t = 1)]
        steps: usize,
    }

    #[test]
    fn usage_errors_fit_on_one_line_and_name_the_flag() {
        for (args, needle) in [
            (vec!["demo", "--steps", "x"], "--steps"),
            (vec!["demo", "--config", "c", "--bogus"], "--bogus"),
            (
                vec!["demo", "--confi", "c"],
                "tip: a similar argument exists: '--config'",
            ),
            (vec!["demo"], "--config"),
        ] {
            let error = Demo::try_parse_from(args).unwrap_err();
            let line = one_line(&error.to_string());
            assert!(
                line.starts_with("error:") && line.contains(needle),
                "{line}"
            );
            assert!(!line.contains('\n'));
        }
    }
}
