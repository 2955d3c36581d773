//! `zdr._zdr`: the `zdr` program as a CPython extension module. The
//! wheel's console script (`zdr`, in `python/zdr/__main__.py`) calls
//! [`main`] with `sys.argv`; the whole command line (the master, a worker,
//! a client command) then runs in the virtualenv's interpreter, which
//! serves `MODULE:APP` with the venv's packages.

use pyo3::prelude::*;

#[path = "../../../src/demo.rs"]
mod demo;

/// Runs the `zdr` command line with `argv` (the first is the program's
/// name) and ends the process with its exit status, as the binary would:
/// the interpreter is not finalised (a worker's Python threads may still
/// run). The GIL is released meanwhile; a worker's Python thread takes it.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<String>) -> PyResult<()> {
    let args = argv.into_iter().map(Into::into).collect();
    let status = py.allow_threads(|| demo::server().run_for_status(args));
    // What Python printed before (nothing, usually) goes out first.
    let sys = py.import("sys")?;
    for stream in ["stdout", "stderr"] {
        let _ = sys.getattr(stream)?.call_method0("flush");
    }
    std::process::exit(i32::from(status))
}

#[pymodule]
fn _zdr(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(main, m)?)
}
