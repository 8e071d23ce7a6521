"""Zero bubble's split backward (Qi et al. 2024): I computes the input gradient, W the weight
gradients later, without walking the input-gradient chain a second time.

A chunk's autograd graph runs from its output down to its input (the received activation) and to
its parameters. Call a node *input-dependent* if the input's gradient flows through it. For each
parameter, the *frontier* is the set of input-dependent nodes closest to it: the matmul that
multiplies the activation by the weight, the norm that scales it, and so on. During I, a pre-hook
on every frontier node keeps the gradient arriving there (the gradient of that node's output).
W then back-propagates from those gradients to the parameters only, so each frontier node computes
just its parameter side and nothing above it runs again.

Parameters are grouped by shared frontier nodes and W runs one backward per group, restricted to
the group's parameters: a frontier seeded in one group cannot push gradient into another group's
parameters through the activation path. A group in which one frontier lies above another (a weight
used twice at different depths) would count that gradient twice; such a group, and parameters no
frontier reaches, take a plain backward from the chunk's output instead. That walks the chunk
again, so tensor hooks and collectives on the activation path run a second time (on every rank
alike, so results stay right; under ZeRO-3 the blocks on that path stay gathered until the step
ends). No model in plait takes this path.

Nothing here communicates. Collectives inside the graph (tensor parallel's conjugate functions,
the vocab-parallel loss) sit on the activation path and run during I; W (but for the fallback)
runs only the parameter side, whose gradients data parallel reduces through its accumulation hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


def _parents(root: Node) -> dict[Node, list[Node]]:
    """Every node under ``root``, with the nodes that pass gradient to it."""
    parents: dict[Node, list[Node]] = {root: []}
    stack = [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in parents:
                parents[child] = []
                stack.append(child)
            parents[child].append(node)
    return parents


def _above(start: list[Node], parents: dict[Node, list[Node]], stop: set[Node] | None = None) -> set[Node]:
    """Nodes reachable upwards (towards the output) from ``start``; with ``stop``, the nodes of
    ``stop`` met first on each path (the walk does not go past them)."""
    seen, hits, stack = set(start), set(), list(start)
    while stack:
        for parent in parents.get(stack.pop(), []):
            if stop is not None and parent in stop:
                hits.add(parent)
            elif parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return hits if stop is not None else seen


def _groups(frontiers: dict[int, set[Node]]) -> list[tuple[list[int], set[Node]]]:
    """Merge parameters (by index) whose frontiers share a node: [(indices, frontier nodes)]."""
    groups: list[tuple[list[int], set[Node]]] = []
    for key, nodes in frontiers.items():
        joined = [g for g in groups if g[1] & nodes]
        keys, merged = [key], set(nodes)
        for g in joined:
            keys += g[0]
            merged |= g[1]
            groups.remove(g)
        groups.append((keys, merged))
    return groups


def _nested(nodes: set[Node], dependent: set[Node]) -> bool:
    """Whether one of ``nodes`` lies below another along input-dependent nodes."""
    for node in nodes:
        stack, seen = [node], {node}
        while stack:
            for child, _ in stack.pop().next_functions:
                if child is None or child in seen or child not in dependent:
                    continue
                if child in nodes:
                    return True
                seen.add(child)
                stack.append(child)
    return False


def input_grad(out: torch.Tensor, grad: torch.Tensor | None, inp: torch.Tensor,
               params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, Callable[[], None]]:
    """I: the gradient of ``inp``; and W, a function that accumulates the parameters' gradients
    (into ``.grad``, firing their hooks) when called once, later."""
    root = out.grad_fn
    parents = _parents(root)
    inp_node = get_gradient_edge(inp).node
    dependent = _above([inp_node], parents) - {inp_node}
    frontiers: dict[int, set[Node]] = {}
    plain: list[torch.nn.Parameter] = []  # no frontier: W back-propagates from the output
    for i, p in enumerate(params):
        node = get_gradient_edge(p).node
        if node not in parents:
            continue  # not used by this chunk's graph
        hits = _above([node], parents, stop=dependent)
        if hits:
            frontiers[i] = hits
        else:
            plain.append(p)
    groups = []
    for keys, nodes in _groups(frontiers):
        if len(nodes) > 1 and _nested(nodes, dependent):
            plain += [params[k] for k in keys]
        else:
            groups.append(([params[k] for k in keys], nodes))
    captured: dict[Node, tuple] = {}
    hooks = [n.register_prehook(lambda gs, n=n: captured.__setitem__(n, gs)) for _, nodes in groups for n in nodes]
    try:
        (g,) = torch.autograd.grad(out, inp, grad, retain_graph=True)
    finally:
        for h in hooks:
            h.remove()

    grad = grad if plain else None  # held until W only where the fallback needs it

    def weight_grad() -> None:
        for group_params, nodes in groups:
            edges, grads = [], []
            for n in nodes:
                for k, gk in enumerate(captured.get(n, ())):
                    if gk is not None:
                        edges.append(GradientEdge(n, k))
                        grads.append(gk)
            if edges:
                torch.autograd.backward(edges, grads, inputs=group_params, retain_graph=bool(plain))
        if plain:
            torch.autograd.backward(out, grad, inputs=plain)
        captured.clear()

    return g, weight_grad
