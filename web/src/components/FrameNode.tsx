// A group on the canvas: a titled, coloured frame behind the nodes; dragged by its title bar (moving
// what lies inside), resized from its edges when selected. Its body lets clicks through to the canvas.

import { type Node, type NodeProps, NodeResizer } from "@xyflow/react";

import { canvasActions } from "../canvasActions";
import { useEditor } from "../store";
import type { Group } from "../uiElements";
import { EditableText } from "./EditableText";

export type FrameData = { group: Group };

export function FrameNode({ data, selected }: NodeProps<Node<FrameData, "frame">>) {
  const { group } = data;
  const renameRequest = useEditor((s) => s.renaming?.target === `group:${group.id}` ? s.renaming.count : 0);
  return (
    <>
      <NodeResizer isVisible={selected} minWidth={140} minHeight={90} color={group.color} />
      <div className="frame" data-testid={`group-${group.id}`} style={{ borderColor: group.color, background: `${group.color}26` }}>
        <div className="frame-title" style={{ background: group.color }}>
          <EditableText text={group.title} placeholder="Group" testId={`group-title-${group.id}`} editRequest={renameRequest}
                        onCommit={(title) => canvasActions.updateGroup(group.id, { title })} />
        </div>
      </div>
    </>
  );
}
