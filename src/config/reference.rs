//! The settings' reference, made from their one declaration
//! ([`super::Options`]): the `[default: …]` that `--help` shows, the
//! README's settings table and `zdr.toml.example`. Tests check the README
//! and the example against it; `ZDR_BLESS=1 cargo test --lib reference`
//! writes them.

use clap::Args;

use super::Options;

/// One setting, as its declaration describes it.
#[derive(Debug, Clone)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct Entry {
    /// The config file's key.
    pub key: String,
    /// `-b/--bind`; for a positional, its value's name (`MODULE:APP`), or
    /// `-- CMD ARGS` for the command.
    pub flag: String,
    /// The `ZDR_*` variable, if it has one.
    pub env: Option<String>,
    /// The default as words: the declared value, or what the doc says
    /// (`[default: …]`) when it depends on more than a value.
    pub default: String,
    /// Whether [`Entry::default`] is a declared value (not words).
    pub declared: bool,
    /// The first paragraph of its doc (`-h`), without the default.
    pub summary: String,
    /// Its doc past the first paragraph (`--help` shows both), or the
    /// first when there is no more: what the README's table and the
    /// example say of it. Without the default.
    pub text: String,
    /// What `zdr.toml.example` sets it to, as TOML: its default, or for a
    /// setting with none, its example (commented out).
    pub value: String,
    /// Whether [`Entry::value`] is an example rather than the default.
    pub example: bool,
}

/// A doc text without its `[default: …]`, and the default it gives.
fn split_default(doc: &str) -> (String, Option<String>) {
    let Some(at) = doc.find("[default:") else {
        return (doc.trim().to_owned(), None);
    };
    let rest = &doc[at + "[default:".len()..];
    let end = rest.find(']').unwrap_or(rest.len());
    let default = rest[..end].split_whitespace().collect::<Vec<_>>().join(" ");
    let text = format!("{}{}", &doc[..at], rest.get(end + 1..).unwrap_or(""));
    (text.trim().to_owned(), Some(default))
}

/// A paragraph that ends as a sentence does (clap drops a lone
/// sentence's period from `-h`'s line).
fn sentence(text: &str) -> String {
    let text = text.trim();
    if text.ends_with(['.', ')', '!', '?']) {
        text.to_owned()
    } else {
        format!("{text}.")
    }
}

/// A declared default as words (`--help`'s `[default: …]`).
fn shown(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) if s.is_empty() => "\"\"".to_owned(),
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) if f.fract() == 0.0 => format!("{f:.0}"),
        toml::Value::Array(items) => items.iter().map(shown).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// A declared default as TOML, as `zdr.toml.example` writes it (seconds
/// without a needless `.0`).
fn toml_text(value: &toml::Value) -> String {
    match value {
        toml::Value::Float(f) if f.fract() == 0.0 => format!("{f:.0}"),
        toml::Value::String(s) if s.contains('"') && !s.contains('\'') => format!("'{s}'"),
        toml::Value::Array(items) => format!(
            "[{}]",
            items.iter().map(toml_text).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

/// Every setting, in the order of its declaration.
pub fn entries() -> Vec<Entry> {
    let command = Options::augment_args(clap::Command::new("zdr"));
    let defaults = Options::default_values();
    Options::KEYS
        .iter()
        .filter_map(|&key| {
            let arg = command.get_arguments().find(|a| a.get_id() == key)?;
            let flag = match (arg.get_short(), arg.get_long()) {
                (Some(s), Some(l)) => format!("-{s}/--{l}"),
                (None, Some(l)) => format!("--{l}"),
                _ if arg.is_last_set() => "-- CMD ARGS".to_owned(),
                _ => arg
                    .get_value_names()
                    .and_then(|names| names.first())
                    .map_or_else(|| key.to_owned(), |name| name.to_string()),
            };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let long = arg
                .get_long_help()
                .map(|h| h.to_string())
                .unwrap_or_else(|| help.clone());
            let (summary, said) = split_default(&help);
            let (text, said_long) = split_default(&long);
            let text = match text.split_once("\n\n") {
                Some((_, more)) => more.trim().to_owned(),
                None => sentence(&summary),
            };
            let value = defaults
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.clone());
            let example = Options::EXAMPLES
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, e)| (*e).to_owned());
            let declared = said.is_none() && said_long.is_none() && value.is_some();
            let default = said
                .or(said_long)
                .or_else(|| value.as_ref().map(shown))
                .unwrap_or_else(|| "none".to_owned());
            let (value, example) = match (example, value) {
                (Some(e), _) => (e, true),
                (None, Some(v)) => (toml_text(&v), false),
                (None, None) => (String::new(), true),
            };
            Some(Entry {
                key: key.to_owned(),
                flag,
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                default,
                declared,
                summary,
                text,
                value,
                example,
            })
        })
        .collect()
}

/// The command line with each declared default in its flag's help, as
/// `[default: …]` (a default the doc words itself is already there).
pub fn with_defaults(command: clap::Command) -> clap::Command {
    let entries = entries();
    let mut command = command;
    for entry in entries.iter().filter(|e| e.declared) {
        let id = entry.key.clone();
        let default = entry.default.clone();
        command = command.mut_arg(id, |arg| {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let long = arg.get_long_help().map(|h| h.to_string());
            let arg = arg.help(format!("{help} [default: {default}]"));
            match long {
                Some(long) => arg.long_help(format!("{long}\n\n[default: {default}]")),
                None => arg,
            }
        });
    }
    command
}

#[cfg(test)]
/// The README's settings table.
pub fn readme_table() -> String {
    let mut out = String::from("| key | flag | env | default | meaning |\n|---|---|---|---|---|\n");
    for e in entries() {
        let default = if e.declared
            && !e.default.chars().all(|c| c.is_ascii_digit() || c == '.')
            && e.default != "false"
            && e.default != "true"
        {
            format!("`{}`", e.default)
        } else {
            e.default.clone()
        };
        let meaning = e.text.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} | {} |\n",
            e.key,
            e.flag,
            e.env
                .as_deref()
                .map_or("—".to_owned(), |v| format!("`{v}`")),
            default.replace('|', "\\|"),
            meaning.replace('|', "\\|"),
        ));
    }
    out
}

#[cfg(test)]
/// Words wrapped at 76 columns, each line a `#` comment.
fn comment(text: &str) -> String {
    let mut out = String::new();
    for paragraph in text.split("\n\n") {
        if !out.is_empty() {
            out.push_str("#\n");
        }
        let mut line = String::from("#");
        for word in paragraph.split_whitespace() {
            if line.len() + 1 + word.len() > 76 && line.len() > 1 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("#");
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
/// The part of `zdr.toml.example` after its preamble: every setting with
/// its doc, its flag and variable, and its default (or, commented out, an
/// example).
pub fn example_settings() -> String {
    let mut out = String::new();
    for e in entries() {
        out.push('\n');
        out.push_str(&comment(&e.text));
        let mut how = format!("# Flag: {}.", e.flag);
        if let Some(env) = &e.env {
            how.push_str(&format!(" Env: {env}."));
        }
        if e.example || !e.declared {
            how.push_str(&format!(" Default: {}.", e.default));
        }
        out.push_str(&how);
        out.push('\n');
        if e.example {
            out.push_str(&format!("# {} = {}\n", e.key, e.value));
        } else {
            out.push_str(&format!("{} = {}\n", e.key, e.value));
        }
    }
    out
}

#[cfg(test)]
/// The line after which `zdr.toml.example` is made from the declarations.
pub const EXAMPLE_MARK: &str = "# ---- Every setting, from its declaration (src/config.rs). ----";
#[cfg(test)]
/// The README lines around its settings table.
pub const README_BEGIN: &str =
    "<!-- The settings table is made from their declarations (src/config.rs): ZDR_BLESS=1 cargo test --lib reference -->";
#[cfg(test)]
/// The line after the README's settings table.
pub const README_END: &str = "<!-- end of the settings table -->";

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// `text` with what lies between `begin` and `end` (or after `begin`
    /// to the end) replaced by `made`.
    fn replaced(text: &str, begin: &str, end: Option<&str>, made: &str) -> String {
        let at = text.find(begin).expect("the mark") + begin.len();
        let tail = match end {
            Some(end) => &text[text[at..].find(end).expect("the end mark") + at..],
            None => "",
        };
        format!("{}\n{made}{tail}", &text[..at])
    }

    /// Checks (or with ZDR_BLESS=1 writes) a file made from the
    /// declarations.
    fn check(name: &str, begin: &str, end: Option<&str>, made: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let want = replaced(&text, begin, end, made);
        if std::env::var_os("ZDR_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
            return;
        }
        if text != want {
            let line = text
                .lines()
                .zip(want.lines())
                .position(|(a, b)| a != b)
                .map_or(text.lines().count().min(want.lines().count()), |n| n);
            panic!(
                "{name} differs from the settings' declarations at line {}:\n  has:  {:?}\n  made: {:?}\n\
                 Run `ZDR_BLESS=1 cargo test --lib reference` to write it from src/config.rs.",
                line + 1,
                text.lines().nth(line).unwrap_or(""),
                want.lines().nth(line).unwrap_or("")
            );
        }
    }

    #[test]
    fn the_readme_table_is_made_from_the_declarations() {
        check("README.md", README_BEGIN, Some(README_END), &readme_table());
    }

    #[test]
    fn the_example_config_is_made_from_the_declarations() {
        check("zdr.toml.example", EXAMPLE_MARK, None, &example_settings());
    }

    #[test]
    fn every_setting_has_a_default_or_an_example() {
        assert_eq!(
            entries().len(),
            Options::KEYS.len(),
            "a setting with no flag"
        );
        for e in entries() {
            assert!(
                !e.value.is_empty(),
                "{}: give it `= default` or `=> \"example\"`",
                e.key
            );
            assert!(!e.summary.is_empty(), "{}: no doc", e.key);
        }
    }

    #[test]
    fn help_shows_each_declared_default() {
        let command = with_defaults(Options::augment_args(clap::Command::new("zdr")));
        let keepalive = command
            .get_arguments()
            .find(|a| a.get_id() == "keepalive")
            .unwrap();
        let help = keepalive.get_help().unwrap().to_string();
        assert!(help.ends_with("[default: 2]"), "{help}");
        // A default the doc words itself is not repeated.
        let bind = command
            .get_arguments()
            .find(|a| a.get_id() == "bind")
            .unwrap();
        let help = bind
            .get_long_help()
            .or(bind.get_help())
            .unwrap()
            .to_string();
        assert_eq!(help.matches("[default:").count(), 1, "{help}");
    }
}
