//! The direction of dependencies between the crate's top-level modules, read from the sources:
//! `main → server → {proxy, admin, reload} → {policy, process} → erp adapters`, with `config`
//! (specs and compiled values) below them. Any cycle fails, and so does `config` importing a
//! runtime module or `error` importing a domain.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its files name as `crate::<module>`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let deps = graph.entry(top.clone()).or_default();
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let code = line.split("//").next().unwrap_or("");
                for (i, _) in code.match_indices("crate::") {
                    let name: String = code[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        deps.insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(node).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn top_level_modules_depend_one_way() {
    let graph = imports();
    assert!(graph.len() >= 10, "read the sources: {graph:?}");
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            panic!("a cycle between top-level modules: {}\n{graph:#?}", cycle.join(" → "));
        }
    }
}

#[test]
fn config_and_error_import_no_runtime_or_domain_module() {
    let graph = imports();
    let runtime = ["server", "proxy", "admin", "reload", "process", "erp", "sandbox", "changes", "events"];
    for dep in &graph["config"] {
        assert!(!runtime.contains(&dep.as_str()), "config imports the runtime module `{dep}`");
    }
    assert!(graph["error"].is_empty(), "error imports {:?}; domains convert into it instead", graph["error"]);
    assert!(
        graph["edge"].is_empty(),
        "edge (TLS, client addresses, the PROXY protocol) imports {:?}; it is a leaf the listeners and policies use",
        graph["edge"]
    );
    assert!(!graph["process"].contains("erp"), "process owns the ERP port; erp implements it");
    for outer in ["changes", "events"] {
        assert!(!graph["process"].contains(outer), "process knows nothing of `{outer}`, which builds on it");
    }
    assert!(!graph["policy"].contains("config"), "policies receive compiled data, not the configuration");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    graph.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(cycle_from(&graph, "a"), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    graph.get_mut("c").unwrap().clear();
    assert_eq!(cycle_from(&graph, "a"), None);
}
