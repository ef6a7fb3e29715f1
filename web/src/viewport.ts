// Where the canvas looks when a workflow is opened: all of it if it fits at a zoom where text is
// readable, else its top-left part at that zoom (a graph reads from its left, where it starts).

export interface Rect {
  x: number;
  y: number;
  width: number;
  height: number;
}

export interface Viewport {
  x: number;
  y: number;
  zoom: number;
}

/** The smallest zoom a workflow is opened at: 13 px socket labels stay above 10 px on screen. */
export const READABLE_ZOOM = 0.8;
/** The largest: nodes are never drawn larger than their size. */
export const FIT_MAX_ZOOM = 1;

/** The viewport showing `bounds` (canvas coordinates) in a `width` x `height` view with `padding`
 *  pixels around it, zoomed to fit between READABLE_ZOOM and FIT_MAX_ZOOM; centred along each axis
 *  that fits, aligned to the top or left along one that does not. */
export function fitViewport(bounds: Rect, width: number, height: number, padding = 24): Viewport {
  const fit = Math.min((width - 2 * padding) / bounds.width, (height - 2 * padding) / bounds.height);
  const zoom = Math.max(READABLE_ZOOM, Math.min(FIT_MAX_ZOOM, fit));
  const place = (start: number, size: number, view: number) => {
    const drawn = size * zoom;
    return drawn + 2 * padding <= view ? (view - drawn) / 2 - start * zoom : padding - start * zoom;
  };
  return { x: place(bounds.x, bounds.width, width), y: place(bounds.y, bounds.height, height), zoom };
}
