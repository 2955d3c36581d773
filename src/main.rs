//! The `zdr` binary: the zdr server with its built-in demo app.

fn main() -> std::process::ExitCode {
    zdr::demo::server().run()
}
