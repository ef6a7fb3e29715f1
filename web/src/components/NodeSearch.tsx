// The node search box: opened by a double-click on the canvas or a link let go in empty space; Enter
// (or a click) adds the highlighted node there, arrows move the highlight, Escape closes it.

import { useEffect, useRef, useState } from "react";

import { canvasActions } from "../canvasActions";
import { searchNodes } from "../nodeSearch";
import type { Catalogue } from "../catalogue";
import { actions, getState, type SearchRequest, useEditor } from "../store";

const SHOWN = 60;

/** Canvas things the search also adds (not node types): found by these words. */
const EXTRAS = [
  { key: "@note", name: "Note", detail: "markdown text", words: ["note", "markdown", "comment", "text"],
    add: (at: { x: number; y: number }) => canvasActions.addNote(at) },
  { key: "@group", name: "Group", detail: "a frame that moves its nodes", words: ["group", "frame"],
    add: (at: { x: number; y: number }) => canvasActions.addGroup([at.x, at.y, 480, 320]) },
];
const BOX = { width: 360, height: 470 };

export function NodeSearch() {
  const search = useEditor((s) => s.search);
  const catalogue = useEditor((s) => s.catalogue);
  if (search === null || catalogue === null) return null;
  // A new box for each opening: it starts from the text typed to open it.
  return <SearchBox key={search.serial} search={search} catalogue={catalogue} />;
}

function SearchBox({ search, catalogue }: { search: SearchRequest; catalogue: Catalogue }) {
  const usage = useEditor((s) => s.usage);
  const [query, setQuery] = useState(search.query ?? "");
  const [active, setActive] = useState(0);
  const list = useRef<HTMLUListElement>(null);
  useEffect(() => {
    list.current?.querySelector(".active")?.scrollIntoView({ block: "nearest" });
  }, [active]);
  const hits = searchNodes(catalogue, query, search.link, usage).slice(0, SHOWN);
  const typed = query.trim().toLowerCase();
  const extras = search.link || typed.length < 2 ? [] : EXTRAS.filter((extra) => extra.words.some((word) => word.startsWith(typed)));
  const choose = (index: number) => {
    if (index < extras.length) {
      const at = getState().search?.at;
      actions.closeSearch();
      if (at) extras[index].add(at);
      return;
    }
    const hit = hits[index - extras.length];
    if (hit !== undefined) actions.addFromSearch(hit.spec.type, hit.socket);
  };
  const count = extras.length + hits.length;
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
                 else if (event.key === "ArrowDown") setActive(Math.min(active + 1, count - 1));
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
          {extras.map((extra, index) => (
            <li key={extra.key} className={index === active ? "active" : ""} data-testid={`search-hit-${extra.key}`}
                onMouseEnter={() => setActive(index)} onClick={() => choose(index)}>
              <span className="hit-name">{extra.name}</span>
              <span className="hit-detail">{extra.detail}</span>
              <span className="hit-category">canvas</span>
            </li>
          ))}
          {hits.map((hit, i) => ({ hit, index: i + extras.length })).map(({ hit, index }) => (
            <li key={hit.spec.type} className={index === active ? "active" : ""} data-testid={`search-hit-${hit.spec.type}`}
                title={hit.spec.description} onMouseEnter={() => setActive(index)} onClick={() => choose(index)}>
              <span className="hit-name">{hit.spec.display_name}</span>
              <span className="hit-detail">{hit.alias ?? (hit.spec.display_name.replace(/\s/g, "") !== hit.spec.type ? hit.spec.type : "")}</span>
              <span className="hit-category">{hit.spec.category}</span>
            </li>
          ))}
          {count === 0 && <li className="muted">no node matches “{query}”</li>}
        </ul>
      </div>
    </div>
  );
}
