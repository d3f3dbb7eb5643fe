//! Logging, set up once per process the same way for both subcommands: `tracing` to stderr (stdout
//! is the local mode's progress display), level from `RUST_LOG` or the subcommand's default, as
//! text or JSON.

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the process's subscriber. `default_filter` applies when `RUST_LOG` is unset (an
/// `EnvFilter` directive such as `info,kube=warn`).
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
