//! `--set section.key=value` on the command line: one key of a TOML tree replaced, the value
//! read as TOML (`3`, `1e-3`, `true`, `[0, 1]`, `"x"`) or, if it is not, as a string. The run
//! configuration (`origami train --set`) and the planner's hardware description
//! (`origami plan --set`) share it; each checks the result against its own schema.

use anyhow::{bail, Context};

/// Sets `section.key[.key…]=value` in `tree`; `example` shows a valid item in the error for a
/// key that names no field of a section.
pub fn apply_override(tree: &mut toml::Table, item: &str, example: &str) -> anyhow::Result<()> {
    let (path, raw) = item
        .split_once('=')
        .with_context(|| format!("--set {item:?}: expected section.key=value"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
        bail!("--set {item:?}: the key must name a section and a field, e.g. {example}");
    }
    let value = parse_value(raw.trim());
    let mut table = tree;
    for key in &keys[..keys.len() - 1] {
        let entry = table
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .with_context(|| format!("--set {item:?}: {key} is not a section"))?;
    }
    table.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

/// A TOML literal, or the raw text as a string.
fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_read_as_toml_else_as_strings_and_sections_are_created() {
        let mut tree: toml::Table = toml::from_str("[a]\nb = 1\n").unwrap();
        for item in ["a.b=2.5", "a.c=true", "a.d=[0, 1]", "a.e=byte", "x.y.z=3"] {
            apply_override(&mut tree, item, "a.b=1").unwrap();
        }
        let expected: toml::Table =
            toml::from_str("[a]\nb = 2.5\nc = true\nd = [0, 1]\ne = \"byte\"\n[x.y]\nz = 3\n")
                .unwrap();
        assert_eq!(tree, expected);
    }

    #[test]
    fn malformed_items_are_errors_that_quote_them() {
        let mut tree: toml::Table = toml::from_str("[a]\nb = 1\n").unwrap();
        for (item, says) in [
            ("a.b", "expected section.key=value"),
            ("a=1", "e.g. a.b=1"),
            ("a..b=1", "e.g. a.b=1"),
            ("a.b.c=1", "b is not a section"),
        ] {
            let err = apply_override(&mut tree, item, "a.b=1").unwrap_err();
            let message = format!("{err:#}");
            assert!(
                message.contains(item) && message.contains(says),
                "{message}"
            );
        }
    }
}
