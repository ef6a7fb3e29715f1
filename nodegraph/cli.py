"""The `nodegraph` command line: run, validate, convert, list nodes, print the workflow schema."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from . import events as ev
from .event_json import event_json
from .events import Event
from .executor import Executor, RunResult
from .files import atomic_write
from .importers import is_native
from .json_values import JsonRefused, decode_json, json_problems
from .node import CancelToken
from .plugins import DEFAULT_NODES_DIR, PackProblem, build_registry
from .registry import NodeRegistry
from .validation import WorkflowInvalid, parse_document
from .workflow import Workflow, document_schema

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad command-line arguments or files; exit code 2."""


THREADS_ENV = "NODEGRAPH_THREADS"
"""How many CPU threads packs compute with: a number, or "auto" (each pack's own policy; the
diffusion pack's picks per run from the work size and the cores other programs leave free)."""


def _threads(text: str) -> str:
    """A --threads value: "auto" or a whole number of at least 1."""
    value = text.strip()
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected a number of threads (1 or more) or 'auto', got {text!r}")
    return value


COMPILE_ENV = "NODEGRAPH_COMPILE"
"""Whether packs compile their models and how: "1" or a mode name, which the pack checks (the
diffusion pack: torch.compile's modes default, reduce-overhead, max-autotune, ...)."""


def _apply_compute_options(args: argparse.Namespace) -> None:
    """--threads and --compile reach the packs through the environment (the engine imports no
    compute library)."""
    if args.threads is not None:
        os.environ[THREADS_ENV] = args.threads
    if args.compile is not None:
        os.environ[COMPILE_ENV] = args.compile


def _parse_assignment(text: str) -> tuple[str, str, Any]:
    target, sep, raw = text.partition("=")
    node_id, dot, input_name = target.rpartition(".")
    if not sep or not dot or not node_id or not input_name:
        raise UsageError(f"--set {text[:100]!r}: expected NODE.INPUT=VALUE")
    try:
        value = decode_json(raw, f"--set {target}")
    except JsonRefused as error:
        if error.code != "invalid_json":  # JSON, but not acceptable (too deep, a number too long, NaN)
            raise UsageError(str(error)) from None
        value = raw  # plain text needs no JSON quotes
    return node_id, input_name, value


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read workflow {path}: {error.strerror}") from None


def _import(registry: NodeRegistry, data: bytes) -> tuple[Any, str | None]:
    """The decoded document, converted if it is in a foreign format a pack imports, and the
    importer's name (None: not converted)."""
    try:
        document = decode_json(data)
    except JsonRefused:  # not acceptable JSON: parse_document reports where and why
        return data, None
    if json_problems(document):  # too deep, NaN, ...: validation reports it, no importer need read it
        return document, None
    return registry.import_document(document)


def read_workflow(path: str, assignments: list[str], registry: NodeRegistry | None = None) -> Workflow:
    """Read and parse a workflow file and apply `--set` overrides to it. With a registry, a file in
    a foreign format (e.g. ComfyUI's) that one of its packs imports is converted first."""
    data = _read_file(path)
    document, importer = _import(registry, data) if registry is not None else (data, None)
    if importer is not None:
        logging.getLogger(__name__).info("%s: converted from %s", path, importer)
    workflow = parse_document(document, source=path)
    for text in assignments:
        node_id, input_name, value = _parse_assignment(text)
        if node_id not in workflow.nodes:
            raise UsageError(f"--set {text!r}: the workflow has no node {node_id!r} (nodes: {', '.join(workflow.nodes)})")
        workflow.nodes[node_id].inputs[input_name] = value
    return workflow


def _print_problems(problems: list[PackProblem]) -> None:
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)


def _print_issues(issues: list, out: TextIO) -> None:
    print(f"invalid workflow: {len(issues)} problem{'s' if len(issues) != 1 else ''}", file=out)
    for issue in issues:
        print(f"  - {issue}", file=out)


class ProgressDisplay:
    """Turns run events into terminal output: a live status line on a TTY, plain lines otherwise."""

    def __init__(self, out: TextIO, live: bool) -> None:
        self.out = out
        self.live = live
        self.total = 0
        self.done = 0
        self.current = ""
        self.width = 0

    def _line(self, text: str) -> None:
        if self.live:
            self.out.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def _end_line(self) -> None:
        if self.live and self.width:
            self.out.write("\n")
            self.width = 0

    def __call__(self, event: Event) -> None:
        kind, data = event.type, event.data
        if kind == ev.RUN_STARTED:
            self.total = len(data["nodes"])
        elif kind == ev.NODE_STARTED:
            self.current = f"{event.node_id} ({data['node_type']})"
            if self.live:
                self._line(f"[{self.done + 1}/{self.total}] {self.current}")
        elif kind == ev.NODE_PROGRESS:
            value, total = data["value"], max(data["max"], 1)
            filled = int(20 * value / total)
            bar = "#" * filled + "-" * (20 - filled)
            if self.live or value == total or value == 1:
                self._line(f"[{self.done + 1}/{self.total}] {self.current} [{bar}] {value}/{total}")
        elif kind in (ev.NODE_FINISHED, ev.NODE_CACHED):
            self.done += 1
            if not self.live:
                what = f"{event.node_id}: cached" if kind == ev.NODE_CACHED else f"{self.current} done in {data['seconds']:.2f}s"
                self._line(f"[{self.done}/{self.total}] {what}")
        elif kind in ev.RUN_ENDED:
            self._end_line()


def _run_result_json(result: RunResult) -> dict[str, Any]:
    return {"run_id": result.run_id, "status": result.status, "seconds": result.seconds, "files": result.files,
            "executed": result.executed, "cached": result.cached,
            "error": result.error.to_json() if result.error else None}


def cmd_run(args: argparse.Namespace) -> int:
    _apply_compute_options(args)
    registry, problems = build_registry(args.nodes_dir or [DEFAULT_NODES_DIR])
    _print_problems(problems)
    try:
        workflow = read_workflow(args.workflow, args.set, registry)
        executor = Executor(registry, device=args.device, output_dir=args.output_dir)
        plan = executor.compile(workflow, args.output or None)
    except WorkflowInvalid as invalid:
        if args.json:
            print(json.dumps({"status": "invalid", "issues": [i.to_json() for i in invalid.issues]}))
        else:
            _print_issues(invalid.issues, sys.stderr)
        return EXIT_INVALID

    cancel = CancelToken()

    def on_sigint(signum: int, frame: Any) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()
        print("\ncancelling (Ctrl-C again to abort)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    if args.json:
        sink = lambda event: print(json.dumps(event_json(event)), flush=True)  # noqa: E731
    else:
        sink = ProgressDisplay(sys.stderr, live=sys.stderr.isatty())
    try:
        result = executor.run(plan, on_event=sink, cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, previous)

    if args.json:
        print(json.dumps({"result": _run_result_json(result)}))
    elif result.status == "failed" and result.error is not None:
        print(f"error: {result.error}", file=sys.stderr)
        if args.verbose:
            print(result.error.traceback, file=sys.stderr)
    elif result.status == "cancelled":
        print("cancelled", file=sys.stderr)
    else:
        for path in result.files:
            print(path)
        print(f"finished in {result.seconds:.2f}s ({len(result.executed)} nodes run, {len(result.cached)} cached)",
              file=sys.stderr)
    return {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}[result.status]


def cmd_validate(args: argparse.Namespace) -> int:
    registry, problems = build_registry(args.nodes_dir or [DEFAULT_NODES_DIR])
    _print_problems(problems)
    try:
        Executor(registry).compile(read_workflow(args.workflow, [], registry))
    except WorkflowInvalid as invalid:
        if args.json:
            print(json.dumps({"valid": False, "issues": [i.to_json() for i in invalid.issues]}, indent=2))
        else:
            _print_issues(invalid.issues, sys.stdout)
        return EXIT_INVALID
    print(json.dumps({"valid": True}) if args.json else f"{args.workflow}: valid")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    registry, problems = build_registry(args.nodes_dir or [DEFAULT_NODES_DIR])
    _print_problems(problems)
    document, importer = _import(registry, _read_file(args.input))
    if importer is None:
        if isinstance(document, bytes):
            parse_document(document, source=args.input)  # reports the JSON syntax error and its position
        if is_native(document):
            raise UsageError(f"{args.input} is already a nodegraph workflow; nothing to convert")
        known = ", ".join(i.name for i in registry.importers) or "none loaded"
        raise UsageError(f"{args.input}: not a nodegraph workflow, and no importer recognises it (importers: {known})")
    workflow = parse_document(document, source=args.input)
    atomic_write(Path(args.output), (json.dumps(workflow.to_json(), indent=2) + "\n").encode())
    print(f"converted {args.input} ({importer}, {len(workflow.nodes)} nodes) to {args.output}")
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    registry, problems = build_registry(args.nodes_dir or [DEFAULT_NODES_DIR])
    _print_problems(problems)
    catalogue = registry.catalogue()
    if args.query:
        query = args.query.casefold()
        catalogue["nodes"] = {name: info for name, info in catalogue["nodes"].items()
                              if any(query in text.casefold() for text in
                                     (name, info.get("display_name", ""), *info["aliases"]))}
        if not catalogue["nodes"]:
            print(f"no node type, display name or other tool's name contains {args.query!r}", file=sys.stderr)
            return EXIT_INVALID
    if args.json:
        print(json.dumps(catalogue, indent=2, default=str))
        return EXIT_OK
    by_category: dict[str, list[dict[str, Any]]] = {}
    for info in catalogue["nodes"].values():
        by_category.setdefault(info["category"], []).append(info)
    for category in sorted(by_category):
        print(f"{category}:")
        for info in by_category[category]:
            print(f"  {info['type']} - {info['description']}")
            other_names = [name for name in info["aliases"] if name != info["type"]]
            if other_names:
                print(f"      also known as: {', '.join(other_names)}")
            for name, spec in info["inputs"].items():
                detail = spec["type"] + ("" if spec["required"] else f" = {spec.get('default')!r}")
                if "choices" in spec:
                    detail += f" one of {spec['choices'][:8]}"
                print(f"      in  {name}: {detail}")
            for name, spec in info["outputs"].items():
                print(f"      out {name}: {spec['type']}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    registry, problems = build_registry(args.nodes_dir or [DEFAULT_NODES_DIR])
    _print_problems(problems)
    print(json.dumps(document_schema(registry), indent=2, default=str))
    return EXIT_OK


def _ray_backend(args: argparse.Namespace) -> Any:
    """The Ray backend `serve --backend ray` asks for, connected to its cluster."""
    try:
        from .server.ray_backend import RayBackend, RayPoolConfig  # Ray is an optional extra
    except ImportError as error:
        raise UsageError(f"--backend ray needs Ray, which cannot be imported ({error}); install it with "
                         "pip install 'nodegraph[ray]'") from None
    given = {name: value for name, value in (("workers_per_node", args.ray_workers_per_node),
                                             ("cpus_per_worker", args.ray_cpus_per_worker)) if value is not None}
    try:
        config = RayPoolConfig(address=args.ray_address, device=args.device,
                               nodes_dirs=tuple(args.nodes_dir or [DEFAULT_NODES_DIR]), **given)
    except ValueError as error:
        raise UsageError(f"--backend ray: {error}") from None
    backend = RayBackend(config)
    try:
        backend.connect()
    except ConnectionError as error:
        raise UsageError(f"cannot reach the Ray cluster at {args.ray_address or '$RAY_ADDRESS'}: {error}") from None
    return backend


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import LOOPBACK_NAMES, new_token, serve  # aiohttp is needed only here

    ray_options = [option for option, value in (("--ray-address", args.ray_address),
                                                ("--ray-workers-per-node", args.ray_workers_per_node),
                                                ("--ray-cpus-per-worker", args.ray_cpus_per_worker)) if value is not None]
    if args.backend != "ray" and ray_options:
        raise UsageError(f"{', '.join(ray_options)}: only with --backend ray")

    _apply_compute_options(args)
    # Packs that list input images (LoadImage) read $NODEGRAPH_INPUTS: uploads land where they look.
    inputs_dir = args.inputs_dir or Path(os.environ.get("NODEGRAPH_INPUTS") or "inputs")
    os.environ["NODEGRAPH_INPUTS"] = str(inputs_dir)
    registry, problems = build_registry(args.nodes_dir or [DEFAULT_NODES_DIR])
    _print_problems(problems)
    beyond_loopback = args.listen not in LOOPBACK_NAMES
    token = args.token or os.environ.get("NODEGRAPH_TOKEN") or (new_token() if beyond_loopback else None)
    shown_host = f"[{args.listen}]" if ":" in args.listen else args.listen
    address = f"http://{shown_host}:{args.port}/"
    if token is not None:
        address += f"?token={token}"
        if beyond_loopback:
            print("serving beyond this machine: every request needs the access token", file=sys.stderr)
    backend = _ray_backend(args) if args.backend == "ray" else None
    print(f"serving on {address}", file=sys.stderr)
    serve(registry, args.db, host=args.listen, port=args.port, output_dir=args.output_dir, device=args.device,
          token=token, inputs_dir=inputs_dir, workflows_dir=args.workflows_dir, backend=backend,
          **({"editor_dir": args.editor_dir} if args.editor_dir else {}))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodegraph", description="Run and inspect nodegraph workflows.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and print tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_compute(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--threads", type=_threads, metavar="N|auto",
                       help=f"CPU threads a run computes with (default: ${THREADS_ENV}, else auto: chosen per run "
                            "from the work size and the cores other programs leave free)")
        p.add_argument("--compile", action="store_const", const="default",
                       help="compile the models (the first run of a model is slower, later runs of it faster; "
                            f"default: ${COMPILE_ENV}, else not compiled)")
        p.add_argument("--compile-mode", dest="compile", metavar="MODE",
                       help="compile in this mode; the diffusion pack's: default, reduce-overhead (CUDA graphs), "
                            "max-autotune, max-autotune-no-cudagraphs")
        return p

    def with_nodes_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--nodes-dir", action="append", type=Path, metavar="DIR",
                       help=f"load node packs from DIR (repeatable; default ./{DEFAULT_NODES_DIR})")
        return p

    run = with_compute(with_nodes_dir(sub.add_parser("run", help="run a workflow file (or a ComfyUI one a pack imports)")))
    run.add_argument("workflow")
    run.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input (VALUE is JSON, or plain text)")
    run.add_argument("--output", action="append", metavar="NODE", help="run only what this node needs (repeatable)")
    run.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where output files go (default outputs/)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    run.add_argument("--json", action="store_true", help="print events and the result as JSON lines")
    run.set_defaults(handler=cmd_run)

    validate = with_nodes_dir(sub.add_parser("validate", help="check a workflow without running it"))
    validate.add_argument("workflow")
    validate.add_argument("--json", action="store_true")
    validate.set_defaults(handler=cmd_validate)

    convert = with_nodes_dir(sub.add_parser(
        "convert", help="convert a workflow in a foreign format (e.g. ComfyUI API or UI JSON) to a nodegraph workflow"))
    convert.add_argument("input")
    convert.add_argument("output", help="where the nodegraph workflow is written (replaced if it exists)")
    convert.set_defaults(handler=cmd_convert)

    nodes = with_nodes_dir(sub.add_parser("nodes", help="list node types with their inputs and outputs"))
    nodes.add_argument("query", nargs="?", help="only node types whose name, display name or another tool's "
                                                "name for them (ComfyUI's, say) contains this, any case")
    nodes.add_argument("--json", action="store_true")
    nodes.set_defaults(handler=cmd_nodes)

    schema = with_nodes_dir(sub.add_parser("schema", help="print the workflow JSON Schema"))
    schema.set_defaults(handler=cmd_schema)

    serve = with_compute(with_nodes_dir(sub.add_parser("serve", help="run the HTTP/WebSocket API server")))
    serve.add_argument("--listen", "--host", dest="listen", default="127.0.0.1", metavar="ADDRESS",
                       help="address to listen on (default 127.0.0.1, this machine only; any other address "
                            "requires an access token)")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--token", help="access token (default: $NODEGRAPH_TOKEN, or generated and printed when "
                                       "listening beyond this machine)")
    serve.add_argument("--db", type=Path, default=Path("nodegraph-runs.sqlite"), help="run queue and history database")
    serve.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where output files go (default outputs/)")
    serve.add_argument("--inputs-dir", type=Path, help="where uploaded images go, and where image nodes look "
                                                        "(default: $NODEGRAPH_INPUTS, else inputs/)")
    serve.add_argument("--workflows-dir", type=Path, default=Path("workflows"),
                       help="saved workflows the editor lists (default workflows/)")
    serve.add_argument("--editor-dir", type=Path, help="the built editor to serve (default: the one installed with "
                                                       "nodegraph, else web/dist of this checkout)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    serve.add_argument("--backend", choices=["local", "ray"], default="local",
                       help="where runs execute: local (this process, one at a time; the default) or ray (a pool "
                            "of Ray workers, one per GPU or --ray-workers-per-node per machine; needs nodegraph[ray])")
    serve.add_argument("--ray-address", metavar="ADDRESS",
                       help="the Ray cluster to join (auto, HOST:6379); default $RAY_ADDRESS, else a new one on "
                            "this machine")
    serve.add_argument("--ray-workers-per-node", type=int, metavar="N",
                       help="CPU workers per machine, when the cluster has no GPUs or --device is cpu (default 1)")
    serve.add_argument("--ray-cpus-per-worker", type=float, metavar="N",
                       help="CPUs each Ray worker reserves and uses (default 1)")
    serve.set_defaults(handler=cmd_serve)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    except WorkflowInvalid as invalid:
        _print_issues(invalid.issues, sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return EXIT_CANCELLED
