// One node on the canvas: typed, coloured handles, widgets for its literal inputs, run state and images.

import { Handle, type Node, type NodeProps, Position, useConnection } from "@xyflow/react";

import { canConnect, type Catalogue, typeColor, widgetFor } from "../catalogue";
import type { GraphNodeData } from "../graph";
import { canvasActions } from "../canvasActions";
import { actions, getState, useEditor } from "../store";
import { EditableText } from "./EditableText";

/** The socket a link is being dragged from, as "source|node|socket" (or "target|..."), "" if none. */
const draggedFrom = (connection: { inProgress: boolean; fromHandle: { type: string; nodeId: string; id?: string | null } | null }) =>
  connection.inProgress && connection.fromHandle
    ? `${connection.fromHandle.type}|${connection.fromHandle.nodeId}|${connection.fromHandle.id ?? ""}` : "";

/** While a link is dragged: which of this node's sockets could take it ("compatible", lit up) or not. */
function socketFit(catalogue: Catalogue, dragged: string, self: string, kind: "source" | "target", type: string): string {
  if (dragged === "") return "";
  const [fromKind, nodeId, socket] = dragged.split("|");
  if (fromKind === kind || nodeId === self) return "incompatible";
  const node = getState().history.present.nodes.find((n) => n.id === nodeId);
  const spec = node && catalogue.nodes[node.data.nodeType];
  const fromType = fromKind === "source" ? spec?.outputs[socket]?.type : spec?.inputs[socket]?.type;
  if (fromType === undefined) return "";
  const fits = fromKind === "source" ? canConnect(catalogue, fromType, type) : canConnect(catalogue, type, fromType);
  return fits ? "compatible" : "incompatible";
}
import { InputWidget } from "./Widgets";

export function GraphNode({ id, data, selected }: NodeProps<Node<GraphNodeData, "graph">>) {
  const catalogue = useEditor((s) => s.catalogue);
  const linked = useEditor((s) => s.history.present.edges);
  const issues = useEditor((s) => s.issues[id]);
  const media = useEditor((s) => s.media[id]);
  const runState = useEditor((s) => s.nodeRuns[id]);
  const dragged = useConnection(draggedFrom);
  const renameRequest = useEditor((s) => s.renaming?.target === id ? s.renaming.count : 0);
  const spec = catalogue?.nodes[data.nodeType];
  const status = runState?.status ?? "idle";
  const className = ["graph-node", `status-${status}`, selected ? "selected" : "", issues ? "has-issues" : "",
                     data.mode ? `mode-${data.mode}` : ""].join(" ");
  const modeBadge = data.mode && (
    <span className="mode-badge" data-testid={`mode-${id}`} title={data.mode === "bypass"
      ? "bypassed (Ctrl+B): does not run; its outputs pass on its inputs of the same type"
      : "muted (Ctrl+M): does not run"}>{data.mode === "bypass" ? "bypassed" : "muted"}</span>
  );

  if (catalogue === null || spec === undefined) {
    return (
      <div className={className} data-testid={`node-${id}`}>
        <div className="node-title">{data.nodeType} <span className="node-id">{id}</span></div>
        <div className="node-issue">unknown node type {data.nodeType}: no installed pack provides it</div>
      </div>
    );
  }
  const linkedInputs = new Set(linked.filter((edge) => edge.target === id).map((edge) => edge.targetHandle));
  const progress = runState?.progress;
  const titleBar = (
    <div className="node-title" style={data.color ? { background: data.color } : undefined}>
      <button className="nodrag collapse-button" data-testid={`collapse-${id}`} title={data.collapsed ? "expand" : "collapse"}
              onClick={() => canvasActions.toggleCollapsed([id])}>{data.collapsed ? "▸" : "▾"}</button>
      <EditableText text={data.title ?? spec.display_name} placeholder={spec.display_name} testId={`title-${id}`} className="node-name"
                    editRequest={renameRequest}
                    onCommit={(title) => canvasActions.setNodeLook({ title: title === spec.display_name ? "" : title }, [id])} />
      {data.title && <span className="node-type">{spec.display_name}</span>}
      <span className="node-id">{id}</span>{modeBadge}
    </div>
  );
  const look = data.color ? { borderColor: data.color } : undefined;
  if (data.collapsed) {
    // Drawn as its title bar; the sockets stay (at its ends) so its links still show.
    return (
      <div className={`${className} collapsed`} data-testid={`node-${id}`} data-status={status} data-mode={data.mode}
           data-collapsed="true" title={spec.description} style={look}>
        {titleBar}
        {Object.entries(spec.inputs).map(([name, input]) => (
          <Handle key={name} type="target" position={Position.Left} id={name} className="socket collapsed-socket"
                  style={{ background: typeColor(catalogue, input.type) }} isConnectable={false} />
        ))}
        {Object.entries(spec.outputs).map(([name, output]) => (
          <Handle key={name} type="source" position={Position.Right} id={name} className="socket collapsed-socket"
                  style={{ background: typeColor(catalogue, output.type) }} isConnectable={false} />
        ))}
      </div>
    );
  }
  return (
    <div className={className} data-testid={`node-${id}`} data-status={status} data-mode={data.mode} title={spec.description}
         style={look}>
      {titleBar}
      {status === "running" && (
        <div className="node-progress" data-testid={`progress-${id}`}>
          <div style={{ width: progress ? `${(100 * progress[0]) / Math.max(progress[1], 1)}%` : "0%" }} />
        </div>
      )}
      {issues?.[""]?.map((message) => <div key={message} className="node-issue">{message}</div>)}
      {runState?.error && <div className="node-issue">{runState.error}</div>}
      <div className="node-body">
        {Object.entries(spec.inputs).map(([name, input]) => {
          const widget = widgetFor(name, input);
          const isLinked = linkedInputs.has(name);
          return (
            <div className="node-input" key={name}>
              <Handle type="target" position={Position.Left} id={name}
                      className={`socket ${socketFit(catalogue, dragged, id, "target", input.type)}`}
                      style={{ background: typeColor(catalogue, input.type) }} title={`${name}: ${input.type}`} />
              <span className="socket-label" title={input.description} data-testid={`label-in-${name}`}>
                {name}{input.required && !isLinked && widget.kind === "none" ? " *" : ""}
              </span>
              {!isLinked && (
                <InputWidget nodeId={id} name={name} spec={input} widget={widget} value={data.values[name]}
                             randomize={data.randomize?.includes(name) ?? false} />
              )}
              {issues?.[name]?.map((message) => (
                <div key={message} className="node-issue" data-testid={`issue-${id}-${name}`}>{message}</div>
              ))}
            </div>
          );
        })}
        {Object.entries(spec.outputs).map(([name, output]) => (
          <div className="node-output" key={name}>
            <span className="socket-label" title={output.description} data-testid={`label-out-${name}`}>{name}</span>
            <Handle type="source" position={Position.Right} id={name}
                    className={`socket ${socketFit(catalogue, dragged, id, "source", output.type)}`}
                    style={{ background: typeColor(catalogue, output.type) }} title={`${name}: ${output.type}`} />
          </div>
        ))}
      </div>
      {media && (media.kind === "image"
        ? <img className="node-media clickable" data-testid={`media-${id}`} data-kind="image" src={media.src} alt={`${id} image`}
               title="click to see it large" onClick={() => actions.openViewer(media.images ?? [media.src], (media.images?.length ?? 1) - 1, media.runId)} />
        : <img className="node-media" data-testid={`media-${id}`} data-kind="preview" src={media.src} alt={`${id} preview`} />)}
    </div>
  );
}
