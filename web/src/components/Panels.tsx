// The node palette: the catalogue's node types by category, searchable; click or drag one onto the canvas.

import { useState } from "react";

import { paletteGroups } from "../catalogue";
import { useEditor } from "../store";

export const PALETTE_DRAG_TYPE = "application/x-nodegraph-type";

export function Palette({ onAdd }: { onAdd: (type: string) => void }) {
  const catalogue = useEditor((s) => s.catalogue);
  const [search, setSearch] = useState("");
  const [closed, setClosed] = useState<Set<string>>(new Set());
  if (catalogue === null) return <aside className="palette">loading nodes…</aside>;
  const groups = paletteGroups(catalogue, search);
  const toggle = (category: string) => {
    const next = new Set(closed);
    if (next.has(category)) next.delete(category);
    else next.add(category);
    setClosed(next);
  };
  return (
    <aside className="palette" data-testid="palette">
      <input className="palette-search" type="search" placeholder="search nodes" value={search}
             data-testid="palette-search" onChange={(event) => setSearch(event.target.value)} />
      {groups.map(([category, specs]) => (
        <section key={category}>
          <h3 onClick={() => toggle(category)}>{closed.has(category) && !search ? "▸" : "▾"} {category}</h3>
          {(!closed.has(category) || search) && specs.map((spec) => (
            <div key={spec.type} className="palette-item" title={spec.description} draggable
                 data-testid={`palette-${spec.type}`}
                 onDragStart={(event) => event.dataTransfer.setData(PALETTE_DRAG_TYPE, spec.type)}
                 onClick={() => onAdd(spec.type)}>
              {spec.display_name}
            </div>
          ))}
        </section>
      ))}
      {groups.length === 0 && <p className="muted">no node matches “{search}”</p>}
    </aside>
  );
}
