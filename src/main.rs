//! The `tessera` binary: every role and command lives in the library; this only hands over to
//! its command line.

fn main() -> std::process::ExitCode {
    tessera::cli::main()
}
