// The node search box: opened by a double-click on the canvas or a link let go in empty space; Enter
// (or a click) adds the highlighted node there, arrows move the highlight, Escape closes it.

import { useEffect, useRef, useState } from "react";

import { searchNodes } from "../nodeSearch";
import { actions, useEditor } from "../store";

const SHOWN = 60;
const BOX = { width: 360, height: 470 };

export function NodeSearch() {
  const search = useEditor((s) => s.search);
  const catalogue = useEditor((s) => s.catalogue);
  const usage = useEditor((s) => s.usage);
  const [query, setQuery] = useState("");
  const [active, setActive] = useState(0);
  const list = useRef<HTMLUListElement>(null);
  useEffect(() => {
    setQuery("");
    setActive(0);
  }, [search]);
  useEffect(() => {
    list.current?.querySelector(".active")?.scrollIntoView({ block: "nearest" });
  }, [active]);
  if (search === null || catalogue === null) return null;
  const hits = searchNodes(catalogue, query, search.link, usage).slice(0, SHOWN);
  const choose = (index: number) => {
    const hit = hits[index];
    if (hit !== undefined) actions.addFromSearch(hit.spec.type, hit.socket);
  };
  const left = Math.max(4, Math.min(search.screen.x, window.innerWidth - BOX.width - 4));
  const top = Math.max(4, Math.min(search.screen.y, window.innerHeight - BOX.height - 4));
  return (
    <div className="search-backdrop" onMouseDown={actions.closeSearch} onContextMenu={(event) => event.preventDefault()}>
      <div className="node-search" data-testid="node-search" style={{ left, top, width: BOX.width, maxHeight: BOX.height }}
           onMouseDown={(event) => event.stopPropagation()}>
        <input autoFocus value={query} placeholder={search.link ? `a node that takes ${search.link.type}…` : "search nodes…"}
               data-testid="node-search-input" spellCheck={false}
               onChange={(event) => { setQuery(event.target.value); setActive(0); }}
               onKeyDown={(event) => {
                 if (event.key === "Enter") choose(active);
                 else if (event.key === "Escape") actions.closeSearch();
                 else if (event.key === "ArrowDown") setActive(Math.min(active + 1, hits.length - 1));
                 else if (event.key === "ArrowUp") setActive(Math.max(active - 1, 0));
                 else return;
                 event.preventDefault();
               }} />
        {search.link && (
          <div className="search-filter muted">
            {search.link.from === "output" ? "takes" : "gives"} <b>{search.link.type}</b> ({search.link.nodeId}.{search.link.socket})
          </div>
        )}
        <ul ref={list} className="search-hits" data-testid="node-search-hits">
          {hits.map((hit, index) => (
            <li key={hit.spec.type} className={index === active ? "active" : ""} data-testid={`search-hit-${hit.spec.type}`}
                title={hit.spec.description} onMouseEnter={() => setActive(index)} onClick={() => choose(index)}>
              <span className="hit-name">{hit.spec.display_name}</span>
              <span className="hit-detail">{hit.comfyName ?? (hit.spec.display_name.replace(/\s/g, "") !== hit.spec.type ? hit.spec.type : "")}</span>
              <span className="hit-category">{hit.spec.category}</span>
            </li>
          ))}
          {hits.length === 0 && <li className="muted">no node matches “{query}”</li>}
        </ul>
      </div>
    </div>
  );
}
