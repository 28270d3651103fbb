//! Progress of an image build: an indicatif spinner or bar per step when stderr
//! is a terminal, one plain line per step otherwise (logs, CI).

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug)]
pub struct Progress {
    bars: Option<MultiProgress>,
    lines: bool,
}

impl Progress {
    /// Bars on a terminal, plain lines otherwise.
    pub fn auto() -> Self {
        if std::io::stderr().is_terminal() {
            Progress {
                bars: Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
                lines: false,
            }
        } else {
            Self::lines()
        }
    }

    /// One line on stderr per step.
    pub fn lines() -> Self {
        Progress {
            bars: None,
            lines: true,
        }
    }

    /// Nothing shown.
    pub fn quiet() -> Self {
        Progress {
            bars: None,
            lines: false,
        }
    }

    /// Starts a step; `total` bytes or items make it a bar instead of a spinner.
    pub fn step(&self, what: &str, total: Option<u64>) -> Step {
        let bar = self.bars.as_ref().map(|m| {
            let b = match total {
                Some(n) => {
                    let b = ProgressBar::new(n);
                    b.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {msg:28} [{bar:30}] {bytes}/{total_bytes} {elapsed}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b
                }
                None => {
                    let b = ProgressBar::new_spinner();
                    b.set_style(
                        ProgressStyle::with_template("{spinner} {msg:28} {elapsed}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    b
                }
            };
            let b = m.add(b);
            b.set_message(what.to_string());
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        if self.lines {
            eprintln!("aivmm image: {what} …");
        }
        Step {
            bar,
            what: what.to_string(),
            start: Instant::now(),
            lines: self.lines,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }
}

/// One step of the build; finishing it records its duration.
#[derive(Debug)]
pub struct Step {
    bar: Option<ProgressBar>,
    what: String,
    start: Instant,
    lines: bool,
    last_line: std::cell::Cell<Instant>,
}

impl Step {
    /// Advances a bar.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Shows how far a long step is (e.g. objects compiled): on the bar at once;
    /// as a plain line at most once a minute, so logs stay short.
    pub fn set_message(&self, note: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{} {note}", self.what));
        }
        if self.lines && self.last_line.get().elapsed().as_secs() >= 60 {
            self.last_line.set(Instant::now());
            eprintln!("aivmm image: {} … {note}", self.what);
        }
    }

    /// Ends the step with a short note (e.g. a size).
    pub fn finish(self, note: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        if let Some(b) = &self.bar {
            b.finish_with_message(format!("{} {note} ({secs:.1}s)", self.what));
        }
        if self.lines {
            eprintln!("aivmm image: {} done {note} ({secs:.1}s)", self.what);
        }
    }
}
