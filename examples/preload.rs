//! A preload app: the load step builds a large lookup table once, in the
//! master, and every worker shares its memory copy-on-write.
//!
//! ```sh
//! cargo run --release --example preload -- serve --workers 3 --preload
//! curl localhost:8000/lookup/12345
//! ```
//!
//! `TABLE_MB` sets the table's size (default 64). Compare the workers'
//! memory with and without `--preload` (for example the `Pss:` line of
//! /proc/PID/smaps_rollup): with it, the table is paid for once.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;

/// The shared table: entry i holds a value derived from i.
struct Table {
    values: Vec<u64>,
    built_in: u32,
}

fn build_table() -> Result<Table, zdr::BoxError> {
    let mb: usize = match std::env::var("TABLE_MB") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("TABLE_MB must be a whole number, got {v:?}"))?,
        Err(_) => 64,
    };
    let len = mb * 1024 * 1024 / 8;
    let values = (0..len as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 7)
        .collect();
    Ok(Table {
        values,
        built_in: std::process::id(),
    })
}

fn main() -> std::process::ExitCode {
    zdr::Server::new("preload-example")
        .load(build_table)
        .service(|table: Arc<Table>| async move {
            Ok(tower::service_fn(move |req: zdr::Request| {
                let table = Arc::clone(&table);
                async move {
                    let body = match req
                        .uri()
                        .path()
                        .strip_prefix("/lookup/")
                        .map(str::parse::<usize>)
                    {
                        Some(Ok(i)) => match table.values.get(i) {
                            Some(v) => {
                                format!("{i} => {v} (table built in pid {})\n", table.built_in)
                            }
                            None => {
                                format!("{i} is past the end ({} entries)\n", table.values.len())
                            }
                        },
                        // This app does not ask for its requests' clients
                        // (`Server::client_info`), so they carry none.
                        None if req.uri().path() == "/client" => {
                            match req.extensions().get::<zdr::ClientInfo>() {
                                Some(c) => format!("client: {:?}\n", c.addr),
                                None => "client: not asked for\n".to_owned(),
                            }
                        }
                        _ => format!("GET /lookup/N for N < {}\n", table.values.len()),
                    };
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                }
            }))
        })
        .run()
}
