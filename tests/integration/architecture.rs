//! The direction of dependencies between the crate's top-level modules, read from the sources
//! and checked against the "may use" table of docs/architecture.md: an import the table does not
//! allow fails, and so does a module the table leaves out. Any cycle fails too, and so does
//! `config` importing a runtime module or `error` importing a domain.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Top-level module → the top-level modules its files name as `crate::<module>`.
fn imports() -> Graph {
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

/// docs/architecture.md's module table: module → the modules its "may use" column names (in
/// backticks; `everything` for the CLI). A row's module is its first cell's backticked name
/// without `.rs` or `/`.
fn documented(doc: &str) -> Graph {
    let backticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(|n| n.trim_end_matches(".rs").trim_end_matches('/').to_string())
            .collect()
    };
    let mut table = Graph::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
        let (Some(first), Some(last)) = (cells.first(), cells.last()) else { continue };
        let Some(module) = backticked(first).into_iter().next() else { continue };
        table.insert(module, backticked(last).into_iter().collect());
    }
    table
}

/// Every way the code departs from the documented table: an import it does not list, a module
/// it leaves out, a module it lists that is not there.
fn violations(code: &Graph, doc: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    for (module, deps) in code {
        let Some(allowed) = doc.get(module) else {
            found.push(format!("`{module}` is missing from the module table"));
            continue;
        };
        for dep in deps.iter().filter(|d| !allowed.contains(*d) && !allowed.contains("everything")) {
            found.push(format!("`{module}` imports `{dep}`, which its row's \"may use\" does not list"));
        }
    }
    for module in doc.keys().filter(|m| !code.contains_key(*m) && *m != "main") {
        found.push(format!("the table lists `{module}`, which is not a module of src/"));
    }
    found
}

fn architecture_doc() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md")).unwrap()
}

#[test]
fn every_import_between_modules_is_one_the_architecture_doc_allows() {
    let (code, doc) = (imports(), documented(&architecture_doc()));
    assert!(doc.len() >= 15, "read the table of docs/architecture.md: {doc:#?}");
    let found = violations(&code, &doc);
    assert!(found.is_empty(), "docs/architecture.md and the code disagree:\n  {}", found.join("\n  "));
}

#[test]
fn the_doc_check_finds_an_undocumented_import_and_a_missing_module() {
    let doc = documented(
        "| module | what | may use |\n|---|---|---|\n| `a/` | A | `b`, `c` |\n| `b.rs` | B | nothing |\n| `c.rs` | C | nothing |\n",
    );
    let mut code = Graph::new();
    code.insert("a".into(), BTreeSet::from(["b".to_string(), "c".to_string()]));
    code.insert("b".into(), BTreeSet::new());
    code.insert("c".into(), BTreeSet::new());
    assert_eq!(violations(&code, &doc), Vec::<String>::new());
    code.get_mut("b").unwrap().insert("a".into());
    code.insert("d".into(), BTreeSet::new());
    code.remove("c");
    assert_eq!(
        violations(&code, &doc),
        [
            "`b` imports `a`, which its row's \"may use\" does not list",
            "`d` is missing from the module table",
            "the table lists `c`, which is not a module of src/",
        ]
    );
}

/// A cycle through `start`, if any (depth-first search).
fn cycle_from(graph: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &Graph,
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
