//! Rules of the workspace's layout, checked on its files so a change that
//! breaks one fails here, not in review: `contracts` owns what is on the
//! wire (no other crate's `src/` spells a `conv.` subject or event type);
//! the shipped `convctl` links no service crate (in its resolved dependency
//! graph, read with `cargo metadata`); errors are typed (no `Result<_,
//! String>` and no `type Err = String` in any `src/`).

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `src/` files of every crate but those named in `except`.
fn crate_sources(except: &[&str]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(workspace()).expect("the workspace").flatten() {
        let src = entry.path().join("src");
        let name = entry.file_name();
        let skipped = except.iter().any(|e| name == *e);
        if src.is_dir() && !skipped && entry.path().join("Cargo.toml").is_file() {
            sources(&src, &mut files);
        }
    }
    assert!(files.len() > 40, "found the crates' sources: {}", files.len());
    files
}

/// The error type of each `Result<…>` in `text` that is `String`, with its line.
fn string_errors(text: &str) -> Vec<usize> {
    let mut found = Vec::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("Result<") {
        let start = from + at + "Result<".len();
        let boundary =
            from + at == 0 || !(bytes[from + at - 1].is_ascii_alphanumeric() || bytes[from + at - 1] == b'_');
        // The last argument at depth 0, up to the closing `>`.
        let (mut depth, mut args, mut arg, mut i) = (0i32, Vec::new(), start, start);
        while i < bytes.len() {
            match bytes[i] {
                // The arrow of a function type is not a bracket.
                b'>' if i > 0 && bytes[i - 1] == b'-' => {}
                b'<' | b'(' | b'[' => depth += 1,
                b'>' if depth == 0 => break,
                b'>' | b')' | b']' => depth -= 1,
                b',' if depth == 0 => {
                    args.push(text[arg..i].trim());
                    arg = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        if i < bytes.len() {
            args.push(text[arg..i].trim());
        }
        // A trailing comma leaves an empty last argument.
        let error = args.iter().rev().find(|a| !a.is_empty());
        if boundary && args.len() >= 2 && error == Some(&"String") {
            found.push(text[..start].lines().count());
        }
        from = start;
    }
    found
}

#[test]
fn no_subject_or_event_type_literal_outside_contracts() {
    let needle = ["\"", "conv."].concat();
    let mut found = Vec::new();
    for file in crate_sources(&["contracts", "target"]) {
        let text = std::fs::read_to_string(&file).expect("readable");
        for (n, line) in text.lines().enumerate() {
            if line.contains(&needle) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "wire names belong in conv_contracts::subject / EventType:\n{}", found.join("\n"));
}

/// `text` without its comment lines (`//`, `///`, `//!`).
fn code(text: &str) -> String {
    text.lines().map(|l| if l.trim_start().starts_with("//") { "" } else { l }).collect::<Vec<_>>().join("\n")
}

/// Every package `package` links when built as shipped: its normal
/// dependencies, transitively (dev- and build-dependencies left out).
fn linked(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--manifest-path"])
        .arg(workspace().join("Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let name_of = |id: &str| {
        meta["packages"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["id"] == id))
            .and_then(|p| p["name"].as_str())
            .map(str::to_owned)
    };
    let nodes = meta["resolve"]["nodes"].as_array().expect("a resolve graph");
    let start = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == package))
        .and_then(|p| p["id"].as_str())
        .expect("the package")
        .to_owned();
    let (mut seen, mut todo) = (vec![start.clone()], vec![start]);
    while let Some(id) = todo.pop() {
        let node = nodes.iter().find(|n| n["id"] == id.as_str()).expect("a node");
        for dep in node["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"].as_array().into_iter().flatten().any(|k| k["kind"].is_null());
            let dep_id = dep["pkg"].as_str().unwrap_or_default().to_owned();
            if normal && !seen.contains(&dep_id) {
                seen.push(dep_id.clone());
                todo.push(dep_id);
            }
        }
    }
    seen.iter().filter_map(|id| name_of(id)).collect()
}

#[test]
fn convctl_links_no_service_crate() {
    let linked = linked("conv-ops");
    assert!(linked.iter().any(|p| p == "conv-store"), "the graph was read: {linked:?}");
    for service in ["conv-ingress", "conv-effects", "conv-runtime", "conv-projections"] {
        assert!(!linked.contains(&service.to_owned()), "convctl links {service}");
    }
}

#[test]
fn no_string_errors_in_any_src() {
    assert_eq!(string_errors("fn a() -> Result<(), String> {}"), vec![1]);
    assert_eq!(
        string_errors("fn a() -> Result<Vec<String>, E> {}\nfn b() -> Result<\n  u8,\n  String,\n> {}"),
        vec![2]
    );
    assert!(string_errors("fn a() -> Result<(String, u8), Error> {} type X = MyResult<u8, String>;").is_empty());
    assert_eq!(string_errors("fn a() -> Result<Box<dyn Fn() -> u8>, String> {}"), vec![1]);
    let mut found = Vec::new();
    for file in crate_sources(&["target"]) {
        let text = code(&std::fs::read_to_string(&file).expect("readable"));
        for line in string_errors(&text) {
            found.push(format!("{}:{line}", file.display()));
        }
        for (n, line) in text.lines().enumerate() {
            let squeezed: String = line.split_whitespace().collect();
            if squeezed.starts_with("typeErr=String") || squeezed.starts_with("typeError=String") {
                found.push(format!("{}:{}", file.display(), n + 1));
            }
        }
    }
    assert!(found.is_empty(), "errors are typed (thiserror), not strings:\n{}", found.join("\n"));
}
