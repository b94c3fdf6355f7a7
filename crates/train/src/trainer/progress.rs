//! What a person watching the run sees: a bar per epoch on a terminal, plain lines in a log.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps: `prefix [====>   ] pos/len message [elapsed < eta]`.
pub fn progress_bar(len: usize, prefix: String) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:28.cyan/blue}] {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// Prints `line` above the bar, or as a plain line when the bar is hidden (stderr is not a
/// terminal).
pub fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// The rest of the run at the pace so far, as `1h02m`, `3m05s` or `12s`.
pub fn time_left(elapsed: Duration, done: usize, total: usize) -> String {
    duration(elapsed.as_secs_f64() / done as f64 * (total - done) as f64)
}

/// Seconds as `1h02m`, `3m05s` or `12s`.
pub fn duration(seconds: f64) -> String {
    match seconds.round() as u64 {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Progress lines for logs: when stderr is not a terminal the bar draws nothing, so a line is
/// printed about every tenth of the epoch and at least once a minute (at the reads of the
/// numbers, which come every `train.log_every` steps).
pub struct PlainProgress {
    every: usize,
    next: usize,
    last: Instant,
}

impl PlainProgress {
    pub fn new(steps: usize, first: usize) -> Option<Self> {
        let every = steps.div_ceil(10).max(1);
        (!std::io::stderr().is_terminal()).then(|| Self {
            every,
            next: (first / every + 1) * every,
            last: Instant::now(),
        })
    }

    /// Prints `line()` when the epoch passed a tenth since the last line, at its end, or a
    /// minute after the last line.
    pub fn tick(&mut self, done: usize, steps: usize, line: impl FnOnce() -> String) {
        if done >= self.next || done == steps || self.last.elapsed().as_secs() >= 60 {
            println!("{}", line());
            self.last = Instant::now();
            self.next = (done / self.every + 1) * self.every;
        }
    }
}
