//! EXPLAIN of a streaming plan: the operator graph from the sink down, one line per
//! node with its parallelism, how its input arrives, its changelog and its state.

use crate::stream::graph::StreamGraph;

pub fn render(graph: &StreamGraph) -> String {
    let mut out = String::new();
    if let Some(last) = graph.nodes.len().checked_sub(1) {
        render_node(graph, last, None, 0, &mut out);
    }
    out
}

fn render_node(
    graph: &StreamGraph,
    id: usize,
    input: Option<String>,
    depth: usize,
    out: &mut String,
) {
    let node = &graph.nodes[id];
    out.push_str(&"  ".repeat(depth));
    out.push_str(&format!(
        "{} [parallelism={}, changelog={}",
        node.name, node.parallelism, node.changelog
    ));
    if let Some(input) = input {
        out.push_str(&format!(", input={input}"));
    }
    out.push_str(&format!(", state={}]", node.state));
    if !node.detail.is_empty() {
        out.push_str(": ");
        out.push_str(&node.detail.replace('\n', " "));
    }
    out.push('\n');
    for edge in &node.inputs {
        render_node(
            graph,
            edge.from,
            Some(edge.exchange.describe()),
            depth + 1,
            out,
        );
    }
}
