//! Progress on stderr for the commands that run longer than a few seconds (eval, bench,
//! steps, init): a bar on a terminal (indicatif, redrawn every second so a long single run
//! still shows its elapsed time); when stderr is not a terminal, either a line every 10 s
//! (long runs in logs and Slurm: eval) or nothing (tables, and the tests that read them,
//! stay clean).

use indicatif::{ProgressBar, ProgressStyle};
use std::cell::Cell;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Where progress goes when stderr is not a terminal.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Off {
    /// Nothing.
    Silent,
    /// A line every 10 s, and one at the end.
    Lines,
}

/// Progress of one piece of work counted in `unit`s (images, runs, tensors).
pub struct Progress {
    what: String,
    unit: &'static str,
    /// None: no progress at all (quiet, or not a terminal with [`Off::Silent`]).
    bar: Option<Option<ProgressBar>>,
    done: Cell<u64>,
    total: Cell<u64>,
    t0: Instant,
    last: Cell<Instant>,
}

impl Progress {
    /// Progress of `what` in `unit`s; `quiet` shows none.
    pub fn new(what: impl Into<String>, unit: &'static str, off: Off, quiet: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = match (quiet, terminal, off) {
            (true, _, _) | (false, false, Off::Silent) => None,
            (false, false, Off::Lines) => Some(None),
            (false, true, _) => Some(Some(ProgressBar::hidden())),
        };
        Progress {
            what: what.into(),
            unit,
            bar,
            done: Cell::new(0),
            total: Cell::new(0),
            t0: Instant::now(),
            last: Cell::new(Instant::now()),
        }
    }

    /// `done` of `total` units (all done: the bar is removed, a last line printed).
    pub fn update(&self, done: u64, total: u64) {
        self.done.set(done);
        self.total.set(total);
        match &self.bar {
            None => {}
            Some(Some(pb)) => {
                if pb.is_hidden() {
                    self.show(pb);
                }
                pb.set_length(total);
                pb.set_position(done);
                if done == total {
                    pb.finish_and_clear();
                }
            }
            Some(None) if self.last.get().elapsed().as_secs_f64() >= 10.0 || done == total => {
                let el = self.t0.elapsed().as_secs_f64();
                eprintln!(
                    "{}: {done}/{total} {}, {:.2} {}/s, {el:.0} s elapsed",
                    self.what,
                    self.unit,
                    done as f64 / el.max(1e-9),
                    self.unit
                );
                self.last.set(Instant::now());
            }
            Some(None) => {}
        }
    }

    /// `n` more units done (of the total last given).
    pub fn inc(&self, n: u64) {
        self.update(self.done.get() + n, self.total.get());
    }

    /// What is running now, shown after the bar (a terminal only).
    pub fn message(&self, msg: impl Into<String>) {
        if let Some(Some(pb)) = &self.bar {
            if pb.is_hidden() {
                self.show(pb);
            }
            pb.set_message(msg.into());
        }
    }

    /// Run `f` (which prints to stdout) with the bar taken off the terminal meanwhile.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(Some(pb)) => pb.suspend(f),
            _ => f(),
        }
    }

    /// The bar removed (the output it shared the terminal with stays).
    pub fn finish(&self) {
        if let Some(Some(pb)) = &self.bar {
            pb.finish_and_clear();
        }
    }

    fn show(&self, pb: &ProgressBar) {
        pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(&format!(
            "{}: {{bar:30}} {{pos}}/{{len}} {}, {{elapsed}} elapsed, ETA {{eta}} {{wide_msg}}",
            self.what, self.unit
        )) {
            pb.set_style(style);
        }
        pb.enable_steady_tick(Duration::from_secs(1));
    }
}
