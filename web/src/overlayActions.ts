// What opens over the canvas and beside it: the node search (and the node chosen in it), the title being
// renamed, the right-click menu, the image viewer, the shortcut sheet and the minimap.

import { type ContextMenu, currentGraph as graph, getState, type SearchRequest, set } from "./editorState";
import { connect, connectionProblem, linkUnambiguousInputs, removeItems } from "./graph";
import { commit, NODE_WIDTH, withNewNode } from "./graphActions";
import { say } from "./messages";

export const MINIMAP_KEY = "nodegraph.minimap";
let searchSerial = 0;

export const overlayActions = {
  /** Start typing over the title of a node (or "group:<id>"). */
  startRenaming(target: string): void {
    set({ renaming: { target, count: (getState().renaming?.count ?? 0) + 1 } });
  },

  openSearch(request: SearchRequest): void {
    searchSerial += 1;
    set({ search: { ...request, serial: searchSerial }, menu: null });
  },

  /** Close the search without choosing. A link pulled off an input for it stays off. */
  closeSearch(): void {
    const link = getState().search?.link;
    set({ search: null });
    if (link?.replaces !== undefined) commit(removeItems(graph(), new Set(), new Set([link.replaces])));
  },

  /** Add the node chosen in the search where it was opened; with a dragged link, joined by it (the new
   *  node placed so the socket is near where the link was let go), and its other required link inputs
   *  linked where only one output fits. One undo step. */
  addFromSearch(type: string, socket?: string): string | null {
    const { search, catalogue } = getState();
    if (search === null || catalogue === null) return null;
    const link = search.link;
    const at = link?.from === "input" ? { x: search.at.x - NODE_WIDTH, y: search.at.y - 20 } : { x: search.at.x, y: search.at.y - 20 };
    let base = graph();
    if (link?.replaces !== undefined) base = removeItems(base, new Set(), new Set([link.replaces]));
    const added = withNewNode(base, type, at);
    if (added === null) return null;
    let next = added.graph;
    if (link !== undefined && socket !== undefined) {
      const connection = link.from === "output"
        ? { source: link.nodeId, sourceHandle: link.socket, target: added.id, targetHandle: socket }
        : { source: added.id, sourceHandle: socket, target: link.nodeId, targetHandle: link.socket };
      if (connectionProblem(catalogue, next, connection) === null) next = connect(next, connection);
    }
    const filled = linkUnambiguousInputs(catalogue, next, added.id);
    set({ search: null });
    commit(filled.graph);
    if (filled.linked.length > 0) {
      say(`linked ${filled.linked.map((l) => `${l.targetHandle} from ${l.source}`).join(", ")} (the only fitting outputs)`);
    }
    return added.id;
  },

  /** Show images large, starting at `index`; `runId`: the run that made them. */
  openViewer(images: string[], index: number, runId: string): void {
    if (images.length > 0) set({ viewer: { images, index: Math.max(0, Math.min(index, images.length - 1)), runId } });
  },

  /** Step through the viewer's images (wrapping around). */
  stepViewer(delta: number): void {
    const viewer = getState().viewer;
    if (viewer === null) return;
    const count = viewer.images.length;
    set({ viewer: { ...viewer, index: (viewer.index + delta + count) % count } });
  },

  closeViewer(): void {
    set({ viewer: null });
  },

  openMenu(menu: ContextMenu): void {
    set({ menu });
  },

  closeMenu(): void {
    if (getState().menu !== null) set({ menu: null });
  },

  toggleShortcuts(): void {
    set({ showShortcuts: !getState().showShortcuts });
  },

  /** Show or hide the minimap; the choice is kept for the next visit. */
  toggleMinimap(): void {
    const show = !getState().showMinimap;
    set({ showMinimap: show });
    try {
      localStorage.setItem(MINIMAP_KEY, show ? "shown" : "hidden");
    } catch {
      // No storage: the choice holds for this page only.
    }
  },
};
