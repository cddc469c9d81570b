//! Holds the code to the layering table in ARCHITECTURE.md ("Layering"): every `crate::` path in
//! a module must name a module its row allows, and every module must have a row.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges the table forbids that another change is removing, with what removes them. Each must
/// still be needed: once the code no longer has the edge, delete its line here.
const PENDING: &[(&str, &str, &str)] = &[];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The table: module -> the modules it may use (`None`: everything).
fn allowed() -> BTreeMap<String, Option<BTreeSet<String>>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let section = text
        .split("\n## Layering\n")
        .nth(1)
        .expect("ARCHITECTURE.md has a Layering section")
        .split("\n## ")
        .next()
        .unwrap();
    let names = |cell: &str| -> BTreeSet<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    };
    let mut table = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (modules, may_use) = (cells[1], cells[3]);
        let uses = (may_use != "everything").then(|| names(may_use));
        for module in names(modules) {
            table.insert(module, uses.clone());
        }
    }
    assert!(!table.is_empty(), "no rows in the Layering table");
    table
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules named by `crate::<module>` in `text`, comments left out.
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = without_comment(line);
        for (at, _) in code.match_indices("crate::") {
            if at > 0 && code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// `line` up to a `//` comment that is not inside a string literal.
fn without_comment(line: &str) -> &str {
    let (mut in_string, mut escaped) = (false, false);
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            b'"' => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// (module, module it uses) -> the files that do.
fn edges() -> BTreeMap<(String, String), Vec<String>> {
    let src = root().join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = Path::new(first)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if matches!(module.as_str(), "lib" | "main" | "layering") {
            continue;
        }
        for used in uses(&std::fs::read_to_string(&file).unwrap()) {
            if used != module {
                edges
                    .entry((module.clone(), used))
                    .or_default()
                    .push(relative.display().to_string());
            }
        }
    }
    edges
}

#[test]
fn every_module_uses_only_what_the_layering_table_allows() {
    let table = allowed();
    let edges = edges();
    let modules: BTreeSet<&String> = edges.keys().map(|(from, _)| from).collect();
    let mut wrong = Vec::new();
    for module in modules {
        if !table.contains_key(module.as_str()) {
            wrong.push(format!(
                "module `{module}` has no row in ARCHITECTURE.md's Layering table"
            ));
        }
    }
    for ((from, to), files) in &edges {
        let Some(Some(may_use)) = table.get(from) else {
            continue;
        };
        let pending = PENDING.iter().any(|(f, t, _)| f == from && t == to);
        if !may_use.contains(to) && !pending {
            wrong.push(format!(
                "`{from}` uses `{to}` ({}), which the Layering table does not allow",
                files.join(", ")
            ));
        }
    }
    for (from, to, why) in PENDING {
        if !edges.contains_key(&(from.to_string(), to.to_string())) {
            wrong.push(format!(
                "`{from}` no longer uses `{to}` ({why}): delete the line in layering::PENDING"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_scan_finds_paths_and_skips_comments() {
    let text = "use crate::spiffe::SpiffeId;\n// crate::server in a comment\nlet x = crate::ca::to_pem(); // crate::agent\nfoo_crate::bar\nlet u = format!(\"a://b\\\"\", crate::clock::unix_now());\n";
    let found: Vec<String> = uses(text).into_iter().collect();
    assert_eq!(found, ["ca", "clock", "spiffe"]);
}
