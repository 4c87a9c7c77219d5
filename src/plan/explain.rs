//! EXPLAIN of a streaming plan: the operator graph from the sink down, one line per
//! node with its parallelism, how its input arrives, its changelog and its state.

use crate::stream::graph::StreamGraph;

pub fn render(graph: &StreamGraph) -> String {
    let mut out = String::new();
    if let Some(last) = graph.nodes.len().checked_sub(1) {
        render_node(
            graph,
            last,
            0,
            &mut vec![false; graph.nodes.len()],
            &mut out,
        );
    }
    for notice in &graph.notices {
        out.push_str(&format!("NOTICE: {notice}\n"));
    }
    out
}

/// A node read by two parts of the query (a shared subplan) is printed in full once; where
/// it comes again, its line says so and its inputs are not repeated.
fn render_node(graph: &StreamGraph, id: usize, depth: usize, shown: &mut [bool], out: &mut String) {
    let node = &graph.nodes[id];
    let again = std::mem::replace(&mut shown[id], true);
    out.push_str(&"  ".repeat(depth));
    out.push_str(&format!(
        "{} [parallelism={}, changelog={}",
        node.name, node.parallelism, node.changelog
    ));
    if let Some(key) = graph.upsert_keys.get(&id) {
        out.push_str(&format!(" (upsert key: {key})"));
    }
    if !node.inputs.is_empty() {
        let inputs: Vec<String> = node.inputs.iter().map(|e| e.exchange.describe()).collect();
        out.push_str(&format!(", input={}", inputs.join(" + ")));
    }
    out.push_str(&format!(", state={}]", node.state));
    if !node.detail.is_empty() {
        out.push_str(": ");
        out.push_str(&without_window_tables(&node.detail.replace('\n', " ")));
    }
    if again {
        out.push_str(" (shared: the same node as above, computed once)\n");
        return;
    }
    out.push('\n');
    for edge in &node.inputs {
        render_node(graph, edge.from, depth + 1, shown, out);
    }
}

/// Column qualifiers that name a window table function's encoded table say nothing to a
/// reader: drop them (`__weir_window__{...}.qty` becomes `qty`).
fn without_window_tables(text: &str) -> String {
    const PREFIX: &str = "__weir_window__{";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(PREFIX) {
        out.push_str(&rest[..start]);
        let after = &rest[start + PREFIX.len() - 1..];
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = after[end..].strip_prefix('.').unwrap_or(&after[end..]);
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn window_table_qualifiers_are_dropped() {
        assert_eq!(
            super::without_window_tables(
                r#"__weir_window__{"kind":{"Tumble":{"size":5000}},"table":"t"}.qty, b.x"#
            ),
            "qty, b.x"
        );
    }
}
