//! The `zdr` binary: the whole server and command line, serving the
//! built-in demo app (see `demo.rs`).

mod demo;

fn main() -> std::process::ExitCode {
    demo::server().run()
}
