"""nodegraph: a typed node-graph workflow engine."""
