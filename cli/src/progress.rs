//! Progress of long work (backups, verifications, restores): a bar on a terminal, else a line on
//! standard error when a stage begins and every few seconds.

use crate::render::count;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often, at most, a progress line is printed when standard error is not a terminal.
pub const PRINT_EVERY: Duration = Duration::from_secs(5);

pub struct Bar {
    bar: ProgressBar,
    tty: bool,
    /// Stage name, records done, when a line was last printed (no terminal).
    lines: Mutex<(String, u64, Instant)>,
}

impl Bar {
    pub fn new() -> Bar {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {human_pos}/{human_len} records ({elapsed})")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        Bar { bar, tty: std::io::stderr().is_terminal(), lines: Mutex::new((String::new(), 0, Instant::now())) }
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, (String, u64, Instant)> {
        self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl kvs_backup::Progress for Bar {
    fn stage(&self, name: &str, total: u64) {
        self.bar.reset();
        self.bar.set_length(total.max(1));
        self.bar.set_message(name.to_owned());
        if !self.tty {
            eprintln!("{name}: about {} records", count(total));
            *self.lines() = (name.to_owned(), 0, Instant::now());
        }
    }

    fn advance(&self, records: u64) {
        self.bar.inc(records);
        if self.bar.position() > self.bar.length().unwrap_or(0) {
            self.bar.set_length(self.bar.position());
        }
        if !self.tty {
            let mut lines = self.lines();
            lines.1 += records;
            if lines.2.elapsed() >= PRINT_EVERY {
                eprintln!("{}: {} records", lines.0, count(lines.1));
                lines.2 = Instant::now();
            }
        }
    }
}
