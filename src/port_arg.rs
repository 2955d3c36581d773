//! `$PORT` in a `-- CMD` command's arguments: zdr gives each worker's
//! command a private port, so the natural `zdr serve -- uvicorn main:app
//! --port '$PORT'` must reach the command with that port, not with the
//! text `$PORT` (no shell runs between zdr and the command). zdr expands
//! `$PORT` and `${PORT}` itself, anywhere in an argument
//! (`--bind=127.0.0.1:$PORT` too).
//!
//! It also catches the two ways a user's shell spoils the command before
//! zdr sees it: an unquoted `$PORT` expanded to nothing (an empty argument,
//! or a port flag left without its value), or to zdr's own port (Heroku
//! and friends set `PORT` for zdr itself), which the command cannot bind
//! beside zdr. Either is refused with the working form.

/// The command's arguments with `$PORT` and `${PORT}` replaced by `port`.
pub(crate) fn expand(args: &[String], port: u16) -> Vec<String> {
    let port = port.to_string();
    args.iter().map(|a| expand_one(a, &port)).collect()
}

fn expand_one(arg: &str, port: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix("{PORT}") {
            out.push_str(port);
            rest = tail;
        } else if let Some(tail) = after
            .strip_prefix("PORT")
            .filter(|t| !t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
        {
            out.push_str(port);
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Flags that take the port (or an address with it) in the servers users
/// put behind zdr: uvicorn, gunicorn, hypercorn, Node's and Ruby's.
const PORT_FLAGS: [&str; 5] = ["--port", "-p", "--bind", "-b", "--listen"];

/// Refuses a command whose port argument the user's shell spoiled: empty
/// (or missing after a port flag), or zdr's own listening port.
/// `own_ports` are the ports zdr binds (0, an ephemeral port, is none).
pub(crate) fn check(command: &[String], own_ports: &[u16]) -> Result<(), String> {
    let fix = "write it as '$PORT' in single quotes (zdr puts the command's own port there), \
               for example: zdr serve -- uvicorn main:app --port '$PORT'";
    let args = command.get(1..).unwrap_or_default();
    for (i, arg) in args.iter().enumerate() {
        let after_flag = i > 0 && PORT_FLAGS.contains(&args[i - 1].as_str());
        if arg.is_empty() && after_flag {
            return Err(format!(
                "the command's {} argument is empty; was it an unquoted $PORT that your shell \
                 expanded to nothing? {fix}",
                args[i - 1]
            ));
        }
        // `--port=` with nothing after it.
        if let Some(flag) = PORT_FLAGS
            .iter()
            .find(|f| arg.strip_prefix(**f).is_some_and(|v| v == "="))
        {
            return Err(format!(
                "the command's {flag} argument is empty; was it an unquoted $PORT that your \
                 shell expanded to nothing? {fix}"
            ));
        }
        let value = if after_flag {
            Some(arg.as_str())
        } else {
            PORT_FLAGS
                .iter()
                .find_map(|f| arg.strip_prefix(f)?.strip_prefix('='))
        };
        if let Some(port) = value.and_then(port_of) {
            if port != 0 && own_ports.contains(&port) {
                return Err(format!(
                    "the command would listen on port {port}, which zdr itself binds; each \
                     worker's command gets a private port of its own: {fix}"
                ));
            }
        }
    }
    if let Some(last) = args.last().filter(|a| PORT_FLAGS.contains(&a.as_str())) {
        return Err(format!(
            "the command ends with {last} and no value; was it an unquoted $PORT that your \
             shell expanded to nothing? {fix}"
        ));
    }
    Ok(())
}

/// The port a port flag's value names: `8000`, `0.0.0.0:8000`, `[::]:8000`.
fn port_of(value: &str) -> Option<u16> {
    let digits = value.rsplit(':').next()?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn port_is_expanded_in_both_spellings_and_anywhere_in_an_argument() {
        let got = expand(
            &args(&[
                "uvicorn",
                "--port",
                "$PORT",
                "--bind=127.0.0.1:${PORT}",
                "$PORTS",
                "$PORT_X",
                "cost $5",
                "$",
                "${PORT}${PORT}",
            ]),
            4321,
        );
        assert_eq!(
            got,
            args(&[
                "uvicorn",
                "--port",
                "4321",
                "--bind=127.0.0.1:4321",
                "$PORTS",
                "$PORT_X",
                "cost $5",
                "$",
                "43214321",
            ])
        );
    }

    #[test]
    fn a_port_spoiled_by_the_shell_is_refused_with_the_working_form() {
        for (command, says) in [
            (
                &["uvicorn", "main:app", "--port", ""][..],
                "--port argument is empty",
            ),
            (&["uvicorn", "main:app", "--port"][..], "ends with --port"),
            (
                &["gunicorn", "-b", "", "app:app"][..],
                "-b argument is empty",
            ),
            (
                &["gunicorn", "--bind=", "app:app"][..],
                "--bind argument is empty",
            ),
            (
                &["uvicorn", "main:app", "--port", "8000"][..],
                "which zdr itself binds",
            ),
            (
                &["gunicorn", "-b", "0.0.0.0:8000", "app:app"][..],
                "which zdr itself binds",
            ),
            (
                &["gunicorn", "--bind=[::]:8000", "app:app"][..],
                "which zdr itself binds",
            ),
        ] {
            let err = check(&args(command), &[8000]).expect_err(&format!("{command:?}"));
            assert!(err.contains(says), "{command:?}: {err}");
            assert!(err.contains("'$PORT'"), "{err}");
        }
    }

    #[test]
    fn working_commands_pass() {
        for command in [
            &["uvicorn", "main:app", "--port", "$PORT"][..],
            &["sh", "-c", "exec uvicorn main:app --port $PORT"][..],
            &["node", "server.js"][..],
            &["gunicorn", "-b", "127.0.0.1:9000", "app:app"][..],
            &["python3", "-m", "http.server", "-b", "127.0.0.1"][..],
        ] {
            assert_eq!(check(&args(command), &[8000, 0]), Ok(()), "{command:?}");
        }
        assert_eq!(check(&[], &[8000]), Ok(()));
    }
}
