"""The Archtree HTTP API: submit pruning jobs, follow them, fetch results, manage agents."""
