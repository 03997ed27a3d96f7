//! No module of the agent imports a module that imports it back, directly
//! or through others: the modules form a graph without cycles, at the top
//! level (`methods::*` counts as `methods`) and among the submodules of each
//! module that has some (`methods/`, `net/`).
//!
//! The agent is a binary crate, so this test reads its sources. A module
//! refers to another by a path: `use crate::a::X;`, a group
//! `use crate::{a, b::Y};`, an inline `crate::a::f(`, `super::` and
//! `self::` paths, and a parent's bare `child::` path (the root's
//! `agent::build(`, `methods/mod.rs`'s `from_rootfs::run(`). Comments and
//! string literals are skipped; `mod tests { ... }` blocks belong to their
//! file's module. Declaring a module (`mod a;`) is not a reference.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path below the crate root: `[]` is `main.rs`,
/// `["methods", "from_rootfs"]` is `methods/from_rootfs.rs`.
type ModPath = Vec<String>;

/// Every module that has a file, with the references its file makes.
fn read_crate(src: &Path) -> BTreeMap<ModPath, Vec<ModPath>> {
    let mut files = Vec::new();
    collect_rs(src, &mut files);
    let modules: BTreeMap<ModPath, PathBuf> =
        files.into_iter().map(|f| (module_of(src, &f), f)).collect();
    let known: BTreeSet<ModPath> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(module, file)| {
            let text = std::fs::read_to_string(file).unwrap();
            let refs = references(module, &strip_comments_and_strings(&text), &known);
            (module.clone(), refs)
        })
        .collect()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: ModPath = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts == ["main"] || parts == ["lib"] || parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The text with comments, string and char literals blanked out (newlines
/// kept), so that neither a doc comment nor a URL reads as a path.
fn strip_comments_and_strings(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut i = 0;
    while i < c.len() {
        if c[i] == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (at(i + 1) == '"' || at(i + 1) == '#')
            && (i == 0 || !is_ident(c[i - 1]))
        {
            // A raw string r"..." or r#"..."#.
            let mut hashes = 0;
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            i = j + 1;
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            i += 1;
        } else if c[i] == '\'' && (at(i + 2) == '\'' || at(i + 1) == '\\') {
            // A char literal ('x', '\n', '\''), not a lifetime ('a).
            i += 1;
            if c[i] == '\\' {
                i += 1;
            }
            i += 1;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

fn tokenize(code: &str) -> Vec<Token> {
    let c: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if c[i].is_whitespace() {
            i += 1;
        } else if is_ident(c[i]) {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            tokens.push(Token::Ident(c[start..i].iter().collect()));
        } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
            tokens.push(Token::PathSep);
            i += 2;
        } else {
            tokens.push(Token::Punct(c[i]));
            i += 1;
        }
    }
    tokens
}

/// The modules `module`'s file refers to (each reference as the longest
/// known module path it names).
fn references(module: &[String], code: &str, known: &BTreeSet<ModPath>) -> Vec<ModPath> {
    let tokens = tokenize(code);
    let mut refs = Vec::new();
    // Inline modules (`mod tests {`) open at a brace depth.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                depth -= 1;
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Token::Ident(kw) if kw == "mod" => {
                if let (Some(Token::Ident(name)), Some(Token::Punct('{'))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                    depth += 1;
                    i += 3;
                    continue;
                }
            }
            Token::Ident(first) if tokens.get(i + 1) == Some(&Token::PathSep) => {
                let after_sep = i > 0 && tokens[i - 1] == Token::PathSep;
                let here: ModPath = module
                    .iter()
                    .cloned()
                    .chain(inline.iter().map(|(n, _)| n.clone()))
                    .collect();
                let child: ModPath = module.iter().cloned().chain([first.clone()]).collect();
                let anchor = match first.as_str() {
                    _ if after_sep => None,
                    "crate" => Some(vec![]),
                    "self" | "super" => Some(here.clone()),
                    // A child module named by its parent (inline modules
                    // have no children with files).
                    _ if inline.is_empty() && known.contains(&child) => Some(module.to_vec()),
                    _ => None,
                };
                if let Some(anchor) = anchor {
                    let (paths, next) = use_tree(&tokens, i, anchor);
                    for path in paths {
                        refs.push(longest_known(&path, known));
                    }
                    i = next;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    refs
}

/// Reads the path (or `use` tree) that starts at `tokens[start]`, resolved
/// from `base`; returns every full path it names and the index after it.
fn use_tree(tokens: &[Token], start: usize, base: ModPath) -> (Vec<ModPath>, usize) {
    let mut path = base;
    let mut i = start;
    loop {
        match tokens.get(i) {
            Some(Token::Ident(s)) if s == "crate" && i == start => {}
            Some(Token::Ident(s)) if s == "self" => {}
            Some(Token::Ident(s)) if s == "super" => {
                path.pop();
            }
            Some(Token::Ident(s)) => path.push(s.clone()),
            Some(Token::Punct('{')) => {
                // A group: each item is a tree of its own from `path`.
                let mut all = Vec::new();
                i += 1;
                loop {
                    match tokens.get(i) {
                        Some(Token::Punct('}')) | None => return (all, i + 1),
                        Some(Token::Punct(',')) => i += 1,
                        Some(_) => {
                            let (paths, next) = use_tree(tokens, i, path.clone());
                            all.extend(paths);
                            i = next;
                        }
                    }
                }
            }
            Some(Token::Punct('*')) => return (vec![path], i + 1),
            _ => return (vec![path], i),
        }
        i += 1;
        if tokens.get(i) != Some(&Token::PathSep) {
            return (vec![path], i);
        }
        i += 1;
    }
}

fn longest_known(path: &[String], known: &BTreeSet<ModPath>) -> ModPath {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains(p))
        .unwrap_or_default()
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

/// The graph among the modules directly inside `parent` (the parent itself
/// is a node too: its file's items, such as `methods::BuildContext`).
fn graph_inside(
    crate_refs: &BTreeMap<ModPath, Vec<ModPath>>,
    parent: &[String],
) -> BTreeMap<String, BTreeSet<String>> {
    let node = |m: &ModPath| -> Option<String> {
        if !m.starts_with(parent) {
            return None;
        }
        Some(name(&m[..(parent.len() + 1).min(m.len())]))
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, refs) in crate_refs {
        let Some(from) = node(from) else { continue };
        let edges = graph.entry(from.clone()).or_default();
        for to in refs.iter().filter_map(node) {
            if to != from {
                edges.insert(to);
            }
        }
    }
    graph
}

/// A cycle in `graph`, as the path that closes it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

fn describe(graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    graph
        .iter()
        .map(|(from, to)| {
            let to: Vec<&str> = to.iter().map(String::as_str).collect();
            let to = if to.is_empty() {
                "(none)".into()
            } else {
                to.join(", ")
            };
            format!("  {from} -> {to}\n")
        })
        .collect()
}

fn assert_acyclic(graph: &BTreeMap<String, BTreeSet<String>>, what: &str) {
    if let Some(cycle) = find_cycle(graph) {
        panic!(
            "{what}: modules import each other: {}\nthe graph:\n{}",
            cycle.join(" -> "),
            describe(graph)
        );
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_top_level_modules_form_no_cycle() {
    let refs = read_crate(&src());
    let graph = graph_inside(&refs, &[]);
    println!("the top-level modules:\n{}", describe(&graph));
    // The reader sees the references it must: a guard against a parser
    // that finds nothing and so no cycle.
    assert!(graph["pid1"].contains("agent"), "{}", describe(&graph));
    assert!(graph["agent"].contains("methods"), "{}", describe(&graph));
    assert!(graph["crate"].contains("agent"), "{}", describe(&graph));
    assert_acyclic(&graph, "the agent's top-level modules");
}

#[test]
fn the_submodules_of_each_module_form_no_cycle() {
    let refs = read_crate(&src());
    let parents: BTreeSet<ModPath> = refs
        .keys()
        .filter(|m| m.len() > 1)
        .map(|m| m[..m.len() - 1].to_vec())
        .collect();
    assert!(
        parents.contains(&vec!["methods".to_string()]),
        "{parents:?}"
    );
    for parent in parents {
        let graph = graph_inside(&refs, &parent);
        println!("inside {}:\n{}", name(&parent), describe(&graph));
        assert_acyclic(&graph, &format!("inside {}", name(&parent)));
    }
}

#[test]
fn the_reader_resolves_groups_inline_paths_and_super() {
    let known: BTreeSet<ModPath> = [
        vec![],
        vec!["a".to_string()],
        vec!["b".to_string()],
        vec!["m".to_string()],
        vec!["m".to_string(), "x".to_string()],
        vec!["m".to_string(), "y".to_string()],
    ]
    .into_iter()
    .collect();
    let code = r#"
        // crate::commented::out
        use crate::{a::{self, A}, b};
        use super::y::Y;
        use super::{Ctx, y};
        fn f() { let s = "crate::in_a_string"; crate::a::f(); x::g(); }
        #[cfg(test)]
        mod tests { use super::*; }
    "#;
    let stripped = strip_comments_and_strings(code);
    let x = vec!["m".to_string(), "x".to_string()];
    let names: Vec<String> = references(&x, &stripped, &known)
        .iter()
        .map(|m| name(m))
        .collect();
    assert_eq!(names, ["a", "a", "b", "m::y", "m", "m::y", "a", "m::x"]);
    let root_names: Vec<String> = references(&[], "a::f(); m::x::g(); other::h();", &known)
        .iter()
        .map(|m| name(m))
        .collect();
    assert_eq!(root_names, ["a", "m::x"]);
}

#[test]
fn a_cycle_is_found_and_named() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("agent", vec!["pid1", "stage"]),
        ("pid1", vec!["agent"]),
        ("stage", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph).unwrap(),
        ["agent", "pid1", "agent"].map(String::from)
    );
}
