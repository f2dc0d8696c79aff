//! The module graph must stay a DAG with the layers of docs/architecture.md: a module may use
//! modules of its own layer or lower ones, never higher ones, and never in a circle. This test
//! reads the sources, so a change that breaks either rule fails `cargo test`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top layer first. Keep in step with docs/architecture.md.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["server", "admin", "signals", "logging"],
    &["listener"],
    &["session"],
    &["device", "upstream", "greeting", "login", "relay"],
    &["context"],
    &["audit", "limits"],
    &[
        "metrics",
        "inventory",
        "certs",
        "protocol",
        "tls",
        "proxy_protocol",
        "oauth",
        "credentials",
        "dashboard",
    ],
    &["outcome", "config", "text", "fsutil", "secret"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Every `crate::NAME` in each top-level module's files, comments excluded. Grouped imports
/// (`crate::{a, b}`) would hide names from this scan, so they are refused.
fn uses() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(&src).expect("under src");
            let top = relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .unwrap_or("")
                .trim_end_matches(".rs")
                .to_string();
            if matches!(top.as_str(), "lib" | "main" | "layering") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            let used: &mut BTreeSet<String> = graph.entry(top.clone()).or_default();
            for line in text.lines().map(str::trim_start) {
                if line.starts_with("//") {
                    continue;
                }
                assert!(
                    !line.contains("crate::{"),
                    "{}: import crate modules one path at a time",
                    path.display()
                );
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        used.insert(name);
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn modules_only_use_their_own_layer_or_lower_ones() {
    let graph = uses();
    for (module, used) in &graph {
        let Some(own) = layer(module) else {
            panic!("module {module} is not in a layer: add it to LAYERS and docs/architecture.md");
        };
        for name in used {
            let theirs = layer(name).unwrap_or_else(|| panic!("{module} uses unknown {name}"));
            assert!(
                theirs >= own,
                "{module} (layer {own}) uses {name} (layer {theirs}), a higher layer"
            );
        }
    }
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = uses();
    // Depth-first search with colours: a grey module met again closes a circle.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        grey: &mut Vec<&'a str>,
        black: &mut BTreeSet<&'a str>,
    ) {
        if black.contains(module) {
            return;
        }
        if let Some(start) = grey.iter().position(|m| *m == module) {
            panic!("module cycle: {} -> {module}", grey[start..].join(" -> "));
        }
        grey.push(module);
        for next in graph.get(module).into_iter().flatten() {
            visit(next, graph, grey, black);
        }
        grey.pop();
        black.insert(module);
    }
    let mut black = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut black);
    }
}
